"""Distillation checkpoints: what each was made under, writing them atomically, choosing one to resume.

Every ``checkpoint_every`` steps the trainer saves the model, optimizer, schedule and RNG
states (accelerate's ``save_state``) plus the step and history under a temporary name and
renames it, so a killed run resumes from the newest complete checkpoint to the same losses.
Under FSDP the model and optimizer are sharded: every rank writes its own shards in a
torch.distributed.checkpoint folder (``sharded/``) beside accelerate's schedule and RNG states,
and resuming reads them back into the sharded model (so a checkpoint is resumed with the same
number of processes, which :func:`made_under` records).

A checkpoint records what it was made under (:func:`made_under`: the trajectory-relevant
config, seed, process count, the student's parameter shapes, the data and teacher cache, and
the caller's provenance such as the parent model) and the size of each of its files.
Resuming reuses checkpoints only when that record matches: stale ones are moved aside
(``checkpoints.stale``) with a warning and training starts over; a checkpoint whose files are
truncated or unreadable is deleted with a warning and the one before it is tried.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from slimforge import dist
from slimforge.config import hashed_config
from slimforge.distill.config import DistillConfig
from slimforge.errors import SlimforgeError
from slimforge.fsutil import atomic_write_json, partial_path, read_json, stable_hash

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
# Config fields that change how often the run writes or logs, never the weights it reaches, so a
# checkpoint made under other values continues the same trajectory (as do the fields the stage's
# config hash leaves out, ``NOT_HASHED``: where it reports). Every other field invalidates:
# `steps` shapes the LR schedule; `eval_every`/`eval_blocks` decide what joins the history.
RESUME_NEUTRAL_FIELDS = ("checkpoint_every", "keep_checkpoints", "log_every")


def student_signature(model: Any) -> str:
    """A hash of the student's parameter and buffer names, shapes and dtypes (not their values)."""
    return stable_hash([(name, list(t.shape), str(t.dtype)) for name, t in model.state_dict().items()])


def made_under(cfg: DistillConfig, seed: int, student: Any, data: Any, cache: Any,
               kept_layers: list[int] | None, provenance: dict[str, Any]) -> dict[str, Any]:
    """Everything a checkpoint's trajectory depends on (see ``RESUME_NEUTRAL_FIELDS``), as JSON reads it back."""
    config = {k: v for k, v in hashed_config(cfg).items() if k not in RESUME_NEUTRAL_FIELDS}
    record = {"config": config, "seed": seed, "world_size": dist.world_size(),
              "student": student_signature(student), "kept_layers": kept_layers,
              "data": getattr(data, "fingerprint", None), "train_blocks": len(data.train),
              "teacher_cache": cache.meta["key"] if cache is not None else None, **provenance}
    return _json_normal(record)


def setup_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What differs between two :func:`made_under` records, for a log line."""
    if not old:
        return ["made by an earlier slimforge that recorded no setup"]
    changes = []
    old_cfg, new_cfg = old.get("config", {}), new.get("config", {})
    for key in sorted(set(old_cfg) | set(new_cfg)):
        before, after = old_cfg.get(key), new_cfg.get(key)
        if before != after:
            scalar = not isinstance(before, dict | list) and not isinstance(after, dict | list)
            changes.append(f"{key} {before!r} -> {after!r}" if scalar else key)
    changes += [key for key in sorted((set(old) | set(new)) - {"config"}) if old.get(key) != new.get(key)]
    return changes


def _json_normal(obj: Any) -> Any:
    """``obj`` as it reads back from JSON (tuples become lists), so records compare equal."""
    return json.loads(json.dumps(obj, default=str))


def _read_state(folder: Path) -> dict[str, Any] | None:
    try:
        state = read_json(folder / STATE_FILE)
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


def _unreadable_file(path: Path) -> str | None:
    """Why one checkpoint file would not load, or None; opens it without reading tensor data."""
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), "pt") as fh:
                list(fh.keys())
        elif path.suffix in (".bin", ".pkl", ".pt"):
            # Our own files (accelerate's save_state): unpickling them is what resuming does anyway.
            torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except Exception as err:  # noqa: BLE001 - any failure to open means the file is unusable
        return f"{path.name} does not load ({type(err).__name__}: {str(err).splitlines()[0][:100]})"
    return None


def checkpoint_problem(folder: Path, state: dict[str, Any] | None) -> str | None:
    """Why a checkpoint (with its parsed ``trainer_state.json``) cannot be loaded, or None."""
    if state is None:
        return f"its {STATE_FILE} is missing or unreadable"
    files = state.get("files")
    if not isinstance(files, dict) or not files:
        return "it lists no files"
    for name, size in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} holds {path.stat().st_size} bytes, {size} were written"
    for name in files:
        problem = _unreadable_file(folder / name)
        if problem:
            return problem
    return None


class Checkpoints:
    """The checkpoints of one training run, under ``work_dir/checkpoints``, made under one setup.

    Args:
        work_dir: the stage's work folder.
        record: the run's :func:`made_under` record; its hash is the checkpoints' fingerprint.
        keep: how many checkpoints to keep (the newest).
    """

    def __init__(self, work_dir: Path, record: dict[str, Any], keep: int) -> None:
        self.root = Path(work_dir) / "checkpoints"
        self.made_under = record
        self.fingerprint = stable_hash(record)
        self.keep = keep
        self._resume: Path | None = None
        self._resume_decided = False

    def folder(self, step: int) -> Path:
        return self.root / f"step-{step:06d}"

    def latest(self) -> Path | None:
        """The newest checkpoint folder that finished writing (not checked further)."""
        if not self.root.is_dir():
            return None
        done = sorted(p for p in self.root.glob("step-*") if (p / STATE_FILE).is_file())
        return done[-1] if done else None

    def resume_point(self) -> Path | None:
        """The checkpoint this run resumes from, or None to start afresh; decided once.

        The main rank decides (and moves stale or broken checkpoints out of the way), then
        every rank learns the answer, so all of them call this at the same point.
        """
        if not self._resume_decided:
            choice = self._choose() if dist.is_main() else None
            shared = dist.broadcast_object(str(choice) if choice is not None else None)
            self._resume = Path(shared) if shared else None
            self._resume_decided = True
        return self._resume

    def _choose(self) -> Path | None:
        found = sorted(self.root.glob("step-*"), reverse=True) if self.root.is_dir() else []
        states = {folder: _read_state(folder) for folder in found}
        stale = [s for s in states.values() if s is not None and s.get("fingerprint") != self.fingerprint]
        if stale:
            self._set_aside(stale[0].get("made_under") or {})
            return None
        for folder in found:
            problem = checkpoint_problem(folder, states[folder])
            if problem is None:
                return folder
            log.warning("distillation checkpoint %s cannot be loaded (%s); deleting it and trying the one before",
                        folder, problem)
            shutil.rmtree(folder, ignore_errors=True)
        if found:
            log.warning("no distillation checkpoint in %s could be loaded; training from scratch", self.root)
        return None

    def _set_aside(self, old_record: dict[str, Any]) -> None:
        """Move checkpoints of another setup to ``checkpoints.stale`` (replacing older stale ones)."""
        stale = self.root.with_name("checkpoints.stale")
        if stale.exists():
            shutil.rmtree(stale)
        os.replace(self.root, stale)
        log.warning("distillation checkpoints in %s were made under a different setup (%s); moved them to %s "
                    "and training from scratch", self.root, "; ".join(setup_changes(old_record, self.made_under)),
                    stale)

    def load(self, acc: Any, folder: Path, sharded: tuple[Any, Any] | None = None) -> dict[str, Any]:
        """Restore ``folder`` into the accelerator's objects; returns its trainer state.

        ``sharded``: the FSDP-sharded model and its optimizer, restored from the checkpoint's shards.

        Every file was opened and size-checked before, so a failure here is unexpected and may have
        restored part of the state: the checkpoint is deleted and the run stops, and the next
        invocation resumes from the one before it (or from scratch).
        """
        try:
            acc.load_state(str(folder))
            if sharded is not None:
                from slimforge.distill.sharding import load_sharded

                load_sharded(folder, *sharded)
        except Exception as err:  # noqa: BLE001 - reported in one line; the half-restored state is unusable
            if acc.is_main_process:
                shutil.rmtree(folder, ignore_errors=True)
            raise SlimforgeError(
                f"distillation checkpoint {folder} passed its checks but failed to load "
                f"({type(err).__name__}: {str(err).splitlines()[0][:160]}); it was deleted: run the same "
                "command again to resume from the checkpoint before it"
            ) from None
        return read_json(folder / STATE_FILE)

    def save(self, acc: Any, step: int, state: dict[str, Any], sharded: tuple[Any, Any] | None = None) -> None:
        """Write the accelerator's state and ``state`` as the checkpoint of ``step``, atomically, on every rank.

        ``sharded``: the FSDP-sharded model and its optimizer, written as every rank's shards.
        """
        final = self.folder(step)
        tmp = partial_path(final)
        if acc.is_main_process and tmp.exists():
            shutil.rmtree(tmp)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        if sharded is not None:
            from slimforge.distill.sharding import save_sharded

            save_sharded(tmp, *sharded)
        acc.wait_for_everyone()
        if acc.is_main_process:
            # The record of what the checkpoint was made under, and the size of each file, so
            # resuming can tell a stale or truncated checkpoint from a good one.
            files = {p.relative_to(tmp).as_posix(): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
            atomic_write_json(tmp / STATE_FILE, {**state, "fingerprint": self.fingerprint,
                                                 "made_under": self.made_under, "files": files})
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            for old in sorted(final.parent.glob("step-*"))[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
