"""Offline KD: the teacher's top-k distribution per token, computed once and kept on disk.

Training from a cache never loads the teacher. Per predicted token the cache
holds the teacher's top-k vocabulary ids (uint16 when the vocabulary has at most
65,536 ids, else int32) and k + 1 log-probabilities in fp16: the k kept ids, then
the **tail bucket**, log(1 - sum of the top-k probabilities) — the teacher's mass
beyond the top-k. The student's distribution is folded onto the same k + 1 buckets
(its probabilities at the k ids, then everything else), so each divergence compares
two proper distributions and the tail mass is matched rather than dropped or
renormalised away. At k = 32 that is 32 x 2 + 33 x 2 = 130 bytes per token with
uint16 ids, 32 x 4 + 33 x 2 = 194 with int32 ids (:func:`bytes_per_token`).

An entry is keyed by the teacher, the data, k and the temperature (log-probabilities
are stored at the training temperature), not by the blocks: it holds one row per
block that some run asked for, and a run that needs blocks it lacks appends them.
So runs that differ in learning rate, steps, batch size or seed share one entry; a
shorter run finds its blocks there, a longer one adds only what is new.

Appending is crash-safe and resumable. ``meta.json`` describes committed rows only
and is replaced atomically once an extension's rows are on disk; the extension's
plan (``pending.json``) and progress (``progress.json``) let an interrupted one
continue where it stopped. One process at a time writes an entry: it holds an
exclusive ``flock`` on a lock file beside it (``.<entry>.lock``); the others wait,
then find the rows written. A killed writer's lock is released by the OS.

Files in an entry: ``meta.json``, ``ids.bin``, ``logp.bin`` (raw little-endian
arrays, one row per block; shapes and dtypes in ``meta.json``).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slimforge import fsutil
from slimforge.distill.objective import final_hidden, teacher_buckets
from slimforge.errors import ConfigError
from slimforge.fsutil import atomic_write_json, read_json, stable_hash
from slimforge.progress import progress_bar

log = logging.getLogger(__name__)

CACHE_VERSION = 2
# Rows of a batch computed another way than the teacher's buckets at every position: (teacher, ids [B, L])
# -> (top ids [B, L - 1, k], bucket log-probabilities [B, L - 1, k + 1]).
RowsFn = Callable[[Any, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
PENDING = "pending.json"
PROGRESS = "progress.json"


def ids_dtype_for(vocab_size: int) -> str:
    """The narrowest dtype that holds every token id of the vocabulary."""
    return "uint16" if vocab_size <= np.iinfo(np.uint16).max + 1 else "int32"


def bytes_per_token(ids_dtype: str, top_k: int) -> int:
    """Disk per cached token: ``top_k`` ids plus ``top_k + 1`` fp16 bucket log-probabilities."""
    return np.dtype(ids_dtype).itemsize * top_k + np.dtype(np.float16).itemsize * (top_k + 1)


@dataclass
class TeacherCache:
    """An opened cache: memory-mapped ids and bucket log-probabilities, rows per block."""

    folder: Path
    meta: dict[str, Any]
    ids: np.ndarray
    logp: np.ndarray

    @property
    def top_k(self) -> int:
        return int(self.meta["top_k"])

    def rows(self, split: str, blocks: list[int]) -> list[int]:
        index = self.meta["rows"][split]
        try:
            return [index[str(b)] for b in blocks]
        except KeyError as err:
            raise ConfigError(f"the teacher cache {self.folder} has no {split} block {err.args[0]}; rebuild it") from None

    def missing(self, train_blocks: list[int], heldout_blocks: list[int]) -> list[tuple[str, int]]:
        """The (split, block) pairs among these that the cache holds no row for, in order."""
        return _missing(self.meta["rows"], train_blocks, heldout_blocks)

    def lookup(self, split: str, blocks: list[int], device: Any = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """(ids [B, L - 1, k] int64, log-probabilities [B, L - 1, k + 1] fp32) for these blocks."""
        rows = self.rows(split, blocks)
        ids = torch.from_numpy(self.ids[rows].astype(np.int64))
        logp = torch.from_numpy(self.logp[rows].astype(np.float32))
        return ids.to(device), logp.to(device)

    def bytes_per_token(self) -> int:
        return bytes_per_token(self.meta["ids_dtype"], self.top_k)


def cache_key(teacher_fingerprint: str, data_fingerprint: str, top_k: int, temperature: float,
              extra: Any = None) -> str:
    """What an entry's rows depend on; the blocks it holds are not part of it.

    ``extra``: anything else the rows depend on (distillation across tokenizers names the student's
    tokenizer here, so such an entry is never taken for a plain one, nor the other way round).
    """
    parts = [CACHE_VERSION, teacher_fingerprint, data_fingerprint, top_k, float(temperature)]
    return stable_hash(parts if extra is None else [*parts, extra])


def _missing(rows: dict[str, dict[str, int]], train_blocks: list[int],
             heldout_blocks: list[int]) -> list[tuple[str, int]]:
    wanted = [("train", b) for b in train_blocks] + [("heldout", b) for b in heldout_blocks]
    return [(split, b) for split, b in wanted if str(b) not in rows[split]]


def _row_shapes(meta: dict[str, Any]) -> tuple[tuple[int, int], tuple[int, int]]:
    positions, k = int(meta["positions"]), int(meta["top_k"])
    return (positions, k), (positions, k + 1)


def _open(folder: Path, meta: dict[str, Any]) -> TeacherCache:
    n = int(meta["num_rows"])
    ids_shape, logp_shape = _row_shapes(meta)
    ids = np.memmap(folder / "ids.bin", dtype=np.dtype(meta["ids_dtype"]), mode="r", shape=(n, *ids_shape))
    logp = np.memmap(folder / "logp.bin", dtype=np.float16, mode="r", shape=(n, *logp_shape))
    return TeacherCache(folder, meta, ids, logp)


def open_teacher_cache(folder: str | Path) -> TeacherCache:
    """Open a committed entry (read-only)."""
    folder = Path(folder)
    if not (folder / "meta.json").is_file():
        raise ConfigError(f"{folder} holds no committed slimforge teacher cache; build it with "
                          "`slimforge distill cache-teacher` or run the stage with teacher_cache=true")
    meta = read_json(folder / "meta.json")
    if meta.get("version") != CACHE_VERSION:
        raise ConfigError(f"{folder} is a teacher cache of format {meta.get('version')}, not {CACHE_VERSION}; "
                          "delete it and build it again")
    return _open(folder, meta)


def entry_lock(dest: str | Path) -> contextlib.AbstractContextManager[None]:
    """Hold the entry's lock: one writer at a time; the OS releases it if the holder dies."""
    return fsutil.entry_lock(dest, "the teacher cache")


def build_teacher_cache(teacher: Any, train: Any, heldout: Any, train_blocks: list[int], heldout_blocks: list[int],
                        top_k: int, temperature: float, dest: str | Path, key: str, device: Any,
                        batch_size: int = 8, provenance: dict[str, Any] | None = None) -> TeacherCache:
    """The entry at ``dest`` holding at least these blocks: reused, extended or built with ``teacher``.

    See :func:`ensure_cached`, which takes a loader instead of a loaded teacher.
    """
    return ensure_cached(lambda: teacher, train, heldout, train_blocks, heldout_blocks, top_k, temperature, dest,
                         key, device, batch_size=batch_size, provenance=provenance)


def ensure_cached(load_teacher: Callable[[], Any], train: Any, heldout: Any, train_blocks: list[int],
                  heldout_blocks: list[int], top_k: int, temperature: float, dest: str | Path, key: str,
                  device: Any, batch_size: int = 8, provenance: dict[str, Any] | None = None,
                  rows: RowsFn | None = None) -> TeacherCache:
    """Make the entry at ``dest`` hold the teacher's top-k buckets for these blocks.

    Args:
        load_teacher: returns the teacher model (eval mode); called only when rows are missing.
        train, heldout: packed block datasets (``input_ids`` columns).
        train_blocks, heldout_blocks: which blocks of each split the caller needs.
        top_k: ids kept per token (plus the tail bucket).
        temperature: the training temperature the log-probabilities are taken at.
        dest: the entry's folder.
        key: :func:`cache_key` of these inputs (stored and checked on reuse).
        device: where the teacher runs.
        batch_size: blocks per teacher forward.
        provenance: extra facts for ``meta.json`` when the entry is created (teacher path, data source...).
        rows: computes a batch's rows from the teacher and the blocks' ids ([B, L] int64) instead of
            the teacher's buckets at every position (distillation across tokenizers: at aligned ones).
    """
    dest = Path(dest)
    ready = _committed(dest, key)
    if ready is not None and not ready.missing(train_blocks, heldout_blocks):
        return ready
    with entry_lock(dest):
        committed = _committed(dest, key)  # another process may have added the rows while we waited
        meta = committed.meta if committed is not None else None
        plan, done = _plan(dest, key, meta, train_blocks, heldout_blocks)
        if plan:
            teacher = load_teacher()
            if meta is None:
                meta = _new_meta(teacher, train, top_k, temperature, key, provenance)
            _append_rows(teacher, train, heldout, meta, plan, done, dest, device, batch_size, rows)
            _commit(dest, meta, plan)
    return open_teacher_cache(dest)


def _committed(dest: Path, key: str) -> TeacherCache | None:
    if not (dest / "meta.json").is_file():
        return None
    cache = open_teacher_cache(dest)
    if cache.meta["key"] != key:
        raise ConfigError(f"{dest} holds a teacher cache for other inputs; remove it or choose another folder")
    return cache


def _new_meta(teacher: Any, train: Any, top_k: int, temperature: float, key: str,
              provenance: dict[str, Any] | None) -> dict[str, Any]:
    vocab = int(teacher.config.vocab_size)
    if top_k > vocab:
        raise ConfigError(f"distill.top_k={top_k} exceeds the teacher's vocabulary of {vocab}")
    return {"version": CACHE_VERSION, "key": key, "top_k": top_k, "temperature": float(temperature),
            "num_rows": 0, "positions": len(train[0]["input_ids"]) - 1, "vocab_size": vocab,
            "ids_dtype": ids_dtype_for(vocab), "rows": {"train": {}, "heldout": {}}, "provenance": provenance or {}}


def _plan(dest: Path, key: str, meta: dict[str, Any] | None, train_blocks: list[int],
          heldout_blocks: list[int]) -> tuple[list[tuple[str, int]], int]:
    """The rows to append after the committed ones, and how many of them an interrupted extension wrote.

    An unfinished extension of the same committed state is finished first (its rows keep their
    places); whatever the caller needs beyond it is appended to its plan.
    """
    base = int(meta["num_rows"]) if meta else 0
    rows = meta["rows"] if meta else {"train": {}, "heldout": {}}
    pending = read_json(dest / PENDING) if (dest / PENDING).is_file() else {}
    plan: list[tuple[str, int]] = []
    done = 0
    if pending.get("key") == key and pending.get("base_rows") == base:
        plan = [(split, int(b)) for split, b in pending["plan"]]
        if (dest / PROGRESS).is_file():
            done = int(read_json(dest / PROGRESS)["rows_done"])
        log.info("resuming the teacher cache at row %d of %d", base + done, base + len(plan))
    else:  # none, or left by an extension that committed or was made for other inputs
        for name in (PENDING, PROGRESS):
            (dest / name).unlink(missing_ok=True)
    planned = {(split, str(b)) for split, b in plan}
    plan += [(s, b) for s, b in _missing(rows, train_blocks, heldout_blocks) if (s, str(b)) not in planned]
    if plan:
        dest.mkdir(parents=True, exist_ok=True)
        atomic_write_json(dest / PENDING, {"key": key, "base_rows": base, "plan": plan})
        atomic_write_json(dest / PROGRESS, {"rows_done": done})
    return plan, done


def _grow(path: Path, dtype: Any, row_shape: tuple[int, int], base: int, total: int) -> np.memmap:
    """``path`` sized for ``total`` rows; a writable map of rows ``base`` onwards."""
    row_bytes = int(np.prod(row_shape)) * np.dtype(dtype).itemsize
    with open(path, "ab"):
        pass
    os.truncate(path, total * row_bytes)  # also drops bytes an abandoned extension left past the committed rows
    return np.memmap(path, dtype=dtype, mode="r+", offset=base * row_bytes, shape=(total - base, *row_shape))


def _next_batch(plan: list[tuple[str, int]], start: int, size: int) -> tuple[str, list[int]]:
    """Up to ``size`` blocks from ``plan[start:]``, all of one split (a forward reads one split)."""
    split = plan[start][0]
    blocks = []
    for s, block in plan[start: start + size]:
        if s != split:
            break
        blocks.append(block)
    return split, blocks


def _append_rows(teacher: Any, train: Any, heldout: Any, meta: dict[str, Any], plan: list[tuple[str, int]],
                 done: int, dest: Path, device: Any, batch_size: int, rows: RowsFn | None = None) -> None:
    """Run the teacher over ``plan[done:]`` and write its buckets after the committed rows."""
    from slimforge.data import blocks_tensor
    from slimforge.distill.chunked import softcap_transform

    base = int(meta["num_rows"])
    ids_shape, logp_shape = _row_shapes(meta)
    ids = _grow(dest / "ids.bin", np.dtype(meta["ids_dtype"]), ids_shape, base, base + len(plan))
    logp = _grow(dest / "logp.bin", np.float16, logp_shape, base, base + len(plan))
    cap = softcap_transform(teacher.config)
    bar = progress_bar(total=len(plan), initial=done, desc="teacher cache", unit="block")
    with torch.no_grad():
        while done < len(plan):
            split, batch = _next_batch(plan, done, batch_size)
            source = train if split == "train" else heldout
            tokens = blocks_tensor(source.select(batch)).to(device)
            if rows is not None:
                top_ids, top_logp = rows(teacher, tokens)
            else:
                logits = teacher.get_output_embeddings()(final_hidden(teacher, tokens))
                top_ids, top_logp = teacher_buckets(cap(logits.float()) if cap else logits, int(meta["top_k"]),
                                                    float(meta["temperature"]))
            ids[done: done + len(batch)] = top_ids.cpu().numpy().astype(ids.dtype)
            logp[done: done + len(batch)] = top_logp.cpu().numpy().astype(np.float16)
            ids.flush()
            logp.flush()
            done += len(batch)
            atomic_write_json(dest / PROGRESS, {"rows_done": done})
            bar.update(len(batch))
    bar.close()
    del ids, logp


def _commit(dest: Path, meta: dict[str, Any], plan: list[tuple[str, int]]) -> None:
    """Publish the appended rows: the new ``meta.json`` replaces the old one in one rename."""
    base = int(meta["num_rows"])
    rows = {split: dict(index) for split, index in meta["rows"].items()}
    for offset, (split, block) in enumerate(plan):
        rows[split][str(block)] = base + offset
    committed = {**meta, "num_rows": base + len(plan), "rows": rows}
    atomic_write_json(dest / "meta.json", committed)
    for name in (PENDING, PROGRESS):
        (dest / name).unlink(missing_ok=True)
    log.info("teacher cache: %d blocks x %d tokens (%d new), %d bytes/token, in %s", committed["num_rows"],
             committed["positions"], len(plan), bytes_per_token(committed["ids_dtype"], committed["top_k"]), dest)
