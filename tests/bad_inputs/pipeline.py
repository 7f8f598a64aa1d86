"""Bad run locations and late-found recipe mistakes: refused before anything is written or run."""

from __future__ import annotations

from bad_inputs.harness import TINY, BadInput, Env


def _named_run(env: Env, *extra: str, layers: str = "2") -> list[str]:
    """argv for the tiny recipe with ``out_dir`` under the case's folder (the run path comes from the names)."""
    return ["run", TINY, f"teacher.path={env.teacher_dir}", f"data.path={env.corpus_dir}",
            f"stages.student.num_layers={layers}", f"out_dir={env.tmp / 'runs'}", *extra]


def _own_files(env: Env) -> None:
    """The user's own config.yaml and report.md beside the out_dir, where ``run_name=../..`` would write."""
    (env.tmp / "config.yaml").write_text("my own config\n")
    (env.tmp / "report.md").write_text("my own report\n")


def _own_files_untouched(env: Env) -> None:
    assert (env.tmp / "config.yaml").read_text() == "my own config\n"
    assert (env.tmp / "report.md").read_text() == "my own report\n"
    assert not (env.tmp / "runs").exists()


def _escape(run_name: str):
    def build(env: Env) -> list[str]:
        _own_files(env)
        return _named_run(env, f"run_name={run_name}")
    return build


def _absolute(env: Env) -> list[str]:
    _own_files(env)
    return _named_run(env, f"run_name={env.tmp / 'elsewhere'}")


def _absolute_after(env: Env) -> None:
    _own_files_untouched(env)
    assert not (env.tmp / "elsewhere").exists()


def _project_folder(env: Env) -> list[str]:
    """run_dir= a folder of the user's that is not a run directory."""
    folder = env.tmp / "project"
    folder.mkdir()
    (folder / "config.yaml").write_text("my own config\n")
    (folder / "notes.txt").write_text("notes\n")
    env.state["before"] = {p.name: p.read_bytes() for p in folder.iterdir()}
    return env.tiny_run(folder)


def _project_untouched(env: Env) -> None:
    folder = env.tmp / "project"
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == env.state["before"]


def _sweep_into_a_run(env: Env) -> list[str]:
    """A sweep whose folder is a single run's directory: its report.md would be overwritten."""
    folder = env.tmp / "single"
    folder.mkdir()
    (folder / "manifest.json").write_text("{}\n")
    (folder / "report.md").write_text("the single run's report\n")
    env.state["before"] = {p.name: p.read_bytes() for p in folder.iterdir()}
    return [*env.tiny_run(folder), "-m", "seed=0,1"]


def _single_untouched(env: Env) -> None:
    assert {p.name: p.read_bytes() for p in (env.tmp / "single").iterdir()} == env.state["before"]


def _file_in_the_way(env: Env) -> list[str]:
    """out_dir below a regular file: the run directory cannot be created (as root too, unlike chmod)."""
    (env.tmp / "a-file").write_text("not a folder\n")
    return _named_run(env, f"out_dir={env.tmp / 'a-file' / 'runs'}", "run_name=exp")


def _eval_out_in_the_way(env: Env) -> list[str]:
    (env.tmp / "a-file").write_text("not a folder\n")
    return ["eval", "--teacher", str(env.teacher_dir), "--students", str(env.model_dirs["qwen2"]),
            "--tasks", "perplexity", "--data", str(env.corpus_dir), "--block-size", "32", "--max-blocks", "2",
            "--out", str(env.tmp / "a-file" / "out")]


def _nothing_ran(env: Env) -> None:
    runs = env.tmp / "runs"
    assert not list(runs.rglob("stages")), "a job ran before the bad one was found"
    assert not list(runs.rglob("manifest.json"))


CASES = [
    BadInput("run-name-parent", _escape("../.."), r"invalid value run_name='\.\./\.\.': must be a plain folder name",
             after=lambda env: _own_files_untouched(env)),
    BadInput("run-name-etc", _escape("../../etc"), r"run_name='\.\./\.\./etc'.*plain folder name.*set run_dir=PATH",
             after=lambda env: _own_files_untouched(env)),
    BadInput("run-name-absolute", _absolute, r"run_name='/.*elsewhere'.*plain folder name", after=_absolute_after),
    BadInput("run-name-dot", _escape("."), r"run_name='\.'.*must not start with '\.'",
             after=lambda env: _own_files_untouched(env)),
    BadInput("recipe-name-escape", lambda env: _own_files(env) or _named_run(env, "name=../../x"),
             r"invalid value name='\.\./\.\./x': must be a plain folder name",
             after=lambda env: _own_files_untouched(env)),
    BadInput("run-dir-not-a-run", _project_folder,
             r"project is not a slimforge run directory \(no manifest\.json\) and holds other files "
             r"\(config\.yaml, notes\.txt\)", after=_project_untouched),
    BadInput("sweep-into-a-run-dir", _sweep_into_a_run,
             r"single is not a slimforge sweep folder \(no sweep\.json\) and holds other files "
             r"\(manifest\.json, report\.md\)", after=_single_untouched),
    BadInput("run-dir-is-a-file", lambda env: (env.tmp / "f").write_text("x") and env.tiny_run(env.tmp / "f"),
             r"the run directory .*/f is a file"),
    BadInput("run-dir-below-a-file", _file_in_the_way, r"cannot create the run directory .*a-file/runs/tiny/exp: "
             r".*a-file is a file; choose another run_dir or out_dir"),
    BadInput("eval-out-below-a-file", _eval_out_in_the_way,
             r"cannot write to .*a-file/out \(Not a directory\); choose a writable --out folder"),
    BadInput("unknown-eval-model", lambda env: _named_run(env, "run_name=exp", "eval.models=[teacher,studnet]"),
             r"eval\.models names 'studnet'.*valid names: teacher, all, student",
             after=lambda env: _nothing_ran(env)),
    BadInput("task-models-unknown-stage",
             lambda env: _named_run(env, "run_name=exp", "+eval.tasks.perplexity.models=[teacher,studnet]"),
             r"eval\.tasks\.perplexity\.models names 'studnet'.*valid names: teacher, student",
             after=lambda env: _nothing_ran(env)),
    BadInput("task-models-without-teacher",
             lambda env: _named_run(env, "run_name=exp", "+eval.tasks.perplexity.models=[student]"),
             r"eval\.tasks\.perplexity\.models leaves out 'teacher'; add it",
             after=lambda env: _nothing_ran(env)),
    BadInput("sweep-with-a-bad-member",
             lambda env: _named_run(env, "run_name=sw", "-m", layers="1,9"),
             r"stages\.student\.num_layers=9.*the teacher has only 4 layers", after=_nothing_ran),
]
