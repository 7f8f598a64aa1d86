"""What a bad-input case is, and the fixtures it may build on."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "tests" / "assets" / "recipes" / "tiny.yaml")  # one drop_layers stage + perplexity
TINY_DISTILL = str(REPO / "tests" / "assets" / "recipes" / "tiny_distill.yaml")


@dataclass
class Env:
    """What a case's ``build`` gets: a private temporary folder and the session's tiny assets."""

    tmp: Path
    teacher_dir: Path          # a saved 4-layer tiny Llama with its tokenizer
    corpus_dir: Path           # tests/assets/corpus (plain text and Markdown)
    tokenizer: Any             # the tiny BPE tokenizer the teacher uses
    model_dirs: dict[str, Path]  # arch -> saved tiny model folder
    state: dict[str, Any] = field(default_factory=dict)  # for ``after`` checks

    def tiny_run(self, run_dir: Path, *extra: str) -> list[str]:
        """argv for ``slimforge run`` of the tiny one-stage recipe on the tiny teacher."""
        return ["run", TINY, f"teacher.path={self.teacher_dir}", f"data.path={self.corpus_dir}",
                "stages.student.num_layers=2", f"run_dir={run_dir}", *extra]


@dataclass
class BadInput:
    """One bad input.

    Attributes:
        id: short, unique within its area.
        build: returns the ``slimforge`` argv (without the program name) for this case; may
            prepare files under ``env.tmp`` first (a broken model folder, a finished run...).
        match: a regex the single ``slimforge: error:`` line must match.
        code: expected exit status (2 for user errors).
        after: optional check run after the command (e.g. nothing overwritten).
        env: extra environment variables for the command.
    """

    id: str
    build: Callable[[Env], list[str]]
    match: str
    code: int = 2
    after: Callable[[Env], None] | None = None
    env: dict[str, str] = field(default_factory=dict)
