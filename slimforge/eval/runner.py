"""The eval stage of a run: every model, every task, identical settings, cached results."""

from __future__ import annotations

import gc
import logging
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slimforge.fsutil import atomic_write_json, read_json, stable_hash
from slimforge.stage import EvalContext

if TYPE_CHECKING:  # pragma: no cover
    from slimforge.models import ModelRef
    from slimforge.pipeline import Run, RunSession

log = logging.getLogger(__name__)

# Bump when a task's computation changes, so cached results are recomputed.
EVAL_VERSION = 1


def select_models(wanted: list[str], teacher: ModelRef, artifacts: dict[str, ModelRef]) -> list[tuple[str, ModelRef]]:
    """Resolve ``eval.models`` ("teacher", "all", or stage names) into labelled references."""
    from slimforge.errors import ConfigError

    chosen: dict[str, ModelRef] = {}
    for name in wanted:
        if name == "teacher":
            chosen["teacher"] = teacher
        elif name == "all":
            chosen.update(artifacts)
        elif name in artifacts:
            chosen[name] = artifacts[name]
        else:
            raise ConfigError(f"eval.models names {name!r}, which is not 'teacher', 'all' or a stage: {sorted(artifacts)}")
    return list(chosen.items())


def eval_key(ref: ModelRef, tasks: dict[str, Any], session: RunSession, batch_size: int) -> str:
    """What a model's eval results depend on: weights, tasks, data, precision and batch size."""
    task_cfgs = {name: asdict(cfg) for name, cfg in tasks.items()}
    return stable_hash([EVAL_VERSION, ref.fingerprint, task_cfgs, session.data().fingerprint,
                        str(session.dtype), session.device.type, batch_size])


def evaluate_model(model: Any, tokenizer: Any, tasks: dict[str, Any], ctx: EvalContext) -> dict[str, Any]:
    from slimforge.registry import registry

    return {name: registry("eval").get(cfg.type).load()(model, tokenizer, cfg, ctx) for name, cfg in tasks.items()}


def evaluate_run(run: Run, session: RunSession, artifacts: dict[str, ModelRef]) -> dict[str, Any]:
    """Evaluate the teacher and the chosen students; write ``eval/`` and the report."""
    from slimforge.eval.report import build_report, write_report

    cfg = run.cfg.eval
    tasks = run.recipe.tasks
    if not tasks:
        return {}
    ctx = EvalContext(session, cfg.batch_size, run.cfg.seed)
    results: dict[str, dict[str, Any]] = {}
    for label, ref in select_models(cfg.models, session.teacher_ref, artifacts):
        path = Path(run.run_dir) / "eval" / f"{label}.json"
        key = eval_key(ref, tasks, session, cfg.batch_size)
        if path.is_file() and read_json(path).get("key") == key:
            log.info("eval %s: unchanged, reusing %s", label, path)
            results[label] = read_json(path)
            continue
        log.info("eval %s: %s", label, ", ".join(tasks))
        if label == "teacher":
            model, tokenizer = session.teacher()
        else:
            model, tokenizer = ref.load(device=session.device, dtype=session.dtype)
        from slimforge.models import count_parameters

        record = {"key": key, "model": label, "path": ref.path, "fingerprint": ref.fingerprint,
                  "num_parameters": count_parameters(model), "dtype": str(session.dtype),
                  "device": session.device.type, "batch_size": cfg.batch_size,
                  "tasks": evaluate_model(model, tokenizer, tasks, ctx)}
        atomic_write_json(path, record)
        results[label] = record
        if label != "teacher":
            del model
            gc.collect()
    report = build_report(run.cfg.name, results)
    write_report(Path(run.run_dir), report)
    run.manifest.data["eval"] = {"models": list(results), "report": str(Path(run.run_dir) / "report.json")}
    run.manifest.save()
    return report
