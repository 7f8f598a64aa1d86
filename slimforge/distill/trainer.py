"""The distillation trainer: one accelerate loop for CPU, one GPU, DDP and FSDP2.

With ``sharding: none`` (the default) every rank holds a whole copy of the student (and of the
teacher, unless it trains from the teacher cache) and accelerate wraps the student in DDP. With
``sharding: fsdp`` the trainer shards the student and the frozen teacher itself with torch's
``fully_shard`` (:mod:`~slimforge.distill.sharding`: accelerate's FSDP plugin does not drive
CPU runs), checkpoints hold every rank's shards (torch.distributed.checkpoint), and the final
student is gathered whole on the main rank. accelerate's own FSDP plugin and DeepSpeed are refused
with a clear error.

A step: each rank takes its slice of the step's blocks (a seeded permutation per
epoch, so the data position is a pure function of the step and resuming needs no
sampler state); the live teacher, or its cache, gives targets without gradients;
the student's loss runs inside one wrapped module so DDP sees an ordinary
forward; gradients accumulate, are clipped, the optimizer and the schedule step.
A non-finite loss stops the run with a clear error before any checkpoint of the bad
state is written.

This module is the loop; its parts live beside it: the objective wiring (student
preparation, teacher targets, the loss of a batch) in :mod:`~slimforge.distill.wiring`,
checkpoints (what each was made under, which one to resume) in
:mod:`~slimforge.distill.checkpoints`, held-out metrics and the experiment trackers in
:mod:`~slimforge.distill.metrics`.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slimforge import dist
from slimforge.distill import sharding
from slimforge.distill.checkpoints import Checkpoints, made_under
from slimforge.distill.config import DistillConfig
from slimforge.distill.metrics import RunLog, build_trackers, heldout_metrics, tracker_config
from slimforge.distill.wiring import KDObjective, StudentWithLoss, masked_linears, prepare_student
from slimforge.errors import ConfigError, DataError, SlimforgeError
from slimforge.progress import progress_bar

log = logging.getLogger(__name__)

# Fault injection for the resume test: SIGKILL this process right after the given step.
KILL_ENV = "SLIMFORGE_KILL_AFTER_STEP"


class TrainingDiverged(SlimforgeError):
    """The loss became NaN or infinite."""


@dataclass
class TrainResult:
    model: Any
    metrics: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)


def block_schedule(num_blocks: int, total: int, seed: int) -> np.ndarray:
    """The training blocks in visiting order: a fresh seeded permutation per epoch, ``total`` long."""
    if num_blocks < 1:
        raise ConfigError("the training split is empty; add data or lower data.heldout_fraction")
    order: list[int] = []
    epoch = 0
    while len(order) < total:
        order.extend(np.random.default_rng([seed, epoch]).permutation(num_blocks).tolist())
        epoch += 1
    return np.asarray(order[:total], dtype=np.int64)


def loss_token_count(split: Any) -> int:
    """How many tokens of a packed split count in the loss (sum of its ``loss_mask``), read from Arrow."""
    import pyarrow.compute as pc

    total = pc.sum(pc.list_flatten(split.data.column("loss_mask"))).as_py()
    return int(total or 0)


def require_loss_tokens(cfg: DistillConfig, data: Any) -> None:
    """Refuse training blocks whose loss masks are all zero: the loss would be 0 at every step.

    With ``on_policy.fraction`` 1 every batch is generated and masks its own tokens, so the data's
    masks do not matter.
    """
    if cfg.on_policy.fraction < 1 and loss_token_count(data.train) == 0:
        raise DataError(
            f"none of the {len(data.train)} training blocks has a token the loss counts (every loss_mask is 0: "
            "chat data without assistant turns?), so distillation would learn nothing; add assistant turns to "
            "the conversations or train on plain text"
        )


def ranks_hold_the_same_weights(model: Any) -> bool:
    """Every rank's trainable weights are bit-identical (trivially true in one process).

    For replicated (DDP) training only: under FSDP each weight is held once, in shards, so there is
    nothing to compare (the trainer reports ``ranks_agree: null`` there).
    """
    if not dist.is_distributed():
        return True
    import torch.distributed as tdist

    sums = [float(p.detach().double().sum()) for p in model.parameters() if p.requires_grad]
    gathered: list[Any] = [None] * dist.world_size()
    tdist.all_gather_object(gathered, sums)
    return all(g == gathered[0] for g in gathered)


@dataclass
class _Run:
    """The mutable state of one training run (what a checkpoint restores, plus live objects)."""

    acc: Any
    wrapped: Any
    student: Any
    params: list[torch.nn.Parameter]
    optimizer: Any
    scheduler: Any
    masked: list[tuple[torch.nn.Linear, torch.Tensor]]
    on_policy: Any
    tokens_per_step: int
    sharded: bool = False
    step: int = 0
    first_step: int = 0
    tokens: int = 0
    seconds: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    run_log: RunLog | None = None

    def state(self) -> dict[str, Any]:
        return {"step": self.step, "history": self.history, "losses": self.losses, "tokens": self.tokens}

    def restore(self, state: dict[str, Any]) -> None:
        self.step, self.history, self.losses, self.tokens = state["step"], state["history"], state["losses"], state["tokens"]

    def tokens_per_s(self) -> float:
        return (self.step - self.first_step) * self.tokens_per_step / max(self.seconds, 1e-9)

    def release(self) -> None:
        self.wrapped = self.optimizer = None
        self.acc.free_memory()


class DistillTrainer:
    """Distils ``student`` from a live ``teacher`` or a ``cache`` of its top-k distribution.

    ``provenance`` names what the student and teacher were made from (the pipeline passes the
    parent's and the teacher's fingerprints); it joins the checkpoints' record of what they
    were made under (:func:`~slimforge.distill.checkpoints.made_under`), so checkpoints of
    another parent are never resumed.

    ``tracking_dir`` is the folder the experiment trackers (``cfg.trackers``) write in, each in its
    own subfolder, under a run named ``run_name``; None reports to no tracker.
    """

    def __init__(self, cfg: DistillConfig, student: Any, data: Any, work_dir: Path, tracking_dir: Path | None,
                 seed: int, device: torch.device, teacher: Any = None, cache: Any = None,
                 kept_layers: list[int] | None = None, provenance: dict[str, Any] | None = None,
                 run_name: str = "distill", objective: Any = None) -> None:
        if teacher is None and cache is None:
            raise ValueError("a live teacher or a teacher cache is required")
        if cfg.sharding == "fsdp":
            sharding.require_processes(dist.world_size())
            sharding.require_unquantized(student)
        self.cfg = cfg
        from slimforge.quantize.bnb_cpu import keep_4bit_layers_off_cpu_packing

        # A 4-bit (QLoRA) base must never be repacked for bitsandbytes' CPU kernel by an
        # evaluation: that kernel has no backward, so later gradients would be silently wrong.
        keep_4bit_layers_off_cpu_packing(student, everywhere=True)
        self.student = student
        self.teacher = teacher
        self.cache = cache
        self.data = data
        self.tracking_dir = tracking_dir
        self.run_name = run_name
        self.seed = seed
        self.device = device
        # ``objective``: another loss of a batch with KDObjective's interface (distillation across tokenizers).
        self.objective = objective if objective is not None else KDObjective(cfg, teacher, cache)
        self.kept_layers = kept_layers
        self.train_blocks = self._plan_blocks()
        self.eval_blocks = list(range(min(cfg.eval_blocks, len(data.heldout))))
        record = made_under(cfg, seed, student, data, cache, kept_layers, provenance or {})
        self.checkpoints = Checkpoints(work_dir, record, cfg.keep_checkpoints)

    # -- planning ---------------------------------------------------------------------

    def _plan_blocks(self) -> np.ndarray:
        per_step = self.cfg.batch_size * self.cfg.grad_accum * dist.world_size()
        return block_schedule(len(self.data.train), self.cfg.steps * per_step, self.seed)

    def blocks_for(self, micro_step: int) -> list[int]:
        """This rank's blocks for one micro-batch (a pure function of the micro-step)."""
        size = self.cfg.batch_size
        start = (micro_step * dist.world_size() + dist.rank()) * size
        return self.train_blocks[start: start + size].tolist()

    def resume_point(self) -> Path | None:
        """The checkpoint training resumes from, or None to start afresh (see :class:`Checkpoints`)."""
        return self.checkpoints.resume_point()

    def evaluate(self, student: Any) -> dict[str, float]:
        """Held-out forward KL(teacher || student) at T = 1, student CE and top-1 agreement (or the objective's own)."""
        own = getattr(self.objective, "heldout_metrics", None)
        if own is not None:
            return own(student, self.data.heldout, self.eval_blocks, self.cfg.batch_size, self.device)
        return heldout_metrics(student, self.data.heldout, self.eval_blocks, self.cfg.batch_size, self.device,
                               teacher=self.teacher, cache=self.cache)

    # -- setup ------------------------------------------------------------------------

    def _accelerator(self) -> Any:
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state()  # one process may train several stages
        if os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true"):
            raise ConfigError("the distillation trainer shards with FSDP itself, not through accelerate's FSDP plugin: "
                              "launch with accelerate launch --multi_gpu (or torchrun), without --use_fsdp, and set "
                              "stages.<name>.sharding=fsdp")
        if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true"):
            raise ConfigError("the distillation trainer supports one process, DDP and FSDP (sharding=fsdp); "
                              "DeepSpeed is not supported")
        precision = self.cfg.precision
        if precision == "auto":
            from slimforge.models import cpu_supports_fast_bf16

            fast_bf16 = self.device.type == "cuda" or (self.device.type == "cpu" and cpu_supports_fast_bf16())
            precision = "bf16" if fast_bf16 else "fp32"
        # Only the main process reports: the other ranks' Accelerators get no trackers.
        trackers = build_trackers(self.cfg.trackers, self.tracking_dir, self.run_name) \
            if self.tracking_dir is not None and dist.is_main() else []
        return Accelerator(cpu=self.device.type == "cpu", mixed_precision="bf16" if precision == "bf16" else "no",
                           log_with=trackers or None)

    def _optimizer(self, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        """AdamW over the schema's parameter groups (a group's own ``lr`` or ``weight_decay`` wins)."""
        if self.cfg.optimizer == "adamw_8bit":
            import bitsandbytes as bnb

            return bnb.optim.AdamW8bit(groups, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        fused = self.device.type == "cuda"
        return torch.optim.AdamW(groups, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay, fused=fused)

    def _scheduler(self, optimizer: torch.optim.Optimizer) -> Any:
        from transformers import get_scheduler

        name = {"constant": "constant_with_warmup"}.get(self.cfg.schedule, self.cfg.schedule)
        return get_scheduler(name, optimizer, num_warmup_steps=self.cfg.warmup_steps,
                             num_training_steps=self.cfg.steps)

    def _setup(self) -> _Run:
        acc = self._accelerator()
        self.student, masks = prepare_student(self.cfg, self.student)
        projections = self.objective.hidden_projections(self.student, self.kept_layers)
        if self.teacher is not None:
            self.teacher.eval().requires_grad_(False)
        wrapped = StudentWithLoss(self.student, projections)
        sharded = self.cfg.sharding == "fsdp"
        if sharded:  # before the optimizer: sharding replaces the parameters by DTensors
            mesh = sharding.device_mesh(acc.device)
            sharding.shard_student(wrapped, self.student, mesh)
            if self.teacher is not None:
                sharding.shard_teacher(self.teacher, mesh)
            log.info("FSDP over %d processes: this rank holds %s", dist.world_size(), "; ".join(
                f"{held:,} of the {name}'s {total:,} parameters" for name, (held, total) in
                (("student", sharding.held_here(wrapped)),
                 *((("teacher", sharding.held_here(self.teacher)),) if self.teacher is not None else ()))))
        params = [p for p in wrapped.parameters() if p.requires_grad]
        optimizer = self._optimizer(self.cfg.param_groups(wrapped))
        scheduler = self._scheduler(optimizer)
        if not sharded:
            wrapped, optimizer = acc.prepare(wrapped, optimizer)
        acc.register_for_checkpointing(scheduler)
        from slimforge.distill.gkd import OnPolicy

        masked = masked_linears(self.student, masks)
        run = _Run(acc=acc, wrapped=wrapped, student=self.student, params=params, optimizer=optimizer,
                   scheduler=scheduler, masked=sharding.shard_masks(masked) if sharded else masked, sharded=sharded,
                   on_policy=OnPolicy(self.cfg.on_policy, self.seed) if self.cfg.on_policy.fraction > 0 else None,
                   tokens_per_step=self.cfg.batch_size * self.cfg.grad_accum * dist.world_size()
                   * len(self.data.train[0]["input_ids"]))
        resume = self.resume_point()
        if resume is not None:
            run.restore(self.checkpoints.load(acc, resume, self._sharded_state(run)))
            log.info("resuming distillation from %s (step %d of %d)", resume, run.step, self.cfg.steps)
        run.first_step = run.step
        run.run_log = RunLog(acc, self.cfg.log_every, tracker_config(self.cfg, self.seed))
        return run

    @staticmethod
    def _sharded_state(run: _Run) -> tuple[Any, Any] | None:
        """The sharded model and optimizer a checkpoint holds beside accelerate's state (None: not sharded)."""
        return (run.wrapped, run.optimizer) if run.sharded else None

    # -- the loop ---------------------------------------------------------------------

    def _batch(self, split: str, blocks: list[int], ids_device: torch.device) -> dict[str, Any]:
        from slimforge.data import blocks_tensor

        source = self.data.train if split == "train" else self.data.heldout
        rows = source.select(blocks)
        ids = blocks_tensor(rows).to(ids_device)
        loss_mask = blocks_tensor(rows, column="loss_mask").to(ids_device)
        return {"input_ids": ids, "loss_mask": loss_mask, "attention_mask": None}

    def train(self) -> TrainResult:
        """Run (or resume) the loop to ``cfg.steps``; returns the unwrapped student and its metrics.

        Under FSDP the student is returned whole on the main rank, and as None on the others.
        """
        cfg = self.cfg
        run = self._setup()
        bar = progress_bar(total=cfg.steps, initial=run.step, desc="distill", unit="step",
                           enabled=run.acc.is_main_process)
        kill_after = int(os.environ.get(KILL_ENV, "0") or 0)
        try:
            while run.step < cfg.steps:
                started = time.perf_counter()
                loss, stats = self._train_step(run)
                run.seconds += time.perf_counter() - started
                run.step += 1
                run.losses.append(round(loss, 6))
                bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{run.tokens_per_s():.0f}")
                bar.update(1)
                run.run_log.step(run.step, loss, run.scheduler.get_last_lr()[0], run.tokens_per_s(), stats)
                if run.step % cfg.eval_every == 0 or run.step == cfg.steps:
                    self._evaluate_into_history(run, loss)
                if run.step % cfg.checkpoint_every == 0 and run.step < cfg.steps:
                    self.checkpoints.save(run.acc, run.step, run.state(), self._sharded_state(run))
                if kill_after and run.step == kill_after:
                    os.kill(os.getpid(), signal.SIGKILL)
        finally:
            bar.close()
            run.run_log.close()
        return self._finish(run)

    def _train_step(self, run: _Run) -> tuple[float, dict[str, float]]:
        """One optimizer step over ``grad_accum`` micro-batches; returns the mean loss and stats."""
        cfg, acc = self.cfg, run.acc
        step_loss, step_stats = 0.0, {}
        for micro in range(cfg.grad_accum):
            micro_step = run.step * cfg.grad_accum + micro
            blocks = self.blocks_for(micro_step)
            batch = self._batch("train", blocks, acc.device)
            if run.on_policy is not None and run.on_policy.use_for(micro_step):
                batch = run.on_policy.rollout(self, run.student, batch)
            # On-policy batches exist only with a live teacher, which scores the ids it is given.
            teacher_side = self.objective.teacher_targets("train", blocks, batch["input_ids"])
            # FSDP reduce-scatters every micro-batch's gradients (no unsharded gradient is kept).
            sync = micro == cfg.grad_accum - 1 or run.sharded
            with nullcontext() if sync else acc.no_sync(run.wrapped), acc.autocast():
                loss, stats = run.wrapped(self.objective, input_ids=batch["input_ids"], loss_mask=batch["loss_mask"],
                                          attention_mask=batch["attention_mask"], targets_from_teacher=teacher_side)
            self._stop_if_diverged(loss, run.step, micro)
            acc.backward(loss / cfg.grad_accum)
            # Report the mean over ranks: what a single process with the whole batch would see.
            step_loss += acc.reduce(loss.detach(), reduction="mean").item() / cfg.grad_accum
            for key, value in stats.items():
                step_stats[key] = step_stats.get(key, 0.0) + value / cfg.grad_accum
            run.tokens += batch["input_ids"].numel() * dist.world_size()
        if cfg.max_grad_norm is not None and run.sharded:
            torch.nn.utils.clip_grad_norm_(run.params, cfg.max_grad_norm)  # the norm over every rank's shards
        elif cfg.max_grad_norm is not None:
            acc.clip_grad_norm_(run.params, cfg.max_grad_norm)
        run.optimizer.step()
        run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            # Masked training: pruned weights stay exactly zero (under FSDP, each shard by its part of the mask).
            for module, mask in run.masked:
                module.weight.mul_(mask)
        return step_loss, step_stats

    def _stop_if_diverged(self, loss: torch.Tensor, step: int, micro: int) -> None:
        if dist.all_true(bool(torch.isfinite(loss.detach()).all())):
            return
        last = self.checkpoints.latest()
        where = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
        raise TrainingDiverged(
            f"distillation diverged: the loss is {loss.item()} at step {step + 1} (micro-batch {micro + 1}); "
            f"{where}; lower distill.lr, raise distill.warmup_steps or use distill.precision=fp32"
        )

    def _evaluate_into_history(self, run: _Run, loss: float) -> None:
        if run.sharded:
            # Through the root unit's forward, which gathers it and orders FSDP's gathers after the optimizer
            # step; a root unit stays gathered after a forward without backward, so it is freed here.
            with torch.no_grad():
                measured = run.wrapped(lambda student, projections: self.evaluate(student))
            run.wrapped.reshard()
        else:
            measured = self.evaluate(run.student)
        record = {"step": run.step, "tokens": run.tokens, "train_loss": loss, **measured}
        run.history.append(record)
        run.run_log.evaluation(record)

    def _finish(self, run: _Run) -> TrainResult:
        model = run.student
        if run.sharded:
            # Every rank gathers; the main rank rebuilds the whole student. The other ranks return no model:
            # theirs is only shards, and the main rank alone writes the artifact.
            full = sharding.strip_prefix(sharding.full_state_on_main(run.wrapped), "student.")
            model = sharding.unsharded_copy(run.student, full) if dist.is_main() else None
            del full
        metrics = {"steps": self.cfg.steps, "tokens": run.tokens, "world_size": dist.world_size(),
                   **({"sharding": "fsdp"} if run.sharded else {}),
                   "ranks_agree": None if run.sharded else ranks_hold_the_same_weights(model),
                   "train_tokens_per_s": round(run.tokens_per_s(), 1), "train_seconds": round(run.seconds, 2),
                   "final_train_loss": run.losses[-1] if run.losses else None,
                   **(run.history[-1] if run.history else {})}
        result = TrainResult(model=model, metrics=metrics, history=run.history, losses=run.losses)
        run.release()
        return result
