"""The distillation trainer: one accelerate loop for CPU, one GPU, DDP and FSDP.

A step: each rank takes its slice of the step's blocks (a seeded permutation per
epoch, so the data position is a pure function of the step and resuming needs no
sampler state); the live teacher, or its cache, gives targets without gradients;
the student's loss runs inside one wrapped module so DDP/FSDP see an ordinary
forward; gradients accumulate, are clipped, the optimizer and the schedule step.
Every ``checkpoint_every`` steps the model, optimizer, schedule and RNG states
(accelerate's ``save_state``) plus the step and history are written under a
temporary name and renamed; a killed run resumes from the newest complete
checkpoint to the same losses. A non-finite loss stops the run with a clear error
before any checkpoint of the bad state is written.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from slimforge import dist
from slimforge.arch import decoder_layers
from slimforge.distill.chunked import chunked_head_loss, softcap_transform
from slimforge.distill.config import DistillConfig
from slimforge.distill.hidden import (
    HiddenProjections,
    capture_layer_outputs,
    default_layer_map,
    hidden_state_loss,
    validate_layer_map,
)
from slimforge.distill.objective import (
    LossSpec,
    cached_chunk_loss,
    final_hidden,
    flatten_batch,
    naive_loss,
    online_chunk_loss,
)
from slimforge.errors import ConfigError, SlimforgeError
from slimforge.fsutil import atomic_write_json, partial_path, read_json

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


def sparsity_masks(model: Any, min_sparsity: float = 0.01) -> dict[str, torch.Tensor]:
    """Masks (weight != 0) of the decoder's linear weights that are meaningfully sparse."""
    masks = {}
    for layer_idx, block in enumerate(decoder_layers(model)):
        for name, module in block.named_modules():
            if isinstance(module, torch.nn.Linear):
                mask = module.weight.detach() != 0
                if 1 - mask.float().mean().item() >= min_sparsity:
                    masks[f"{layer_idx}.{name}"] = mask
    return masks


def _masked_linears(model: Any, masks: dict[str, torch.Tensor]) -> list[tuple[torch.nn.Linear, torch.Tensor]]:
    pairs = []
    for layer_idx, block in enumerate(decoder_layers(model)):
        for name, module in block.named_modules():
            key = f"{layer_idx}.{name}"
            if key in masks:
                pairs.append((module, masks[key].to(module.weight.device)))
    return pairs


def ranks_hold_the_same_weights(model: Any) -> bool:
    """Every rank's trainable weights are bit-identical (trivially true in one process)."""
    if not dist.is_distributed():
        return True
    import torch.distributed as tdist

    sums = [float(p.detach().double().sum()) for p in model.parameters() if p.requires_grad]
    gathered: list[Any] = [None] * dist.world_size()
    tdist.all_gather_object(gathered, sums)
    return all(g == gathered[0] for g in gathered)


class StudentWithLoss(torch.nn.Module):
    """The student and its training-only parts; ``forward`` returns the loss.

    Wrapping the whole student-side computation in one module lets DDP and FSDP
    track every parameter that gets a gradient, including the lm_head used by
    the chunked loss and the hidden-state projections.
    """

    def __init__(self, student: Any, projections: HiddenProjections | None) -> None:
        super().__init__()
        self.student = student
        self.projections = projections

    def forward(self, objective: Callable[..., tuple[torch.Tensor, dict[str, float]]], **batch: Any):
        return objective(self.student, self.projections, **batch)


@dataclass
class _Run:
    """The mutable state of one training run (what a checkpoint restores, plus live objects)."""

    acc: Any
    wrapped: Any
    params: list[torch.nn.Parameter]
    optimizer: Any
    scheduler: Any
    masked: list[tuple[torch.nn.Linear, torch.Tensor]]
    on_policy: Any
    tokens_per_step: int
    step: int = 0
    first_step: int = 0
    tokens: int = 0
    seconds: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    writer: Any = None

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
    """Distils ``student`` from a live ``teacher`` or a ``cache`` of its top-k distribution."""

    def __init__(self, cfg: DistillConfig, student: Any, data: Any, work_dir: Path, log_dir: Path | None,
                 seed: int, device: torch.device, teacher: Any = None, cache: Any = None,
                 kept_layers: list[int] | None = None) -> None:
        if teacher is None and cache is None:
            raise ValueError("a live teacher or a teacher cache is required")
        self.cfg = cfg
        self.student = student
        self.teacher = teacher
        self.cache = cache
        self.data = data
        self.work_dir = Path(work_dir)
        self.log_dir = log_dir
        self.seed = seed
        self.device = device
        self.spec = LossSpec(cfg.loss, cfg.temperature, cfg.beta, cfg.alpha, cfg.ce_weight)
        self.kept_layers = kept_layers
        self.train_blocks = self._plan_blocks()
        self.eval_blocks = list(range(min(cfg.eval_blocks, len(data.heldout))))

    # -- planning ---------------------------------------------------------------------

    def _plan_blocks(self) -> np.ndarray:
        per_step = self.cfg.batch_size * self.cfg.grad_accum * dist.world_size()
        return block_schedule(len(self.data.train), self.cfg.steps * per_step, self.seed)

    def blocks_for(self, micro_step: int) -> list[int]:
        """This rank's blocks for one micro-batch (a pure function of the micro-step)."""
        size = self.cfg.batch_size
        start = (micro_step * dist.world_size() + dist.rank()) * size
        return self.train_blocks[start: start + size].tolist()

    # -- setup ------------------------------------------------------------------------

    def _accelerator(self) -> Any:
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state()  # one process may train several stages
        if os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true") or \
                os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true"):
            raise ConfigError("the distillation trainer supports one process or DDP (accelerate launch --multi_gpu); "
                              "FSDP and DeepSpeed sharding are not supported yet")
        precision = self.cfg.precision
        if precision == "auto":
            from slimforge.models import cpu_supports_fast_bf16

            fast_bf16 = self.device.type == "cuda" or (self.device.type == "cpu" and cpu_supports_fast_bf16())
            precision = "bf16" if fast_bf16 else "fp32"
        return Accelerator(cpu=self.device.type == "cpu", mixed_precision="bf16" if precision == "bf16" else "no")

    def _prepare_student(self) -> None:
        cfg = self.cfg
        quantized = bool(getattr(self.student, "is_quantized", False) or getattr(self.student, "hf_quantizer", None))
        if quantized and not cfg.lora.enabled:
            raise ConfigError("the student is quantized, so it can only learn through adapters: set "
                              "lora.enabled=true (QLoRA)")
        self.masks = sparsity_masks(self.student) if cfg.keep_sparsity else {}
        if cfg.keep_sparsity and not self.masks:
            log.warning("keep_sparsity is on but the student has no sparse weights to keep")
        if cfg.lora.enabled:
            from peft import LoraConfig, get_peft_model

            lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                              target_modules=list(cfg.lora.target_modules), task_type="CAUSAL_LM")
            try:
                self.student = get_peft_model(self.student, lora)
            except ValueError as err:
                raise ConfigError(f"lora.target_modules={list(cfg.lora.target_modules)} matched no module of the "
                                  f"student ({str(err).splitlines()[0][:120]}); name its linear layers, e.g. q_proj") from None
        else:
            self.student.requires_grad_(True)
        self.student.train()
        if not any(p.requires_grad for p in self.student.parameters()):
            raise ConfigError("the student has no trainable parameters; check lora.target_modules")

    def _hidden_setup(self) -> HiddenProjections | None:
        if not self.cfg.hidden_weight:
            self.layer_map = []
            return None
        n_s, n_t = len(decoder_layers(self.student)), len(decoder_layers(self.teacher))
        self.layer_map = list(self.cfg.layer_map) if self.cfg.layer_map else default_layer_map(n_s, n_t, self.kept_layers)
        validate_layer_map(self.layer_map, n_s, n_t)
        return HiddenProjections(self.student.config.hidden_size, self.teacher.config.hidden_size, n_s)

    def _optimizer(self, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        if self.cfg.optimizer == "adamw_8bit":
            import bitsandbytes as bnb

            return bnb.optim.AdamW8bit(params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        fused = self.device.type == "cuda"
        return torch.optim.AdamW(params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay, fused=fused)

    def _scheduler(self, optimizer: torch.optim.Optimizer) -> Any:
        from transformers import get_scheduler

        name = {"constant": "constant_with_warmup"}.get(self.cfg.schedule, self.cfg.schedule)
        return get_scheduler(name, optimizer, num_warmup_steps=self.cfg.warmup_steps,
                             num_training_steps=self.cfg.steps)

    # -- the objective ----------------------------------------------------------------

    def _teacher_targets(self, split: str, blocks: list[int], ids: torch.Tensor) -> dict[str, Any]:
        """What the student is compared with on this batch, computed without gradients."""
        if self.cache is not None:
            top_ids, top_logp = self.cache.lookup(split, blocks, ids.device)
            return {"top_ids": top_ids.reshape(-1, top_ids.shape[-1]), "top_logp": top_logp.reshape(-1, top_logp.shape[-1])}
        with torch.no_grad():
            mapped = sorted(set(self.layer_map))
            capture = capture_layer_outputs(self.teacher, mapped) if mapped else nullcontext({})
            with capture as layers:
                if self.cfg.kd_backend == "naive":
                    logits = self.teacher(input_ids=ids, use_cache=False).logits[:, :-1]
                    t_logp = F.log_softmax(logits.float() / self.spec.temperature, dim=-1)
                    out = {"teacher_logp": t_logp.reshape(-1, t_logp.shape[-1])}
                else:
                    hidden = final_hidden(self.teacher, ids)
                    out = {"teacher_hidden": hidden.reshape(-1, hidden.shape[-1])}
            out["teacher_layers"] = {j: layers[j][:, :-1].reshape(-1, layers[j].shape[-1]) for j in mapped}
        return out

    def objective(self, student: Any, projections: HiddenProjections | None, input_ids: torch.Tensor,
                  loss_mask: torch.Tensor, attention_mask: torch.Tensor | None, targets_from_teacher: dict[str, Any]
                  ) -> tuple[torch.Tensor, dict[str, float]]:
        targets, mask = flatten_batch(input_ids, loss_mask, attention_mask)
        kept = mask.sum().clamp_min(1)
        spec, t = self.spec, targets_from_teacher
        capture = capture_layer_outputs(student, list(range(len(self.layer_map)))) if self.layer_map else nullcontext({})
        with capture as layers:
            if self.cfg.kd_backend == "naive":
                logits = student(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1]
                logits = logits.reshape(-1, logits.shape[-1])
                if "top_ids" in t:
                    loss = naive_loss(spec, logits, t["top_logp"], targets, mask, topk_ids=t["top_ids"])
                else:
                    loss = naive_loss(spec, logits, t["teacher_logp"], targets, mask)
            else:
                hidden = final_hidden(student, input_ids, attention_mask)
                hidden = hidden.reshape(-1, hidden.shape[-1])
                scale = 1.0 / kept.item()
                if "top_ids" in t:
                    chunk = cached_chunk_loss(spec, t["top_ids"], t["top_logp"], targets, mask, scale)
                else:
                    chunk = online_chunk_loss(spec, t["teacher_hidden"], self.teacher.get_output_embeddings(),
                                              targets, mask, scale, softcap_transform(self.teacher.config))
                head = student.get_output_embeddings()
                loss = chunked_head_loss(hidden, head, chunk, self.cfg.chunk_size, softcap_transform(student.config))
        stats = {"kd": loss.item()}
        if self.layer_map:
            terms = []
            for i, j in enumerate(self.layer_map):
                s_states = layers[i][:, :-1].reshape(-1, layers[i].shape[-1])
                terms.append(hidden_state_loss(projections(i, s_states), t["teacher_layers"][j], mask,
                                               self.cfg.hidden_loss))
            hidden_term = torch.stack(terms).mean()
            stats["hidden"] = hidden_term.item()
            loss = loss + self.cfg.hidden_weight * hidden_term
        return loss, stats

    # -- evaluation -------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, student: Any) -> dict[str, float]:
        """Held-out forward KL(teacher || student) at T = 1, student CE and top-1 agreement."""
        from slimforge.data import blocks_tensor
        from slimforge.distill.losses import divergence, topk_bucket_logprobs

        was_training = student.training
        student.eval()
        kl_sum = ce_sum = agree = count = 0.0
        for start in range(0, len(self.eval_blocks), self.cfg.batch_size):
            blocks = self.eval_blocks[start: start + self.cfg.batch_size]
            ids = blocks_tensor(self.data.heldout.select(blocks)).to(self.device)
            logits = student(input_ids=ids, use_cache=False).logits[:, :-1].float()
            logits = logits.reshape(-1, logits.shape[-1])
            targets = ids[:, 1:].reshape(-1)
            ce_sum += F.cross_entropy(logits, targets, reduction="sum").item()
            if self.cache is not None:
                top_ids, top_logp = self.cache.lookup("heldout", blocks, self.device)
                top_ids = top_ids.reshape(-1, top_ids.shape[-1])
                s_logp = topk_bucket_logprobs(logits, top_ids) if self.cache.meta["temperature"] == 1.0 else None
                t_logp = top_logp.reshape(-1, top_logp.shape[-1]).float()
                if s_logp is not None:
                    kl_sum += divergence("forward_kl", s_logp, t_logp).sum().item()
                teacher_top1 = top_ids[:, 0]
            else:
                t_logits = self.teacher(input_ids=ids, use_cache=False).logits[:, :-1].float()
                t_logits = t_logits.reshape(-1, t_logits.shape[-1])
                kl_sum += divergence("forward_kl", F.log_softmax(logits, -1), F.log_softmax(t_logits, -1)).sum().item()
                teacher_top1 = t_logits.argmax(-1)
            agree += (logits.argmax(-1) == teacher_top1).sum().item()
            count += targets.numel()
        student.train(was_training)
        out = {"eval_ce": ce_sum / count, "eval_ppl": math.exp(ce_sum / count), "eval_top1": agree / count}
        if self.cache is None or self.cache.meta["temperature"] == 1.0:
            out["eval_kl"] = kl_sum / count
        return out

    # -- checkpoints ------------------------------------------------------------------

    def _checkpoint_dir(self, step: int) -> Path:
        return self.work_dir / "checkpoints" / f"step-{step:06d}"

    def latest_checkpoint(self) -> Path | None:
        root = self.work_dir / "checkpoints"
        if not root.is_dir():
            return None
        done = sorted(p for p in root.glob("step-*") if (p / "trainer_state.json").is_file())
        return done[-1] if done else None

    def _save(self, acc: Any, step: int, state: dict[str, Any]) -> None:
        final = self._checkpoint_dir(step)
        tmp = partial_path(final)
        if acc.is_main_process and tmp.exists():
            shutil.rmtree(tmp)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        acc.wait_for_everyone()
        if acc.is_main_process:
            atomic_write_json(tmp / "trainer_state.json", state)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            for old in sorted(final.parent.glob("step-*"))[: -self.cfg.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()

    # -- the loop ---------------------------------------------------------------------

    def _batch(self, split: str, blocks: list[int], ids_device: torch.device) -> dict[str, Any]:
        from slimforge.data import blocks_tensor

        source = self.data.train if split == "train" else self.data.heldout
        rows = source.select(blocks)
        ids = blocks_tensor(rows).to(ids_device)
        loss_mask = blocks_tensor(rows, column="loss_mask").to(ids_device)
        return {"input_ids": ids, "loss_mask": loss_mask, "attention_mask": None}

    def train(self) -> TrainResult:
        """Run (or resume) the loop to ``cfg.steps``; returns the unwrapped student and its metrics."""
        cfg = self.cfg
        run = self._setup()
        bar = tqdm(total=cfg.steps, initial=run.step, desc="distill", unit="step",
                   disable=not run.acc.is_main_process)
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
                self._log_step(run, loss, stats)
                if run.step % cfg.eval_every == 0 or run.step == cfg.steps:
                    self._evaluate_into_history(run, loss)
                if run.step % cfg.checkpoint_every == 0 and run.step < cfg.steps:
                    self._save(run.acc, run.step, run.state())
                if kill_after and run.step == kill_after:
                    os.kill(os.getpid(), signal.SIGKILL)
        finally:
            bar.close()
            if run.writer is not None:
                run.writer.close()
        return self._finish(run)

    def _setup(self) -> _Run:
        acc = self._accelerator()
        self._prepare_student()
        projections = self._hidden_setup()
        if self.teacher is not None:
            self.teacher.eval().requires_grad_(False)
        wrapped = StudentWithLoss(self.student, projections)
        params = [p for p in wrapped.parameters() if p.requires_grad]
        optimizer = self._optimizer(params)
        scheduler = self._scheduler(optimizer)
        wrapped, optimizer = acc.prepare(wrapped, optimizer)
        acc.register_for_checkpointing(scheduler)
        from slimforge.distill.gkd import OnPolicy

        run = _Run(acc=acc, wrapped=wrapped, params=params, optimizer=optimizer, scheduler=scheduler,
                   masked=_masked_linears(self.student, self.masks),
                   on_policy=OnPolicy(self.cfg.on_policy, self.seed) if self.cfg.on_policy.fraction > 0 else None,
                   tokens_per_step=self.cfg.batch_size * self.cfg.grad_accum * dist.world_size()
                   * len(self.data.train[0]["input_ids"]))
        resume = self.latest_checkpoint()
        if resume is not None:
            acc.load_state(str(resume))
            run.restore(read_json(resume / "trainer_state.json"))
            log.info("resuming distillation from %s (step %d of %d)", resume, run.step, self.cfg.steps)
        run.first_step = run.step
        run.writer = self._tensorboard(acc)
        return run

    def _train_step(self, run: _Run) -> tuple[float, dict[str, float]]:
        """One optimizer step over ``grad_accum`` micro-batches; returns the mean loss and stats."""
        cfg, acc = self.cfg, run.acc
        step_loss, step_stats = 0.0, {}
        for micro in range(cfg.grad_accum):
            micro_step = run.step * cfg.grad_accum + micro
            blocks = self.blocks_for(micro_step)
            batch = self._batch("train", blocks, acc.device)
            if run.on_policy is not None and run.on_policy.use_for(micro_step):
                batch = run.on_policy.rollout(self, acc.unwrap_model(run.wrapped).student, batch)
            # On-policy batches exist only with a live teacher, which scores the ids it is given.
            teacher_side = self._teacher_targets("train", blocks, batch["input_ids"])
            sync = micro == cfg.grad_accum - 1
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
        if cfg.max_grad_norm is not None:
            acc.clip_grad_norm_(run.params, cfg.max_grad_norm)
        run.optimizer.step()
        run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for module, mask in run.masked:  # masked training: pruned weights stay exactly zero
                module.weight.mul_(mask)
        return step_loss, step_stats

    def _stop_if_diverged(self, loss: torch.Tensor, step: int, micro: int) -> None:
        if dist.all_true(bool(torch.isfinite(loss.detach()).all())):
            return
        last = self.latest_checkpoint()
        where = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
        raise TrainingDiverged(
            f"distillation diverged: the loss is {loss.item()} at step {step + 1} (micro-batch {micro + 1}); "
            f"{where}; lower distill.lr, raise distill.warmup_steps or use distill.precision=fp32"
        )

    def _log_step(self, run: _Run, loss: float, stats: dict[str, float]) -> None:
        if run.writer is None or run.step % self.cfg.log_every:
            return
        run.writer.add_scalar("train/loss", loss, run.step)
        run.writer.add_scalar("train/lr", run.scheduler.get_last_lr()[0], run.step)
        run.writer.add_scalar("train/tokens_per_s", run.tokens_per_s(), run.step)
        for key, value in stats.items():
            run.writer.add_scalar(f"train/{key}", value, run.step)

    def _evaluate_into_history(self, run: _Run, loss: float) -> None:
        record = {"step": run.step, "tokens": run.tokens, "train_loss": loss,
                  **self.evaluate(run.acc.unwrap_model(run.wrapped).student)}
        run.history.append(record)
        if run.writer is not None:
            for key, value in record.items():
                if key.startswith("eval_"):
                    run.writer.add_scalar(f"eval/{key[5:]}", value, run.step)
        log.info("step %d: %s", run.step, json.dumps({k: round(v, 4) if isinstance(v, float) else v
                                                      for k, v in record.items()}))

    def _finish(self, run: _Run) -> TrainResult:
        model = run.acc.unwrap_model(run.wrapped).student
        metrics = {"steps": self.cfg.steps, "tokens": run.tokens, "world_size": dist.world_size(),
                   "ranks_agree": ranks_hold_the_same_weights(model),
                   "train_tokens_per_s": round(run.tokens_per_s(), 1), "train_seconds": round(run.seconds, 2),
                   "final_train_loss": run.losses[-1] if run.losses else None,
                   **(run.history[-1] if run.history else {})}
        result = TrainResult(model=model, metrics=metrics, history=run.history, losses=run.losses)
        run.release()
        return result

    def _tensorboard(self, acc: Any) -> Any:
        if self.log_dir is None or not acc.is_main_process:
            return None
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(log_dir=str(self.log_dir))
