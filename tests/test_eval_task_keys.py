"""Eval results stay reusable across refactors: the task part of every result's cache key is pinned.

``eval.runner.task_key`` hashes a task's type and config, the eval settings, and what the task's
schema says it depends on (the data, the teacher, :meth:`cache_key_extra`). If a schema gains,
loses or renames a field, a default changes, or a hook answers differently, these keys change
and every cached result (and every run's ``eval/<model>.json``) is computed again. The model,
data and teacher fingerprints are fixed strings here, and ``cache_key_extra`` (task YAMLs'
mtimes, the device's name: facts of this machine) a marker, so the golden file holds only what
the code decides. When a change is meant, bump ``EVAL_VERSION`` or regenerate the file and say
so in the commit: ``python tests/test_eval_task_keys.py > tests/assets/eval_task_keys.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

GOLDEN = Path(__file__).parent / "assets" / "eval_task_keys.json"
# Recipes that need a value from the command line before they validate.
REQUIRED = {"ci_gate": ["stages.candidate.path=/models/candidate"]}
# Every way `slimforge eval` builds tasks: named types, offline benchmarks, a limit, a generation file.
EVAL_ARGS = ["eval", "--teacher", "t", "--students", "s", "--tasks", "offline", "perplexity", "word_perplexity",
             "efficiency", "mmlu:5", "--generation", "prompts.jsonl", "--stop", "\\n", "--limit", "7",
             "--num-fewshot", "2", "--max-blocks", "9"]


@contextlib.contextmanager
def marked_extras() -> Iterator[None]:
    """Every registered task schema's ``cache_key_extra`` answers a fixed marker."""
    from slimforge.config import TaskConfig
    from slimforge.registry import registry

    eval_types = registry("eval")
    schemas = {TaskConfig, *(eval_types.get(name).load_schema() for name in eval_types.names())}
    with contextlib.ExitStack() as stack:
        for schema in schemas:
            stack.enter_context(mock.patch.object(schema, "cache_key_extra", lambda self, settings: "EXTRA"))
        yield


def _keys(tasks: dict[str, Any], settings: Any) -> dict[str, list[str]]:
    """Task name -> [its key for a student, its key for the teacher]."""
    from slimforge.eval.runner import resolve_tasks, task_key

    return {name: [task_key(cfg, "MODEL", settings, "DATA", "TEACHER"), task_key(cfg, "MODEL", settings, "DATA", None)]
            for name, cfg in resolve_tasks(tasks, settings).items()}


def current_keys() -> dict[str, dict[str, list[str]]]:
    """recipe (or ``slimforge eval``) -> task -> [student key, teacher key]."""
    import torch

    from slimforge.config import EvalConfig
    from slimforge.eval.command import add_parser, build_tasks
    from slimforge.eval.config import EvalSettings
    from slimforge.pipeline import prepare
    from slimforge.recipes import list_recipes

    cpu = torch.device("cpu")
    out = {}
    with marked_extras():
        for name in list_recipes():
            recipe = prepare(name, REQUIRED.get(name, []))
            out[name] = _keys(recipe.tasks, EvalSettings.from_config(recipe.config.eval, cpu, torch.float32))
        parser = argparse.ArgumentParser()
        add_parser(parser.add_subparsers())
        ns = parser.parse_args(EVAL_ARGS)
        settings = EvalSettings.from_config(EvalConfig(limit=ns.limit, num_fewshot=ns.num_fewshot), cpu, torch.float32)
        out["slimforge eval"] = _keys(build_tasks(ns), settings)
    return out


def test_eval_task_keys_are_unchanged():
    golden = json.loads(GOLDEN.read_text())
    assert current_keys() == golden


if __name__ == "__main__":
    os.environ.setdefault("SLIMFORGE_OFFLINE", "1")
    json.dump(current_keys(), sys.stdout, indent=1, sort_keys=True)
    print()
