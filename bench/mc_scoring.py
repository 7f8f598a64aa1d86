"""Multiple-choice scoring speed: lm-eval's HFLM against slimforge's shared-context scorer.

Both score the same fixed subsets of the shipped offline benchmarks on the real SmolLM2-135M
teacher through lm-eval's own ``evaluate``; HFLM (lm-eval's wrapper, the baseline) runs every
(context, answer) pair as its own sequence, the shared-context scorer
(:mod:`slimforge.eval.shared_context`) reads each context once. The script prints each
one's seconds, the ratio, and the largest log-likelihood difference and any answer that
differs (there should be none: the values agree to fp32 rounding).

    .venv/bin/python bench/mc_scoring.py [--threads 2] [--limit 100] [--tasks arc_easy hellaswag piqa]
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--tasks", nargs="+", default=["arc_easy", "hellaswag", "piqa"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from lm_eval.evaluator import evaluate
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from slimforge.eval.harness import load_tasks, quiet_libraries, subset_indices, task_manager
    from slimforge.eval.offline import data_root
    from slimforge.eval.shared_context import shared_context_lm
    from slimforge.models import asset_model_folder

    data_root()
    folder = asset_model_folder("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():  # warm-up, so that the first variant timed does not pay for it
        model(torch.ones(args.batch_size, 64, dtype=torch.long))
    print(f"teacher: SmolLM2-135M-Instruct fp32 CPU, {args.threads} threads, batch {args.batch_size}, "
          f"{args.limit} items per task")
    for name in args.tasks:
        timings, answers = {}, {}
        for label, make in (("HFLM", lambda: HFLM(pretrained=model, tokenizer=tokenizer, batch_size=args.batch_size)),
                            ("shared", lambda: shared_context_lm(model, tokenizer, args.batch_size))):
            with quiet_libraries():
                loaded = load_tasks(task_manager([name], [], False), [name], None, 1234)
                task = loaded["tasks"][name]
                samples = {name: subset_indices(len(task.eval_docs), args.limit, 1234, name)}
                lm = make()
                start = time.perf_counter()
                out = evaluate(lm, loaded, samples=samples, bootstrap_iters=0, log_samples=True)
                timings[label] = time.perf_counter() - start
            answers[label] = [[r[0] for r in s["filtered_resps"]] for s in out["samples"][name]]
        diff = max(abs(a - b) for x, y in zip(answers["HFLM"], answers["shared"]) for a, b in zip(x, y))
        picks = sum(max(range(len(x)), key=x.__getitem__) != max(range(len(y)), key=y.__getitem__)
                    for x, y in zip(answers["HFLM"], answers["shared"]))
        print(f"{name:10s} HFLM {timings['HFLM']:6.1f} s | shared {timings['shared']:6.1f} s | "
              f"{timings['HFLM'] / timings['shared']:.2f}x | max |d loglik| {diff:.2e} | answers differing {picks}",
              flush=True)


if __name__ == "__main__":
    main()
