"""Quantization-aware distillation from GPTQ int4 on the real SmolLM2-135M: how much of GPTQ's gap it closes.

GPTQ int4 g64 (the shipped preset, calibrated on the Shakespeare training split) is made once,
or given with ``--gptq``; each variant is the shipped ``qat`` stage (its preset, then the
variant's settings) run on that artifact through ``slimforge.run_stage``, with the live fp32
teacher. Its time is the stage's own report: ``train_seconds``, the training loop alone (the
stage also scores its parent before training and writes the artifact).

Every model is scored by bench/quant_quality.py's scorer against the teacher's logits:
perplexity, mean per-token KL(teacher || model) and top-1 agreement, on held-out Shakespeare
blocks (in domain: QAT trains on the other plays) and on Wikipedia paragraphs (out of domain:
nothing here saw them). Gap closed = (ppl_GPTQ - ppl_QAT) / (ppl_GPTQ - ppl_teacher).

    .venv/bin/python bench/qat_quality.py [--gptq DIR] [--variant "steps=30;lr=1e-4"]...
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
import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from quant_quality import Scorer  # noqa: E402

import slimforge  # noqa: E402
from slimforge.config import DataConfig  # noqa: E402
from slimforge.data import blocks_tensor, build_data  # noqa: E402
from slimforge.models import asset_model_folder, load_model  # noqa: E402

TEACHER = "smollm2-135m"


def parse_variant(text: str) -> dict:
    """``"steps=30;lr=1e-4;trainable=[weights,scales]"`` -> the stage's options (YAML values)."""
    options = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        key, _, value = part.partition("=")
        try:
            options[key.strip()] = float(value) if any(c in value for c in ".eE") else int(value)
        except ValueError:  # YAML reads 1e-4 as a string; everything else (lists, booleans) as YAML
            options[key.strip()] = yaml.safe_load(value)
    return options


def make_gptq(args, work: Path) -> Path:
    return slimforge.run_stage("quantize", TEACHER, work / "gptq", method="gptq",
                               data={"asset": "shakespeare", "block_size": args.block_size}, bits=4,
                               group_size=args.group_size, num_samples=args.samples, seq_len=args.seq_len)


def gap_closed(ppl: float, base: float, teacher: float) -> float:
    return (base - ppl) / (base - teacher)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gptq", type=Path, default=None, help="an existing GPTQ artifact folder (else made here)")
    parser.add_argument("--samples", type=int, default=32, help="GPTQ calibration windows")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per calibration window")
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--block-size", type=int, default=512, help="tokens per scored block")
    parser.add_argument("--train-block-size", type=int, default=256, help="tokens per QAT training block")
    parser.add_argument("--eval-blocks", type=int, default=16, help="held-out Shakespeare blocks (in domain)")
    parser.add_argument("--ood-blocks", type=int, default=16, help="Wikipedia blocks (out of domain)")
    parser.add_argument("--batch-size", type=int, default=4, help="blocks per scoring forward pass")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variant", action="append", default=None,
                        help='QAT settings over the preset, "key=value;key=value" (repeat for several)')
    parser.add_argument("--work", type=Path, default=None, help="keep the artifacts here (default: a temp folder)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    started = time.perf_counter()

    teacher_folder = asset_model_folder(TEACHER)
    teacher, tokenizer = load_model(str(teacher_folder), dtype=torch.float32)
    shakespeare = build_data(DataConfig(asset="shakespeare", block_size=args.block_size), tokenizer)
    wikipedia = build_data(DataConfig(asset="wikipedia", block_size=args.block_size), tokenizer)
    scorers = {"in": Scorer(teacher, blocks_tensor(shakespeare.heldout, args.eval_blocks), args.batch_size),
               "ood": Scorer(teacher, blocks_tensor(wikipedia.heldout, args.ood_blocks), args.batch_size)}
    rows: list[dict] = []

    def add(name: str, model, seconds: float | None, meta: dict | None = None) -> None:
        row = {"name": name, "seconds": seconds, **{f"{d}_{k}": v for d, s in scorers.items()
                                                     for k, v in s.score(model).items()}}
        if meta:
            row["settings"] = meta
        rows.append(row)
        print(f"  {name:<40} in: ppl {row['in_perplexity']:8.3f} KL {row['in_kl']:.4f} top1 {row['in_top1']:.3f}  "
              f"ood: ppl {row['ood_perplexity']:8.3f} KL {row['ood_kl']:.4f} top1 {row['ood_top1']:.3f}"
              + (f"  {seconds:6.1f} s" if seconds is not None else ""), flush=True)

    add("fp32 (teacher)", teacher, None)
    with tempfile.TemporaryDirectory(prefix="qat-bench-") as tmp:
        work = args.work or Path(tmp)
        gptq = args.gptq or make_gptq(args, work)
        gptq_meta = json.loads((Path(gptq) / "slimforge.json").read_text())
        add(f"GPTQ int4 g{args.group_size}", load_model(str(gptq), dtype=torch.float32, with_tokenizer=False),
            gptq_meta.get("quantize_seconds"))
        for index, text in enumerate(args.variant or [""]):
            options = parse_variant(text)
            folder = slimforge.run_stage("distill", gptq, work / f"qat-{index}", method="qat", name="qat",
                                         teacher=TEACHER, data={"asset": "shakespeare",
                                                                "block_size": args.train_block_size},
                                         **{"trackers": [], **options})
            meta = json.loads((folder / "slimforge.json").read_text())
            model = load_model(str(folder), dtype=torch.float32, with_tokenizer=False)
            add(f"QAT {text or '(preset)'}", model, meta["metrics"]["train_seconds"], meta["config"])
            del model

    teacher_row, gptq_row = rows[0], rows[1]
    print(f"\nSmolLM2-135M-Instruct; in domain: {args.eval_blocks} held-out Shakespeare blocks of {args.block_size} "
          f"tokens; out of domain: {args.ood_blocks} Wikipedia blocks; QAT trains on {args.train_block_size}-token "
          f"Shakespeare blocks; {args.threads} CPU threads, fp32; {time.perf_counter() - started:.0f} s in all\n")
    print("| model | train time (s) | ppl | ratio | gap closed | KL | top-1 | ood ppl | ood ratio | ood gap closed "
          "| ood KL | ood top-1 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        cells = [row["name"], "-" if row["seconds"] is None else f"{row['seconds']:.0f}"]
        for d in ("in", "ood"):
            ppl, base, ref = row[f"{d}_perplexity"], gptq_row[f"{d}_perplexity"], teacher_row[f"{d}_perplexity"]
            closed = "-" if row in (teacher_row, gptq_row) else f"{gap_closed(ppl, base, ref):.0%}"
            cells += [f"{ppl:.3f}", f"{ppl / ref:.4f}", closed, f"{row[f'{d}_kl']:.4f}", f"{row[f'{d}_top1']:.3f}"]
        print("| " + " | ".join(cells) + " |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1, default=str))


if __name__ == "__main__":
    main()
