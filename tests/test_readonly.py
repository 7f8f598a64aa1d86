"""Read-only places, for real: the kernel refuses the write, slimforge answers in one line.

Root ignores file modes, and tests here (and in CI) often run as root. So the command runs
in a subprocess that, when the test runs as root, gives up the capabilities that let root
write where the mode says no (``setpriv`` from util-linux drops CAP_DAC_OVERRIDE and
friends); as any other user it runs as is. Either way the folder really is read-only to it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, cli_env

# What root keeps of its powers over file modes when these are dropped: none.
DROP_FILE_POWERS = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search,-fowner", "--"]


@pytest.fixture()
def shared(teacher_dir, corpus_dir, tmp_path):
    """The tiny teacher and corpus, and a HOME the command may write."""
    shutil.copytree(teacher_dir, tmp_path / "teacher")
    shutil.copytree(corpus_dir, tmp_path / "corpus")
    for sub in ("home", "cache"):
        (tmp_path / sub).mkdir()
    return tmp_path


def read_only(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o555)
    return path


def slimforge_as_other_user(root: Path, *args: str, cache: Path | None = None) -> subprocess.CompletedProcess:
    env = cli_env()
    env.update(HOME=str(root / "home"), SLIMFORGE_CACHE=str(cache or root / "cache"),
               HF_HOME=str(root / "home" / "hf"), MPLCONFIGDIR=str(root / "home" / "mpl"))
    prefix = DROP_FILE_POWERS if os.geteuid() == 0 else []
    return subprocess.run([*prefix, sys.executable, "-m", "slimforge", *args], capture_output=True, text=True,
                          env=env, cwd=root, timeout=600)


def assert_one_line(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 2, proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("slimforge: error:")]
    assert len(errors) == 1, proc.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def tiny_run(root: Path, *extra: str) -> list[str]:
    return ["run", str(REPO / "tests" / "assets" / "recipes" / "tiny.yaml"), f"teacher.path={root / 'teacher'}",
            f"data.path={root / 'corpus'}", "stages.student.num_layers=2", "dtype=float32", *extra]


def test_read_only_out_dir(shared):
    out = read_only(shared / "out")
    proc = slimforge_as_other_user(shared, *tiny_run(shared, f"out_dir={out}", "run_name=r1"))
    assert_one_line(proc, str(out), "run_dir or out_dir")
    assert list(out.iterdir()) == []


def test_read_only_run_dir(shared):
    run_dir = read_only(shared / "run")
    proc = slimforge_as_other_user(shared, *tiny_run(shared, f"run_dir={run_dir}"))
    assert_one_line(proc, str(run_dir), "run_dir or out_dir")
    assert list(run_dir.iterdir()) == []


def test_read_only_cache(shared):
    cache = read_only(shared / "ro-cache")
    proc = slimforge_as_other_user(shared, *tiny_run(shared, f"run_dir={shared / 'run'}"), cache=cache)
    assert_one_line(proc, str(cache), "SLIMFORGE_CACHE")
    assert list(cache.iterdir()) == []


def test_read_only_eval_out(shared):
    out = read_only(shared / "eval-out")
    proc = slimforge_as_other_user(shared, "eval", "--teacher", str(shared / "teacher"), "--students",
                                   str(shared / "teacher"), "--tasks", "perplexity", "--data", str(shared / "corpus"),
                                   "--dtype", "float32", "--out", str(out / "report"))
    assert_one_line(proc, str(out), "--out")
    assert list(out.iterdir()) == []
