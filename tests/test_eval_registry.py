"""One source per task name: the eval registry, the schemas, ``slimforge eval``'s task lists, the
Python API's defaults and the shipped offline task YAMLs all name the same tasks."""

from __future__ import annotations

import argparse
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
import yaml

from slimforge.config import DataConfig, TaskConfig
from slimforge.eval.command import DEFAULT_TASKS, EPILOG, add_parser, build_tasks, named_tasks
from slimforge.eval.offline import OFFLINE_TASKS, SOURCES, shipped_tasks_dir
from slimforge.registry import registry


def _namespace(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    return parser.parse_args(["eval", "--teacher", "t", "--students", "s", *argv])


class _TaskYamlLoader(yaml.SafeLoader):
    """Reads lm-eval task YAMLs: ``!function`` tags stay text."""


_TaskYamlLoader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))


def _read_yaml(path: Path) -> dict:
    return yaml.load(path.read_text(encoding="utf-8"), Loader=_TaskYamlLoader) or {}


@pytest.mark.parametrize("name", registry("eval").names())
def test_every_task_type_is_its_schema_and_function(name):
    entry = registry("eval").get(name)
    schema = entry.load_schema()
    assert issubclass(schema, TaskConfig)
    assert schema().type == name, "the schema's default type is the name it is registered under"
    assert callable(entry.load())


def test_command_line_names_are_registered_types_and_the_defaults():
    offered = named_tasks(_namespace())
    assert set(offered) <= set(registry("eval").names())
    assert all(offered[name].type == name for name in offered)
    assert set(DEFAULT_TASKS) <= set(offered), "what runs by default is offered by name"
    import slimforge.api

    assert tuple(inspect.signature(slimforge.api.evaluate).parameters["tasks"].default) == DEFAULT_TASKS
    assert all(name in EPILOG for name in (*DEFAULT_TASKS, *OFFLINE_TASKS))


def test_a_named_type_takes_its_command_line_options():
    tasks = build_tasks(_namespace("--tasks", "perplexity", "efficiency", "arc_easy:5", "--max-blocks", "9"))
    assert tasks["perplexity"].max_blocks == 9
    assert tasks["efficiency"].type == "efficiency"
    assert tasks["arc_easy"].type == "lm_eval" and tasks["arc_easy"].limit == 5


def test_offline_tasks_are_the_shipped_task_yamls():
    root = shipped_tasks_dir()
    names = {_read_yaml(path)["task"] for path in root.glob("*.yaml")}
    names |= {_read_yaml(folder / f"_{folder.name}.yaml")["group"] for folder in root.iterdir() if folder.is_dir()}
    assert names == set(OFFLINE_TASKS)
    assert len(OFFLINE_TASKS) == len(set(OFFLINE_TASKS))


def test_every_shipped_task_yaml_reads_a_known_offline_source():
    root = shipped_tasks_dir()
    for path in root.rglob("*.yaml"):
        source = (_read_yaml(path).get("dataset_kwargs") or {}).get("source")
        if source is not None:
            assert source in SOURCES or source.startswith("mmlu/"), f"{path.name}: unknown source {source!r}"
    assert set(SOURCES) <= set(OFFLINE_TASKS)


# --- a task type added by this test: its schema, its function and one registry line, nothing else ---


@dataclass
class FirstBlockTaskConfig(TaskConfig):
    """Mean log-probability of the first held-out block's tokens (an example of a new task type)."""

    USES_DATA: ClassVar[bool] = True
    TEACHER_TOKENS: ClassVar[bool] = True

    type: str = "first_block"
    tokens: int = 8


def first_block_task(model: Any, tokenizer: Any, cfg: FirstBlockTaskConfig, ctx: Any) -> dict[str, Any]:
    from slimforge.data import blocks_tensor

    ids = blocks_tensor(ctx.data().heldout, 1)[:, : cfg.tokens].to(model.device)
    with torch.no_grad():
        logprobs = model(ids).logits[0, :-1].float().log_softmax(-1)
    mean = float(logprobs.gather(-1, ids[0, 1:, None]).mean())
    return {"mean_logprob": mean, "higher_is_better": {"mean_logprob": True}, "metric": "mean_logprob"}


def test_a_new_task_type_needs_only_its_schema_function_and_registry_line(teacher_dir, corpus_dir, tmp_path,
                                                                            monkeypatch):
    from slimforge.eval.config import EvalSettings
    from slimforge.eval.runner import evaluate_models
    from slimforge.models import ModelRef
    from slimforge.session import Session

    eval_types = registry("eval")
    monkeypatch.setattr(eval_types, "_entries", dict(eval_types._entries))
    eval_types.register("first_block", f"{__name__}:first_block_task", f"{__name__}:FirstBlockTaskConfig",
                        "mean log-probability of the first held-out block")
    cpu = torch.device("cpu")
    session = Session(ModelRef.from_source(str(teacher_dir), "teacher"),
                      DataConfig(path=str(corpus_dir), block_size=32), cpu, torch.float32)
    twin = ModelRef.from_source(str(teacher_dir), "twin")
    report = evaluate_models(session, [("twin", twin)], {"first": FirstBlockTaskConfig()},
                             EvalSettings(cpu, torch.float32, cache=False), tmp_path, "a new task")
    assert report["primary"] == {"first": "mean_logprob"}
    assert report["models"]["teacher"]["tasks"]["first"]["mean_logprob"] < 0
    assert report["retained"]["twin"]["first.mean_logprob"] == pytest.approx(1.0)
