"""The distillation objective wired from a stage config: what trains, against what, with which loss.

:func:`prepare_student` makes the student trainable (LoRA adapters through peft, or every
weight; the sparsity masks that keep pruned weights at zero). :class:`KDObjective` turns the
config into the loss of one batch: the divergence and temperature (:class:`LossSpec`), the
teacher source (the live teacher's final hidden states, or its logits for the naive
backend, or its top-k cache), the chunked or naive path, and the hidden-state term.
:class:`StudentWithLoss` holds the student-side computation in one module, so DDP sees an
ordinary forward. The loss math itself lives in :mod:`slimforge.distill.objective`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F

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
from slimforge.distill.losses import next_token_ce
from slimforge.distill.objective import (
    LossSpec,
    cached_chunk_loss,
    ce_chunk_loss,
    final_hidden,
    flatten_batch,
    naive_loss,
    online_chunk_loss,
)
from slimforge.errors import ConfigError

log = logging.getLogger(__name__)


class FusedWeight:
    """A mixture-of-experts block's fused 3-D expert parameter (``mlp.experts.gate_up_proj``) presented as a
    module with a ``weight``, which is all masked training touches; looked up live, so a sharded
    parameter is seen too."""

    def __init__(self, owner: torch.nn.Module, name: str) -> None:
        self.owner, self.name = owner, name

    @property
    def weight(self) -> torch.Tensor:
        return getattr(self.owner, self.name)


def _maskable(block: torch.nn.Module) -> dict[str, Any]:
    """The block's linears and fused 3-D expert weights (an MoE block's), by name inside the block."""
    found: dict[str, Any] = {name: m for name, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
    for name, param in block.named_parameters():
        if param.dim() == 3 and ".experts." in f".{name}":
            owner, _, attr = name.rpartition(".")
            found[name] = FusedWeight(block.get_submodule(owner), attr)
    return found


def sparsity_masks(model: Any, min_sparsity: float = 0.01) -> dict[str, torch.Tensor]:
    """Masks (weight != 0) of the decoder's linear weights (and fused expert weights) that are meaningfully sparse."""
    masks = {}
    for layer_idx, block in enumerate(decoder_layers(model)):
        for name, module in _maskable(block).items():
            mask = module.weight.detach() != 0
            if 1 - mask.float().mean().item() >= min_sparsity:
                masks[f"{layer_idx}.{name}"] = mask
    return masks


def masked_linears(model: Any, masks: dict[str, torch.Tensor]) -> list[tuple[Any, torch.Tensor]]:
    """The linear layers (and :class:`FusedWeight` s) of ``model`` that :func:`sparsity_masks` kept masks for,
    each with its mask."""
    pairs = []
    for layer_idx, block in enumerate(decoder_layers(model)):
        for name, module in _maskable(block).items():
            key = f"{layer_idx}.{name}"
            if key in masks:
                pairs.append((module, masks[key].to(module.weight.device)))
    return pairs


def prepare_student(cfg: DistillConfig, student: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """The student ready to train (peft-wrapped with LoRA on), and the masks of its sparse weights.

    The masks are taken before LoRA wraps the model, from the weights as they came.
    """
    quantized = bool(getattr(student, "is_quantized", False) or getattr(student, "hf_quantizer", None))
    if quantized and not cfg.lora.enabled:
        raise ConfigError("the student is quantized, so it can only learn through adapters: set "
                          "lora.enabled=true (QLoRA)")
    masks = sparsity_masks(student) if cfg.keep_sparsity else {}
    if cfg.keep_sparsity and not masks:
        log.warning("keep_sparsity is on but the student has no sparse weights to keep")
    if cfg.lora.enabled:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                          target_modules=list(cfg.lora.target_modules), task_type="CAUSAL_LM")
        try:
            student = get_peft_model(student, lora)
        except ValueError as err:
            raise ConfigError(f"lora.target_modules={list(cfg.lora.target_modules)} matched no module of the "
                              f"student ({str(err).splitlines()[0][:120]}); name its linear layers, e.g. q_proj") from None
    else:
        cfg.set_trainable(student)  # every weight, or what the method's schema says trains
    student.train()
    if not any(p.requires_grad for p in student.parameters()):
        raise ConfigError("the student has no trainable parameters; check lora.target_modules")
    return student, masks


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


class KDObjective:
    """The loss of one batch, as ``cfg`` asks for it, against a live ``teacher`` or its ``cache``.

    Calling it with the student (and its hidden-state projections) and a batch returns the
    loss and its parts for logging. A plain class, not a dataclass: DDP rebuilds dataclass
    arguments of ``forward`` field by field.
    """

    def __init__(self, cfg: DistillConfig, teacher: Any = None, cache: Any = None) -> None:
        self.cfg = cfg
        self.teacher = teacher
        self.cache = cache
        self.spec = LossSpec(cfg.loss, cfg.temperature, cfg.beta, cfg.alpha, cfg.ce_weight)
        self.layer_map: list[int] = []  # the teacher layer for each student layer; empty: no hidden term

    def hidden_projections(self, student: Any, kept_layers: list[int] | None) -> HiddenProjections | None:
        """Set up the hidden-state term (its layer map) and return its learned width projections, if any."""
        if not self.cfg.hidden_weight:
            self.layer_map = []
            return None
        n_s, n_t = len(decoder_layers(student)), len(decoder_layers(self.teacher))
        self.layer_map = list(self.cfg.layer_map) if self.cfg.layer_map else default_layer_map(n_s, n_t, kept_layers)
        validate_layer_map(self.layer_map, n_s, n_t)
        return HiddenProjections(student.config.hidden_size, self.teacher.config.hidden_size, n_s)

    def teacher_per_step(self) -> bool:
        """Whether a training step needs the teacher: not at ``ce_weight`` 1 without a hidden-state term
        (sequence-level KD: the teacher's text is the target)."""
        return self.spec.ce_weight < 1 or bool(self.layer_map)

    def teacher_targets(self, split: str, blocks: list[int], ids: torch.Tensor) -> dict[str, Any]:
        """What the student is compared with on this batch, computed without gradients."""
        if not self.teacher_per_step():
            return {}
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

    def __call__(self, student: Any, projections: HiddenProjections | None, input_ids: torch.Tensor,
                 loss_mask: torch.Tensor, attention_mask: torch.Tensor | None, targets_from_teacher: dict[str, Any]
                 ) -> tuple[torch.Tensor, dict[str, float]]:
        from slimforge import moe

        targets, mask = flatten_batch(input_ids, loss_mask, attention_mask)
        t = targets_from_teacher
        capture = capture_layer_outputs(student, list(range(len(self.layer_map)))) if self.layer_map else nullcontext({})
        # An MoE student keeps its router's load-balancing term, as its own training loss would have it.
        aux_coef = moe.router_aux_coef(student.config)
        routers = moe.capture_router_logits(student) if aux_coef else nullcontext(None)
        with capture as layers, routers as router_logits:
            if self.cfg.kd_backend == "naive":
                loss = self._naive_kd(student, input_ids, attention_mask, targets, mask, t)
            else:
                loss = self._chunked_kd(student, input_ids, attention_mask, targets, mask, t)
        stats = {"kd": loss.item()}
        if self.layer_map:
            hidden_term = self._hidden_term(layers, projections, mask, t["teacher_layers"])
            stats["hidden"] = hidden_term.item()
            loss = loss + self.cfg.hidden_weight * hidden_term
        if router_logits is not None and router_logits.logits:
            aux = moe.load_balancing_loss(student, router_logits.logits, attention_mask)
            stats["router_aux"] = aux.item()
            loss = loss + aux_coef * aux
        return loss, stats

    def _naive_kd(self, student: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                  targets: torch.Tensor, mask: torch.Tensor, t: dict[str, Any]) -> torch.Tensor:
        logits = student(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1]
        logits = logits.reshape(-1, logits.shape[-1])
        if not t:  # cross-entropy alone
            return next_token_ce(logits, targets, mask)
        if "top_ids" in t:
            return naive_loss(self.spec, logits, t["top_logp"], targets, mask, topk_ids=t["top_ids"])
        return naive_loss(self.spec, logits, t["teacher_logp"], targets, mask)

    def _chunked_kd(self, student: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                    targets: torch.Tensor, mask: torch.Tensor, t: dict[str, Any]) -> torch.Tensor:
        hidden = final_hidden(student, input_ids, attention_mask)
        hidden = hidden.reshape(-1, hidden.shape[-1])
        scale = 1.0 / mask.sum().clamp_min(1).item()
        if not t:  # cross-entropy alone
            chunk = ce_chunk_loss(targets, mask, scale)
        elif "top_ids" in t:
            chunk = cached_chunk_loss(self.spec, t["top_ids"], t["top_logp"], targets, mask, scale)
        else:
            chunk = online_chunk_loss(self.spec, t["teacher_hidden"], self.teacher.get_output_embeddings(),
                                      targets, mask, scale, softcap_transform(self.teacher.config))
        head = student.get_output_embeddings()
        return chunked_head_loss(hidden, head, chunk, self.cfg.chunk_size, softcap_transform(student.config))

    def _hidden_term(self, layers: dict[int, torch.Tensor], projections: HiddenProjections | None,
                     mask: torch.Tensor, teacher_layers: dict[int, torch.Tensor]) -> torch.Tensor:
        """The mean hidden-state loss over mapped layers (student layer i against teacher layer ``layer_map[i]``)."""
        terms = []
        for i, j in enumerate(self.layer_map):
            s_states = layers[i][:, :-1].reshape(-1, layers[i].shape[-1])
            terms.append(hidden_state_loss(projections(i, s_states), teacher_layers[j], mask, self.cfg.hidden_loss))
        return torch.stack(terms).mean()
