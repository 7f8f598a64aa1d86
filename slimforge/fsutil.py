"""Atomic file output and content fingerprints.

Everything slimforge writes goes through here: a file or folder is built under a
temporary name beside its destination and renamed into place when complete, so
a crash never leaves a half-written result that looks finished.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

PARTIAL_SUFFIX = ".partial"


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
