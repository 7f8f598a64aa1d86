"""Draft models for speculative decoding on the real SmolLM2-135M teacher: acceptance and speed-up.

Runs the shipped ``draft_speculative`` recipe (the teacher cut to 2 of its 30 layers, then trained
on the teacher's own generations) twice, with two training objectives for the same draft:

- **KD**: forward KL to the live teacher's next-token distribution at every position (the recipe);
- **seqKD**: sequence-level KD (Kim & Rush 2016), plain cross-entropy on the teacher's generated
  text (``distill@seqkd``: the teacher is not run while training).

Each run's report scores, on the same held-out prompts (teacher-generated text, never trained on):
the undistilled draft (the stage before: the same 2 layers, untrained), the trained draft, and the
teacher alone. The speculative task reports the acceptance rate, tokens per round, the teacher's
greedy tokens/s alone and with the draft (its output is the teacher's, token for token: checked
per prompt), and the cost model's prediction ``E / (k c + v)`` from the measured draft cost ``c``
and verification cost ``v``. The baseline of every speed-up is the teacher alone, in the same run.

Time is CPU-bound and sensitive to other load: run it on an otherwise idle machine.

    .venv/bin/python bench/speculative.py [--steps 200] [--keep DIR] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from slimforge.pipeline import run_recipe  # noqa: E402

VARIANTS = [
    ("kd", []),
    ("seqkd", ["distill@stages.draft=seqkd", "stages.draft.role=draft", "stages.draft.lr=1.0e-3",
               "stages.draft.teacher_cache=false",
               "stages.draft.warmup_steps=20"]),
]


def speculative_rows(report: dict, variant: str) -> list[dict]:
    rows = []
    for label, entry in report["models"].items():
        result = entry.get("tasks", {}).get("speculative")
        if not result or "acceptance_rate" not in result:  # the teacher's own row: its greedy speed only
            continue
        row = {"variant": variant, "model": label}
        row.update({k: v for k, v in result.items() if isinstance(v, (int, float))})
        row.update({k: v for k, v in result.get("info", {}).items() if isinstance(v, (int, float))})
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="training steps of each draft")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--k", type=int, default=4, help="drafted tokens per round")
    parser.add_argument("--only", default=None, help="comma-separated variants (kd, seqkd)")
    parser.add_argument("--keep", type=Path, default=None, help="make the run directories here and keep them "
                        "(a kept directory resumes: finished stages are reused, evaluation is redone)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    wanted = set((args.only or "kd,seqkd").split(","))
    started = time.perf_counter()
    rows: list[dict] = []
    with (contextlib.nullcontext(str(args.keep)) if args.keep else
          tempfile.TemporaryDirectory(prefix="spec-bench-")) as tmp:
        for variant, extra in VARIANTS:
            if variant not in wanted:
                continue
            run_dir = Path(tmp) / f"run-{variant}"
            for stale in run_dir.glob("eval/*.json"):  # timings are redone on every invocation
                stale.unlink()
            result = run_recipe("draft_speculative", [
                f"run_dir={run_dir}", *extra, f"stages.draft.steps={args.steps}",
                f"eval.tasks.speculative.prompts={args.prompts}",
                f"eval.tasks.speculative.new_tokens={args.new_tokens}", f"eval.tasks.speculative.k={args.k}"])
            report = json.loads((Path(result.run_dir) / "report.json").read_text())
            rows.extend(speculative_rows(report, variant))
    print(f"\nspeculative decoding, SmolLM2-135M teacher, k={args.k}, {args.prompts} prompts x "
          f"{args.new_tokens} new tokens, {args.steps} training steps per draft")
    print(f"{'variant':<7} {'draft':<9} {'accept':>7} {'a/pos':>6} {'tok/round':>9} {'teacher tok/s':>13} {'with draft':>10} "
          f"{'speed-up':>8} {'predicted':>9} {'identical':>9}")
    for r in rows:
        print(f"{r['variant']:<7} {r['model']:<9} {r['acceptance_rate']:7.3f} {r.get('position_acceptance', 0):6.3f} "
              f"{r['tokens_per_round']:9.2f} "
              f"{r['teacher_tokens_per_s']:13.1f} {r['speculative_tokens_per_s']:10.1f} {r['speedup']:7.2f}x "
              f"{r['predicted_speedup']:8.2f}x {r['identical_outputs']:9.2f}")
    print(f"(baseline: the teacher alone in the same run; total {time.perf_counter() - started:.0f} s)")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
