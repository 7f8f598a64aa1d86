"""The one evaluation engine behind a recipe's eval stage and ``slimforge eval``.

Every model (the teacher first, then each student) gets the same tasks with
identical settings: batch size, dtype, device, few-shot count, item subsets and
seed. Each (model, task) result is cached twice: in the slimforge cache, keyed
by the model's *content* hash, the task's settings and whatever else it depends
on (data, teacher, device), so a sweep never re-evaluates its teacher; and in
the run's ``eval/<model>.json``. Models load only when some task is not cached,
one student at a time. Then the report is written, the gate checked, and the report
returned: the caller records it (a run, in its manifest and model cards).

The engine knows no task type by name: each task's schema says what the task needs
(data, the teacher, the teacher's tokenizer, fresh timings), what it checks before
any model loads and what its results depend on (see :class:`slimforge.config.TaskConfig`).
A task that reads text reads the run's data or a corpus of its own (its ``own_data()``); each
such result is labelled with its corpus and whether it is in-domain or out-of-domain
(:mod:`slimforge.eval.corpus`).
"""

from __future__ import annotations

import gc
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slimforge.errors import AssetError, ConfigError, DataError
from slimforge.eval.config import EvalSettings
from slimforge.eval.tables import TEACHER
from slimforge.fsutil import atomic_write_json, read_json_or_none, stable_hash
from slimforge.stage import EvalContext

if TYPE_CHECKING:  # pragma: no cover
    from slimforge.config import DataConfig, GateConfig, Recipe, TaskConfig
    from slimforge.models import ModelRef
    from slimforge.session import Session

log = logging.getLogger(__name__)

# Bump when a task's computation changes, so cached results are recomputed.
EVAL_VERSION = 2
# Where ``slimforge eval`` logs, in its --out folder (a run logs to its run.log).
EVAL_LOG = "eval.log"


@dataclass
class ModelEvalContext(EvalContext):
    """An :class:`EvalContext` for one model: its reference and, for a student, its teacher."""

    label: str = ""
    ref: Any = None
    include_path: tuple[str, ...] = ()
    allow_code: bool = False
    task_name: str = ""
    teacher_pair: Callable[[], tuple[Any, Any]] | None = None
    teacher_results: dict[str, dict[str, Any]] = field(default_factory=dict)
    task_data: DataConfig | None = None

    def data(self) -> Any:
        """The blocks the task reads: its own corpus (``task_data``), else the run's data."""
        return self.session.data() if self.task_data is None else self.session.data(self.task_data)

    def teacher(self) -> tuple[Any, Any] | None:
        """The teacher (model, tokenizer) for fidelity, or None (this is the teacher, or tokenizers differ)."""
        return self.teacher_pair() if self.teacher_pair is not None else None

    def teacher_result(self) -> dict[str, Any] | None:
        """The teacher's result for the task being run (e.g. its generations), if any."""
        return self.teacher_results.get(self.task_name)


# --- preparing: resolve settings into each task, fail early on bad input ------------------


def resolve_tasks(tasks: dict[str, TaskConfig], settings: EvalSettings) -> dict[str, TaskConfig]:
    """Each task config with the eval-wide defaults it takes (limit, few-shot) filled in."""
    return {name: cfg.with_defaults(settings) for name, cfg in tasks.items()}


def check_gate_targets(gate: GateConfig, tasks: dict[str, TaskConfig]) -> None:
    """Every threshold of the gate reads a metric some task measures."""
    fidelity = any(cfg.measures_token_fidelity() for cfg in tasks.values())
    if (gate.max_kl is not None or gate.min_top1_agreement is not None) and not fidelity:
        raise ConfigError("the gate's max_kl / min_top1_agreement need a perplexity task with fidelity on; add one")
    if gate.max_bias_shift is not None and not any(cfg.measures_bias() for cfg in tasks.values()):
        raise ConfigError("the gate's max_bias_shift needs a bias task; add one (slimforge eval --tasks bias, "
                          "or eval.tasks.bias: {type: bias} in a recipe)")
    for key in gate.min_retained_tasks:
        if key.split(".", 1)[0] not in tasks:
            raise ConfigError(f"the gate names task {key.split('.', 1)[0]!r}, which is not evaluated; "
                              f"evaluated tasks: {', '.join(tasks)}")


def preflight(tasks: dict[str, TaskConfig], settings: EvalSettings, session: Session,
              gate: GateConfig | None) -> None:
    """Every check that needs no model weights: each task's own (names, files), the data, gate targets."""
    for cfg in tasks.values():
        cfg.preflight(settings)
    check_models(tasks, [(TEACHER, session.teacher_ref)])
    for name, cfg in tasks.items():
        if cfg.USES_DATA:
            task_data(session, name, cfg)
    if gate is not None:
        check_gate_targets(gate, tasks)


def check_models(tasks: dict[str, TaskConfig], models: list[tuple[str, ModelRef]]) -> None:
    """Each task's checks on each model that need no weights (such as a chat template it requires)."""
    for label, ref in models:
        for cfg in tasks.values():
            if cfg.models is None or label in cfg.models:
                cfg.check_model(label, ref)


def task_data(session: Session, name: str, cfg: TaskConfig) -> Any:
    """The blocks a data task reads (built here, once per corpus); an error in its own corpus names the task."""
    own = cfg.own_data()
    try:
        return session.data(own)
    except (AssetError, DataError) as err:
        if own is None:
            raise
        raise type(err)(f"eval task {name!r}, its own data: {err}") from None


def preflight_run(recipe: Recipe, session: Session) -> None:
    """A recipe's eval checks, run while planning: a bad task name fails before any stage trains."""
    settings = EvalSettings.from_config(recipe.config.eval, session.device, session.dtype)
    preflight(resolve_tasks(recipe.tasks, settings), settings, session, recipe.config.eval.gate)


# --- cache keys --------------------------------------------------------------------------


def task_key(cfg: TaskConfig, model_fp: str, settings: EvalSettings, data_fp: str | None,
             teacher_fp: str | None) -> str:
    """The cache key of one (model, task) result; ``data_fp`` is that of the blocks the task reads."""
    return stable_hash([EVAL_VERSION, model_fp, cfg.type, cfg.key_settings(), settings.key(),
                        data_fp if cfg.USES_DATA else None,
                        teacher_fp if cfg.pairs_with_teacher() else None, cfg.cache_key_extra(settings)])


class ResultCache:
    """``<slimforge cache>/eval/results/<key>.json``; disabled, it stores nothing."""

    def __init__(self, enabled: bool) -> None:
        from slimforge.assets import cache_root

        self.enabled = enabled
        self.root = cache_root() / "eval" / "results"

    def get(self, key: str) -> dict[str, Any] | None:
        if not self.enabled:
            return None
        return read_json_or_none(self.root / f"{key}.json", instead="computing the result again")

    def put(self, key: str, result: dict[str, Any]) -> None:
        if self.enabled:
            atomic_write_json(self.root / f"{key}.json", result)


# --- evaluating --------------------------------------------------------------------------


@dataclass
class Evaluation:
    """The state shared while one set of models is evaluated."""

    session: Session
    tasks: dict[str, TaskConfig]
    settings: EvalSettings
    out_dir: Path
    cache: ResultCache
    teacher_fp: str = ""
    data_fps: dict[str, str] = field(default_factory=dict)  # task -> fingerprint of the blocks it reads
    corpora: dict[str, dict[str, Any]] = field(default_factory=dict)  # task -> its corpus and domain
    teacher_results: dict[str, dict[str, Any]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    invocation: str = field(default_factory=lambda: uuid.uuid4().hex)


def _tokenizer_problem(ev: Evaluation, ref: ModelRef) -> str | None:
    from slimforge.models import tokenizer_mismatch

    return tokenizer_mismatch(ev.session.teacher_tokenizer(), ref.load_tokenizer())


def _model_info(ref: ModelRef, model: Any) -> dict[str, Any]:
    from slimforge import moe
    from slimforge.eval.efficiency import disk_bytes, logical_parameters, memory_bytes
    from slimforge.eval.fingerprint import model_kind

    params = logical_parameters(model)
    active = moe.active_parameters(model, params) if moe.is_moe_config(getattr(model, "config", None)) else None
    return {"num_parameters": params, "memory_bytes": memory_bytes(model),
            "disk_bytes": disk_bytes(ref.path, ref.gguf_file), "kind": model_kind(ref.path, ref.gguf_file),
            **({"active_parameters": active} if active is not None else {})}


def _lineage(ref: ModelRef) -> dict[str, Any]:
    """The model's own and its parent's stage fingerprints (its ``slimforge.json``): how the report
    finds which evaluated student a stage started from."""
    return {"fingerprint": ref.meta.get("fingerprint"), "parent": (ref.meta.get("parent") or {}).get("fingerprint")}


def evaluate_model(ev: Evaluation, label: str, ref: ModelRef, is_teacher: bool) -> dict[str, Any]:
    """All tasks on one model, from the caches where possible; writes ``eval/<label>.json``."""
    from slimforge.eval.fingerprint import ref_fingerprint
    from slimforge.registry import registry

    model_fp = ev.teacher_fp if is_teacher else ref_fingerprint(ref)
    problem = None if is_teacher else _tokenizer_problem(ev, ref)
    if problem:
        ev.warnings.append(f"{label}: its tokenizer differs from the teacher's ({problem}); token perplexity "
                           "and KL/top-1 fidelity are skipped, the other metrics still run")
        log.warning(ev.warnings[-1])
    keys = {name: task_key(cfg, model_fp, ev.settings, ev.data_fps.get(name), None if is_teacher else ev.teacher_fp)
            for name, cfg in ev.tasks.items()}
    info_key = stable_hash([EVAL_VERSION, "info", model_fp, ev.settings.key()])
    fresh = {name for name, cfg in ev.tasks.items() if cfg.FRESH}  # never reused, even from eval/<label>.json
    # The labels join the record's key: whether a corpus is in-domain depends on the run's data, not the result.
    record_key = stable_hash([keys, info_key, bool(problem), ev.invocation if fresh else None, ev.corpora])
    record_path = ev.out_dir / "eval" / f"{label}.json"
    previous = read_json_or_none(record_path, instead="evaluating the model again")
    if previous is not None and previous.get("key") == record_key:
        log.info("eval %s: unchanged, reusing %s", label, record_path)
        return previous
    loaded: tuple[Any, Any] | None = None

    def model_and_tokenizer() -> tuple[Any, Any]:
        nonlocal loaded
        if loaded is None:
            loaded = ev.session.teacher() if is_teacher else ref.load(device=ev.settings.device, dtype=ev.settings.dtype)
        return loaded

    results: dict[str, Any] = {}
    for name, cfg in ev.tasks.items():
        if cfg.models is not None and label not in cfg.models:
            results[name] = {"type": cfg.type, "skipped": f"not asked for this model (eval.tasks.{name}.models)"}
            continue
        cached = None if name in fresh else ev.cache.get(keys[name])
        if cached is not None:
            log.info("eval %s / %s: cached", label, name)
            results[name] = cached
            continue
        if problem and cfg.TEACHER_TOKENS:
            results[name] = {"type": cfg.type, "skipped": f"tokenizer differs from the teacher's ({problem})"}
            continue
        model, tokenizer = model_and_tokenizer()
        ctx = ModelEvalContext(ev.session, ev.settings.batch_size, ev.settings.seed, label=label, ref=ref,
                               include_path=tuple(ev.settings.include_path), allow_code=ev.settings.allow_code,
                               task_name=name,
                               teacher_pair=None if is_teacher or problem else ev.session.teacher,
                               teacher_results=ev.teacher_results, task_data=cfg.own_data())
        log.info("eval %s / %s (%s)", label, name, cfg.type)
        start = time.perf_counter()
        result = registry("eval").get(cfg.type).load()(model, tokenizer, cfg, ctx)
        result["type"] = cfg.type
        result["seconds"] = round(time.perf_counter() - start, 3)
        if name not in fresh:
            ev.cache.put(keys[name], result)
        results[name] = result
    for name, corpus in ev.corpora.items():  # after caching: the cached result holds only what the model did
        results[name] = {**results[name], **corpus}
    info = ev.cache.get(info_key)
    if info is None:
        info = _model_info(ref, model_and_tokenizer()[0])
        ev.cache.put(info_key, info)
    record = {"key": record_key, "model": label, "path": ref.path, "fingerprint": ref.fingerprint,
              "content_fingerprint": model_fp, **info, "dtype": str(ev.settings.dtype),
              "device": ev.settings.device.type, "batch_size": ev.settings.batch_size, "seed": ev.settings.seed,
              "task_keys": keys, "tasks": results}
    atomic_write_json(record_path, record)
    if loaded is not None and not is_teacher:
        del loaded
        gc.collect()
    return record


def evaluate_models(session: Session, students: list[tuple[str, ModelRef]], tasks: dict[str, TaskConfig],
                    settings: EvalSettings, out_dir: Path, title: str,
                    gate: GateConfig | None = None, log_file: Path | None = None) -> dict[str, Any]:
    """Evaluate the session's teacher and ``students`` alike; write ``eval/`` and the reports.

    Args:
        log_file: the log file already being written (a run's ``run.log``); None: log to
            ``<out_dir>/eval.log`` for this call. A crash's traceback goes there.

    Returns:
        The report (``report.json``'s content), with the gate's verdict under ``gate``.

    Raises:
        ConfigError: a task, its data or the gate is wrong (before any model loads).
        OutputError: ``out_dir`` cannot be written.
        StageCrash: evaluating a model failed unexpectedly (the one line names ``log_file``).
    """
    tasks = resolve_tasks(tasks, settings)
    preflight(tasks, settings, session, gate)
    if TEACHER in {label for label, _ in students}:
        raise ConfigError(f"a student cannot be labelled {TEACHER!r}; that label is the teacher's")
    check_models(tasks, students)
    if log_file is not None:
        return _evaluate_all(session, students, tasks, settings, Path(out_dir), title, gate, log_file)
    from slimforge.fsutil import ensure_writable_dir
    from slimforge.runlog import file_logging

    log_file = ensure_writable_dir(out_dir, "--out folder") / EVAL_LOG
    with file_logging(log_file):
        return _evaluate_all(session, students, tasks, settings, Path(out_dir), title, gate, log_file)


def _evaluate_all(session: Session, students: list[tuple[str, ModelRef]], tasks: dict[str, TaskConfig],
                  settings: EvalSettings, out_dir: Path, title: str, gate: GateConfig | None,
                  log_file: Path) -> dict[str, Any]:
    """:func:`evaluate_models` once its arguments are checked: each model in turn, then the reports."""
    from slimforge.eval.corpus import task_corpora
    from slimforge.eval.fingerprint import ref_fingerprint
    from slimforge.eval.gate import check_gate
    from slimforge.eval.report import build_report, write_report
    from slimforge.runlog import crash_boundary

    ev = Evaluation(session, tasks, settings, out_dir, ResultCache(settings.cache))
    with crash_boundary("the evaluation", log_file):
        ev.teacher_fp = ref_fingerprint(session.teacher_ref)
        ev.data_fps = {name: task_data(session, name, cfg).fingerprint for name, cfg in tasks.items() if cfg.USES_DATA}
        ev.corpora, warnings = task_corpora(tasks, session, ev.data_fps)
        ev.warnings += warnings
        records: dict[str, dict[str, Any]] = {}
        for label, ref in [(TEACHER, session.teacher_ref), *students]:
            with crash_boundary(f"evaluating {label!r}", log_file):
                records[label] = {**evaluate_model(ev, label, ref, is_teacher=label == TEACHER), "lineage": _lineage(ref)}
            if label == TEACHER:
                ev.teacher_results.update(records[TEACHER]["tasks"])
        report = build_report(title, records, settings, ev.warnings, gate)
        report["gate"] = check_gate(report, gate)
        write_report(out_dir, report)
    return report


# --- a recipe's choice of models ---------------------------------------------------------


def _unknown_model(name: str, stages: list[str]) -> ConfigError:
    return ConfigError(f"eval.models names {name!r}, which is not 'teacher', 'all' or a stage of the pipeline; "
                       f"valid names: {', '.join([TEACHER, 'all', *stages])}")


def check_eval_models(recipe: Recipe) -> None:
    """Every ``eval.models`` name is "teacher", "all" or a pipeline stage: checked before any stage runs."""
    valid = {TEACHER, "all", *recipe.pipeline}
    for name in recipe.config.eval.models:
        if name not in valid:
            raise _unknown_model(name, list(recipe.pipeline))
    for task, cfg in recipe.tasks.items():
        check_task_models(task, cfg.models, list(recipe.pipeline))


def check_task_models(task: str, models: list[str] | None, stages: list[str]) -> None:
    """A task's own ``models`` names the teacher (retention needs its score) and stages of the pipeline."""
    if models is None:
        return
    for name in models:
        if name != TEACHER and name not in stages:
            raise ConfigError(f"eval.tasks.{task}.models names {name!r}, which is neither 'teacher' nor a stage "
                              f"of the pipeline; valid names: {', '.join([TEACHER, *stages])}")
    if TEACHER not in models:
        raise ConfigError(f"eval.tasks.{task}.models leaves out 'teacher'; add it: every student's score on "
                          "a task is read against the teacher's")


def select_models(wanted: list[str], teacher: ModelRef, artifacts: dict[str, ModelRef]) -> list[tuple[str, ModelRef]]:
    """Resolve ``eval.models`` ("teacher", "all", or stage names) into labelled references."""
    chosen: dict[str, ModelRef] = {}
    for name in wanted:
        if name == TEACHER:
            chosen[TEACHER] = teacher
        elif name == "all":
            chosen.update(artifacts)
        elif name in artifacts:
            chosen[name] = artifacts[name]
        else:
            raise _unknown_model(name, list(artifacts))
    return list(chosen.items())
