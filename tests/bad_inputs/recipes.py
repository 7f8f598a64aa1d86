"""Bad recipes, overrides and config values."""

from __future__ import annotations

from bad_inputs.harness import TINY_DISTILL, BadInput, Env


def _distill_run(env: Env, *extra: str) -> list[str]:
    return ["run", TINY_DISTILL, f"teacher.path={env.teacher_dir}", f"data.path={env.corpus_dir}",
            "stages.student.num_layers=2", f"run_dir={env.tmp / 'run'}", *extra]


def _nothing_written(env: Env) -> None:
    assert not (env.tmp / "run").exists()


def _broken_recipe(env: Env) -> list[str]:
    path = env.tmp / "mine.yaml"
    path.write_text("defaults:\n  - slimforge_recipe\n  - _self_\nname: mine\npipeline: [student\n"
                    "data:\n  block_size: 32\n")
    return ["run", str(path), "--dry-run"]


UTILS_PY = "import pathlib\npathlib.Path(__file__).with_name('IMPORTED').write_text('ran')\n" \
           "def keep(docs):\n    return docs\n"


def _coded_tasks(env: Env):
    """An include path whose task YAML runs Python from utils.py (which marks that it was imported)."""
    folder = env.tmp / "tasks"
    folder.mkdir()
    (folder / "qa.jsonl").write_text('{"q": "Who?", "options": [" him", " her"], "label": 0}\n')
    (folder / "qa.yaml").write_text(
        f"task: qa\ndataset_path: json\ndataset_kwargs: {{data_files: {{test: {folder / 'qa.jsonl'}}}}}\n"
        "output_type: multiple_choice\ntest_split: test\ndoc_to_text: '{{q}}'\ndoc_to_choice: '{{options}}'\n"
        "doc_to_target: label\nprocess_docs: !function utils.keep\n")
    (folder / "utils.py").write_text(UTILS_PY)
    return folder


def _coded_recipe(env: Env) -> list[str]:
    folder = _coded_tasks(env)
    return env.tiny_run(env.tmp / "run", f"eval.include_path=[{folder}]", "+eval.tasks.qa={type: lm_eval, task: qa}")


def _coded_eval(env: Env) -> list[str]:
    folder = _coded_tasks(env)
    return ["eval", "--teacher", str(env.teacher_dir), "--students", str(env.teacher_dir), "--tasks", "qa",
            "--include-path", str(folder), "--out", str(env.tmp / "ev")]


def _code_never_ran(env: Env) -> None:
    assert not (env.tmp / "tasks" / "IMPORTED").exists()
    assert not (env.tmp / "run").exists() and not (env.tmp / "ev").exists()


CODE = (r"/tasks/qa\.yaml runs Python \(!function utils\.keep\); task YAMLs from an include path may run code only "
        r"when you allow it \(eval\.allow_code=true in a recipe, --allow-code for slimforge eval\)")

CASES = [
    BadInput("negative-seed", lambda env: env.tiny_run(env.tmp / "run", "seed=-1"),
             r"seed=-1: must be between 0 and 4294967295"),
    BadInput("unknown-recipe", lambda env: ["run", "nonexistent"],
             r"unknown recipe 'nonexistent'.*Valid recipes: default"),
    BadInput("unknown-size-point", lambda env: ["run", "size_quality", "size=p33", f"run_dir={env.tmp / 'run'}"],
             r"recipe 'size_quality': In 'size_quality': Could not find 'size/p33'; Available options in 'size'; "
             r"p40; p57; p75; p90; teacher_gptq; teacher_nf4$", after=_nothing_written),
    BadInput("value-out-of-range", lambda env: env.tiny_run(env.tmp / "run", "data.heldout_fraction=2"),
             r"data\.heldout_fraction=2\.0: must be in \(0, 1\)"),
    BadInput("retention-threshold-out-of-range", lambda env: env.tiny_run(env.tmp / "run", "eval.retention_threshold=0"),
             r"^slimforge: error: invalid value eval\.retention_threshold=0\.0: must be in \(0, 2\]$",
             after=_nothing_written),
    BadInput("misspelled-stage-key", lambda env: _distill_run(env, "stages.heal.stepz=5"),
             r"^slimforge: error: unknown key stages\.heal\.stepz: DistillConfig has no 'stepz'; "
             r"did you mean stages\.heal\.steps\?$", after=_nothing_written),
    # With a leading + these used to compose, pass --dry-run and be ignored.
    BadInput("plus-key-no-schema-has", lambda env: _distill_run(env, "+stages.heal.stepz=5"),
             r"^slimforge: error: unknown key stages\.heal\.stepz: DistillConfig has no 'stepz'; "
             r"did you mean stages\.heal\.steps\?$", after=_nothing_written),
    BadInput("plus-teacher-key-dry-run", lambda env: env.tiny_run(env.tmp / "run", "+teacher.foo=bar", "--dry-run"),
             r"^slimforge: error: unknown key teacher\.foo: TeacherConfig has no 'foo'; the keys there are: path, "
             r"asset, gguf_file, revision, trust_remote_code, allow_pickle$"),
    BadInput("plus-key-of-a-misspelled-stage", lambda env: _distill_run(env, "+stages.hael.steps=5"),
             r"^slimforge: error: stages\.hael is not a stage \(it has no kind and method\); did you mean "
             r"stages\.heal\?$", after=_nothing_written),
    BadInput("yaml-syntax-error", _broken_recipe,
             r"/mine\.yaml is not valid YAML: line 6, column 5: expected ',' or '\]', but got ':' \(while parsing "
             r"a flow sequence that starts on line 5\); fix the syntax there$"),
    BadInput("include-path-runs-code", _coded_recipe, CODE, after=_code_never_ran),
    BadInput("eval-include-path-runs-code", _coded_eval, CODE, after=_code_never_ran),
]
