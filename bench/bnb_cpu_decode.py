"""CPU decode speed of bitsandbytes 4-bit layers on their two paths, in one run.

On a CPU with AVX512-BF16, bitsandbytes repacks a 4-bit weight for a bf16 kernel on the
first eval-mode call (the *packed* path); slimforge keeps layers whose widths that kernel
cannot tile on the *unpacked* path (dequantize, then matmul), which every CPU has. This
times HF ``generate`` (greedy, KV cache, fixed new tokens) of one NF4 model whose widths all
fit, once with every layer kept unpacked (the baseline) and once packed, plus the unquantized
model for reference; each variant in a fresh process. Prints tokens/s and the ratio to the
baseline. Where the CPU lacks AVX512-BF16 it prints the rows it could measure, then exits
with one line saying the packed row needs such a CPU.

    .venv/bin/python bench/bnb_cpu_decode.py                  # SmolLM2-135M shapes, random init
    .venv/bin/python bench/bnb_cpu_decode.py --layers 4       # a quicker run
    .venv/bin/python bench/bnb_cpu_decode.py --threads 1      # a shared box: OpenMP barriers
                                                              # under contention cost ~10x

Compute dtype is slimforge's ``dtype: auto`` for the CPU (bf16 where it is native, else fp32).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time

# SmolLM2-135M's shapes: every quantized width divides by 64 (and by 32), so all layers fit.
SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_attention_heads=9,
                    num_key_value_heads=3, max_position_embeddings=2048, tie_word_embeddings=True)
VARIANTS = ("unpacked", "packed", "dense")


def build_model(variant: str, layers: int) -> tuple:
    """The variant's model, in eval mode, and the compute dtype it runs in."""
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    from slimforge.models import resolve_dtype
    from slimforge.quantize.bnb_cpu import keep_4bit_layers_off_cpu_packing

    dtype = resolve_dtype("auto", "cpu")
    torch.manual_seed(0)
    config = LlamaConfig(num_hidden_layers=layers, **SMOLLM2_135M)
    quant = None if variant == "dense" else BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    with tempfile.TemporaryDirectory() as tmp:
        LlamaForCausalLM(config).save_pretrained(tmp)
        model = AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype, quantization_config=quant).eval()
    if variant == "unpacked":
        keep_4bit_layers_off_cpu_packing(model, everywhere=True)
    return model, dtype


def run_variant(variant: str, args: argparse.Namespace) -> dict:
    """tokens/s of one variant at each batch size, and how many of its layers ran packed."""
    import torch

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, dtype = build_model(variant, args.layers)
    out = {"variant": variant, "dtype": str(dtype).replace("torch.", ""), "threads": torch.get_num_threads(),
           "tokens_per_s": {}}
    kwargs = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
    for batch in args.batch:
        prompt = torch.randint(0, SMOLLM2_135M["vocab_size"], (batch, args.prompt),
                               generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            model.generate(prompt, **{**kwargs, "max_new_tokens": 4, "min_new_tokens": 4})  # warm-up (repacks)
            start = time.perf_counter()
            tokens = model.generate(prompt, **kwargs)
        out["tokens_per_s"][str(batch)] = batch * args.new_tokens / (time.perf_counter() - start)
        out.setdefault("greedy", tokens[0, args.prompt:args.prompt + 16].tolist())
    states = [getattr(m.weight, "quant_state", None) for m in model.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
    out["packed_layers"] = sum(bool(getattr(s, "packing_format_for_cpu", False)) for s in states)
    out["layers_4bit"] = len(states)
    return out


def measure(variant: str, args: argparse.Namespace) -> dict:
    """Run one variant in a fresh process (its own memory and kernel choice)."""
    cmd = [sys.executable, __file__, "--one", variant, "--layers", str(args.layers), "--prompt", str(args.prompt),
           "--new-tokens", str(args.new_tokens), "--threads", str(args.threads), "--batch", *map(str, args.batch)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"variant {variant} failed")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def print_table(rows: list[dict], args: argparse.Namespace) -> None:
    base = rows[0]
    print(f"decode on CPU ({os.cpu_count()} cores, {base['threads']} threads, {base['dtype']} compute): Llama with SmolLM2-135M shapes, "
          f"{args.layers} layers, random init, prompt {args.prompt}, {args.new_tokens} new tokens, greedy; "
          f"baseline {base['variant']}")
    header = "".join(f"{'batch ' + str(b) + ' tok/s':>18}{'vs base':>9}" for b in args.batch)
    print(f"{'variant':<10}{'packed layers':>15}{header}{'same greedy tokens':>20}")
    for row in rows:
        cells = "".join(f"{row['tokens_per_s'][str(b)]:>18.1f}"
                        f"{row['tokens_per_s'][str(b)] / base['tokens_per_s'][str(b)]:>8.2f}x" for b in args.batch)
        packed = f"{row['packed_layers']}/{row['layers_4bit']}" if row["layers_4bit"] else "-"
        # Only the two 4-bit paths compute the same model; the dense one is the reference speed.
        same = "-" if row["variant"] == "dense" else "yes" if row["greedy"] == base["greedy"] else "no"
        print(f"{row['variant']:<10}{packed:>15}{cells}{same:>20}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=30, help="decoder layers (SmolLM2-135M has 30)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt", type=int, default=64, help="prompt tokens")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--one", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_variant(args.one, args)))
        return
    from bitsandbytes.functional import has_avx512bf16

    packs = bool(has_avx512bf16())
    rows = [measure(v, args) for v in VARIANTS if packs or v != "packed"]
    print_table(rows, args)
    if not packs:
        raise SystemExit("packed: not measured: this CPU lacks AVX512-BF16, which bitsandbytes' packed 4-bit "
                         "kernel needs; run this on such a CPU (grep avx512_bf16 /proc/cpuinfo)")


if __name__ == "__main__":
    main()
