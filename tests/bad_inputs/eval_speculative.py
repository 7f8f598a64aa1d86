"""Bad input to the speculative-decoding task: refused in one line while the recipe is validated."""

from __future__ import annotations

from bad_inputs.harness import BadInput, Env


def _nothing_ran(env: Env) -> None:
    assert not (env.tmp / "run").exists(), "the run started before the recipe was refused"


def _spec(*settings: str):
    def build(env: Env) -> list[str]:
        return env.tiny_run(env.tmp / "run", "data.block_size=32", "+eval.tasks.spec.type=speculative",
                            *(f"+eval.tasks.spec.{s}" for s in settings))
    return build


CASES = [
    BadInput("prompt-longer-than-a-block", _spec("prompt_tokens=64"),
             r"invalid value eval\.tasks\.spec\.prompt_tokens=64: a prompt is cut from one held-out block, and "
             r"data\.block_size is 32; lower prompt_tokens or raise data\.block_size$", after=_nothing_ran),
    BadInput("no-drafts", _spec("k=0"), r"invalid value eval\.tasks\.spec\.k=0: must be between 1 and 64$", after=_nothing_ran),
    BadInput("no-candidates", _spec("width=0"), r"invalid value eval\.tasks\.spec\.width=0: must be between 1 and 64$",
             after=_nothing_ran),
]
