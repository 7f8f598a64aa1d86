"""The distillation trainer: one accelerate loop for CPU, one GPU and DDP.

FSDP and DeepSpeed sharding are refused with a clear error: every rank holds a whole
copy of the student (and of the teacher, unless it trains from the teacher cache).

A step: each rank takes its slice of the step's blocks (a seeded permutation per
epoch, so the data position is a pure function of the step and resuming needs no
sampler state); the live teacher, or its cache, gives targets without gradients;
the student's loss runs inside one wrapped module so DDP sees an ordinary
forward; gradients accumulate, are clipped, the optimizer and the schedule step.
Every ``checkpoint_every`` steps the model, optimizer, schedule and RNG states
(accelerate's ``save_state``) plus the step and history are written under a
temporary name and renamed; a killed run resumes from the newest complete
checkpoint to the same losses. A non-finite loss stops the run with a clear error
before any checkpoint of the bad state is written.

A checkpoint records what it was made under (:meth:`DistillTrainer.made_under`: the
trajectory-relevant config, seed, process count, the student's parameter shapes, the
data and teacher cache, and the caller's provenance such as the parent model) and the
size of each of its files. Resuming reuses checkpoints only when that record matches:
stale ones are moved aside (``checkpoints.stale``) with a warning and training starts
over; a checkpoint whose files are truncated or unreadable is deleted with a warning
and the one before it is tried.
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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

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
from slimforge.errors import ConfigError, DataError, SlimforgeError
from slimforge.fsutil import atomic_write_json, partial_path, read_json, stable_hash
from slimforge.progress import progress_bar

log = logging.getLogger(__name__)

# Fault injection for the resume test: SIGKILL this process right after the given step.
KILL_ENV = "SLIMFORGE_KILL_AFTER_STEP"
STATE_FILE = "trainer_state.json"
# Config fields that change how often the run writes or logs, never the weights it reaches, so a
# checkpoint made under other values continues the same trajectory. Every other field invalidates:
# `steps` shapes the LR schedule; `eval_every`/`eval_blocks` decide what joins the history.
RESUME_NEUTRAL_FIELDS = ("checkpoint_every", "keep_checkpoints", "log_every")


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


def student_signature(model: Any) -> str:
    """A hash of the student's parameter and buffer names, shapes and dtypes (not their values)."""
    return stable_hash([(name, list(t.shape), str(t.dtype)) for name, t in model.state_dict().items()])


def setup_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What differs between two :meth:`DistillTrainer.made_under` records, for a log line."""
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

    Wrapping the whole student-side computation in one module lets DDP track
    every parameter that gets a gradient, including the lm_head used by the
    chunked loss and the hidden-state projections.
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
    """Distils ``student`` from a live ``teacher`` or a ``cache`` of its top-k distribution.

    ``provenance`` names what the student and teacher were made from (the pipeline passes the
    parent's and the teacher's fingerprints); it joins :meth:`made_under`, so checkpoints of
    another parent are never resumed.
    """

    def __init__(self, cfg: DistillConfig, student: Any, data: Any, work_dir: Path, log_dir: Path | None,
                 seed: int, device: torch.device, teacher: Any = None, cache: Any = None,
                 kept_layers: list[int] | None = None, provenance: dict[str, Any] | None = None) -> None:
        if teacher is None and cache is None:
            raise ValueError("a live teacher or a teacher cache is required")
        self.cfg = cfg
        from slimforge.quantize.bnb import keep_4bit_layers_off_cpu_packing

        # A 4-bit (QLoRA) base must never be repacked for bitsandbytes' CPU kernel by an
        # evaluation: that kernel has no backward, so later gradients would be silently wrong.
        keep_4bit_layers_off_cpu_packing(student, everywhere=True)
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
        self.made_under = _json_normal(self._made_under(provenance or {}))
        self.fingerprint = stable_hash(self.made_under)
        self._resume: Path | None = None
        self._resume_decided = False

    def _made_under(self, provenance: dict[str, Any]) -> dict[str, Any]:
        """Everything a checkpoint's trajectory depends on (see ``RESUME_NEUTRAL_FIELDS``)."""
        config = {k: v for k, v in asdict(self.cfg).items() if k not in RESUME_NEUTRAL_FIELDS}
        return {"config": config, "seed": self.seed, "world_size": dist.world_size(),
                "student": student_signature(self.student), "kept_layers": self.kept_layers,
                "data": getattr(self.data, "fingerprint", None), "train_blocks": len(self.data.train),
                "teacher_cache": self.cache.meta["key"] if self.cache is not None else None, **provenance}

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
        """The newest checkpoint folder that finished writing (not checked further)."""
        root = self.work_dir / "checkpoints"
        if not root.is_dir():
            return None
        done = sorted(p for p in root.glob("step-*") if (p / STATE_FILE).is_file())
        return done[-1] if done else None

    def resume_point(self) -> Path | None:
        """The checkpoint this run resumes from, or None to start afresh; decided once.

        The main rank decides (and moves stale or broken checkpoints out of the way), then
        every rank learns the answer, so all of them call this at the same point.
        """
        if not self._resume_decided:
            choice = self._choose_checkpoint() if dist.is_main() else None
            shared = dist.broadcast_object(str(choice) if choice is not None else None)
            self._resume = Path(shared) if shared else None
            self._resume_decided = True
        return self._resume

    def _choose_checkpoint(self) -> Path | None:
        root = self.work_dir / "checkpoints"
        found = sorted(root.glob("step-*"), reverse=True) if root.is_dir() else []
        states = {folder: _read_state(folder) for folder in found}
        stale = [s for s in states.values() if s is not None and s.get("fingerprint") != self.fingerprint]
        if stale:
            self._set_aside(root, stale[0].get("made_under") or {})
            return None
        for folder in found:
            problem = checkpoint_problem(folder, states[folder])
            if problem is None:
                return folder
            log.warning("distillation checkpoint %s cannot be loaded (%s); deleting it and trying the one before",
                        folder, problem)
            shutil.rmtree(folder, ignore_errors=True)
        if found:
            log.warning("no distillation checkpoint in %s could be loaded; training from scratch", root)
        return None

    def _set_aside(self, root: Path, made_under: dict[str, Any]) -> None:
        """Move checkpoints of another setup to ``checkpoints.stale`` (replacing older stale ones)."""
        stale = root.with_name("checkpoints.stale")
        if stale.exists():
            shutil.rmtree(stale)
        os.replace(root, stale)
        log.warning("distillation checkpoints in %s were made under a different setup (%s); moved them to %s "
                    "and training from scratch", root, "; ".join(setup_changes(made_under, self.made_under)), stale)

    def _load_checkpoint(self, acc: Any, folder: Path) -> dict[str, Any]:
        """Restore ``folder`` into the accelerator's objects; returns its trainer state.

        Every file was opened and size-checked before, so a failure here is unexpected and may have
        restored part of the state: the checkpoint is deleted and the run stops, and the next
        invocation resumes from the one before it (or from scratch).
        """
        try:
            acc.load_state(str(folder))
        except Exception as err:  # noqa: BLE001 - reported in one line; the half-restored state is unusable
            if acc.is_main_process:
                shutil.rmtree(folder, ignore_errors=True)
            raise SlimforgeError(
                f"distillation checkpoint {folder} passed its checks but failed to load "
                f"({type(err).__name__}: {str(err).splitlines()[0][:160]}); it was deleted: run the same "
                "command again to resume from the checkpoint before it"
            ) from None
        return read_json(folder / STATE_FILE)

    def _save(self, acc: Any, step: int, state: dict[str, Any]) -> None:
        final = self._checkpoint_dir(step)
        tmp = partial_path(final)
        if acc.is_main_process and tmp.exists():
            shutil.rmtree(tmp)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        acc.wait_for_everyone()
        if acc.is_main_process:
            # The record of what the checkpoint was made under, and the size of each file, so
            # resuming can tell a stale or truncated checkpoint from a good one.
            files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
            atomic_write_json(tmp / STATE_FILE, {**state, "fingerprint": self.fingerprint,
                                                 "made_under": self.made_under, "files": files})
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
        resume = self.resume_point()
        if resume is not None:
            run.restore(self._load_checkpoint(acc, resume))
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
