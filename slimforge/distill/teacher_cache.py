"""Offline KD: the teacher's top-k distribution per token, computed once and kept on disk.

Training from a cache never loads the teacher. Per predicted token the cache
holds the teacher's top-k vocabulary ids (uint16 when the vocabulary fits, else
int32) and k + 1 log-probabilities in fp16: the k kept ids, then the **tail
bucket**, log(1 - sum of the top-k probabilities) — the teacher's mass beyond
the top-k. The student's distribution is folded onto the same k + 1 buckets (its
probabilities at the k ids, then everything else), so each divergence compares
two proper distributions and the tail mass is matched rather than dropped or
renormalised away. At k = 32 that is 32 x 2 + 33 x 2 = 130 bytes per token.

The cache is tied to the teacher, the data, the blocks, k and the temperature
(log-probabilities are stored at the training temperature); anything else
refuses to use it. Building it is resumable: rows are flushed as they are
written and an interrupted build continues where it stopped.

Files in a cache folder: ``meta.json``, ``ids.bin``, ``logp.bin`` (raw
little-endian arrays; shapes and dtypes in ``meta.json``).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from slimforge.distill.objective import final_hidden, teacher_buckets
from slimforge.errors import ConfigError
from slimforge.fsutil import atomic_write_json, partial_path, read_json, stable_hash

log = logging.getLogger(__name__)

CACHE_VERSION = 1


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

    def lookup(self, split: str, blocks: list[int], device: Any = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """(ids [B, L - 1, k] int64, log-probabilities [B, L - 1, k + 1] fp32) for these blocks."""
        rows = self.rows(split, blocks)
        ids = torch.from_numpy(self.ids[rows].astype(np.int64))
        logp = torch.from_numpy(self.logp[rows].astype(np.float32))
        return ids.to(device), logp.to(device)

    def bytes_per_token(self) -> float:
        return (self.ids.itemsize * self.ids.shape[-1] + self.logp.itemsize * self.logp.shape[-1])


def cache_key(teacher_fingerprint: str, data_fingerprint: str, train_blocks: list[int],
              heldout_blocks: list[int], top_k: int, temperature: float) -> str:
    return stable_hash([CACHE_VERSION, teacher_fingerprint, data_fingerprint, train_blocks, heldout_blocks,
                        top_k, float(temperature)])


def _open(folder: Path, meta: dict[str, Any], mode: str) -> TeacherCache:
    n, positions, k = meta["num_rows"], meta["positions"], meta["top_k"]
    ids = np.memmap(folder / "ids.bin", dtype=np.dtype(meta["ids_dtype"]), mode=mode, shape=(n, positions, k))
    logp = np.memmap(folder / "logp.bin", dtype=np.float16, mode=mode, shape=(n, positions, k + 1))
    return TeacherCache(folder, meta, ids, logp)


def open_teacher_cache(folder: str | Path) -> TeacherCache:
    folder = Path(folder)
    meta = read_json(folder / "meta.json")
    if meta.get("version") != CACHE_VERSION or not meta.get("complete"):
        raise ConfigError(f"{folder} is not a complete slimforge teacher cache (version {CACHE_VERSION}); rebuild it")
    return _open(folder, meta, "r")


def build_teacher_cache(teacher: Any, train: Any, heldout: Any, train_blocks: list[int], heldout_blocks: list[int],
                        top_k: int, temperature: float, dest: str | Path, key: str, device: Any,
                        batch_size: int = 8, provenance: dict[str, Any] | None = None) -> TeacherCache:
    """Run the teacher over the chosen blocks once and store its top-k buckets.

    Args:
        teacher: the teacher model (eval mode).
        train, heldout: packed block datasets (``input_ids`` columns).
        train_blocks, heldout_blocks: which blocks of each split to cache.
        top_k: ids kept per token (plus the tail bucket).
        temperature: the training temperature the log-probabilities are taken at.
        dest: the cache folder; built under a temporary name and renamed when complete.
        key: :func:`cache_key` of these inputs (stored and checked on reuse).
        device: where the teacher runs.
        batch_size: blocks per teacher forward.
        provenance: extra facts for ``meta.json`` (teacher path, data source...).
    """
    from slimforge.data import blocks_tensor

    dest = Path(dest)
    if (dest / "meta.json").is_file():
        cache = open_teacher_cache(dest)
        if cache.meta["key"] != key:
            raise ConfigError(f"{dest} holds a teacher cache for other inputs; remove it or choose another folder")
        return cache
    vocab = teacher.config.vocab_size
    if top_k > vocab:
        raise ConfigError(f"distill.top_k={top_k} exceeds the teacher's vocabulary of {vocab}")
    work = partial_path(dest)
    work.mkdir(parents=True, exist_ok=True)
    block_size = len(train[0]["input_ids"])
    plan = [("train", b) for b in train_blocks] + [("heldout", b) for b in heldout_blocks]
    meta = {
        "version": CACHE_VERSION, "key": key, "complete": False, "top_k": top_k, "temperature": float(temperature),
        "num_rows": len(plan), "positions": block_size - 1, "vocab_size": vocab,
        "ids_dtype": "uint16" if vocab <= np.iinfo(np.uint16).max + 1 else "int32",
        "rows": {"train": {str(b): i for i, b in enumerate(train_blocks)},
                 "heldout": {str(b): len(train_blocks) + i for i, b in enumerate(heldout_blocks)}},
        "provenance": provenance or {},
    }
    progress = work / "progress.json"
    done = 0
    if progress.is_file() and read_json(progress).get("key") == key:
        done = int(read_json(progress)["rows_done"])
        log.info("resuming the teacher cache at row %d of %d", done, len(plan))
    else:
        for name in ("ids.bin", "logp.bin"):
            (work / name).unlink(missing_ok=True)
    mode = "r+" if done else "w+"
    cache = _open(work, meta, mode)
    bar = tqdm(total=len(plan), initial=done, desc="teacher cache", unit="block")
    with torch.no_grad():
        while done < len(plan):
            batch = plan[done: done + batch_size]
            split = batch[0][0]
            batch = [b for b in batch if b[0] == split]
            source = train if split == "train" else heldout
            ids = blocks_tensor(source.select([b for _, b in batch])).to(device)
            hidden = final_hidden(teacher, ids)
            logits = teacher.get_output_embeddings()(hidden)
            from slimforge.distill.chunked import softcap_transform

            cap = softcap_transform(teacher.config)
            top_ids, logp = teacher_buckets(cap(logits.float()) if cap else logits, top_k, temperature)
            cache.ids[done: done + len(batch)] = top_ids.cpu().numpy().astype(cache.ids.dtype)
            cache.logp[done: done + len(batch)] = logp.cpu().numpy().astype(np.float16)
            cache.ids.flush()
            cache.logp.flush()
            done += len(batch)
            atomic_write_json(progress, {"key": key, "rows_done": done})
            bar.update(len(batch))
    bar.close()
    meta["complete"] = True
    atomic_write_json(work / "meta.json", meta)
    progress.unlink()
    del cache
    os.replace(work, dest)
    log.info("teacher cache: %d blocks x %d tokens, %.0f bytes/token, in %s",
             len(plan), block_size - 1, _bytes_per_token(meta), dest)
    return open_teacher_cache(dest)


def _bytes_per_token(meta: dict[str, Any]) -> float:
    return np.dtype(meta["ids_dtype"]).itemsize * meta["top_k"] + 2 * (meta["top_k"] + 1)
