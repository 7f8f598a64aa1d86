"""Atomic file output and content fingerprints.

Everything slimforge writes goes through here: a file or folder is built under a
temporary name beside its destination and renamed into place when complete, so
a crash never leaves a half-written result that looks finished.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PARTIAL_SUFFIX = ".partial"
# sha256 of an artifact's content files, written when it is published and checked when it is reused.
CHECKSUMS_FILE = "checksums.json"
# Files of an artifact that describe it rather than make it up: provenance (``slimforge.json``,
# ``recipe.yaml``) carries timestamps and run paths, and each evaluation rewrites the model card.
DESCRIPTIVE_FILES = frozenset({"slimforge.json", "recipe.yaml", "README.md", CHECKSUMS_FILE})
# Folders of training logs inside an artifact, one per experiment tracker (distill/tracker_names.py):
# TensorBoard event files, an MLflow file store and an offline W&B run all carry timestamps.
LOG_DIRS = frozenset({"tensorboard", "mlruns", "wandb"})


def stable_hash(obj: Any, length: int = 16) -> str:
    """Hash a JSON-able object independently of dict key order."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """The hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def tree_fingerprint(root: str | Path, patterns: tuple[str, ...] = ("*",)) -> str:
    """A cheap fingerprint of a file or folder: relative names, sizes and mtimes.

    Hashing every byte of a multi-GB checkpoint on each run would cost minutes;
    name, size and modification time change whenever the content is rewritten.
    """
    root = Path(root)
    files = [root] if root.is_file() else sorted(
        p for pat in patterns for p in root.rglob(pat) if p.is_file()
    )
    entries = []
    for path in files:
        stat = path.stat()
        rel = path.name if path == root else str(path.relative_to(root))
        entries.append((rel, stat.st_size, stat.st_mtime_ns))
    return stable_hash(entries)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publish_mode(path: Path) -> None:
    """Give a finished file the mode a plain ``open()`` would (mkstemp makes it 0600)."""
    os.chmod(path, 0o666 & ~_umask())


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        _publish_mode(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: str | Path) -> Any:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def read_json_or_none(path: str | Path, instead: str | None = "ignoring it") -> dict[str, Any] | None:
    """A JSON object from ``path``; None when the file is missing, or unreadable (with a warning).

    Derived files (cached results, records) may be truncated or garbled by a crash, a full
    disk or a hand edit; their readers recompute rather than fail. ``instead`` ends the
    warning with what the caller does about it; None: no warning (the caller gives its own).
    """
    path = Path(path)
    try:
        data = read_json(path)
    except FileNotFoundError:
        return None
    except ValueError as err:  # JSONDecodeError and UnicodeDecodeError both are
        if instead is not None:
            log.warning("%s is unreadable (%s: %s); %s", path, type(err).__name__, err, instead)
        return None
    if not isinstance(data, dict):
        if instead is not None:
            log.warning("%s holds a JSON %s, not an object; %s", path, type(data).__name__, instead)
        return None
    return data


def path_component_problem(value: str) -> str | None:
    """Why ``value`` cannot be one folder name inside another folder, or None when it can.

    Names that flow into paths (a recipe's ``name``, ``run_name``) must stay where they are
    put: no separators, nothing that means "this folder" or "the folder above", no drive.
    """
    if not value.strip():
        return "must not be empty"
    if any(ch in value for ch in "/\\:") or any(ord(ch) < 32 for ch in value):
        return "must be a plain folder name, without '/', '\\', ':' or control characters"
    if value.startswith((".", "~")):
        return "must not start with '.' or '~'"
    return None


def ensure_writable_dir(path: str | Path, what: str) -> Path:
    """Create ``path`` if needed and check a file can be made in it.

    Raises:
        OutputError: the folder cannot be made or written (permissions, a read-only
            filesystem, a file in the way); the message names ``what`` to choose instead.
    """
    from slimforge.errors import OutputError

    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        # Named like every temporary file here (".*.tmp"), so one left by a kill reads as a leftover.
        fd, probe = tempfile.mkstemp(prefix=".slimforge-write-check-", suffix=".tmp", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        reason = err.strerror or type(err).__name__
        failed = Path(err.filename) if err.filename else path
        where = path if failed.parent == path else failed  # the probe file's own name says nothing
        raise OutputError(f"cannot write to {where} ({reason}); choose a writable {what}") from None
    return path


def partial_path(dest: str | Path) -> Path:
    """The temporary sibling a folder is built in before it is renamed to ``dest``."""
    dest = Path(dest)
    return dest.parent / f".{dest.name}{PARTIAL_SUFFIX}"


@contextlib.contextmanager
def atomic_dir(dest: str | Path, replace: bool = False) -> Iterator[Path]:
    """Build a folder under a temporary name; rename it to ``dest`` on success.

    Args:
        dest: the folder to create.
        replace: if ``dest`` already exists, swap it out for the new one;
            otherwise an existing ``dest`` raises ``FileExistsError``.

    Yields:
        The temporary folder to write into. A leftover from an interrupted
        earlier attempt is cleared first. On error the temporary folder is
        removed and ``dest`` is untouched.
    """
    dest = Path(dest)
    if dest.exists() and not replace:
        raise FileExistsError(dest)
    tmp = partial_path(dest)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for file in tmp.rglob("*"):
        if file.is_file() and not file.is_symlink():
            _publish_mode(file)
    if dest.exists():
        trash = dest.parent / f".{dest.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(dest, trash)
        os.replace(tmp, dest)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, dest)


@contextlib.contextmanager
def entry_lock(dest: str | Path, what: str = "the cache entry") -> Iterator[None]:
    """Hold ``dest``'s lock (``.<name>.lock`` beside it): one writer at a time, the others wait.

    An exclusive ``flock``: the OS releases it when its holder dies, so a killed run never
    leaves a stale lock behind. ``what`` names the entry in the message a waiting process logs.
    """
    import fcntl

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(dest.parent / f".{dest.name}.lock", os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("another process is writing %s %s; waiting for it to finish", what, dest)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor drops the lock


# --- checksums of a published artifact ---------------------------------------------------


def content_files(folder: str | Path) -> list[Path]:
    """The files a model folder is made of, sorted: all but dotfiles, descriptions and training logs."""
    folder = Path(folder)
    return sorted(p for p in folder.rglob("*")
                  if p.is_file() and p.name not in DESCRIPTIVE_FILES and not p.name.startswith(".")
                  and LOG_DIRS.isdisjoint(p.relative_to(folder).parts[:-1]))


def write_checksums(folder: str | Path) -> dict[str, str]:
    """Record the sha256 of every content file of ``folder`` in its ``checksums.json``.

    The file holds nothing but names and digests, so identical artifacts get identical
    checksum files. Returns the recorded digests by relative name.
    """
    folder = Path(folder)
    digests = {str(p.relative_to(folder)): sha256_file(p) for p in content_files(folder)}
    atomic_write_json(folder / CHECKSUMS_FILE, {"algorithm": "sha256", "files": digests})
    return digests


def checksum_problem(folder: str | Path) -> str | None:
    """What no longer matches ``checksums.json`` in ``folder`` (the first problem), or None.

    A missing ``checksums.json`` is a problem too: callers that accept folders made before
    checksums were recorded check for the file first.
    """
    folder = Path(folder)
    record = read_json_or_none(folder / CHECKSUMS_FILE, instead="treating the folder as damaged")
    files = record.get("files") if record is not None else None
    if not isinstance(files, dict) or record.get("algorithm") != "sha256":
        return f"{CHECKSUMS_FILE} is missing or unreadable"
    for name, digest in sorted(files.items()):
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if sha256_file(path) != digest:
            return f"{name} differs from the sha256 recorded when it was written"
    return None
