"""Bad mixed-precision settings: a budget nothing fits or that leaves nothing to choose, bad candidate widths.

All but the last fail while planning (no stage runs, ``after`` checks it); the last passes the
plan's nominal check and is refused by the stage's exact one, once the layers' shapes are
known and before any calibration (tests/test_quant_mixed.py checks that no calibration ran).
The tiny teacher's widths are 32 and 64, so the cases use groups of 32: int3 then stores
3 + 16/32 = 3.5 bits per weight nominally, int4 4.5.
"""

from __future__ import annotations

from bad_inputs.harness import REPO, BadInput, Env

STUDENT = str(REPO / "tests" / "assets" / "recipes" / "student.yaml")


def mixed_run(env: Env, *extra: str) -> list[str]:
    """argv for ``slimforge run`` of one mixed_precision stage on the tiny teacher, no evaluation."""
    return ["run", STUDENT, f"teacher.path={env.teacher_dir}", "data=text", f"data.path={env.corpus_dir}",
            "data.block_size=32", f"run_dir={env.tmp / 'run'}", "+quantize@stages.quant=mixed_precision",
            "pipeline=[quant]", "~eval.tasks.perplexity", "stages.quant.group_size=32", "stages.quant.block_size=32",
            *extra]


def nothing_ran(env: Env) -> None:
    assert not (env.tmp / "run" / "stages").exists(), "a stage ran before the plan refused the recipe"


def no_artifact(env: Env) -> None:
    assert not (env.tmp / "run" / "stages" / "quant" / "slimforge.json").exists()


CASES = [
    BadInput("budget-below-the-narrowest-width",
             lambda env: mixed_run(env, "stages.quant.bits_budget=3.2"),
             r"stages\.quant\.bits_budget=3\.2: is below 3\.5, what the narrowest candidate \(width 3\) stores "
             r"per weight with its scales; raise bits_budget to at least 3\.5",
             after=nothing_ran),
    BadInput("budget-at-the-widest-width",
             lambda env: mixed_run(env, "stages.quant.bits_budget=16"),
             r"stages\.quant\.bits_budget=16\.0: reaches 16, .*every layer would simply take width 16; "
             r"lower bits_budget below 16, or use the gptq method",
             after=nothing_ran),
    BadInput("budget-above-the-widest-quantized-width",
             lambda env: mixed_run(env, "stages.quant.candidates=[3,4]", "stages.quant.bits_budget=4.6"),
             r"stages\.quant\.bits_budget=4\.6: reaches 4\.5, what the widest candidate \(width 4\) stores",
             after=nothing_ran),
    BadInput("candidate-width-outside-the-set",
             lambda env: mixed_run(env, "stages.quant.candidates=[2,4,16]"),
             r"stages\.quant\.candidates=\[2, 4, 16\]: each must be one of 3, 4, 8, 16",
             after=nothing_ran),
    BadInput("no-candidates",
             lambda env: mixed_run(env, "stages.quant.candidates=[]"),
             r"stages\.quant\.candidates=\[\]: needs at least two widths to choose from",
             after=nothing_ran),
    BadInput("one-candidate",
             lambda env: mixed_run(env, "stages.quant.candidates=[4]"),
             r"stages\.quant\.candidates=\[4\]: needs at least two different widths",
             after=nothing_ran),
    BadInput("bits-given",
             lambda env: mixed_run(env, "stages.quant.bits=4"),
             r"stages\.quant\.bits=4: mixed_precision chooses each layer's width from candidates",
             after=nothing_ran),
    # Nominally 3.5 fits; the tiny layers' shape tensors add ~0.2 bits a weight, found once they load.
    BadInput("budget-below-the-exact-minimum",
             lambda env: mixed_run(env, "stages.quant.bits_budget=3.55"),
             r"stages\.quant\.bits_budget=3\.55: is below 3\.598, what the narrowest candidate \(width 3\)",
             after=no_artifact),
]
