"""Decode speed of bitsandbytes int8 and NF4 against the 16-bit model, in one run.

HF ``generate`` (greedy, KV cache, a fixed number of new tokens, no early stop) on a
random-init Llama config, each variant in its own fresh process so memory is its own.
Prints tokens/s at each batch size, peak memory, and the ratio to the 16-bit baseline.

    .venv/bin/python bench/decode_speed.py                     # CUDA: 1.7B Llama config, bf16 baseline
    .venv/bin/python bench/decode_speed.py --preset tiny       # CPU smoke run (fp32 baseline)

The 1.7B shape is the one the H100 figures in ../shared/FACTS.md used (24 layers, hidden 2048).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import time

PRESETS = {
    "1.7b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
                 num_key_value_heads=32),
    "tiny": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2),
}
VOCAB = 49152


def run_variant(variant: str, args: argparse.Namespace) -> dict:
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, max_position_embeddings=4096, tie_word_embeddings=True,
                         **PRESETS[args.preset])
    with tempfile.TemporaryDirectory() as tmp:
        LlamaForCausalLM(config).to(dtype).save_pretrained(tmp)
        quant = {"int8": BitsAndBytesConfig(load_in_8bit=True),
                 "nf4": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                           bnb_4bit_compute_dtype=dtype)}.get(variant)
        model = AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype, quantization_config=quant,
                                                     device_map={"": device.index or 0} if device.type == "cuda"
                                                     else None)
    if device.type != "cuda" or quant is None:
        model.to(device)
    model.eval()
    out = {"variant": variant, "weights_gib": model.get_memory_footprint() / 2**30, "tokens_per_s": {}}
    for batch in args.batch:
        prompt = torch.randint(0, VOCAB, (batch, args.prompt), generator=torch.Generator().manual_seed(1)).to(device)
        kwargs = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                      pad_token_id=0)
        with torch.no_grad():
            model.generate(prompt, **{**kwargs, "max_new_tokens": 4, "min_new_tokens": 4})  # warm-up
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            model.generate(prompt, **kwargs)
            if device.type == "cuda":
                torch.cuda.synchronize()
        out["tokens_per_s"][str(batch)] = batch * args.new_tokens / (time.perf_counter() - start)
    out["peak_gib"] = (torch.cuda.max_memory_allocated() if device.type == "cuda"
                       else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**30
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None, help="1.7b on CUDA, tiny on CPU")
    parser.add_argument("--device", default=None)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--prompt", type=int, default=64, help="prompt tokens")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--variants", default="16bit,int8,nf4")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.preset = args.preset or ("1.7b" if args.device == "cuda" else "tiny")
    if args.one:
        print(json.dumps(run_variant(args.one, args)))
        return
    rows = []
    for variant in args.variants.split(","):
        cmd = [sys.executable, __file__, "--one", variant, "--device", args.device, "--preset", args.preset,
               "--prompt", str(args.prompt), "--new-tokens", str(args.new_tokens), "--batch", *map(str, args.batch)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"variant {variant} failed")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    base = rows[0]
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    print(f"decode on {where}: Llama {args.preset} config, random init, prompt {args.prompt}, "
          f"{args.new_tokens} new tokens, greedy; baseline {base['variant']} "
          f"({'bf16' if args.device == 'cuda' else 'fp32'})")
    header = "".join(f"{'batch ' + str(b) + ' tok/s':>18}{'vs base':>9}" for b in args.batch)
    print(f"{'variant':<10}{'weights GiB':>12}{'peak GiB':>10}{header}")
    for row in rows:
        cells = "".join(f"{row['tokens_per_s'][str(b)]:>18.1f}"
                        f"{row['tokens_per_s'][str(b)] / base['tokens_per_s'][str(b)]:>8.2f}x" for b in args.batch)
        print(f"{row['variant']:<10}{row['weights_gib']:>12.2f}{row['peak_gib']:>10.2f}{cells}")


if __name__ == "__main__":
    main()
