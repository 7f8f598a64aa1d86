"""The distillation objective on one batch: student hidden states against a teacher.

Two teacher sources feed the same losses:

- **online**: the teacher's final hidden states and lm_head, projected chunk by chunk;
- **cached**: the teacher's top-k log-probabilities and ids, plus the log of the
  mass beyond the top-k (see :mod:`slimforge.distill.teacher_cache`). The student's
  distribution is folded onto the same k + 1 buckets (its k probabilities at the
  cached ids and its remaining mass), so every divergence compares two proper
  distributions over the same categories. With k equal to the vocabulary size
  this is exactly the online loss.

Both run either chunked (:func:`chunked_head_loss`, the default) or naively on
full logits (the reference, kept for parity tests and the benchmark baseline).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from slimforge.distill.chunked import ChunkLoss
from slimforge.distill.losses import divergence, topk_bucket_logprobs, upcast


@dataclass(frozen=True)
class LossSpec:
    """Which loss, at which temperature, mixed with how much cross-entropy."""

    loss: str = "forward_kl"
    temperature: float = 1.0
    beta: float = 0.5
    alpha: float = 0.1
    ce_weight: float = 0.0


def _mixed_rows(spec: LossSpec, s_logits: torch.Tensor, s_logp: torch.Tensor, t_logp: torch.Tensor,
                targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Summed (1 - ce_weight) * T^2 * divergence + ce_weight * CE over kept rows."""
    kd = divergence(spec.loss, s_logp, t_logp, beta=spec.beta, alpha=spec.alpha) * spec.temperature**2
    total = (1 - spec.ce_weight) * (kd * mask).sum()
    if spec.ce_weight:
        ce = F.cross_entropy(s_logits, targets, reduction="none")
        total = total + spec.ce_weight * (ce * mask).sum()
    return total


def online_chunk_loss(spec: LossSpec, teacher_hidden: torch.Tensor, teacher_head: torch.nn.Linear,
                      targets: torch.Tensor, mask: torch.Tensor, scale: float,
                      teacher_transform: Callable | None = None) -> ChunkLoss:
    """A chunk loss against the live teacher: its logits are formed per chunk, without grad."""

    def chunk(logits: torch.Tensor, rows: slice) -> torch.Tensor:
        with torch.no_grad():
            t_logits = upcast(F.linear(teacher_hidden[rows], teacher_head.weight, teacher_head.bias))
            if teacher_transform is not None:
                t_logits = teacher_transform(t_logits)
            t_logp = F.log_softmax(t_logits / spec.temperature, dim=-1)
        s_logp = F.log_softmax(logits / spec.temperature, dim=-1)
        return _mixed_rows(spec, logits, s_logp, t_logp, targets[rows], mask[rows]) * scale

    return chunk


def cached_chunk_loss(spec: LossSpec, topk_ids: torch.Tensor, topk_logp: torch.Tensor,
                      targets: torch.Tensor, mask: torch.Tensor, scale: float) -> ChunkLoss:
    """A chunk loss against cached teacher buckets ``topk_logp`` [N, k + 1] at ids ``topk_ids`` [N, k]."""

    def chunk(logits: torch.Tensor, rows: slice) -> torch.Tensor:
        s_logp = topk_bucket_logprobs(logits, topk_ids[rows], spec.temperature)
        return _mixed_rows(spec, logits, s_logp, upcast(topk_logp[rows]), targets[rows], mask[rows]) * scale

    return chunk


def teacher_buckets(teacher_logits: torch.Tensor, k: int, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's top-k ids and its k + 1 bucket log-probabilities (k kept ids, then the tail)."""
    t_logp = F.log_softmax(upcast(teacher_logits) / temperature, dim=-1)
    top_logp, top_ids = t_logp.topk(k, dim=-1)
    rest = t_logp.scatter(-1, top_ids, float("-inf"))
    tail = torch.logsumexp(rest, dim=-1, keepdim=True)
    return top_ids, torch.cat([top_logp, tail], dim=-1)


def naive_loss(spec: LossSpec, student_logits: torch.Tensor, teacher_logp: torch.Tensor,
               targets: torch.Tensor, mask: torch.Tensor, topk_ids: torch.Tensor | None = None) -> torch.Tensor:
    """The reference: full-vocabulary fp32 log-softmax of the student, mean over kept tokens.

    ``teacher_logp`` is full-vocabulary log-probabilities at the temperature, or
    cached buckets when ``topk_ids`` is given.
    """
    logits = upcast(student_logits)
    if topk_ids is None:
        s_logp = F.log_softmax(logits / spec.temperature, dim=-1)
    else:
        s_logp = topk_bucket_logprobs(logits, topk_ids, spec.temperature)
    return _mixed_rows(spec, logits, s_logp, upcast(teacher_logp), targets, mask) / mask.sum().clamp_min(1)


def flatten_batch(input_ids: torch.Tensor, loss_mask: torch.Tensor | None,
                  attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token targets and the per-position weight, both flattened over [B, L - 1].

    Position i predicts token i + 1, so it counts when token i + 1 is a training
    target (its loss mask is 1) and is not padding.
    """
    targets = input_ids[:, 1:].reshape(-1)
    keep = torch.ones_like(input_ids[:, 1:], dtype=torch.float32)
    if loss_mask is not None:
        keep = keep * loss_mask[:, 1:].float()
    if attention_mask is not None:
        keep = keep * attention_mask[:, 1:].float()
    return targets, keep.reshape(-1)


def backbone(model: Any) -> Any:
    """The decoder stack without the lm_head (works through peft wrappers)."""
    return model.get_decoder()


def final_hidden(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Last hidden states [B, L - 1, D] for positions that predict a next token."""
    out = backbone(model)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out.last_hidden_state[:, :-1]
