"""The run directory: where a run writes, what may already be there, its lock, log and manifest.

One run directory per run::

    runs/<recipe>/<run_name>/
      config.yaml        the resolved recipe of the latest invocation
      manifest.json      per stage: status, config hash, fingerprint, inputs, times, metrics
      run.log            the log of every invocation
      stages/<name>/     one HF model folder per stage (slimforge.json + recipe.yaml inside)
      work/<name>/       scratch kept across interrupted attempts (checkpoints)
      eval/<model>.json  evaluation results, keyed by what they depend on
      report.json, report.md

``run_name`` and the recipe's ``name`` are single folder names, and a run only writes into
a new or empty folder or an earlier run's directory (:func:`check_run_dir`), so no run
touches files that are not its own.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import slimforge.dist as dist
from slimforge.errors import RunDirError
from slimforge.fsutil import atomic_write_json, read_json_or_none
from slimforge.models import META_FILE

MANIFEST = "manifest.json"
RUN_LOG = "run.log"
SWEEP_FILE = "sweep.json"
# What a first invocation leaves in its run directory before the manifest exists.
STARTUP_FILES = frozenset({".lock", RUN_LOG})


def now() -> str:
    """The local time, to the second, as the manifest records it."""
    return _dt.datetime.now().isoformat(timespec="seconds")


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
        self.data["updated"] = now()
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


# --- where a run writes ---------------------------------------------------------------


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
