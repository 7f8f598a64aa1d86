"""The catalogue of bad inputs (see tests/bad_inputs/): one line, the right exit code, no traceback.

Each area keeps its cases in ``tests/bad_inputs/<area>.py`` as a ``CASES`` list; this file runs
them all through ``slimforge.cli.main`` in-process. Test ids are ``<area>/<case>``, so
``pytest tests/test_bad_inputs.py -q`` shows the catalogue's size.
"""

from __future__ import annotations

import importlib
import pkgutil
import re

import bad_inputs
import pytest
from bad_inputs.harness import BadInput, Env


def _catalogue() -> list[tuple[str, BadInput]]:
    cases = []
    for info in sorted(pkgutil.iter_modules(bad_inputs.__path__), key=lambda i: i.name):
        if info.name == "harness":
            continue
        module = importlib.import_module(f"bad_inputs.{info.name}")
        cases += [(f"{info.name}/{case.id}", case) for case in module.CASES]
    return cases


CATALOGUE = _catalogue()


def test_case_ids_are_unique():
    ids = [name for name, _ in CATALOGUE]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("case", [c for _, c in CATALOGUE], ids=[n for n, _ in CATALOGUE])
def test_bad_input(case: BadInput, tmp_path, teacher_dir, corpus_dir, tokenizer, model_dirs, capsys, monkeypatch):
    from slimforge import cli

    env = Env(tmp_path, teacher_dir, corpus_dir, tokenizer, model_dirs)
    argv = case.build(env)
    capsys.readouterr()  # what building the case printed is not the command's output
    for key, value in case.env.items():
        monkeypatch.setenv(key, value)
    code = cli.main(argv)
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if ln.startswith("slimforge: error:")]
    assert "Traceback" not in err, err
    assert code == case.code, err
    assert len(errors) == 1, err
    assert re.search(case.match, errors[0]), errors[0]
    if case.after is not None:
        case.after(env)
