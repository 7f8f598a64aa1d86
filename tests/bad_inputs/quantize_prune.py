"""Bad pruning and quantization settings: refused in one line before the first stage runs."""

from __future__ import annotations

from bad_inputs.harness import REPO, BadInput, Env

TINY_COMPRESS = str(REPO / "tests" / "assets" / "recipes" / "tiny_compress.yaml")  # prune + quantize stages


def _compress_run(env: Env, *extra: str) -> list[str]:
    """argv for ``slimforge run`` of the tiny prune/quantize recipe on the tiny teacher (hidden 32, MLP 64)."""
    return ["run", TINY_COMPRESS, f"teacher.path={env.teacher_dir}", f"data.path={env.corpus_dir}",
            f"run_dir={env.tmp / 'run'}", *extra]


def _nothing_ran(env: Env) -> None:
    assert not (env.tmp / "run" / "stages").exists(), "a stage ran before the plan refused the recipe"


CASES = [
    # The width prune states MLP 48; GPTQ's groups of 32 cannot tile it. Found at plan time,
    # not after the width stage spent its calibration.
    BadInput("gptq-group-size-vs-pruned-width",
             lambda env: _compress_run(env, "pipeline=[width,gptq]", "stages.width.intermediate_size=48",
                                       "stages.gptq.group_size=32"),
             r"stages\.gptq\.group_size=32: must divide every linear input width, but the model the stages "
             r"before it will make has intermediate_size=48; pick a group size that divides them "
             r"\(none of 32, 64, 128 does\) or -1 \(per channel\)",
             after=_nothing_ran),
    # Through a depth prune too: the widths carry over, the plan still knows them.
    BadInput("rtn-group-size-vs-pruned-width-after-depth",
             lambda env: _compress_run(env, "pipeline=[depth,width,rtn]", "stages.width.intermediate_size=48",
                                       "stages.rtn.group_size=32"),
             r"stages\.rtn\.group_size=32: .*intermediate_size=48",
             after=_nothing_ran),
    # Distillation keeps its input's shape, so a width prune's sizes still reach the quantizer.
    BadInput("gptq-group-size-vs-pruned-width-after-heal",
             lambda env: _compress_run(env, "+distill@stages.heal=kd", "pipeline=[width,heal,gptq]",
                                       "stages.width.intermediate_size=48", "stages.gptq.group_size=32"),
             r"stages\.gptq\.group_size=32: .*intermediate_size=48.*\(none of 32, 64, 128 does\)",
             after=_nothing_ran),
    # N:M sparsity after a width prune: M must divide the pruned widths.
    BadInput("nm-sparsity-vs-pruned-width",
             lambda env: _compress_run(env, "pipeline=[width,wanda]", "stages.width.intermediate_size=48",
                                       "stages.wanda.n=2", "stages.wanda.m=32"),
             r"stages\.wanda\.m=32: the model's linear layers take \[48\] inputs, which are not multiples of M",
             after=_nothing_ran),
]
