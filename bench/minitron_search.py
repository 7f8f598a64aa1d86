"""Architecture search against Minitron's hand-picked shape, on the real SmolLM2-135M, healed alike.

The hand-picked shape is the minitron recipe's: depth pruning of 20% of the layers (Block
Influence), then width pruning to 70% of what is left (one common shrink of MLP, heads and
hidden). The searched shape is the ``search`` prune method's choice at the *same* parameter count
(``target_params`` = the hand-picked model's count, within the search's tolerance). Each stage is
the shipped one, run through ``slimforge.run_stage`` with its preset and the recipe's settings;
both students are then healed by the same ``kd`` stage (same steps, lr, data and seed).

Every model is scored by bench/quant_quality.py's scorer against the teacher's logits: perplexity,
mean per-token KL(teacher || model) and top-1 agreement, on held-out Shakespeare blocks (in
domain: the stages train and calibrate on the other plays) and on Wikipedia paragraphs (out of
domain: nothing here saw them). Retention = teacher perplexity / model perplexity; the last
table gives searched / hand-picked from this same run (the baseline is the hand-picked shape).

    .venv/bin/python bench/minitron_search.py            # the full run: the minitron recipe's settings
    .venv/bin/python bench/minitron_search.py --quick    # a smoke run (tiny settings; ~14 min on 2 busy cores)
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from quant_quality import Scorer  # noqa: E402

import slimforge  # noqa: E402
from slimforge import arch  # noqa: E402
from slimforge.config import DataConfig  # noqa: E402
from slimforge.data import blocks_tensor, build_data  # noqa: E402
from slimforge.models import asset_model_folder, load_model  # noqa: E402

TEACHER = "smollm2-135m"
# (full, --quick) settings: calibration, the search's grid and short heal, the KD heal both students get.
SETTINGS = {
    "full": {"calib": {"num_samples": 64, "seq_len": 256}, "depth_calib": {"num_samples": 32, "seq_len": 256},
             "search": {"heal_steps": 10, "heal_batch_size": 4, "score_blocks": 8, "max_candidates": 16},
             "heal": {"steps": 60, "lr": 5.0e-4, "warmup_steps": 6, "batch_size": 8, "eval_every": 30},
             "eval_blocks": 16, "ood_blocks": 16, "block_size": 256},
    "quick": {"calib": {"num_samples": 8, "seq_len": 128}, "depth_calib": {"num_samples": 8, "seq_len": 128},
              "search": {"heal_steps": 2, "heal_batch_size": 2, "score_blocks": 2, "max_candidates": 3},
              "heal": {"steps": 4, "lr": 5.0e-4, "warmup_steps": 1, "batch_size": 2, "eval_every": 4,
                       "eval_blocks": 2},
              "eval_blocks": 4, "ood_blocks": 4, "block_size": 128},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny settings: a smoke run, not a measurement")
    parser.add_argument("--block-size", type=int, default=None,
                        help="tokens per training and scored block (default 256; 128 with --quick)")
    parser.add_argument("--batch-size", type=int, default=4, help="blocks per scoring forward pass")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", type=Path, default=None, help="keep the artifacts here (default: a temp folder)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    s = SETTINGS["quick" if args.quick else "full"]
    args.block_size = args.block_size or s["block_size"]
    started = time.perf_counter()

    teacher, tokenizer = load_model(str(asset_model_folder(TEACHER)), dtype=torch.float32)
    data = {"asset": "shakespeare", "block_size": args.block_size}
    shakespeare = build_data(DataConfig(**data), tokenizer)
    wikipedia = build_data(DataConfig(asset="wikipedia", block_size=args.block_size), tokenizer)
    scorers = {"in": Scorer(teacher, blocks_tensor(shakespeare.heldout, s["eval_blocks"]), args.batch_size),
               "ood": Scorer(teacher, blocks_tensor(wikipedia.heldout, s["ood_blocks"]), args.batch_size)}
    rows: dict[str, dict] = {}

    def add(name: str, folder: Path | None, model=None, **extra) -> None:
        model = model if model is not None else load_model(str(folder), dtype=torch.float32, with_tokenizer=False)
        row = {"parameters": arch.count_parameters(model), **extra,
               **{f"{d}_{k}": v for d, sc in scorers.items() for k, v in sc.score(model).items()}}
        rows[name] = row
        print(f"  {name:<28} {row['parameters']:>11,}  in: ppl {row['in_perplexity']:8.3f} KL {row['in_kl']:.4f} "
              f"top1 {row['in_top1']:.3f}  ood: ppl {row['ood_perplexity']:8.3f} KL {row['ood_kl']:.4f} "
              f"top1 {row['ood_top1']:.3f}", flush=True)

    add("teacher", None, teacher)
    with tempfile.TemporaryDirectory(prefix="search-bench-") as tmp:
        work = args.work or Path(tmp)
        t0 = time.perf_counter()
        depth = slimforge.run_stage("prune", TEACHER, work / "depth", method="depth", data=data,
                                    remove_ratio=0.2, **s["depth_calib"])
        hand = slimforge.run_stage("prune", depth, work / "width", method="width", data=data,
                                   param_ratio=0.7, **s["calib"])
        hand_seconds = time.perf_counter() - t0
        hand_meta = json.loads((hand / "slimforge.json").read_text())
        target = int(hand_meta["parameters_after"])
        print(f"hand-picked (minitron recipe): {hand_meta['dims_after']} at 24 layers, {target:,} parameters "
              f"({hand_seconds:.0f} s)", flush=True)
        t0 = time.perf_counter()
        searched = slimforge.run_stage("prune", TEACHER, work / "search", method="search", data=data,
                                       target_params=str(target), **s["calib"], **s["search"])
        search_seconds = time.perf_counter() - t0
        meta = json.loads((searched / "slimforge.json").read_text())
        print(f"search: {len(meta['candidates'])} candidates in {search_seconds:.0f} s; Pareto set {meta['pareto']}; "
              f"chose {meta['chosen']}: {meta['dims_after']}", flush=True)
        print("\n".join(meta["candidates_table"]), flush=True)
        add("hand-picked, pruned", hand)
        add("searched, pruned", searched)
        healed = {}
        for label, folder in (("hand-picked", hand), ("searched", searched)):
            t0 = time.perf_counter()
            healed[label] = slimforge.run_stage("distill", folder, work / f"heal-{label}", method="kd", name="heal",
                                                teacher=TEACHER, data=data, trackers=[], **s["heal"])
            add(f"{label}, healed", healed[label], heal_seconds=round(time.perf_counter() - t0, 1))

    teacher_row = rows["teacher"]
    print(f"\nSmolLM2-135M-Instruct fp32 CPU ({args.threads} threads){' --quick' if args.quick else ''}; in domain: "
          f"{s['eval_blocks']} held-out Shakespeare blocks of {args.block_size} tokens; out of domain: "
          f"{s['ood_blocks']} Wikipedia blocks; both students healed {s['heal']['steps']} KD steps alike.")
    print("\n| model | parameters | in ppl | in retention | in KL | ood ppl | ood retention | ood KL |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, row in rows.items():
        row["in_retention"] = teacher_row["in_perplexity"] / row["in_perplexity"]
        row["ood_retention"] = teacher_row["ood_perplexity"] / row["ood_perplexity"]
        print(f"| {name} | {row['parameters']:,} | {row['in_perplexity']:.3f} | {row['in_retention']:.3f} | "
              f"{row['in_kl']:.4f} | {row['ood_perplexity']:.3f} | {row['ood_retention']:.3f} | {row['ood_kl']:.4f} |")
    print("\nsearched / hand-picked (same run; < 1 is better for perplexity and KL, > 1 for retention):")
    for stage in ("pruned", "healed"):
        a, b = rows[f"searched, {stage}"], rows[f"hand-picked, {stage}"]
        print(f"  {stage}: in ppl x{a['in_perplexity'] / b['in_perplexity']:.3f}, in KL x{a['in_kl'] / b['in_kl']:.3f}, "
              f"ood ppl x{a['ood_perplexity'] / b['ood_perplexity']:.3f}, ood KL x{a['ood_kl'] / b['ood_kl']:.3f}, "
              f"ood retention x{a['ood_retention'] / b['ood_retention']:.3f}")
    print(f"\nsearch {search_seconds:.0f} s (hand-picked pruning {hand_seconds:.0f} s); total "
          f"{time.perf_counter() - started:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"settings": s, "rows": rows, "search": {
            "seconds": search_seconds, "candidates": meta["candidates"], "pareto": meta["pareto"],
            "chosen": meta["chosen"]}}, indent=2))


if __name__ == "__main__":
    main()
