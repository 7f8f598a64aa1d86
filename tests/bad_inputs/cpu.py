"""Bad values for the CPU-kind override (SLIMFORGE_CPU_BF16)."""

from __future__ import annotations

from bad_inputs.harness import BadInput, Env


def _no_stage_ran(env: Env) -> None:
    assert not (env.tmp / "run" / "stages").exists(), "a stage ran although the override was refused"


def _eval_args(env: Env) -> list[str]:
    return ["eval", "--teacher", str(env.teacher_dir), "--students", str(env.teacher_dir), "--tasks", "perplexity",
            "--data", str(env.corpus_dir), "--block-size", "32", "--max-blocks", "2", "--out", str(env.tmp / "out")]


CASES = [
    BadInput("cpu-bf16-not-0-or-1", lambda env: env.tiny_run(env.tmp / "run"),
             r"SLIMFORGE_CPU_BF16='yes' is not understood; set it to 1 .*, 0 .*, or unset it",
             env={"SLIMFORGE_CPU_BF16": "yes"}, after=_no_stage_ran),
    BadInput("cpu-bf16-not-0-or-1-eval", _eval_args, r"SLIMFORGE_CPU_BF16='true' is not understood",
             env={"SLIMFORGE_CPU_BF16": "true"}),
]
