"""Quantization quality, size and time on the real SmolLM2-135M teacher, against llm-compressor in the same run.

Variants: bf16 weights; bitsandbytes int8, NF4, FP4; RTN int4; GPTQ int4 and int3 (MSE-searched
scales, the preset) and GPTQ int4 with min-max scales (llm-compressor's default, like for like
with the anchor); GGUF Q8_0 and Q4_0; and the anchor, llm-compressor's GPTQ W4A16 (run in bench/.venv-llmc on the
same model folder and the same calibration token ids, scored here by the same code). Each
slimforge variant is made by the shipped quantize stage (``slimforge run`` with one quantize
stage), so its time, size and bits are the artifact's own report.

Integer groups are 64 wide, not the customary 128: SmolLM2-135M's hidden size is 576, which
128 does not divide, and the compressed-tensors format (and vLLM's kernels, and llm-compressor,
which refuses) need whole groups. 64 divides every width of this model.

For each: token perplexity on held-out Shakespeare (fixed 512-token blocks), mean per-token
KL(teacher || variant), top-1 agreement with the teacher, effective bits per weight of the
quantized layers, size on disk of the weight files, and the time of the quantization itself
(model loading and evaluation excluded). Ratios are perplexity / bf16 perplexity.

This CPU has no native bf16, so every variant *computes* in fp32: the bf16 row is the teacher
with its weights rounded to bf16, and quantized weights are dequantized into fp32 matmuls
(what the weights lose, not what a kernel adds). The anchor runs after slimforge's variants,
so neither tool's time includes the other's work.

    bash bench/llmc_venv.sh               # once: the anchor's own virtual environment
    .venv/bin/python bench/quant_quality.py [--samples 64 --seq-len 512 --eval-blocks 16]
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from slimforge.arch import count_parameters  # noqa: E402
from slimforge.config import DataConfig  # noqa: E402
from slimforge.data import blocks_tensor, build_data, calibration_samples  # noqa: E402
from slimforge.eval.fidelity import token_kl, top1_agreement  # noqa: E402
from slimforge.models import asset_model_folder, load_model  # noqa: E402
from slimforge.pipeline import run_recipe  # noqa: E402

LLMC_PYTHON = HERE / ".venv-llmc" / "bin" / "python"
MB = 1e6
# The default recipe's evaluation is off here: this script scores every variant itself.
_EVAL_TASKS = yaml.safe_load((HERE.parent / "recipes" / "eval" / "default.yaml").read_text())["tasks"]
NO_EVAL = ["eval.models=[teacher]", *(f"~eval.tasks.{name}" for name in _EVAL_TASKS)]


@dataclass
class Row:
    name: str
    tool: str
    bits_per_weight: float
    size_mb: float
    seconds: float
    perplexity: float = float("nan")
    ratio: float = float("nan")
    kl: float = float("nan")
    top1: float = float("nan")


class Scorer:
    """Scores a model against the teacher's logits on fixed held-out blocks (teacher run once)."""

    def __init__(self, teacher, blocks: torch.Tensor, batch_size: int) -> None:
        self.blocks, self.batch_size = blocks, batch_size
        self.teacher_logits = self._logits(teacher)

    @torch.no_grad()
    def _logits(self, model) -> list[torch.Tensor]:
        return [model(input_ids=self.blocks[i:i + self.batch_size]).logits[:, :-1].float()
                for i in range(0, len(self.blocks), self.batch_size)]

    @torch.no_grad()
    def score(self, model) -> dict[str, float]:
        nll, kl, top1, tokens = 0.0, 0.0, 0.0, 0
        for i, t_logits in zip(range(0, len(self.blocks), self.batch_size), self.teacher_logits):
            ids = self.blocks[i:i + self.batch_size]
            s_logits = model(input_ids=ids).logits[:, :-1].float()
            targets = ids[:, 1:]
            nll += float(torch.nn.functional.cross_entropy(s_logits.transpose(1, 2), targets, reduction="sum"))
            kl += float(token_kl(t_logits, s_logits).sum())
            top1 += float(top1_agreement(t_logits, s_logits).sum())
            tokens += targets.numel()
        return {"perplexity": float(torch.exp(torch.tensor(nll / tokens))), "kl": kl / tokens, "top1": top1 / tokens}


def weight_files_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.iterdir() if p.suffix in (".safetensors", ".gguf")) / MB


def run_stage(method: str, overrides: list[str], args, work: Path) -> Path:
    """Quantize the teacher with one shipped stage; returns the artifact folder."""
    run_dir = work / f"run-{method}-{abs(hash(tuple(overrides))) % 10**6}"
    run_recipe("default", [f"run_dir={run_dir}", *NO_EVAL, f"+quantize@stages.quant={method}",
                           "pipeline=[quant]", f"data.block_size={args.block_size}", *overrides])
    return run_dir / "stages" / "quant"


def stage_row(name: str, folder: Path) -> tuple[Row, object]:
    meta = json.loads((folder / "slimforge.json").read_text())
    model = load_model(str(folder), dtype=torch.float32, gguf_file=meta.get("gguf_file"), with_tokenizer=False)
    row = Row(name, "slimforge", meta["bits_per_weight"], meta["size_on_disk_bytes"] / MB, meta["quantize_seconds"])
    return row, model


def start_anchor(teacher_folder: Path, calib: torch.Tensor, args, work: Path) -> tuple[subprocess.Popen, dict] | str:
    """Start llm-compressor's GPTQ in its own venv."""
    if not LLMC_PYTHON.is_file():
        return f"{LLMC_PYTHON} is missing: run bash bench/llmc_venv.sh"
    files = {"calib": work / "calib.pt", "weights": work / "llmc.safetensors", "report": work / "llmc.json",
             "log": work / "llmc.log"}
    torch.save(calib, files["calib"])
    cmd = [str(LLMC_PYTHON), str(HERE / "quant_llmc_anchor.py"), "--model", str(teacher_folder),
           "--calib", str(files["calib"]), "--threads", str(args.threads), "--batch-size", str(args.llmc_batch_size),
           "--group-size", str(args.group_size), "--out-dir", str(work / "llmc-w4a16"),
           "--weights", str(files["weights"]), "--report", str(files["report"])]
    log = open(files["log"], "w")  # noqa: SIM115 - closed when the process is collected
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), files


def finish_anchor(started: tuple[subprocess.Popen, dict]) -> tuple[dict, Path] | str:
    """Wait for the anchor; returns (report, weights file) or why it could not run."""
    proc, files = started
    code = proc.wait()
    if code != 0:
        tail = " | ".join(files["log"].read_text(errors="replace").strip().splitlines()[-3:])
        return f"llm-compressor failed (exit {code}): {tail}"
    return json.loads(files["report"].read_text()), files["weights"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=64, help="calibration windows (GPTQ, both tools)")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per calibration window")
    parser.add_argument("--block-size", type=int, default=512, help="tokens per held-out block")
    parser.add_argument("--eval-blocks", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=64, help="integer group size (RTN, GPTQ, anchor)")
    parser.add_argument("--llmc-batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-anchor", action="store_true")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    started = time.perf_counter()

    teacher_folder = asset_model_folder("smollm2-135m")
    teacher, tokenizer = load_model(str(teacher_folder), dtype=torch.float32)
    bundle = build_data(DataConfig(asset="shakespeare", block_size=args.block_size), tokenizer)
    blocks = blocks_tensor(bundle.heldout, args.eval_blocks)
    calib = calibration_samples(bundle, args.samples, args.seq_len, seed=0)
    scorer = Scorer(teacher, blocks, args.batch_size)
    params = count_parameters(teacher)
    rows: list[Row] = []

    def add(row: Row, model) -> None:
        row.__dict__.update(scorer.score(model))
        rows.append(row)
        print(f"  {row.name:<18} ppl {row.perplexity:8.3f}  KL {row.kl:.4f}  top1 {row.top1:.3f}  "
              f"{row.bits_per_weight:5.2f} b/w  {row.size_mb:6.1f} MB  {row.seconds:6.1f} s", flush=True)

    add(Row("fp32 (teacher)", "-", 32.0, params * 4 / MB, 0.0), teacher)
    bf16 = load_model(str(teacher_folder), dtype=torch.float32, with_tokenizer=False)
    start = time.perf_counter()
    with torch.no_grad():
        for p in bf16.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    add(Row("bf16", "-", 16.0, params * 2 / MB, time.perf_counter() - start), bf16)
    del bf16

    g = args.group_size
    gptq = [f"stages.quant.group_size={g}", f"stages.quant.num_samples={args.samples}",
            f"stages.quant.seq_len={args.seq_len}"]
    variants = [
        ("int8 (bnb)", "bnb_int8", []),
        ("NF4 (bnb)", "bnb_nf4", []),
        ("FP4 (bnb)", "bnb_fp4", ["stages.quant.double_quant=true"]),
        (f"RTN int4 g{g}", "rtn", ["stages.quant.bits=4", f"stages.quant.group_size={g}"]),
        (f"GPTQ int4 g{g}", "gptq", ["stages.quant.bits=4", *gptq]),
        # The same with min-max scales, llm-compressor's default observer: the like-for-like anchor row.
        (f"GPTQ int4 g{g} minmax", "gptq", ["stages.quant.bits=4", "stages.quant.scale_search=minmax", *gptq]),
        (f"GPTQ int3 g{g}", "gptq", ["stages.quant.bits=3", *gptq]),
        ("GGUF Q8_0", "gguf", ["stages.quant.type=Q8_0"]),
        ("GGUF Q4_0", "gguf", ["stages.quant.type=Q4_0"]),
    ]
    anchor_note = "skipped (--skip-anchor)"
    with tempfile.TemporaryDirectory(prefix="quant-bench-") as tmp:
        work = Path(tmp)
        for name, method, overrides in variants:
            row, model = stage_row(name, run_stage(method, overrides, args, work))
            add(row, model)
            del model
        # After ours, not beside them: each tool's time is its own on the cores.
        started_anchor = None if args.skip_anchor else start_anchor(teacher_folder, calib, args, work)
        if started_anchor is not None:
            result = started_anchor if isinstance(started_anchor, str) else finish_anchor(started_anchor)
            if isinstance(result, str):
                anchor_note = result
            else:
                report, weights_file = result
                from safetensors.torch import load_file

                anchored = load_model(str(teacher_folder), dtype=torch.float32, with_tokenizer=False)
                anchored.load_state_dict(load_file(weights_file), strict=False)
                ours = next(r for r in rows if r.name == f"GPTQ int4 g{g}")
                size = report["size_on_disk_bytes"] / MB
                add(Row(f"GPTQ int4 g{g}", f"llm-compressor {report['llmcompressor']}", ours.bits_per_weight,
                        size, report["seconds"]), anchored)
                anchor_note = (f"llm-compressor {report['llmcompressor']}, compressed-tensors "
                               f"{report['compressed_tensors']}, transformers {report['transformers']}, "
                               f"torch {report['torch']}")

    base = next(r.perplexity for r in rows if r.name == "bf16")
    for row in rows:
        row.ratio = row.perplexity / base
    print_table(rows, args, anchor_note, time.perf_counter() - started)
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=1))


def print_table(rows: list[Row], args, anchor_note: str, total: float) -> None:
    tokens = args.eval_blocks * (args.block_size - 1)
    print(f"\nSmolLM2-135M-Instruct, {args.eval_blocks} held-out Shakespeare blocks of {args.block_size} tokens "
          f"({tokens} predicted tokens); GPTQ calibration {args.samples} x {args.seq_len} tokens; "
          f"{args.threads} CPU threads, fp32 compute\n")
    print("| variant | tool | bits/weight | size on disk (MB) | quantize time (s) | perplexity | ratio to bf16 "
          "| KL to teacher | top-1 agreement |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r.name} | {r.tool} | {r.bits_per_weight:.2f} | {r.size_mb:.1f} | {r.seconds:.1f} | "
              f"{r.perplexity:.3f} | {r.ratio:.4f} | {r.kl:.4f} | {r.top1:.3f} |")
    g = args.group_size
    ours = next((r for r in rows if r.name == f"GPTQ int4 g{g}" and r.tool == "slimforge"), None)
    anchor = next((r for r in rows if r.name == f"GPTQ int4 g{g}" and r.tool != "slimforge"), None)
    nf4 = next(r for r in rows if r.name == "NF4 (bnb)")
    rtn = next(r for r in rows if r.name == f"RTN int4 g{g}")
    int8 = next(r for r in rows if r.name == "int8 (bnb)")
    print(f"\nint8 ratio {int8.ratio:.4f} (target <= 1.02); GPTQ int4 ratio {ours.ratio:.4f} (target <= 1.10), "
          f"NF4 {nf4.ratio:.4f}, RTN {rtn.ratio:.4f}")
    if anchor is not None:
        print(f"ours / llm-compressor: perplexity {ours.perplexity / anchor.perplexity:.4f} (target within 1%), "
              f"KL {ours.kl / anchor.kl:.3f}, time {ours.seconds / anchor.seconds:.2f}x")
        same = next((r for r in rows if r.name == f"GPTQ int4 g{g} minmax"), None)
        if same is not None:
            print(f"like for like (both min-max scales): perplexity {same.perplexity / anchor.perplexity:.4f}, "
                  f"time {same.seconds / anchor.seconds:.2f}x")
    print(f"anchor: {anchor_note}\nbenchmark wall time: {total / 60:.1f} min")


if __name__ == "__main__":
    main()
