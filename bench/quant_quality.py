"""Quantization quality, size and time on the real SmolLM2-135M teacher, against llm-compressor in the same run.

Variants: bf16 weights; bitsandbytes int8, NF4, FP4; RTN int4; GPTQ int4 and int3 (MSE-searched
scales, the preset) and GPTQ int4 with min-max scales (llm-compressor's default, like for like
with the anchor); AWQ int4 (then RTN, then GPTQ; groups and per channel); W8A8 int8 with
SmoothQuant (per-token dynamic and static per-tensor activations); FP8 W8A8 (dynamic, static);
mixed precision at 3.5 and 4.25 bits per weight; quantization-aware distillation from the GPTQ
int4 row; GGUF Q8_0 and Q4_0. The anchors are llm-compressor's GPTQ W4A16, AWQ W4A16,
SmoothQuant + GPTQ W8A8 and FP8 (dynamic, static), run in bench/.venv-llmc on the same model
folder and the same calibration token ids, and read back and scored here by the same loader
and code as slimforge's artifacts (activation quantization included). Each slimforge variant
is made by the shipped stages (``slimforge run``), so its time, size and bits are the
artifact's own report; the QAT row's time is its training alone (its GPTQ parent is the
GPTQ row's artifact, reused).

Integer groups are 64 wide, not the customary 128: SmolLM2-135M's hidden size is 576, which
128 does not divide, and the compressed-tensors format (and vLLM's kernels, and llm-compressor,
which refuses) need whole groups. 64 divides every width of this model.

For each: token perplexity on held-out Shakespeare (fixed 512-token blocks: in-domain, the
text calibration and QAT training come from) and on Wikipedia paragraphs (out of domain: no
method saw any of it), mean per-token KL(teacher || variant), top-1 agreement with the teacher, effective bits per weight of the
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
import contextlib
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
    ood_perplexity: float = float("nan")
    ood_ratio: float = float("nan")


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


@torch.no_grad()
def perplexity(model, blocks: torch.Tensor, batch_size: int) -> float:
    """Token perplexity of ``model`` on ``blocks`` (the out-of-domain column)."""
    nll, tokens = 0.0, 0
    for i in range(0, len(blocks), batch_size):
        ids = blocks[i:i + batch_size]
        logits = model(input_ids=ids).logits[:, :-1].float()
        nll += float(torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="sum"))
        tokens += ids[:, 1:].numel()
    return float(torch.exp(torch.tensor(nll / tokens)))


def weight_files_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.iterdir() if p.suffix in (".safetensors", ".gguf")) / MB


def run_stages(stages: list[tuple[str, str, list[str]]], args, work: Path, run_name: str) -> Path:
    """Run the teacher through shipped stages ``(stage name, group@method, overrides)``; returns the
    last stage's folder. Runs sharing ``run_name`` share a run directory, so a stage already made
    there with the same config is reused (the pipeline resumes), not made again."""
    run_dir = work / f"run-{run_name}"
    adds = [f"+{method.split('@')[0]}@stages.{name}={method.split('@')[1]}" for name, method, _ in stages]
    overrides = [o for _, _, extra in stages for o in extra]
    # data=shakespeare: the default recipe's own data is the teacher's generations; calibration and QAT
    # training here come from the Shakespeare training split, the held-out blocks' domain.
    run_recipe("default", [f"run_dir={run_dir}", "data=shakespeare", *NO_EVAL, *adds, f"pipeline=[{','.join(n for n, _, _ in stages)}]",
                           f"data.block_size={args.block_size}", *overrides])
    return run_dir / "stages" / stages[-1][0]


def stage_row(name: str, folder: Path) -> tuple[Row, object]:
    meta = json.loads((folder / "slimforge.json").read_text())
    model = load_model(str(folder), dtype=torch.float32, gguf_file=meta.get("gguf_file"), with_tokenizer=False)
    if meta.get("kind") == "distill":  # a trained stage (QAT): its training time, not its artifact's packing
        seconds = float(meta.get("metrics", {}).get("train_seconds", float("nan")))
    else:
        seconds = meta.get("quantize_seconds")
    row = Row(name, "slimforge", meta["bits_per_weight"], meta["size_on_disk_bytes"] / MB, seconds)
    return row, model


# llm-compressor's schemes (bench/quant_llmc_anchor.py) and the slimforge row each stands beside.
ANCHORS = [
    ("gptq", "GPTQ int4 g{g} (W4A16, min-max, static act-order)", "GPTQ int4 g{g}"),
    ("awq", "AWQ int4 g{g} (W4A16 symmetric, duo scaling, RTN)", "AWQ+RTN int4 g{g}"),
    ("w8a8", "W8A8 int8 (SmoothQuant 0.8 + GPTQ, dynamic per-token)", "W8A8 int8 dynamic"),
    ("fp8_dynamic", "FP8 W8A8 dynamic (FP8_DYNAMIC)", "FP8 W8A8 dynamic"),
    ("fp8", "FP8 W8A8 static (FP8)", "FP8 W8A8 static"),
]


def run_anchor(scheme: str, teacher_folder: Path, calib_file: Path, args, work: Path) -> tuple[dict, Path] | str:
    """One llm-compressor scheme in its own venv; returns (report, compressed folder) or why it could not run."""
    if not LLMC_PYTHON.is_file():
        return f"{LLMC_PYTHON} is missing: run bash bench/llmc_venv.sh"
    out, report, log_file = work / f"llmc-{scheme}", work / f"llmc-{scheme}.json", work / f"llmc-{scheme}.log"
    cmd = [str(LLMC_PYTHON), str(HERE / "quant_llmc_anchor.py"), "--model", str(teacher_folder), "--scheme", scheme,
           "--calib", str(calib_file), "--threads", str(args.threads), "--batch-size", str(args.llmc_batch_size),
           "--group-size", str(args.group_size), "--out-dir", str(out), "--report", str(report)]
    with open(log_file, "w") as log:
        code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
    if code != 0:
        tail = " | ".join(log_file.read_text(errors="replace").strip().splitlines()[-3:])
        return f"llm-compressor {scheme} failed (exit {code}): {tail}"
    return json.loads(report.read_text()), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=64, help="calibration windows (every calibrated method, both tools)")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per calibration window")
    parser.add_argument("--block-size", type=int, default=512, help="tokens per held-out block")
    parser.add_argument("--eval-blocks", type=int, default=16)
    parser.add_argument("--ood-blocks", type=int, default=8, help="Wikipedia blocks for the out-of-domain column")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=64, help="integer group size (RTN, GPTQ, AWQ, anchors)")
    parser.add_argument("--llmc-batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", default=None, help="comma-separated substrings: run only the variants matching one")
    parser.add_argument("--skip-anchor", action="store_true")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    parser.add_argument("--keep", type=Path, default=None,
                        help="make the run directories here and keep them (default: a temporary directory); "
                             "a kept directory is resumed, so finished variants are not redone")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    started = time.perf_counter()

    teacher_folder = asset_model_folder("smollm2-135m")
    teacher, tokenizer = load_model(str(teacher_folder), dtype=torch.float32)
    bundle = build_data(DataConfig(asset="shakespeare", block_size=args.block_size), tokenizer)
    blocks = blocks_tensor(bundle.heldout, args.eval_blocks)
    wiki = build_data(DataConfig(asset="wikipedia", block_size=args.block_size), tokenizer)
    ood_blocks = blocks_tensor(wiki.heldout, args.ood_blocks)
    calib = calibration_samples(bundle, args.samples, args.seq_len, seed=0)
    scorer = Scorer(teacher, blocks, args.batch_size)
    params = count_parameters(teacher)
    rows: list[Row] = []
    wanted = [w for w in (args.only or "").split(",") if w]

    def add(row: Row, model) -> None:
        row.__dict__.update(scorer.score(model))
        row.ood_perplexity = perplexity(model, ood_blocks, args.batch_size)
        rows.append(row)
        print(f"  {row.name:<24} ppl {row.perplexity:8.3f}  ood {row.ood_perplexity:8.3f}  KL {row.kl:.4f}  "
              f"top1 {row.top1:.3f}  {row.bits_per_weight:5.2f} b/w  {row.size_mb:6.1f} MB  {row.seconds:6.1f} s",
              flush=True)

    add(Row("fp32 (teacher)", "-", 32.0, params * 4 / MB, 0.0), teacher)
    bf16 = load_model(str(teacher_folder), dtype=torch.float32, with_tokenizer=False)
    start = time.perf_counter()
    with torch.no_grad():
        for p in bf16.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    add(Row("bf16", "-", 16.0, params * 2 / MB, time.perf_counter() - start), bf16)
    del bf16

    g = args.group_size
    calib_o = [f"stages.quant.num_samples={args.samples}", f"stages.quant.seq_len={args.seq_len}"]
    gptq = [f"stages.quant.group_size={g}", *calib_o]

    def q(method: str, *overrides: str) -> list[tuple[str, str, list[str]]]:
        return [("quant", f"quantize@{method}", list(overrides))]

    gptq4 = q("gptq", "stages.quant.bits=4", *gptq)
    variants: list[tuple[str, list[tuple[str, str, list[str]]], str]] = [
        ("int8 (bnb)", q("bnb_int8"), "bnb_int8"),
        ("NF4 (bnb)", q("bnb_nf4"), "bnb_nf4"),
        ("FP4 (bnb)", q("bnb_fp4", "stages.quant.double_quant=true"), "bnb_fp4"),
        (f"RTN int4 g{g}", q("rtn", "stages.quant.bits=4", f"stages.quant.group_size={g}"), "rtn"),
        (f"GPTQ int4 g{g}", gptq4, "gptq4"),
        # The same with min-max scales, llm-compressor's default observer: the like-for-like anchor row.
        (f"GPTQ int4 g{g} minmax", q("gptq", "stages.quant.bits=4", "stages.quant.scale_search=minmax", *gptq),
         "gptq_minmax"),
        (f"GPTQ int3 g{g}", q("gptq", "stages.quant.bits=3", *gptq), "gptq3"),
        (f"AWQ+RTN int4 g{g}", q("awq", "stages.quant.rounding=rtn", *gptq), "awq_rtn"),
        (f"AWQ+GPTQ int4 g{g}", q("awq", "stages.quant.rounding=gptq", *gptq), "awq_gptq"),
        ("AWQ+GPTQ int4 per-channel", q("awq", "stages.quant.rounding=gptq", "stages.quant.group_size=-1", *calib_o),
         "awq_gptq_pc"),
        ("W8A8 int8 dynamic", q("w8a8_int8", "stages.quant.activations=dynamic", *calib_o),
         "w8a8_dyn_search"),
        # The preset searches SmoothQuant's alpha per group and block; this is one alpha (0.5) everywhere.
        ("W8A8 int8 dynamic alpha 0.5", q("w8a8_int8", "stages.quant.activations=dynamic",
                                          "stages.quant.smoothquant_alpha_grid=null", *calib_o), "w8a8_dyn"),
        ("W8A8 int8 static", q("w8a8_int8", "stages.quant.activations=static", *calib_o),
         "w8a8_static"),
        ("FP8 W8A8 dynamic", q("w8a8_fp8", "stages.quant.activations=dynamic", *calib_o),
         "fp8_dyn"),
        ("FP8 W8A8 static", q("w8a8_fp8", "stages.quant.activations=static", *calib_o),
         "fp8_static"),
        ("mixed 3.5 b/w", q("mixed_precision", "stages.quant.bits_budget=3.5", *gptq), "mixed35"),
        ("mixed 4.25 b/w", q("mixed_precision", "stages.quant.bits_budget=4.25", *gptq), "mixed425"),
        # In the GPTQ row's run directory: the pipeline reuses that GPTQ artifact as QAT's parent.
        (f"QAT from GPTQ int4 g{g}", [*gptq4, ("qat", "distill@qat", [])], "gptq4"),
        ("GGUF Q8_0", q("gguf", "stages.quant.type=Q8_0"), "gguf8"),
        ("GGUF Q4_0", q("gguf", "stages.quant.type=Q4_0"), "gguf4"),
    ]
    anchor_notes: list[str] = []
    with (contextlib.nullcontext(str(args.keep)) if args.keep else
          tempfile.TemporaryDirectory(prefix="quant-bench-")) as tmp:
        work = Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for name, stages, run_name in variants:
            if wanted and not any(w in name for w in wanted):
                continue
            row, model = stage_row(name, run_stages(stages, args, work, run_name))
            add(row, model)
            del model
        # After ours, not beside them: each tool's time is its own on the cores.
        calib_file = work / "calib.pt"
        torch.save(calib, calib_file)
        for scheme, label, ours_name in [] if args.skip_anchor else ANCHORS:
            label, ours_name = label.format(g=g), ours_name.format(g=g)
            if wanted and not any(w in ours_name for w in wanted):
                continue
            result = run_anchor(scheme, teacher_folder, calib_file, args, work)
            if isinstance(result, str):
                anchor_notes.append(result)
                continue
            report, folder = result
            anchored = load_model(str(folder), dtype=torch.float32, with_tokenizer=False)
            ours = next((r for r in rows if r.name == ours_name), None)
            add(Row(label, f"llm-compressor {report['llmcompressor']}", ours.bits_per_weight if ours else float("nan"),
                    report["size_on_disk_bytes"] / MB, report["seconds"]), anchored)
            del anchored
            anchor_notes.append(f"llm-compressor {report['llmcompressor']}, compressed-tensors "
                                f"{report['compressed_tensors']}, transformers {report['transformers']}, "
                                f"torch {report['torch']}")

    base = next(r for r in rows if r.name == "bf16")
    for row in rows:
        row.ratio = row.perplexity / base.perplexity
        row.ood_ratio = row.ood_perplexity / base.ood_perplexity
    print_table(rows, args, sorted(set(anchor_notes)) or ["skipped"], time.perf_counter() - started)
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=1))


def print_table(rows: list[Row], args, anchor_notes: list[str], total: float) -> None:
    tokens = args.eval_blocks * (args.block_size - 1)
    print(f"\nSmolLM2-135M-Instruct, {args.eval_blocks} held-out Shakespeare blocks of {args.block_size} tokens "
          f"({tokens} predicted tokens, in-domain) and {args.ood_blocks} Wikipedia blocks (out of domain); "
          f"calibration {args.samples} x {args.seq_len} tokens; {args.threads} CPU threads, fp32 compute\n")
    print("| variant | tool | bits/weight | size on disk (MB) | time (s) | perplexity | ratio to bf16 "
          "| KL to teacher | top-1 agreement | out-of-domain ppl | ood ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r.name} | {r.tool} | {r.bits_per_weight:.2f} | {r.size_mb:.1f} | {r.seconds:.1f} | "
              f"{r.perplexity:.3f} | {r.ratio:.4f} | {r.kl:.4f} | {r.top1:.3f} | {r.ood_perplexity:.3f} | "
              f"{r.ood_ratio:.4f} |")
    by = {(r.name, r.tool == "slimforge"): r for r in rows}
    g = args.group_size

    def ours(name: str) -> Row | None:
        return by.get((name, True))

    print()
    int4 = [r for r in rows if r.tool == "slimforge" and "int4" in r.name and "QAT" not in r.name]
    if int4:
        best = min(int4, key=lambda r: r.ratio)
        print(f"best int4 PTQ: {best.name} {best.ratio:.4f} (target <= 1.03)")
    for name, target in (("W8A8 int8 dynamic", 1.01), ("W8A8 int8 static", 1.01), ("FP8 W8A8 dynamic", 1.005),
                         ("FP8 W8A8 static", 1.005)):
        if ours(name):
            print(f"{name}: {ours(name).ratio:.4f} (target <= {target})")
    uniform = ours(f"GPTQ int4 g{g}")
    for name in ("mixed 3.5 b/w", "mixed 4.25 b/w"):
        if ours(name) and uniform:
            print(f"{name}: {ours(name).ratio:.4f} at {ours(name).bits_per_weight:.2f} b/w vs uniform GPTQ int4 "
                  f"{uniform.ratio:.4f} at {uniform.bits_per_weight:.2f} (target: better at 3.5)")
    qat = ours(f"QAT from GPTQ int4 g{g}")
    if qat and uniform:
        closed = (uniform.ratio - qat.ratio) / (uniform.ratio - 1)
        closed_ood = (uniform.ood_ratio - qat.ood_ratio) / (uniform.ood_ratio - 1)
        print(f"QAT closes {closed:.0%} of GPTQ int4's gap in-domain, {closed_ood:.0%} out of domain, in "
              f"{qat.seconds:.0f} s of training (target >= 50% in <= 300 s)")
    for _scheme, label, ours_name in ANCHORS:
        theirs = next((r for r in rows if r.name == label.format(g=g)), None)
        mine = ours(ours_name.format(g=g))
        if theirs and mine:
            print(f"{mine.name} / llm-compressor: perplexity {mine.perplexity / theirs.perplexity:.4f}, "
                  f"KL {mine.kl / max(theirs.kl, 1e-12):.3f}, time {mine.seconds / max(theirs.seconds, 1e-9):.2f}x")
    print(f"anchors: {'; '.join(anchor_notes)}\nbenchmark wall time: {total / 60:.1f} min")


if __name__ == "__main__":
    main()
