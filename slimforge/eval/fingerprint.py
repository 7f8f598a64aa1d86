"""What a model *is*, for the eval cache: a hash of its files' bytes, and its kind.

A run's stage fingerprint says how a model was made; the eval cache needs what
it contains, so that the same weights reached by two routes (a sweep's shared
teacher, a copied folder) are evaluated once. Hashing gigabytes on every
invocation would cost seconds to minutes, so each file's sha256 is remembered
under the slimforge cache, keyed by its path, size, modification time, inode and
change time. The change time (ctime) cannot be set back by hand, as ``touch -r``
sets back the modification time, so rewritten bytes are always hashed again.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slimforge.fsutil import (
    atomic_write_json,
    content_files,
    read_json_or_none,
    sha256_file,
    stable_hash,
)

if TYPE_CHECKING:  # pragma: no cover
    from slimforge.models import ModelRef

_MEMO_LOCK = threading.Lock()


def _memo_path() -> Path:
    from slimforge.assets import cache_root

    return cache_root() / "eval" / "file-hashes.json"


def file_digest(path: Path, memo: dict[str, Any]) -> str:
    """sha256 of a file, reusing ``memo`` while its size, mtime, inode and ctime are unchanged."""
    stat = path.stat()
    key = str(path.resolve())
    state = [stat.st_size, stat.st_mtime_ns, stat.st_ino, stat.st_ctime_ns]
    known = memo.get(key)
    if isinstance(known, list) and known[:-1] == state:
        return known[-1]
    digest = sha256_file(path)
    memo[key] = [*state, digest]
    return digest


def _content_files(location: Path, gguf_file: str | None) -> list[Path]:
    if location.is_file():
        return [location]
    if gguf_file:
        return [location / gguf_file]
    return content_files(location)


def content_fingerprint(path: str, gguf_file: str | None = None, revision: str | None = None) -> str:
    """A hash of everything a model loads from: weights, config, tokenizer (and a LoRA base).

    A hub id that is not a local path hashes its name and revision instead.
    """
    location = Path(path).expanduser()
    if not location.exists():
        return stable_hash(["hub", path, revision])
    memo_file = _memo_path()
    with _MEMO_LOCK:
        memo = read_json_or_none(memo_file, instead="hashing the files again") or {}
        before = dict(memo)
        root = location if location.is_dir() else location.parent
        digests = [(str(p.relative_to(root)), file_digest(p, memo)) for p in _content_files(location, gguf_file)]
        if memo != before:
            atomic_write_json(memo_file, memo)
    from slimforge.models import adapter_base

    base = adapter_base(location) if location.is_dir() else None
    base_fp = content_fingerprint(base) if base else None
    return stable_hash(["content", digests, base_fp])


def ref_fingerprint(ref: ModelRef) -> str:
    return content_fingerprint(ref.path, ref.gguf_file, ref.revision)


def model_kind(path: str, gguf_file: str | None = None) -> str:
    """``gguf``, ``lora``, ``bitsandbytes``, ``quantized`` (another method), ``hf`` or ``hub``, for reports.

    The format comes from :func:`slimforge.models.artifact_format`; a hub id is not looked up.
    """
    from slimforge.models import artifact_format

    location = Path(path).expanduser()
    if not (gguf_file or location.suffix == ".gguf" or location.exists()):
        return "hub"
    kind = artifact_format(path, gguf_file)
    return kind if kind in ("gguf", "lora", "bitsandbytes", "hf") else "quantized"
