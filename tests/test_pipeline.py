"""The recipe runner end to end on a tiny teacher: run dir, manifest, skip, resume, refuse, sweep."""

from __future__ import annotations

import json
import math
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
    _assert_one_line_error(capsys, r"does not share the teacher's tokenizer \(vocabulary sizes differ \(384 vs 320\)\)")
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
    _assert_one_line_error(capsys, r"Key 'num_layers' not in 'CheckpointStudentConfig'")


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
    assert "1. depth: prune/depth" in out and "4. nf4: quantize/bnb_nf4" in out


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
