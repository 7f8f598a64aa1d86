"""Pruning quality and time on the real SmolLM2-135M teacher, against llm-compressor in the same run.

For dense; magnitude, Wanda and SparseGPT at 50% unstructured and 2:4; depth pruning of 25% of
the layers (Block Influence); width pruning to ~60% of the parameters; and llm-compressor's
Wanda and SparseGPT (the anchor, run in bench/.venv-llmc on the same model folder, the same
calibration token ids and scored here by the same code): token perplexity on held-out
Shakespeare blocks, wall time of the pruning itself (model loading and evaluation excluded),
and the ratios ours / llm-compressor.

    bash bench/llmc_venv.sh               # once: the anchor's own virtual environment
    .venv/bin/python bench/prune_quality.py [--samples 64 --seq-len 256 --eval-blocks 32]

Everything runs in fp32 on the CPU with ``--threads`` threads for both tools.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from slimforge import arch  # noqa: E402
from slimforge.config import DataConfig  # noqa: E402
from slimforge.data import blocks_tensor, build_data, calibration_samples  # noqa: E402
from slimforge.eval.perplexity import block_nll  # noqa: E402
from slimforge.models import asset_model_folder, load_model  # noqa: E402
from slimforge.prune.config import WidthConfig  # noqa: E402
from slimforge.prune.depth import depth_scores, drop_layers, layers_to_remove  # noqa: E402
from slimforge.prune.sparsify import sparsegpt_prune_model, sparsity_report, wanda_prune_model  # noqa: E402
from slimforge.prune.unstructured import apply_mask, magnitude_scores, prune_mask  # noqa: E402
from slimforge.prune.width import prune_width  # noqa: E402

LLMC_PYTHON = HERE / ".venv-llmc" / "bin" / "python"


@dataclass
class Row:
    name: str
    tool: str
    perplexity: float
    seconds: float
    parameters: int
    sparsity: float


def perplexity(model, blocks: torch.Tensor, batch_size: int) -> float:
    nll = block_nll(model, blocks, batch_size, "cpu", progress=False)
    return float(torch.exp(nll.sum() / (blocks.shape[0] * (blocks.shape[1] - 1))))


def magnitude(model, sparsity: float, per: str, n=None, m=None) -> None:
    with torch.no_grad():
        for layer in arch.decoder_layers(model):
            for module in layer.modules():
                if isinstance(module, torch.nn.Linear):
                    apply_mask(module.weight, prune_mask(magnitude_scores(module.weight), sparsity, per, n, m))


def run_anchor(folder: Path, calib_file: Path, method: str, mask: str, args, work: Path) -> tuple[dict, Path] | str:
    """Run llm-compressor in its venv; returns (report, weights file) or why it could not run."""
    if not LLMC_PYTHON.is_file():
        return f"{LLMC_PYTHON} is missing: run bash bench/llmc_venv.sh"
    out, report = work / f"llmc-{method}-{mask.replace(':', 'of')}.safetensors", work / f"llmc-{method}.json"
    cmd = [str(LLMC_PYTHON), str(HERE / "prune_llmc_anchor.py"), "--model", str(folder), "--calib", str(calib_file),
           "--method", method, "--sparsity", "0.5", "--mask", mask, "--batch-size", str(args.batch_size),
           "--threads", str(args.threads), "--out", str(out), "--report", str(report)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        return lines[-1] if lines else f"exit status {proc.returncode}"
    return json.loads(report.read_text()), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=64, help="calibration windows")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per calibration window")
    parser.add_argument("--eval-blocks", type=int, default=32, help="held-out blocks of 256 tokens to score")
    parser.add_argument("--calib-seed", type=int, default=0, help="which random calibration windows (both tools)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-anchor", action="store_true")
    parser.add_argument("--only", default="", help="comma-separated row names to run (default: all)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    only = set(filter(None, args.only.split(",")))

    folder = asset_model_folder("smollm2-135m")
    _, tokenizer = load_model(str(folder), dtype=torch.float32)
    bundle = build_data(DataConfig(asset="shakespeare"), tokenizer)
    calib = calibration_samples(bundle, args.samples, args.seq_len, seed=args.calib_seed)
    blocks = blocks_tensor(bundle.heldout, args.eval_blocks)
    print(f"teacher: SmolLM2-135M-Instruct fp32 CPU, {args.threads} threads; calibration {args.samples} x "
          f"{args.seq_len} tokens (Shakespeare train, seed {args.calib_seed}); perplexity on {blocks.shape[0]} held-out blocks of "
          f"{blocks.shape[1]} tokens", flush=True)

    def fresh():
        return load_model(str(folder), dtype=torch.float32, with_tokenizer=False)

    ours = {
        "dense": lambda m: None,
        "magnitude 50%": lambda m: magnitude(m, 0.5, "layer"),
        "magnitude 2:4": lambda m: magnitude(m, 0.5, "layer", 2, 4),
        "wanda 50%": lambda m: wanda_prune_model(m, calib, 0.5, "row", batch_size=args.batch_size),
        "wanda 2:4": lambda m: wanda_prune_model(m, calib, 0.5, "row", 2, 4, batch_size=args.batch_size),
        "sparsegpt 50%": lambda m: sparsegpt_prune_model(m, calib, 0.5, "layer", batch_size=args.batch_size),
        "sparsegpt 2:4": lambda m: sparsegpt_prune_model(m, calib, 0.5, "layer", 2, 4, batch_size=args.batch_size),
    }
    rows: list[Row] = []
    for name, prune in ours.items():
        if only and name not in only:
            continue
        model = fresh()
        start = time.perf_counter()
        prune(model)
        seconds = time.perf_counter() - start
        rows.append(Row(name, "slimforge", perplexity(model, blocks, args.batch_size), seconds,
                        arch.count_parameters(model), sparsity_report(model)["overall"]))
        print(_line(rows[-1]), flush=True)

    if not only or "depth -25%" in only:
        model = fresh()
        start = time.perf_counter()
        total = arch.num_layers(model)
        drop = layers_to_remove(depth_scores(model, calib, "block_influence", batch_size=args.batch_size),
                                round(total * 0.25), "block_influence")
        drop_layers(model, drop)
        rows.append(Row(f"depth -25% (drop {drop})", "slimforge", perplexity(model, blocks, args.batch_size),
                        time.perf_counter() - start, arch.count_parameters(model), 0.0))
        print(_line(rows[-1]), flush=True)
    if not only or "width 60%" in only:
        model = fresh()
        start = time.perf_counter()
        targets = WidthConfig(param_ratio=0.6).targets(model.config)
        pruned, _, _ = prune_width(model, calib, targets, batch_size=args.batch_size)
        label = (f"width 60% (hidden {targets.hidden_size}, mlp {targets.intermediate_size}, "
                 f"heads {targets.num_attention_heads}/{targets.num_key_value_heads})")
        rows.append(Row(label, "slimforge", perplexity(pruned, blocks, args.batch_size),
                        time.perf_counter() - start, arch.count_parameters(pruned), 0.0))
        print(_line(rows[-1]), flush=True)

    anchor_notes = []
    if not args.skip_anchor:
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            calib_file = work / "calib.pt"
            torch.save(calib, calib_file)
            for method, mask, name in (("wanda", "0:0", "wanda 50%"), ("wanda", "2:4", "wanda 2:4"),
                                       ("sparsegpt", "0:0", "sparsegpt 50%"), ("sparsegpt", "2:4", "sparsegpt 2:4")):
                if only and name not in only:
                    continue
                result = run_anchor(folder, calib_file, method, mask, args, work)
                if isinstance(result, str):
                    anchor_notes.append(f"llm-compressor {name}: could not run: {result}")
                    print(anchor_notes[-1], flush=True)
                    continue
                report, weights = result
                from safetensors.torch import load_file

                model = fresh()
                model.load_state_dict(load_file(weights), strict=False)
                rows.append(Row(name, f"llm-compressor {report['llmcompressor']}",
                                perplexity(model, blocks, args.batch_size), report["seconds"],
                                arch.count_parameters(model), sparsity_report(model)["overall"]))
                print(_line(rows[-1]), flush=True)
    print()
    print(markdown(rows))
    for note in anchor_notes:
        print(note)
    if args.json:
        args.json.write_text(json.dumps([vars(r) for r in rows], indent=1))


def _line(row: Row) -> str:
    return (f"{row.name:<58} {row.tool:<24} ppl {row.perplexity:9.3f}  {row.seconds:7.1f} s  "
            f"{row.parameters / 1e6:6.1f}M params  sparsity {row.sparsity:.3f}")


def markdown(rows: list[Row]) -> str:
    """The table, with ours / llm-compressor ratios where both ran the same method."""
    anchor = {r.name: r for r in rows if r.tool.startswith("llm-compressor")}
    dense = next((r for r in rows if r.name == "dense"), None)
    out = ["| method | tool | perplexity | vs dense | time (s) | ppl ours/anchor | time ours/anchor | params | sparsity |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ratio_ppl = ratio_time = ""
        if r.tool == "slimforge" and r.name in anchor:
            ratio_ppl = f"{r.perplexity / anchor[r.name].perplexity:.4f}"
            ratio_time = f"{r.seconds / anchor[r.name].seconds:.2f}"
        vs_dense = f"{r.perplexity / dense.perplexity:.2f}x" if dense else ""
        out.append(f"| {r.name} | {r.tool} | {r.perplexity:.3f} | {vs_dense} | {r.seconds:.1f} | {ratio_ppl} | "
                   f"{ratio_time} | {r.parameters / 1e6:.1f}M | {r.sparsity:.3f} |")
    return "\n".join(out)


if __name__ == "__main__":
    main()
