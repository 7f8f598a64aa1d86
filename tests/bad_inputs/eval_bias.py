"""Bad input to the bias task and the gate's max_bias_shift: each fails in one line before any model
is evaluated (a recipe's, before any stage)."""

from __future__ import annotations

import json
import shutil

from bad_inputs.harness import BadInput, Env

RECORD = {
    "category": "race", "ambig_context": "Two people waited.", "disambig_context": "The first one shouted.",
    "neg_q": "Who was rude?", "nonneg_q": "Who was polite?", "options": ["Unknown", "The first one", "The second one"],
    "unk_label_idx": 0, "stereotype_group_idx": 1, "nonstereotype_group_idx": 2, "neg_label_idx": 1,
    "nonneg_label_idx": 2,
}


def _records(env: Env, records: list[dict]) -> str:
    path = env.tmp / "bbq.json"
    path.write_text(json.dumps(records))
    return str(path)


def _run_with_task(task: str, teacher=None):
    """The tiny run with one more eval task ``bias`` (``task`` may name ``{data}``, a file of records)."""
    def build(env: Env) -> list[str]:
        data = _records(env, [RECORD, {**RECORD, "category": "age"}])
        argv = env.tiny_run(env.tmp / "run", f"+eval.tasks.bias={task.format(data=data)}")
        if teacher is not None:
            argv = [arg if not arg.startswith("teacher.path=") else f"teacher.path={teacher(env)}" for arg in argv]
        return argv
    return build


def _teacher_without_chat_template(env: Env) -> str:
    folder = env.tmp / "plain-teacher"
    shutil.copytree(env.teacher_dir, folder)
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return str(folder)


def _broken_record(env: Env) -> list[str]:
    broken = {k: v for k, v in RECORD.items() if k != "neg_q"}
    return env.tiny_run(env.tmp / "run", f"+eval.tasks.bias={{type: bias, path: {_records(env, [RECORD, broken])}}}")


def _eval(env: Env, *extra: str) -> list[str]:
    return ["eval", "--teacher", str(env.teacher_dir), "--students", str(env.teacher_dir), "--data",
            str(env.corpus_dir), "--block-size", "32", "--max-blocks", "2", "--out", str(env.tmp / "out"), *extra]


def _nothing_ran(env: Env) -> None:
    assert not (env.tmp / "run" / "stages" / "student").exists()
    assert not (env.tmp / "out" / "eval").exists()


CASES = [
    BadInput("unknown-category", _run_with_task("{{type: bias, categories: [race, rase]}}"),
             r"^slimforge: error: invalid value eval\.tasks\.bias\.categories=\['race', 'rase'\]: unknown category "
             r"'rase'; the categories are age, gender, race, religion$", after=_nothing_ran),
    BadInput("category-not-in-file", _run_with_task("{{type: bias, path: {data}, categories: [gender]}}"),
             r"^slimforge: error: the bias task's categories name 'gender', which bbq\.json does not hold; its "
             r"categories are age, race$", after=_nothing_ran),
    BadInput("chat-without-template", _run_with_task("{{type: bias, path: {data}, chat: true}}",
                                                     teacher=_teacher_without_chat_template),
             r"^slimforge: error: the bias task has chat: true, but model 'teacher' \(.*plain-teacher\) has no chat "
             r"template in its tokenizer; set chat: false, or add a chat template", after=_nothing_ran),
    BadInput("broken-record", _broken_record,
             r"^slimforge: error: bias data .*bbq\.json, record 1: lacks neg_q; see docs/evaluation\.md \(Bias\)$",
             after=_nothing_ran),
    BadInput("missing-file", _run_with_task("{{type: bias, path: {data}.gone}}"),
             r"^slimforge: error: bias data .*bbq\.json\.gone does not exist; give a \.json or \.jsonl file",
             after=_nothing_ran),
    # The fast tier's cache holds no bbq asset, and SLIMFORGE_OFFLINE is set: say how to fetch it.
    BadInput("asset-not-fetched", lambda env: _eval(env, "--tasks", "bias"),
             r"^slimforge: error: asset bbq \(multibbq==0\.1\.0\) is not in the cache and SLIMFORGE_OFFLINE is set; "
             r"run `slimforge fetch bbq`", after=_nothing_ran),
    BadInput("gate-without-bias-task", lambda env: _eval(env, "--tasks", "perplexity", "--max-bias-shift", "0.1"),
             r"^slimforge: error: the gate's max_bias_shift needs a bias task; add one \(slimforge eval --tasks bias, "
             r"or eval\.tasks\.bias: \{type: bias\} in a recipe\)$", after=_nothing_ran),
    BadInput("gate-bias-shift-out-of-range", lambda env: _eval(env, "--tasks", "perplexity", "--max-bias-shift", "3"),
             r"^slimforge: error: invalid --max-bias-shift 3: must be in \[0, 2\]$", after=_nothing_ran),
]
