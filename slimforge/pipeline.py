"""Runs a recipe: run directory, manifest, stage order, skip-if-done, resume, eval.

One run directory per run::

    runs/<recipe>/<run_name>/
      config.yaml        the resolved recipe of the latest invocation
      manifest.json      per stage: status, config hash, fingerprint, inputs, times, metrics
      run.log            the log of every invocation
      stages/<name>/     one HF model folder per stage (slimforge.json + recipe.yaml inside)
      work/<name>/       scratch kept across interrupted attempts (checkpoints)
      eval/<model>.json  evaluation results, keyed by what they depend on
      report.json, report.md

A stage's *fingerprint* hashes its kind, method and config with its parent's
fingerprint (and the data's, where it uses data). Re-running into the same
directory skips every stage whose fingerprint and artifact are unchanged, redoes
an interrupted one (its artifact only appears, by rename, once complete), and
refuses to replace a finished artifact made from a different config unless
``overwrite=true``. An artifact is reused only while its files still match the
sha256 digests recorded in its ``checksums.json`` when it was published; a
damaged one is made again, with a warning.

``run_name`` and the recipe's ``name`` are single folder names, and a run only
writes into a new or empty folder or an earlier run's directory, so no run
touches files that are not its own. A bug inside a stage or an evaluation ends
the run with one line naming ``run.log`` (which holds the traceback); the
finished work stays, and the same command resumes.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from slimforge import __version__, dist
from slimforge.config import Recipe, validate_recipe
from slimforge.errors import ConfigError, RunDirError
from slimforge.fsutil import (
    CHECKSUMS_FILE,
    atomic_dir,
    atomic_write_json,
    atomic_write_text,
    checksum_problem,
    ensure_writable_dir,
    read_json,
    read_json_or_none,
    stable_hash,
    write_checksums,
)
from slimforge.models import META_FILE, RECIPE_FILE, ModelRef
from slimforge.recipes import compose_recipe, compose_run, expand_sweep
from slimforge.stage import StageContext, StageOutput, TeacherInfo

log = logging.getLogger("slimforge")

DATA_KINDS = ("prune", "distill", "quantize")
# Stage kinds that run on every rank under `accelerate launch`; the rest run on the main rank.
TRAINING_KINDS = ("distill",)
MANIFEST = "manifest.json"
RUN_LOG = "run.log"
SWEEP_FILE = "sweep.json"
# What a first invocation leaves in its run directory before the manifest exists.
STARTUP_FILES = frozenset({".lock", RUN_LOG})


def _now() -> str:
    return _dt.datetime.now().isoformat(timespec="seconds")


def config_hash(obj: Any) -> str:
    """Hash of a dataclass or mapping, independent of key order."""
    return stable_hash(asdict(obj) if hasattr(obj, "__dataclass_fields__") else obj)


# --- shared, lazily loaded state ----------------------------------------------------------


class RunSession:
    """Loads the teacher, its tokenizer and the data once per run, on first use."""

    def __init__(self, recipe: Recipe, teacher_ref: ModelRef) -> None:
        from slimforge.models import resolve_device, resolve_dtype

        self.recipe = recipe
        self.teacher_ref = teacher_ref
        self.device = resolve_device(recipe.config.device)
        self.dtype = resolve_dtype(recipe.config.dtype, self.device)
        self._teacher: tuple[Any, Any] | None = None
        self._tokenizer: Any = None
        self._data: Any = None

    def teacher(self) -> tuple[Any, Any]:
        if self._teacher is None:
            log.info("loading teacher %s (%s, %s)", self.teacher_ref.path, self.device, self.dtype)
            model, tokenizer = self.teacher_ref.load(device=self.device, dtype=self.dtype)
            model.requires_grad_(False)
            self._teacher = (model, tokenizer)
            self._tokenizer = tokenizer
        return self._teacher

    def teacher_tokenizer(self) -> Any:
        if self._tokenizer is None:
            self._tokenizer = self.teacher_ref.load_tokenizer()
        return self._tokenizer

    def teacher_info(self) -> TeacherInfo:
        return model_info(self.teacher_ref, self.teacher_tokenizer(), lambda: self.teacher()[0])

    def data(self) -> Any:
        if self._data is None:
            from slimforge.data import build_data

            self._data = build_data(self.recipe.config.data, self.teacher_tokenizer())
        return self._data

    def release_teacher(self) -> None:
        self._teacher = None


def model_info(ref: ModelRef, tokenizer: Any = None, load: Any = None) -> TeacherInfo:
    """A model's config and tokenizer, for preflight checks; a GGUF file is loaded (``load``) for its config."""
    if ref.gguf_file or ref.path.endswith(".gguf"):
        config = (load() if load is not None else ref.load()[0]).config
    else:
        config = ref.load_config()
    return TeacherInfo(config=config, tokenizer=tokenizer if tokenizer is not None else ref.load_tokenizer())


def resolve_teacher(recipe: Recipe) -> ModelRef:
    """The teacher as a :class:`ModelRef`: a user path, or the embedded asset (fetched once)."""
    cfg = recipe.config.teacher
    if cfg.path:
        return ModelRef.from_source(cfg.path, "teacher", gguf_file=cfg.gguf_file, revision=cfg.revision,
                                    trust_remote_code=cfg.trust_remote_code, allow_pickle=cfg.allow_pickle)
    from slimforge.models import asset_model_folder

    return ModelRef.from_artifact(asset_model_folder(cfg.asset), "teacher")


# --- the manifest ------------------------------------------------------------------------


@dataclass
class StageRecord:
    name: str
    kind: str
    method: str
    status: str = "pending"  # pending | running | done | skipped | failed | interrupted
    config_hash: str = ""
    fingerprint: str = ""
    parent: dict[str, str] = field(default_factory=dict)
    artifact: str = ""
    started: str | None = None
    ended: str | None = None
    seconds: float | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


class Manifest:
    """``manifest.json``: what each stage is, where it came from, and how it went."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = {}
        if path.is_file():
            # Derived data: when a crash or a full disk garbled it, the stage folders still say what was made.
            loaded = read_json_or_none(path, instead="rebuilding it from the stage folders' slimforge.json "
                                                      "(the history of earlier invocations is lost)")
            self.data = loaded if loaded is not None else {"stages": recovered_stages(path.parent)}

    def stage(self, name: str) -> dict[str, Any] | None:
        return self.data.get("stages", {}).get(name)

    def set_stage(self, record: StageRecord) -> None:
        self.data.setdefault("stages", {})[record.name] = asdict(record)
        self.save()

    def save(self) -> None:
        if not dist.is_main():
            return
        self.data["updated"] = _now()
        atomic_write_json(self.path, self.data)


def recovered_stages(run_dir: Path) -> dict[str, Any]:
    """Manifest records of the finished stages in ``run_dir``, rebuilt from their ``slimforge.json``."""
    stages: dict[str, Any] = {}
    for meta_file in sorted((run_dir / "stages").glob(f"*/{META_FILE}")):
        meta = read_json_or_none(meta_file, instead="leaving that stage out of the rebuilt manifest")
        if meta is None or "fingerprint" not in meta:
            continue
        folder = meta_file.parent
        record = StageRecord(folder.name, str(meta.get("kind", "")), str(meta.get("method", "")), status="done",
                             config_hash=str(meta.get("config_hash", "")), fingerprint=str(meta["fingerprint"]),
                             parent=meta.get("parent") or {}, artifact=str(folder), metrics=meta.get("metrics") or {})
        stages[folder.name] = asdict(record)
    return stages


# --- the run -----------------------------------------------------------------------------


@dataclass
class PlannedStage:
    index: int
    name: str
    config: Any
    entry: Any
    fingerprint: str
    config_hash: str
    parent: ModelRef | None  # None until the previous stage has an artifact
    parent_fingerprint: str


@dataclass
class RunResult:
    """What a finished run hands back (also what ``slimforge.run`` returns)."""

    run_dir: Path
    manifest: dict[str, Any]
    report: dict[str, Any]

    @property
    def artifacts(self) -> dict[str, Path]:
        return {name: Path(rec["artifact"]) for name, rec in self.manifest.get("stages", {}).items()
                if rec.get("artifact")}


def resolve_run_dir(cfg: Any, job: int | None = None, sweep_name: str | None = None) -> Path:
    """``run_dir`` if given, else ``out_dir/<recipe name>/<run_name or timestamp>``."""
    if cfg.run_dir:
        base = Path(cfg.run_dir).expanduser()
    else:
        name = cfg.run_name or sweep_name or _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        base = Path(cfg.out_dir).expanduser() / cfg.name / name
    return base / f"job{job:02d}" if job is not None else base


def _leftover_temp_file(name: str) -> bool:
    """A temporary file of an atomic write that a killed process never renamed."""
    return name.startswith(".") and name.endswith(".tmp")


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def check_run_dir(run_dir: Path) -> None:
    """Refuse a run directory that would mean writing over files no slimforge run made.

    Accepted: a missing or empty folder, an earlier run's directory (it has
    ``manifest.json``), or what a first invocation killed before its manifest leaves
    (``.lock``, ``run.log``, temporary files). Checked before anything loads.

    Raises:
        RunDirError: ``run_dir`` is a file, or a folder of other files.
        OutputError: the folder, or the nearest existing folder above it, is not writable.
    """
    from slimforge.errors import OutputError

    how = "choose another run_name, or a run_dir that is new, empty or an earlier run's directory"
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"the run directory {run_dir} is a file; {how}")
    if run_dir.is_dir() and not (run_dir / MANIFEST).is_file():
        foreign = sorted(e.name for e in run_dir.iterdir()
                         if e.name not in STARTUP_FILES and not _leftover_temp_file(e.name))
        if foreign:
            shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
            raise RunDirError(f"{run_dir} is not a slimforge run directory (no {MANIFEST}) and holds other "
                              f"files ({shown}), which a run would overwrite; {how}")
    existing = _nearest_existing(run_dir)
    if not existing.is_dir():
        raise OutputError(f"cannot create the run directory {run_dir}: {existing} is a file; "
                          "choose another run_dir or out_dir")
    if not os.access(existing, os.W_OK | os.X_OK):  # fail now, not after the teacher has loaded
        raise OutputError(f"cannot write to {existing} (permission denied or read-only); "
                          "choose a writable run_dir or out_dir")


def check_sweep_dir(sweep_dir: Path) -> None:
    """Refuse a sweep folder that holds anything but a sweep's jobs and reports.

    Raises:
        RunDirError: ``sweep_dir`` is a file, or a folder of other files (a single run's directory, say).
    """
    how = "choose another run_name, or a run_dir that is new, empty or an earlier sweep's folder"
    if sweep_dir.exists() and not sweep_dir.is_dir():
        raise RunDirError(f"the sweep folder {sweep_dir} is a file; {how}")
    if sweep_dir.is_dir() and not (sweep_dir / SWEEP_FILE).is_file():
        foreign = sorted(e.name for e in sweep_dir.iterdir() if not re.fullmatch(r"job\d{2,}", e.name))
        if foreign:
            raise RunDirError(f"{sweep_dir} is not a slimforge sweep folder (no {SWEEP_FILE}) and holds other "
                              f"files ({', '.join(foreign[:3])}), which the sweep report would overwrite; {how}")


@contextlib.contextmanager
def run_lock(run_dir: Path):
    """Refuse a second concurrent run in the same directory."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    handle = open(run_dir / ".lock", "w")  # noqa: SIM115
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise RunDirError(f"another slimforge process is running in {run_dir}; wait for it or pick another run_dir") from None
    try:
        yield
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def run_logging(run_dir: Path) -> contextlib.AbstractContextManager[None]:
    """Also log to ``run.log`` in the run directory while the run lasts."""
    from slimforge.runlog import file_logging

    return file_logging(run_dir / RUN_LOG)


def artifact_damage(folder: Path) -> str | None:
    """What in a finished artifact no longer matches its ``checksums.json``, or None.

    An artifact published before slimforge recorded checksums gets them now, from the
    files as they are: from then on, a change is noticed.
    """
    if not (folder / CHECKSUMS_FILE).exists():
        log.info("recording the checksums of %s (made before slimforge recorded them)", folder)
        write_checksums(folder)
        return None
    return checksum_problem(folder)


class Run:
    """One invocation of one recipe into one run directory.

    The first stage's input is the teacher, unless ``source`` names another model (the
    Python API's ``slimforge.distill(student, teacher=...)``); the teacher then joins
    every fingerprint, since the stages still learn from it.
    """

    def __init__(self, recipe: Recipe, run_dir: Path, source: ModelRef | None = None) -> None:
        from omegaconf import OmegaConf

        self.recipe = recipe
        self.cfg = recipe.config
        self.run_dir = run_dir
        self.source = source
        self.recipe_yaml = OmegaConf.to_yaml(recipe.raw)
        self.manifest = Manifest(run_dir / MANIFEST)

    # -- planning (cheap, before any model loads) --

    def plan(self, session: RunSession) -> list[PlannedStage]:
        """Fingerprint every stage and run each method's preflight checks."""
        from slimforge.eval.runner import check_eval_models

        check_eval_models(self.recipe)  # names only: before the data is built
        info = source_info = None
        data_fp = None
        planned: list[PlannedStage] = []
        if self.recipe.tasks or any(self.recipe.stages[n].kind in DATA_KINDS for n in self.recipe.pipeline):
            session.data()  # empty or broken data fails here, before any stage runs
        if self.recipe.tasks:
            from slimforge.eval.runner import preflight_run

            preflight_run(self.recipe, session)  # task names and data, gate targets: before any stage
        first = self.source or session.teacher_ref
        parent_fp = first.fingerprint
        known: TeacherInfo | None = None  # the next stage's input, where planned_config tells it
        for index, name in enumerate(self.recipe.pipeline):
            stage_cfg = self.recipe.stages[name]
            from slimforge.registry import registry

            entry = registry(stage_cfg.kind).get(stage_cfg.method)
            # check_teacher: checks against the teacher alone, valid at any position;
            # preflight: checks against the stage's input when it is the first stage's;
            # check_input: the same for a later stage, when the stages before it say what they make
            # (planned_config: the config of a stage's output, e.g. a width prune's stated sizes).
            hooks = [h for h in ("check_teacher", "preflight" if index == 0 else "check_input", "planned_config")
                     if hasattr(stage_cfg, h)]
            planned_input, known = known, None
            for hook in hooks:
                if hook == "check_teacher":
                    target = info = info or session.teacher_info()
                elif index > 0:
                    target = planned_input
                elif self.source is not None:
                    target = source_info = source_info or model_info(self.source)
                else:
                    target = info = info or session.teacher_info()
                if target is None:
                    continue
                try:
                    result = getattr(stage_cfg, hook)(target)
                except ConfigError as err:
                    from slimforge.config import FieldError

                    raise (err.at(f"stages.{name}") if isinstance(err, FieldError) else err) from None
                if hook == "planned_config" and result is not None:
                    known = TeacherInfo(result, target.tokenizer)
            chash = config_hash(stage_cfg)
            parts = [stage_cfg.kind, stage_cfg.method, chash, parent_fp, self.cfg.seed]
            if self.source is not None:
                parts.append(session.teacher_ref.fingerprint)
            if stage_cfg.kind in DATA_KINDS:
                data_fp = data_fp or session.data().fingerprint
                parts.append(data_fp)
            fingerprint = stable_hash(parts)
            planned.append(PlannedStage(index, name, stage_cfg, entry, fingerprint, chash,
                                        first if index == 0 else None, parent_fp))
            parent_fp = fingerprint
        return planned

    def check_conflicts(self, planned: list[PlannedStage]) -> None:
        """Refuse, before doing anything, to replace finished work made differently."""
        if self.cfg.overwrite:
            return
        for stage in planned:
            folder = self.stage_dir(stage.name)
            meta = read_json_or_none(folder / META_FILE, instead=None)
            if meta is None:  # no artifact, or a damaged one that will be made again
                continue
            if meta.get("fingerprint") != stage.fingerprint:
                raise RunDirError(
                    f"{folder} holds stage {stage.name!r} made from a different config or input; "
                    "re-run with overwrite=true to replace it, or use a new run_name"
                )

    def stage_dir(self, name: str) -> Path:
        return self.run_dir / "stages" / name

    # -- executing --

    def execute(self, session: RunSession, planned: list[PlannedStage]) -> RunResult:
        """Run (or reuse) every planned stage, then the evaluation.

        Raises:
            StageCrash: a stage or the evaluation failed unexpectedly; its traceback is in
                ``run.log``, the finished stages are kept and the same command resumes.
        """
        from slimforge.runlog import crash_boundary

        main = dist.is_main()
        if main:
            ensure_writable_dir(self.run_dir, "run_dir or out_dir")
        dist.barrier()
        lock = run_lock(self.run_dir) if main else contextlib.nullcontext()
        logs = run_logging(self.run_dir) if main else contextlib.nullcontext()

        def boundary(what: str) -> contextlib.AbstractContextManager[None]:
            # Only the main rank logs to run.log; other ranks keep their tracebacks on the console.
            return crash_boundary(what, self.run_dir / RUN_LOG) if main else contextlib.nullcontext()

        with lock, logs:
            dist.on_main(self._start_invocation, session)
            artifacts: dict[str, ModelRef] = {}
            parent = self.source or session.teacher_ref
            for stage in planned:
                stage.parent = parent
                with boundary(f"stage {stage.name!r}"):
                    parent = self.run_stage(session, stage, len(planned))
                artifacts[stage.name] = parent
            from slimforge.eval.runner import evaluate_run

            with boundary("the evaluation"):
                report = dist.on_main(evaluate_run, self, session, artifacts)
            dist.on_main(self._end_invocation)
        return RunResult(self.run_dir, self.manifest.data, report or {})

    def _start_invocation(self, session: RunSession) -> None:
        self.manifest.data.update({
            "recipe": self.cfg.name, "slimforge_version": __version__,
            "config_hash": stable_hash(self.recipe_yaml),
            "teacher": {"path": session.teacher_ref.path, "fingerprint": session.teacher_ref.fingerprint},
            "pipeline": self.recipe.pipeline,
        })
        if self.source is not None:
            self.manifest.data["source"] = {"path": self.source.path, "fingerprint": self.source.fingerprint}
        self.manifest.data.setdefault("created", _now())
        self.manifest.data.setdefault("invocations", []).append(
            {"started": _now(), "argv": sys.argv[1:], "world_size": dist.world_size()})
        self.manifest.save()  # first: a folder with a manifest is a run directory (see check_run_dir)
        atomic_write_text(self.run_dir / "config.yaml", self.recipe_yaml)
        log.info("run directory: %s", self.run_dir)

    def _end_invocation(self) -> None:
        self.manifest.data["invocations"][-1]["ended"] = _now()
        self.manifest.save()

    def run_stage(self, session: RunSession, stage: PlannedStage, total: int) -> ModelRef:
        """Run one stage (or reuse its finished artifact); returns the artifact's reference."""
        folder = self.stage_dir(stage.name)
        label = f"[{stage.index + 1}/{total}] {stage.name} ({stage.config.kind}: {stage.config.method})"
        record = StageRecord(stage.name, stage.config.kind, stage.config.method, config_hash=stage.config_hash,
                             fingerprint=stage.fingerprint, artifact=str(folder),
                             parent={"label": stage.parent.label, "path": stage.parent.path,
                                     "fingerprint": stage.parent.fingerprint})
        if dist.on_main(self._reuse, stage, folder, record, label):
            return ModelRef.from_artifact(folder, stage.name)
        if stage.config.kind in TRAINING_KINDS or not dist.is_distributed():
            self._execute_stage(session, stage, folder, record, label)  # every rank trains
        else:
            dist.on_main(self._execute_stage, session, stage, folder, record, label)
        return ModelRef.from_artifact(folder, stage.name)

    def _reuse(self, stage: PlannedStage, folder: Path, record: StageRecord, label: str) -> bool:
        """Whether an undamaged finished artifact with this fingerprint exists (then mark it skipped).

        A damaged one (a file changed, missing or truncated since it was published) is
        reported and made again: the config is the same, so nothing worth keeping is lost,
        and its replacement only takes its place once complete.
        """
        if not (folder / META_FILE).is_file():
            return False
        meta = read_json_or_none(folder / META_FILE, instead=None)
        if meta is not None and meta.get("fingerprint") != stage.fingerprint:
            return False
        damage = f"{META_FILE} is unreadable" if meta is None else artifact_damage(folder)
        if damage:
            log.warning("%s: the finished artifact %s is damaged (%s); making it again", label, folder, damage)
            return False
        previous = self.manifest.stage(stage.name) or {}
        record.status, record.metrics = "skipped", previous.get("metrics", {})
        record.started, record.ended, record.seconds = (previous.get(k) for k in ("started", "ended", "seconds"))
        self.manifest.set_stage(record)
        log.info("%s: unchanged, reusing %s", label, folder)
        if not (folder / "README.md").is_file():  # made before slimforge wrote model cards
            from slimforge.models import try_write_model_card

            try_write_model_card(folder)
        return True

    def _execute_stage(self, session: RunSession, stage: PlannedStage, folder: Path, record: StageRecord,
                       label: str) -> None:
        main = dist.is_main()
        if main:
            log.info("%s: running", label)
            record.status, record.started = "running", _now()
            self.manifest.set_stage(record)
        start = time.perf_counter()
        work = self.run_dir / "work" / stage.name
        work.mkdir(parents=True, exist_ok=True)
        try:
            from transformers import set_seed

            set_seed(self.cfg.seed)
            # Only the main rank publishes the artifact; other ranks write into a throwaway folder.
            out = atomic_dir(folder, replace=True) if main else tempfile.TemporaryDirectory(prefix="slimforge-rank-")
            with out as tmp:
                ctx = StageContext(stage.name, stage.config, stage.parent, session.teacher_ref, session,
                                   Path(tmp), work, self.cfg.seed)
                output: StageOutput = stage.entry.load()(ctx)
                if main:
                    self.write_artifact(Path(tmp), output, self.artifact_meta(stage, output))
                    from slimforge.models import try_write_model_card

                    try_write_model_card(Path(tmp), location=folder)  # README.md, part of the atomic artifact
                    # Hashed now, while the files are fresh in the page cache; checked on every reuse.
                    write_checksums(Path(tmp))
        except BaseException as err:
            record.status = "interrupted" if isinstance(err, KeyboardInterrupt) else "failed"
            record.error = f"{type(err).__name__}: {err}".splitlines()[0]
            record.ended, record.seconds = _now(), round(time.perf_counter() - start, 3)
            self.manifest.set_stage(record)
            raise
        if stage.config.kind in TRAINING_KINDS:
            dist.barrier()  # the artifact exists once the main rank is past here
        if not main:
            return
        record.status, record.ended = "done", _now()
        record.seconds = round(time.perf_counter() - start, 3)
        record.metrics = output.metrics
        self.manifest.set_stage(record)
        shutil.rmtree(work, ignore_errors=True)
        with contextlib.suppress(OSError):
            work.parent.rmdir()  # only when no other stage keeps scratch there
        log.info("%s: done in %.1f s -> %s", label, record.seconds, folder)

    def artifact_meta(self, stage: PlannedStage, output: StageOutput) -> dict[str, Any]:
        return {
            "stage": stage.name, "kind": stage.config.kind, "method": stage.config.method,
            "parent": {"label": stage.parent.label, "path": stage.parent.path,
                       "fingerprint": stage.parent.fingerprint},
            "teacher": {"path": self.manifest.data["teacher"]["path"],
                        "fingerprint": self.manifest.data["teacher"]["fingerprint"]},
            "config": asdict(stage.config), "config_hash": stage.config_hash,
            "fingerprint": stage.fingerprint, "seed": self.cfg.seed,
            **output.meta, "metrics": output.metrics,
        }

    def write_artifact(self, folder: Path, output: StageOutput, meta: dict[str, Any]) -> None:
        from slimforge.models import write_model_files

        if output.model is not None:
            write_model_files(output.model, output.tokenizer, folder, meta, self.recipe_yaml)
            return
        loadable = ("config.json", "adapter_config.json")
        if not any((folder / name).is_file() for name in loadable) and not any(folder.glob("*.gguf")):
            raise RuntimeError(f"stage {meta['stage']} returned no model and wrote no loadable files")
        existing = read_json(folder / META_FILE) if (folder / META_FILE).is_file() else {}
        config = read_json(folder / "config.json") if (folder / "config.json").is_file() else {}
        described = {"model_type": config.get("model_type"), "architecture": (config.get("architectures") or [None])[0]}
        atomic_write_json(folder / META_FILE, {"slimforge_version": __version__, "created": _now(),
                                               **described, **existing, **meta})
        (folder / RECIPE_FILE).write_text(self.recipe_yaml, encoding="utf-8")


# --- entry points ------------------------------------------------------------------------


def prepare(recipe_name: str, overrides: list[str]) -> Recipe:
    """Compose and validate a recipe; raises ConfigError before anything loads."""
    from slimforge.eval.runner import check_eval_models

    recipe = validate_recipe(compose_recipe(recipe_name, overrides))
    check_eval_models(recipe)
    return recipe


@dataclass
class PlannedRun:
    """A run checked and planned up to its first stage: nothing written, the teacher's weights not loaded."""

    run: Run
    session: RunSession
    stages: list[PlannedStage]

    def execute(self) -> RunResult:
        return self.run.execute(self.session, self.stages)


def plan_run(recipe: Recipe, run_dir: Path, source: ModelRef | None = None) -> PlannedRun:
    """Every check that can fail before a stage runs: the run directory, each stage's plan, conflicts.

    In one process, or on every rank of ``accelerate launch``.
    ``source``: the first stage's input when it is not the teacher (see :class:`Run`).
    """
    dist.ensure_process_group()
    if not dist.is_main():
        log.setLevel(logging.WARNING)  # one rank reports progress
    run_dir = Path(dist.broadcast_object(str(run_dir)))  # one timestamped name for all ranks
    dist.on_main(check_run_dir, run_dir)
    run = Run(recipe, run_dir, source)
    session = RunSession(recipe, dist.main_then_others(resolve_teacher, recipe))
    planned = dist.main_then_others(run.plan, session)
    dist.on_main(run.check_conflicts, planned)
    return PlannedRun(run, session, planned)


def run_one(recipe: Recipe, run_dir: Path, source: ModelRef | None = None) -> RunResult:
    """Run one recipe into ``run_dir``: in one process, or on every rank of ``accelerate launch``.

    ``source``: the first stage's input when it is not the teacher (see :class:`Run`).
    """
    return plan_run(recipe, run_dir, source).execute()


def run_recipe(recipe_name: str = "default", overrides: list[str] | None = None,
               multirun: bool = False) -> RunResult | list[RunResult]:
    """Compose, validate and run a recipe (or a sweep of it).

    Args:
        recipe_name: shipped recipe name or path to a recipe YAML.
        overrides: Hydra overrides.
        multirun: expand sweep overrides (``key=a,b``) and the recipe's
            ``hydra.sweeper.params`` into one run per combination; implied when
            the recipe sets ``hydra.mode: MULTIRUN``.

    Returns:
        A :class:`RunResult`, or a list of them for a sweep.
    """
    overrides = list(overrides or [])
    if not multirun:
        cfg, multirun = compose_run(recipe_name, overrides)
    if not multirun:
        recipe = validate_recipe(cfg)
        return run_one(recipe, resolve_run_dir(recipe.config))
    jobs = expand_sweep(recipe_name, overrides)
    recipes = [prepare(recipe_name, job) for job in jobs]  # validate every job before running any
    sweep_name = _dt.datetime.now().strftime("%Y%m%d-%H%M%S") + "-sweep"
    sweep_dir = resolve_run_dir(recipes[0].config, sweep_name=sweep_name)
    dist.on_main(check_sweep_dir, sweep_dir)
    plans: list[PlannedRun] = []
    for index, recipe in enumerate(recipes):  # plan every job (teacher config, data, preflight) before running any
        plans.append(plan_run(recipe, resolve_run_dir(recipe.config, job=index, sweep_name=sweep_name)))
        if index:
            plans[-1].session.release_teacher()  # loaded while planning only for a GGUF teacher; one at a time
    results: list[RunResult] = []
    try:
        for index, (job, plan) in enumerate(zip(jobs, plans)):
            log.info("sweep job %d/%d: %s", index + 1, len(jobs), " ".join(job))
            results.append(plan.execute())
    except BaseException as err:
        if results and dist.is_main():  # the finished jobs still get their report
            try:
                write_sweep(sweep_dir, recipe_name, jobs, plans, results, failure=err)
            except Exception as write_err:  # noqa: BLE001 - the job's own error matters more
                log.warning("could not write the sweep report in %s: %s", sweep_dir, write_err)
        raise
    if dist.is_main():
        write_sweep(sweep_dir, recipe_name, jobs, plans, results)
    return results


def write_sweep(sweep_dir: Path, recipe_name: str, jobs: list[list[str]], plans: list[PlannedRun],
                results: list[RunResult], failure: BaseException | None = None) -> None:
    """``sweep.json`` (every job, with its status) and the sweep report over the finished jobs.

    Jobs run in order, so the first ``len(results)`` finished; the next one stopped with ``failure``.
    """
    stopped = "interrupted" if isinstance(failure, KeyboardInterrupt) else "failed"
    statuses = ["done"] * len(results) + ([stopped] if failure is not None else [])
    statuses += ["not run"] * (len(jobs) - len(statuses))
    atomic_write_json(sweep_dir / SWEEP_FILE, {
        "recipe": recipe_name,
        "jobs": [{"overrides": job, "run_dir": str(plan.run.run_dir), "status": status}
                 for job, plan, status in zip(jobs, plans, statuses)],
    })
    from slimforge.eval.report import write_sweep_report

    write_sweep_report(sweep_dir, [(r.run_dir.name, r.report) for r in results])
