"""The recipe runner end to end on a tiny teacher: run dir, manifest, skip, resume, refuse, sweep."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, build_tokenizer, cli_env, run_cli
from transformers import AutoModelForCausalLM

import slimforge
from slimforge import cli
from slimforge.distill import students

STUDENT = str(Path(__file__).resolve().parent / "assets" / "recipes" / "student.yaml")  # the runner's test recipe

TINY = str(REPO / "tests" / "assets" / "recipes" / "tiny.yaml")


def tiny_args(teacher_dir, corpus_dir, run_dir, *extra):
    return [
        f"teacher.path={teacher_dir}", "data=text", f"data.path={corpus_dir}", "data.block_size=32",
        "stages.student.num_layers=2", "eval.tasks.perplexity.max_blocks=8", "eval.batch_size=4",
        f"run_dir={run_dir}", *extra,
    ]


def snapshot(folder):
    """Content and mtime of every file under ``folder``: to prove nothing was touched.

    Model cards (README.md) are left out: a new evaluation rightly rewrites their results table.
    """
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name not in ("run.log", ".lock", "README.md")}


def main(*args):
    return cli.main(["run", STUDENT, *args])


@pytest.fixture()
def finished_run(teacher_dir, corpus_dir, tmp_path):
    run_dir = tmp_path / "run"
    assert main(*tiny_args(teacher_dir, corpus_dir, run_dir)) == 0
    return run_dir


def test_cli_end_to_end_in_a_subprocess(teacher_dir, corpus_dir, tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli("run", STUDENT, *tiny_args(teacher_dir, corpus_dir, run_dir), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert f"run directory: {run_dir}" in proc.stdout
    manifest = json.loads((run_dir / "manifest.json").read_text())
    stage = manifest["stages"]["student"]
    assert stage["status"] == "done" and stage["parent"]["label"] == "teacher"
    assert stage["parent"]["fingerprint"] == manifest["teacher"]["fingerprint"]
    artifact = run_dir / "stages" / "student"
    meta = json.loads((artifact / "slimforge.json").read_text())
    assert meta["layers_before"] == 4 and meta["kept_layers"] == [0, 3]
    assert meta["config_hash"] == stage["config_hash"] and (artifact / "recipe.yaml").is_file()
    model = AutoModelForCausalLM.from_pretrained(artifact)
    assert model.config.num_hidden_layers == 2
    report = json.loads((run_dir / "report.json").read_text())
    teacher_ppl = report["models"]["teacher"]["tasks"]["perplexity"]["perplexity"]
    student_ppl = report["models"]["student"]["tasks"]["perplexity"]["perplexity"]
    assert math.isfinite(teacher_ppl) and math.isfinite(student_ppl) and teacher_ppl != student_ppl
    assert report["retained"]["student"]["perplexity.perplexity"] == pytest.approx(teacher_ppl / student_ppl)
    assert (run_dir / "config.yaml").is_file() and (run_dir / "report.md").is_file()
    assert "student" in (run_dir / "run.log").read_text()
    assert not (run_dir / "work").exists()
    assert not any(p.name.endswith(".partial") for p in run_dir.rglob("*"))


def test_rerun_skips_unchanged_stages_and_eval(finished_run, teacher_dir, corpus_dir, capsys):
    before = snapshot(finished_run / "stages")
    evals = snapshot(finished_run / "eval")
    assert main(*tiny_args(teacher_dir, corpus_dir, finished_run)) == 0
    assert snapshot(finished_run / "stages") == before
    assert snapshot(finished_run / "eval") == evals
    manifest = json.loads((finished_run / "manifest.json").read_text())
    assert manifest["stages"]["student"]["status"] == "skipped"
    assert len(manifest["invocations"]) == 2
    assert "unchanged, reusing" in capsys.readouterr().err


def test_changed_eval_settings_rerun_only_the_eval(finished_run, teacher_dir, corpus_dir):
    stages = snapshot(finished_run / "stages")
    assert main(*tiny_args(teacher_dir, corpus_dir, finished_run, "eval.tasks.perplexity.max_blocks=4")) == 0
    assert snapshot(finished_run / "stages") == stages
    teacher = json.loads((finished_run / "eval" / "teacher.json").read_text())
    assert teacher["tasks"]["perplexity"]["blocks"] == 4


def test_changed_stage_config_is_refused_then_overwritten(finished_run, teacher_dir, corpus_dir, capsys):
    before = snapshot(finished_run)
    code = main(*tiny_args(teacher_dir, corpus_dir, finished_run, "stages.student.num_layers=3"))
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2
    assert "made from a different config or input; re-run with overwrite=true" in err
    assert snapshot(finished_run) == before
    assert main(*tiny_args(teacher_dir, corpus_dir, finished_run, "stages.student.num_layers=3", "overwrite=true")) == 0
    meta = json.loads((finished_run / "stages" / "student" / "slimforge.json").read_text())
    assert meta["layers_after"] == 3


def test_interrupted_stage_leaves_no_artifact_and_resumes(teacher_dir, corpus_dir, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    real = students.drop_layers_stage

    def killed(ctx):
        (ctx.out_dir / "model.safetensors").write_bytes(b"half written")
        (ctx.work_dir / "checkpoint").write_text("step 3")
        raise KeyboardInterrupt

    monkeypatch.setattr(students, "drop_layers_stage", killed)
    assert main(*tiny_args(teacher_dir, corpus_dir, run_dir)) == 130
    assert not (run_dir / "stages" / "student").exists()
    assert not any(p.name.endswith(".partial") for p in run_dir.rglob("*"))
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["stages"]["student"]["status"] == "interrupted"
    assert (run_dir / "work" / "student" / "checkpoint").read_text() == "step 3"  # kept for resuming

    seen = {}

    def resumed(ctx):
        seen["checkpoint"] = (ctx.work_dir / "checkpoint").read_text()
        return real(ctx)

    monkeypatch.setattr(students, "drop_layers_stage", resumed)
    assert main(*tiny_args(teacher_dir, corpus_dir, run_dir)) == 0
    assert seen["checkpoint"] == "step 3"
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["stages"]["student"]["status"] == "done"
    assert (run_dir / "report.json").is_file()


# --- bad input: one line, exit 2, nothing overwritten ----------------------------------------


def _assert_one_line_error(capsys, pattern):
    import re

    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("slimforge: error:")]
    assert len(err) == 1, err
    assert re.search(pattern, err[0]), err[0]


def test_unknown_recipe(capsys):
    assert cli.main(["run", "nonexistent"]) == 2
    _assert_one_line_error(capsys, r"unknown recipe 'nonexistent'.*Valid recipes: default")


def test_bad_inputs_leave_the_run_dir_alone(finished_run, teacher_dir, corpus_dir, tmp_path, capsys, model_dirs):
    before = snapshot(finished_run)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "blank.txt").write_text("   \n")
    other_tok = build_tokenizer(vocab_size=320)
    foreign = tmp_path / "foreign"
    from conftest import build_model

    build_model("llama", other_tok).save_pretrained(foreign)
    other_tok.save_pretrained(foreign)
    cases = [
        (["stages.student.method=wanda"], r"unknown student method 'wanda'.*Valid student methods: checkpoint, drop_layers"),
        # Validation comes first: the bad value is reported although the teacher path is also wrong.
        (["stages.student.num_layers=0", "teacher.path=/no/such/teacher"], r"stages\.student\.num_layers=0: must be >= 1"),
        (["data.heldout_fraction=2"], r"data\.heldout_fraction=2\.0: must be in \(0, 1\)"),
        (["teacher.path=/no/such/teacher"], r"model path /no/such/teacher does not exist"),
        (["stages.student.num_layers=9"], r"stages\.student\.num_layers=9.*the teacher has only 4 layers"),
        ([f"data.path={empty}"], r"no text after tokenization"),
    ]
    for extra, pattern in cases:
        code = main(*tiny_args(teacher_dir, corpus_dir, finished_run, *extra))
        assert code == 2, extra
        _assert_one_line_error(capsys, pattern)
        assert snapshot(finished_run) == before, extra
    # A student checkpoint with another tokenizer (the method is switched in a recipe of one's own).
    code = cli.main(["run", TINY, f"teacher.path={teacher_dir}", f"data.path={corpus_dir}", f"run_dir={finished_run}",
                     "student@stages.student=checkpoint", f"stages.student.path={foreign}"])
    assert code == 2
    _assert_one_line_error(capsys, r"does not share the teacher's tokenizer \(vocabulary sizes differ \(384 vs 320\); "
                                   r"\d+ of 384 teacher tokens are missing or have other ids\)")
    assert snapshot(finished_run) == before


def test_checkpoint_student_with_the_same_tokenizer(teacher_dir, corpus_dir, tmp_path, model_dirs):
    run_dir = tmp_path / "run"
    assert cli.main(["run", TINY, f"teacher.path={teacher_dir}", f"data.path={corpus_dir}", f"run_dir={run_dir}",
                     "student@stages.student=checkpoint", f"stages.student.path={model_dirs['phi3']}"]) == 0
    meta = json.loads((run_dir / "stages" / "student" / "slimforge.json").read_text())
    assert meta["model_type"] == "phi3"


def test_switching_a_method_keeps_typed_checks(teacher_dir, corpus_dir, tmp_path, capsys):
    """Group presets carry their method's schema: an unknown key fails while composing."""
    code = cli.main(["run", TINY, f"teacher.path={teacher_dir}", f"data.path={corpus_dir}",
                     "student@stages.student=checkpoint", "stages.student.num_layers=2"])
    assert code == 2
    _assert_one_line_error(capsys, r"unknown key stages\.student\.num_layers: CheckpointStudentConfig has no 'num_layers'")


def test_multirun_sweep(teacher_dir, corpus_dir, tmp_path):
    args = tiny_args(teacher_dir, corpus_dir, tmp_path / "ignored")
    args = [a for a in args if not a.startswith(("run_dir=", "stages.student.num_layers"))]
    assert cli.main(["run", STUDENT, "-m", *args, f"out_dir={tmp_path}", "run_name=sweep1",
                     "stages.student.num_layers=1,3"]) == 0
    sweep = json.loads((tmp_path / "student" / "sweep1" / "sweep.json").read_text())
    assert len(sweep["jobs"]) == 2
    layers = sorted(json.loads((tmp_path / "student" / "sweep1" / job / "stages/student/slimforge.json").read_text())
                    ["layers_after"] for job in ("job00", "job01"))
    assert layers == [1, 3]


def test_python_api(teacher_dir, corpus_dir, tmp_path):
    result = slimforge.run(STUDENT, tiny_args(teacher_dir, corpus_dir, tmp_path / "api"))
    assert result.run_dir == tmp_path / "api"
    assert set(result.report["models"]) == {"teacher", "student"}
    assert result.artifacts["student"].is_dir()


def test_print_config_and_dry_run(capsys):
    assert cli.main(["run", "--print-config", "stages.heal.steps=7"]) == 0
    out = capsys.readouterr().out
    assert "steps: 7" in out and "asset: smollm2-135m" in out
    assert cli.main(["run", "default", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "1. depth: prune/depth" in out and "3. nf4: quantize/bnb_nf4" in out and "wikipedia" in out


def test_recipes_command_lists_summaries(capsys):
    assert cli.main(["recipes"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("default") and "pruned, healed, 4-bit student" in out


def test_help_is_cheap():
    """``slimforge --help`` must not import the heavy libraries."""
    code = ("import sys, slimforge.cli as c\n"
            "try:\n    c.main(['--help'])\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in ('torch', 'transformers', 'hydra', 'datasets') if m in sys.modules]\n"
            "print(heavy)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=cli_env(), cwd=REPO)
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_wheel_carries_the_recipes(tmp_path):
    """A built wheel holds the recipes, and an install finds them from any directory."""
    import zipfile

    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path / "dist"), str(REPO)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    wheel = next((tmp_path / "dist").glob("slimforge-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "slimforge/_recipes/default.yaml" in names
    assert "slimforge/_recipes/teacher/smollm2_135m.yaml" in names
    target = tmp_path / "site"
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(target)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = cli_env()
    env["PYTHONPATH"] = str(target)
    proc = subprocess.run([sys.executable, "-c", "from slimforge.recipes import recipes_dir, list_recipes;"
                           "print(recipes_dir()); print(sorted(list_recipes()))"],
                          capture_output=True, text=True, env=env, cwd=elsewhere)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == str(target / "slimforge" / "_recipes")
    assert "'default'" in proc.stdout.splitlines()[1]


# --- finished work that cannot silently lie ---------------------------------------------------


def _flip_a_byte_keeping_mtime(path: Path) -> None:
    """Change one byte and set the modification time back, as ``touch -r`` would: only the bytes tell."""
    stat = path.stat()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


DAMAGES = {
    "flipped-byte": (lambda a: _flip_a_byte_keeping_mtime(a / "model.safetensors"),
                     "model.safetensors differs from the sha256 recorded when it was written"),
    "truncated-weights": (lambda a: (a / "model.safetensors").write_bytes((a / "model.safetensors").read_bytes()[:999]),
                          "model.safetensors differs from the sha256 recorded when it was written"),
    "garbled-meta": (lambda a: (a / "slimforge.json").write_text('{"stage": "stud'), "slimforge.json is unreadable"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_damaged_artifact_is_made_again(finished_run, teacher_dir, corpus_dir, capsys, damage):
    artifact = finished_run / "stages" / "student"
    weights = (artifact / "model.safetensors").read_bytes()
    report = json.loads((finished_run / "report.json").read_text())
    spoil, why = DAMAGES[damage]
    spoil(artifact)
    capsys.readouterr()
    assert main(*tiny_args(teacher_dir, corpus_dir, finished_run)) == 0
    err = capsys.readouterr().err
    assert f"the finished artifact {artifact} is damaged ({why}); making it again" in err
    assert (artifact / "model.safetensors").read_bytes() == weights  # the same config makes the same bytes
    manifest = json.loads((finished_run / "manifest.json").read_text())
    assert manifest["stages"]["student"]["status"] == "done"
    again = json.loads((finished_run / "report.json").read_text())
    assert again["models"] == report["models"] and again["retained"] == report["retained"]
    assert not any(p.name.startswith(".") and p.is_dir() for p in (finished_run / "stages").iterdir())


def test_checksums_are_deterministic_and_backfilled(finished_run, teacher_dir, corpus_dir, tmp_path):
    """Same seed, same bytes, same checksums.json; an artifact made before checksums gets them on reuse."""
    from slimforge.fsutil import sha256_file

    artifact = finished_run / "stages" / "student"
    recorded = json.loads((artifact / "checksums.json").read_text())["files"]
    assert recorded["model.safetensors"] == sha256_file(artifact / "model.safetensors")
    assert "config.json" in recorded and not {"slimforge.json", "recipe.yaml", "README.md"} & set(recorded)
    other = tmp_path / "other"
    assert main(*tiny_args(teacher_dir, corpus_dir, other)) == 0
    assert (other / "stages/student/checksums.json").read_bytes() == (artifact / "checksums.json").read_bytes()

    before = (artifact / "checksums.json").read_bytes()
    (artifact / "checksums.json").unlink()
    assert main(*tiny_args(teacher_dir, corpus_dir, finished_run)) == 0
    assert json.loads((finished_run / "manifest.json").read_text())["stages"]["student"]["status"] == "skipped"
    assert (artifact / "checksums.json").read_bytes() == before


def test_garbled_eval_record_is_recomputed(finished_run, teacher_dir, corpus_dir, capsys):
    record = finished_run / "eval" / "student.json"
    tasks = json.loads(record.read_text())["tasks"]
    record.write_text(record.read_text()[:40])
    capsys.readouterr()
    assert main(*tiny_args(teacher_dir, corpus_dir, finished_run)) == 0
    assert f"{record} is unreadable (JSONDecodeError" in capsys.readouterr().err
    assert json.loads(record.read_text())["tasks"] == tasks


def test_truncated_manifest_is_rebuilt_from_the_stages(finished_run, teacher_dir, corpus_dir, capsys):
    path = finished_run / "manifest.json"
    original = json.loads(path.read_text())
    stages = snapshot(finished_run / "stages")
    path.write_text(path.read_text()[:100])
    capsys.readouterr()
    assert main(*tiny_args(teacher_dir, corpus_dir, finished_run)) == 0
    assert "rebuilding it from the stage folders" in capsys.readouterr().err
    manifest = json.loads(path.read_text())
    student = manifest["stages"]["student"]
    assert student["status"] == "skipped" and student["fingerprint"] == original["stages"]["student"]["fingerprint"]
    assert student["metrics"] == original["stages"]["student"]["metrics"]
    assert len(manifest["invocations"]) == 1  # the earlier invocations' history is what is lost
    assert snapshot(finished_run / "stages") == stages


# --- crashes: one line, the traceback in the log, finished work kept --------------------------


def _error_lines(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.startswith("slimforge: error:")]


def test_crash_in_a_stage_is_one_line_and_resumes(teacher_dir, corpus_dir, tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    real = students.drop_layers_stage

    def crashing(ctx):
        raise RuntimeError("shape '[576, 6]' is invalid for input of size 3888")

    monkeypatch.setattr(students, "drop_layers_stage", crashing)
    assert main(*tiny_args(teacher_dir, corpus_dir, run_dir)) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = _error_lines(err)
    assert len(lines) == 1, err
    assert lines[0] == (f"slimforge: error: stage 'student' crashed (RuntimeError: shape '[576, 6]' is invalid for "
                        f"input of size 3888); the traceback is in {run_dir / 'run.log'}. Finished work is kept; "
                        "the same command resumes from it")
    log = (run_dir / "run.log").read_text()
    assert "Traceback (most recent call last)" in log and "in crashing" in log
    assert json.loads((run_dir / "manifest.json").read_text())["stages"]["student"]["status"] == "failed"

    monkeypatch.setattr(students, "drop_layers_stage", real)
    assert main(*tiny_args(teacher_dir, corpus_dir, run_dir)) == 0
    assert json.loads((run_dir / "manifest.json").read_text())["stages"]["student"]["status"] == "done"


def test_crash_in_the_evaluation_keeps_the_stages(teacher_dir, corpus_dir, tmp_path, monkeypatch, capsys):
    from slimforge.eval import perplexity

    run_dir = tmp_path / "run"
    real = perplexity.perplexity_task

    def crashing(model, tokenizer, cfg, ctx):
        if ctx.label == "student":
            raise ValueError("boom")
        return real(model, tokenizer, cfg, ctx)

    monkeypatch.setattr(perplexity, "perplexity_task", crashing)
    args = tiny_args(teacher_dir, corpus_dir, run_dir, "eval.cache=false")
    assert main(*args) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert _error_lines(err) == [f"slimforge: error: evaluating 'student' crashed (ValueError: boom); the traceback "
                                 f"is in {run_dir / 'run.log'}. Finished work is kept; the same command resumes from it"]
    assert "ValueError: boom" in (run_dir / "run.log").read_text()
    assert (run_dir / "eval" / "teacher.json").is_file() and not (run_dir / "report.json").exists()

    monkeypatch.setattr(perplexity, "perplexity_task", real)
    assert main(*args) == 0
    err = capsys.readouterr().err
    assert "unchanged, reusing" in err and "eval teacher: unchanged, reusing" in err
    assert json.loads((run_dir / "manifest.json").read_text())["stages"]["student"]["status"] == "skipped"


def test_crash_in_slimforge_eval_names_its_log(teacher_dir, corpus_dir, model_dirs, tmp_path, monkeypatch, capsys):
    from slimforge.eval import perplexity

    def crashing(model, tokenizer, cfg, ctx):
        raise ValueError("boom")

    monkeypatch.setattr(perplexity, "perplexity_task", crashing)
    out = tmp_path / "out"
    code = cli.main(["eval", "--teacher", str(teacher_dir), "--students", str(model_dirs["qwen2"]), "--tasks",
                     "perplexity", "--data", str(corpus_dir), "--block-size", "32", "--max-blocks", "2",
                     "--out", str(out), "--no-cache"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert _error_lines(err) == [f"slimforge: error: evaluating 'teacher' crashed (ValueError: boom); the traceback "
                                 f"is in {out / 'eval.log'}. Finished work is kept; the same command resumes from it"]
    assert "Traceback (most recent call last)" in (out / "eval.log").read_text()


def test_crash_in_a_sweep_job_keeps_the_report_of_the_finished_ones(teacher_dir, corpus_dir, tmp_path, monkeypatch):
    real = students.drop_layers_stage

    def second_crashes(ctx):
        if ctx.config.num_layers == 3:
            raise RuntimeError("boom")
        return real(ctx)

    monkeypatch.setattr(students, "drop_layers_stage", second_crashes)
    args = [a for a in tiny_args(teacher_dir, corpus_dir, tmp_path / "x") if not a.startswith(("run_dir=", "stages."))]
    argv = ["run", STUDENT, "-m", *args, f"out_dir={tmp_path}", "run_name=sw", "stages.student.num_layers=1,3"]
    assert cli.main(argv) == 1
    sweep_dir = tmp_path / "student" / "sw"
    assert [job["status"] for job in json.loads((sweep_dir / "sweep.json").read_text())["jobs"]] == ["done", "failed"]
    assert [m for m in json.loads((sweep_dir / "report.json").read_text())["models"]] == ["teacher", "job00/student"]

    monkeypatch.setattr(students, "drop_layers_stage", real)
    assert cli.main(argv) == 0
    assert [job["status"] for job in json.loads((sweep_dir / "sweep.json").read_text())["jobs"]] == ["done", "done"]
    assert json.loads((sweep_dir / "job00" / "manifest.json").read_text())["stages"]["student"]["status"] == "skipped"


# --- where a run may write --------------------------------------------------------------------


def test_run_dir_check_accepts_only_new_empty_or_run_folders(tmp_path):
    from slimforge.errors import RunDirError
    from slimforge.rundir import check_run_dir

    check_run_dir(tmp_path / "new" / "run")
    (tmp_path / "empty").mkdir()
    check_run_dir(tmp_path / "empty")
    started = tmp_path / "started"  # a first invocation killed before it wrote its manifest
    started.mkdir()
    for name in (".lock", "run.log", ".manifest.json.abc123.tmp"):
        (started / name).write_text("")
    check_run_dir(started)
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "manifest.json").write_text("{}")
    (earlier / "config.yaml").write_text("")
    check_run_dir(earlier)
    (started / "config.yaml").write_text("mine")
    with pytest.raises(RunDirError, match=r"started is not a slimforge run directory .*\(config\.yaml\)"):
        check_run_dir(started)


def test_unwritable_run_dir_is_one_line_before_anything_loads(teacher_dir, corpus_dir, tmp_path, monkeypatch, capsys):
    """A read-only parent folder stops the run before the teacher loads.

    As root, chmod does not stop writes, so there the refusal the kernel would give is
    simulated at the check; as any other user the folder really is read-only.
    """
    from slimforge import rundir
    from slimforge.session import Session

    parent = tmp_path / "ro"
    parent.mkdir()
    if os.geteuid() == 0:
        real_access = os.access
        monkeypatch.setattr(rundir.os, "access", lambda p, mode: Path(p) != parent and real_access(p, mode))
    else:
        parent.chmod(0o500)
    monkeypatch.setattr(Session, "teacher", lambda self: pytest.fail("the teacher was loaded"))
    try:
        code = main(*tiny_args(teacher_dir, corpus_dir, parent / "run"))
    finally:
        parent.chmod(0o700)
    assert code == 2
    assert _error_lines(capsys.readouterr().err) == [
        f"slimforge: error: cannot write to {parent} (permission denied or read-only); "
        "choose a writable run_dir or out_dir"]
    assert not (parent / "run").exists()


def test_refused_writes_are_one_line(teacher_dir, corpus_dir, tmp_path, monkeypatch, capsys):
    """PermissionError where the run directory is made, and anywhere else (the cache, here), is exit 2.

    Simulated (tests may run as root, where chmod does not stop writes): the same error the
    kernel raises, at the same call.
    """
    from slimforge import fsutil
    from slimforge.eval import runner

    run_dir = tmp_path / "run"
    real_mkstemp = fsutil.tempfile.mkstemp

    def refusing_mkstemp(*args, dir=None, **kwargs):  # noqa: A002 - mkstemp's own keyword
        if dir is not None and Path(dir) == run_dir:
            raise PermissionError(13, "Permission denied", str(Path(dir) / ".probe"))
        return real_mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(fsutil.tempfile, "mkstemp", refusing_mkstemp)
    assert main(*tiny_args(teacher_dir, corpus_dir, run_dir)) == 2
    assert _error_lines(capsys.readouterr().err) == [
        f"slimforge: error: cannot write to {run_dir} (Permission denied); choose a writable run_dir or out_dir"]
    monkeypatch.setattr(fsutil.tempfile, "mkstemp", real_mkstemp)

    def refusing_put(self, key, result):
        raise PermissionError(13, "Permission denied", str(self.root / f"{key}.json"))

    monkeypatch.setattr(runner.ResultCache, "put", refusing_put)
    assert main(*tiny_args(teacher_dir, corpus_dir, run_dir, "eval.tasks.perplexity.max_blocks=3")) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = _error_lines(err)
    assert len(lines) == 1 and re.search(r"permission denied writing .*/eval/results/\w+\.json; choose a writable "
                                         r"location .*SLIMFORGE_CACHE for the cache", lines[0]), err


def test_a_stage_made_in_another_dtype_is_refused_then_overwritten(finished_run, teacher_dir, corpus_dir, capsys):
    """The stage fingerprint leaves the run's dtype out (a recipe's dtype: auto resolves per machine), so the
    artifact records it: a resume in another dtype must not take bf16 weights for fp32 ones unasked."""
    meta_file = finished_run / "stages" / "student" / "slimforge.json"
    made = json.loads(meta_file.read_text())["dtype"]
    assert made in ("float32", "bfloat16")  # what dtype: auto resolved to on this machine
    other = "bfloat16" if made == "float32" else "float32"
    before = snapshot(finished_run)
    code = main(*tiny_args(teacher_dir, corpus_dir, finished_run, f"dtype={other}"))
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2
    assert err.endswith(f"holds stage 'student' made in {made}, and this run is in {other}; re-run with "
                        f"dtype={made} to reuse it, overwrite=true to replace it, or use a new run_name")
    assert snapshot(finished_run) == before
    assert main(*tiny_args(teacher_dir, corpus_dir, finished_run, f"dtype={made}")) == 0  # the same dtype reuses it
    assert main(*tiny_args(teacher_dir, corpus_dir, finished_run, f"dtype={other}", "overwrite=true")) == 0
    assert json.loads(meta_file.read_text())["dtype"] == other
