"""Benchmark: one knowledge-distillation training step, slimforge's against the naive reference.

The naive reference is the loop TRL's GKDTrainer and DistillKit run: both models
produce full-vocabulary logits, both get an fp32 log-softmax, the KL is taken over
[tokens x vocab], and autograd keeps it all for the backward pass. slimforge's step
projects chunk by chunk and forms the lm_head gradient inside the chunk
(:mod:`slimforge.distill.chunked`); ``cached`` trains from stored top-k teacher
log-probabilities and skips the teacher's forward entirely.

Each variant runs in its own fresh process, so peak memory (CUDA: max allocated;
CPU: peak resident set size) belongs to that variant alone. Same models, same
batch, same seed, same optimizer (AdamW). Prints a table with the ratios.

Usage:
    python bench/kd_step.py                      # CPU: tiny-to-small Llama configs, 49k vocab
    python bench/kd_step.py --preset h100        # teacher 1.71B / student 362M, bf16, 8 x 1024
    python bench/kd_step.py --batch 16 --seq 2048 --preset h100
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

PRESETS = {
    # Small enough for 2 CPU cores, with the real 49k vocabulary that makes logits the memory hog.
    "cpu": {"teacher": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
                            num_key_value_heads=4),
            "student": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
                            num_key_value_heads=4),
            "batch": 4, "seq": 256, "dtype": "float32", "steps": 4, "warmup": 1, "chunk": 256},
    # The figures measured on an H100 in ../shared/FACTS.md used these shapes.
    "h100": {"teacher": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
                             num_key_value_heads=32),
             "student": dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15,
                             num_key_value_heads=5),
             "batch": 8, "seq": 1024, "dtype": "bfloat16", "steps": 10, "warmup": 3, "chunk": 1024},
}
VOCAB = 49152


def build(cfg: dict, dtype, device, seed: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, max_position_embeddings=4096, tie_word_embeddings=True, **cfg)
    return LlamaForCausalLM(config).to(device=device, dtype=dtype)


def run_variant(variant: str, preset: dict, device_name: str, batch: int, seq: int,
                loss: str = "forward_kl") -> dict:
    """One variant in this process: warm-up steps, then timed steps; returns throughput and peak memory."""
    import torch
    import torch.nn.functional as F

    from slimforge.distill.chunked import chunked_head_loss
    from slimforge.distill.objective import (
        LossSpec,
        cached_chunk_loss,
        final_hidden,
        flatten_batch,
        naive_loss,
        online_chunk_loss,
        teacher_buckets,
    )

    device = torch.device(device_name)
    dtype = getattr(torch, preset["dtype"])
    teacher = build(preset["teacher"], dtype, device, seed=1).eval().requires_grad_(False)
    student = build(preset["student"], torch.float32 if device.type == "cpu" else dtype, device, seed=2)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
    spec = LossSpec(loss, 1.0)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (batch, seq), generator=gen).to(device)
    targets, mask = flatten_batch(ids, None, None)
    cached = None
    if variant == "cached":
        with torch.no_grad():
            hidden = final_hidden(teacher, ids)
            cached = teacher_buckets(teacher.get_output_embeddings()(hidden).reshape(-1, VOCAB), 32)
        del teacher, hidden
        teacher = None
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    baseline_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def step() -> float:
        if variant == "naive":
            with torch.no_grad():
                t_logp = F.log_softmax(teacher(input_ids=ids).logits[:, :-1].float(), dim=-1).reshape(-1, VOCAB)
            logits = student(input_ids=ids).logits[:, :-1].reshape(-1, VOCAB)
            loss = naive_loss(spec, logits, t_logp, targets, mask)
        else:
            hidden = final_hidden(student, ids).reshape(-1, student.config.hidden_size)
            scale = 1.0 / mask.sum().item()
            if variant == "cached":
                chunk = cached_chunk_loss(spec, cached[0], cached[1], targets, mask, scale)
            else:
                with torch.no_grad():
                    t_hidden = final_hidden(teacher, ids).reshape(-1, teacher.config.hidden_size)
                chunk = online_chunk_loss(spec, t_hidden, teacher.get_output_embeddings(), targets, mask, scale)
            loss = chunked_head_loss(hidden, student.get_output_embeddings(), chunk, chunk_size=preset["chunk"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    for _ in range(preset["warmup"]):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    losses = [step() for _ in range(preset["steps"])]
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    tokens = batch * seq * preset["steps"]
    out = {"variant": variant, "tokens_per_s": tokens / seconds, "first_loss": losses[0]}
    if device.type == "cuda":
        out["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    else:
        out["peak_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        out["setup_gib"] = baseline_rss / 2**20
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--seq", type=int, default=None)
    parser.add_argument("--variants", default="naive,chunked,cached")
    parser.add_argument("--loss", default="forward_kl", help="a slimforge.distill loss name")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one variant, print JSON
    args = parser.parse_args()
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    preset = PRESETS[args.preset or ("h100" if device == "cuda" else "cpu")]
    batch, seq = args.batch or preset["batch"], args.seq or preset["seq"]
    if args.one:
        try:
            result = run_variant(args.one, preset, device, batch, seq, args.loss)
        except torch.OutOfMemoryError:
            result = {"variant": args.one, "oom": True}
        print(json.dumps(result))
        return
    rows = []
    for variant in args.variants.split(","):
        cmd = [sys.executable, __file__, "--one", variant, "--device", device, "--batch", str(batch),
               "--seq", str(seq), "--loss", args.loss] + (["--preset", args.preset] if args.preset else [])
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"variant {variant} failed")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    base = next((r for r in rows if r["variant"] == "naive" and not r.get("oom")), None)
    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    print(f"KD step ({args.loss}) on {name}: batch {batch} x {seq} tokens, vocab {VOCAB}, {preset['dtype']}, "
          f"chunks of {preset['chunk']} tokens")
    print(f"{'variant':<10}{'tokens/s':>12}{'peak GiB':>10}{'speed vs naive':>16}{'memory vs naive':>17}")
    for row in rows:
        if row.get("oom"):
            print(f"{row['variant']:<10}{'out of memory':>12}")
            continue
        speed = f"{row['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else "-"
        memory = f"{row['peak_gib'] / base['peak_gib']:.2f}x" if base else "-"
        print(f"{row['variant']:<10}{row['tokens_per_s']:>12.0f}{row['peak_gib']:>10.2f}{speed:>16}{memory:>17}")
    if device == "cpu":
        print("CPU peak = process peak resident set size (weights, optimizer state and framework included).")


if __name__ == "__main__":
    main()
