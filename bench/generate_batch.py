"""Teacher-generation speed against the batch size, on the real SmolLM2-135M teacher.

``data=teacher_generated`` samples the teacher with HF ``generate`` and the KV cache; the
corpus does not depend on the batch size (each sample has its own random stream), so the
batch size is a pure speed knob. This measures tokens/s at batch 16 (the baseline, the
preset's old value) and at larger batches in the same run, every row forced to the same
number of new tokens so that early stops do not flatter a row.

    .venv/bin/python bench/generate_batch.py [--threads 2] [--new-tokens 64] [--batches 16 32 64]
"""

from __future__ import annotations

import argparse
import time

import torch

from slimforge.models import asset_model_folder


def tokens_per_second(model, tokenizer, batch: int, new_tokens: int) -> float:
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": f"Tell me about topic number {i} in science."}],
                                             tokenize=False, add_generation_prompt=True) for i in range(batch)]
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    start = time.perf_counter()
    with torch.no_grad():
        model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=True, temperature=0.8,
                       pad_token_id=tokenizer.eos_token_id)
    return batch * new_tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 32, 64])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = asset_model_folder("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    print(f"teacher: SmolLM2-135M-Instruct fp32 CPU, {args.threads} threads, {args.new_tokens} new tokens per row")
    baseline = None
    for batch in args.batches:
        speed = tokens_per_second(model, tokenizer, batch, args.new_tokens)
        baseline = baseline or speed
        print(f"batch {batch:3d}: {speed:6.1f} tokens/s  ({speed / baseline:.2f}x batch {args.batches[0]})", flush=True)


if __name__ == "__main__":
    main()
