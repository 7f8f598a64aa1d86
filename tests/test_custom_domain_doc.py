"""docs/custom_domain.md's files, run as written with a tiny teacher: own text, own task, own gate."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from slimforge import cli

DOC = Path(__file__).resolve().parents[1] / "docs" / "custom_domain.md"


def doc_files() -> dict[str, str]:
    """``<!-- file: PATH -->`` markers, each followed by one fenced block: PATH -> its text."""
    pattern = re.compile(r"<!-- file: (\S+) -->\n```[a-z]*\n(.*?)```", re.S)
    return {path: body for path, body in pattern.findall(DOC.read_text(encoding="utf-8"))}


def test_the_walkthrough_runs_as_written(tmp_path, teacher_dir, corpus_dir, monkeypatch, capsys):
    files = doc_files()
    assert set(files) == {"support/tasks/support_qa.yaml", "support/tasks/support_qa.jsonl", "support/support.yaml"}
    for rel, body in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(body, encoding="utf-8")
    shutil.copytree(corpus_dir, tmp_path / "support" / "notes")
    monkeypatch.chdir(tmp_path / "support")
    tiny = [f"teacher.path={teacher_dir}", "data.block_size=32", "stages.depth.num_samples=2", "stages.depth.seq_len=32",
            "stages.heal.steps=2", "stages.heal.batch_size=2", "stages.heal.eval_every=2", "stages.heal.eval_blocks=2",
            "stages.heal.checkpoint_every=2", "eval.tasks.perplexity.max_blocks=2", "run_dir=run"]
    assert cli.main(["run", "support.yaml", "--dry-run", *tiny]) == 0
    code = cli.main(["run", "support.yaml", *tiny])
    out = capsys.readouterr().out
    report = json.loads(Path("run/report.json").read_text())
    # The user's task came from the include path and was scored for every model on all 3 items.
    for model in ("teacher", "depth", "heal"):
        assert "acc_norm" in report["models"][model]["tasks"]["support_qa"], model
    assert report["fidelity"]["heal"]["support_qa"]["flips"]["items"] == 3
    # The gate ran, and refused what three items cannot show: the teacher's own score is not
    # above chance there, so a threshold on the task is an error (exit 2), as the doc says.
    assert report["signal"]["support_qa.acc_norm"]["status"] == "no signal"
    assert code == 2 and report["gate"]["status"] == "error" and "gate: ERROR" in out
    assert re.search(r"support_qa is no signal \(teacher acc_norm .* includes chance 0\.33\)", out)
    assert (Path("run/stages/heal/README.md")).is_file() and os.path.isfile("run/report.html")
