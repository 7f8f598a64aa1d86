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
    """A chunk loss against the live teacher: its logits are formed per chunk, without grad.

    A loss in :data:`FUSED_ONLINE` (forward KL, the default, and reverse KL) forms the
    gradient in closed form; the other losses run through autograd.
    """

    def teacher_logp(rows: slice) -> torch.Tensor:
        with torch.no_grad():
            t_logits = upcast(F.linear(teacher_hidden[rows], teacher_head.weight, teacher_head.bias))
            if teacher_transform is not None:
                t_logits = teacher_transform(t_logits)
            if spec.temperature != 1.0:
                t_logits.div_(spec.temperature)  # in place: the linear's output is this chunk's own buffer
            return t_logits.sub_(torch.logsumexp(t_logits, dim=-1, keepdim=True))

    fused = FUSED_ONLINE.get(spec.loss)
    if fused is not None:
        return fused(spec, teacher_logp, targets, mask, scale)

    def chunk(logits: torch.Tensor, rows: slice) -> torch.Tensor:
        t_logp = teacher_logp(rows)
        s_logp = F.log_softmax(logits / spec.temperature, dim=-1)
        return _mixed_rows(spec, logits, s_logp, t_logp, targets[rows], mask[rows]) * scale

    return chunk


class FusedOnlineLoss:
    """A live-teacher chunk loss whose subclasses form d loss / d logits in closed form.

    Calling it is the autograd form of the same loss (used when a logit transform must be
    differentiated through); :meth:`value_and_grad` is the closed form.
    """

    def __init__(self, spec: LossSpec, teacher_logp: Callable[[slice], torch.Tensor],
                 targets: torch.Tensor, mask: torch.Tensor, scale: float) -> None:
        self.spec, self.teacher_logp = spec, teacher_logp
        self.targets, self.mask, self.scale = targets, mask, scale

    def __call__(self, logits: torch.Tensor, rows: slice) -> torch.Tensor:
        t_logp = self.teacher_logp(rows)
        s_logp = F.log_softmax(logits / self.spec.temperature, dim=-1)
        return _mixed_rows(self.spec, logits, s_logp, t_logp, self.targets[rows], self.mask[rows]) * self.scale


def _to_log_q(z: torch.Tensor, spec: LossSpec, targets: torch.Tensor, weight: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """The shared start of every closed-form chunk loss: CE on the raw logits, then ``z`` -> log q.

    Args:
        z: fp32 logits [n, V], overwritten with log softmax(z / T).
        targets: next-token ids [n]; weight: per-row weights [n] (mask times scale).

    Returns:
        (weighted CE sum, or 0 when ``ce_weight`` is 0; softmax(z) - onehot when CE is mixed
        in at T != 1, else None, since at T = 1 it equals q - onehot; target ids [n, 1]).
    """
    ids = targets.unsqueeze(-1)
    ce_value = z.new_zeros(())
    ce_grad = None
    if spec.ce_weight:
        lse = torch.logsumexp(z, dim=-1, keepdim=True)
        ce_value = ((lse - z.gather(-1, ids)).squeeze(-1) * weight).sum()
        if spec.temperature != 1.0:  # softmax(z) differs from q and needs its own buffer
            ce_grad = (z - lse).exp_()
            ce_grad.scatter_add_(-1, ids, -torch.ones_like(ids, dtype=z.dtype))
    if spec.temperature != 1.0:
        z.div_(spec.temperature)
    z.sub_(torch.logsumexp(z, dim=-1, keepdim=True))
    return ce_value, ce_grad, ids


class FusedReverseKL(FusedOnlineLoss):
    """Reverse KL (+ CE) on one chunk, gradient in closed form: two or three [rows x vocab] buffers.

    With q = softmax(z / T), p the teacher's distribution and d = log q - log p,
    d[T^2 KL(q || p)]/dz = T q (d - KL). Parity with the autograd reference is tested.
    """

    @torch.no_grad()
    def value_and_grad(self, z: torch.Tensor, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed loss, d loss / d z) for fp32 logits ``z`` [n, V], which it overwrites."""
        temp, ce_w = self.spec.temperature, self.spec.ce_weight
        weight = (self.mask[rows] * self.scale).to(z.dtype)
        ce_value, ce_grad, targets = _to_log_q(z, self.spec, self.targets[rows], weight)
        total = ce_w * ce_value
        d = self.teacher_logp(rows).to(z.dtype).neg_().add_(z)  # log q - log p
        q = z.exp_()
        kl = torch.bmm(q.unsqueeze(1), d.unsqueeze(2)).reshape(-1)  # sum_j q_j d_j, no [n, V] temporary
        total += (1 - ce_w) * temp**2 * (kl * weight).sum()
        grad = d.sub_(kl.unsqueeze(-1)).mul_(q).mul_((1 - ce_w) * temp)
        if ce_w:
            if ce_grad is None:  # T == 1: softmax(z) = q
                grad.add_(q, alpha=ce_w)
                grad.scatter_add_(-1, targets, torch.full_like(targets, -ce_w, dtype=z.dtype))
            else:
                grad.add_(ce_grad, alpha=ce_w)
        del q, ce_grad
        grad.mul_(weight.unsqueeze(-1))
        return total, grad


class FusedForwardKL(FusedOnlineLoss):
    """Forward KL (+ CE) on one chunk with its gradient in closed form, no autograd graph.

    With q = softmax(z / T) and p the teacher's distribution at T,
    d[T^2 KL(p || q)]/dz = T (q - p) and d CE/dz = softmax(z) - onehot(target). Working
    in place on the chunk's logits, the teacher's log-probabilities and p, a chunk
    holds three [rows x vocab] fp32 buffers (four when CE is mixed in with T != 1),
    where autograd through log-softmax and the KL keeps about eight.
    ``tests/test_distill_losses.py`` checks values and gradients against the plain reference.
    """

    @torch.no_grad()
    def value_and_grad(self, z: torch.Tensor, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed loss, d loss / d z) for fp32 logits ``z`` [n, V], which it overwrites."""
        temp, ce_w = self.spec.temperature, self.spec.ce_weight
        weight = (self.mask[rows] * self.scale).to(z.dtype)
        t_logp = self.teacher_logp(rows).to(z.dtype)
        ce_value, ce_grad, targets = _to_log_q(z, self.spec, self.targets[rows], weight)  # z is now log q
        total = ce_w * ce_value
        p = t_logp.exp()
        # KL rows = sum p (log p - log q); where p underflows to 0 the term is 0, also
        # when log p is -inf (a masked-out logit), hence the clamp before the product.
        diff = t_logp.clamp_min_(torch.finfo(z.dtype).min).sub_(z)
        kl = diff.mul_(p).sum(-1)
        del diff, t_logp
        total += (1 - ce_w) * temp**2 * (kl * weight).sum()
        q = z.exp_()
        if temp == 1.0:
            # (1 - c)(q - p) + c (q - onehot) = q - (1 - c) p - c onehot: no extra buffer
            grad = q.sub_(p, alpha=1 - ce_w)
            if ce_w:
                grad.scatter_add_(-1, targets, torch.full_like(targets, -ce_w, dtype=z.dtype))
        else:
            grad = q.sub_(p).mul_((1 - ce_w) * temp)
            if ce_grad is not None:
                grad.add_(ce_grad, alpha=ce_w)
        del p, ce_grad
        grad.mul_(weight.unsqueeze(-1))
        return total, grad


def cached_chunk_loss(spec: LossSpec, topk_ids: torch.Tensor, topk_logp: torch.Tensor,
                      targets: torch.Tensor, mask: torch.Tensor, scale: float) -> ChunkLoss:
    """A chunk loss against cached teacher buckets ``topk_logp`` [N, k + 1] at ids ``topk_ids`` [N, k].

    A loss in :data:`FUSED_CACHED` (forward KL) forms its gradient in closed form; other losses use autograd.
    """
    fused = FUSED_CACHED.get(spec.loss)
    if fused is not None:
        return fused(spec, topk_ids, topk_logp, targets, mask, scale)

    def chunk(logits: torch.Tensor, rows: slice) -> torch.Tensor:
        s_logp = topk_bucket_logprobs(logits, topk_ids[rows], spec.temperature)
        return _mixed_rows(spec, logits, s_logp, upcast(topk_logp[rows]), targets[rows], mask[rows]) * scale

    return chunk


class FusedCachedForwardKL:
    """Forward KL over cached top-k buckets (+ CE), gradient in closed form, one [rows x vocab] buffer.

    The student's distribution q = softmax(z / T) is folded onto the teacher's k
    kept ids and the tail. With p the teacher's bucket probabilities, P_j = p_j for a
    kept id and p_tail * q_j / Q_tail for any other (its share of the tail bucket),
    d[T^2 KL(p || q)]/dz_j = T (q_j * sum(p) - P_j). The logits buffer becomes q,
    then the gradient, in place. Parity with the autograd reference is tested.
    """

    def __init__(self, spec: LossSpec, topk_ids: torch.Tensor, topk_logp: torch.Tensor,
                 targets: torch.Tensor, mask: torch.Tensor, scale: float) -> None:
        self.spec, self.topk_ids, self.topk_logp = spec, topk_ids, topk_logp
        self.targets, self.mask, self.scale = targets, mask, scale

    def __call__(self, logits: torch.Tensor, rows: slice) -> torch.Tensor:
        """The autograd form (used when a logit transform must be differentiated through)."""
        s_logp = topk_bucket_logprobs(logits, self.topk_ids[rows], self.spec.temperature)
        return _mixed_rows(self.spec, logits, s_logp, upcast(self.topk_logp[rows]),
                           self.targets[rows], self.mask[rows]) * self.scale

    @torch.no_grad()
    def value_and_grad(self, z: torch.Tensor, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed loss, d loss / d z) for fp32 logits ``z`` [n, V], which it overwrites."""
        temp, ce_w = self.spec.temperature, self.spec.ce_weight
        weight = (self.mask[rows] * self.scale).to(z.dtype)
        ids = self.topk_ids[rows].long()
        t_logp = self.topk_logp[rows].to(z.dtype)
        p = t_logp.exp()
        p_kept, p_tail = p[:, :-1], p[:, -1:]
        ce_value, ce_grad, targets = _to_log_q(z, self.spec, self.targets[rows], weight)  # z is now log q
        total = ce_w * ce_value
        logq_kept = z.gather(-1, ids)
        q = z.exp_()
        q_kept = logq_kept.exp()
        q_tail = q.scatter_(-1, ids, 0.0).sum(-1, keepdim=True)  # q now holds the tail ids' mass only
        logq = torch.cat([logq_kept, q_tail.clamp_min(torch.finfo(z.dtype).tiny).log()], dim=-1)
        log_ratio = torch.where(p > 0, t_logp - logq, torch.zeros_like(p))
        total += (1 - ce_w) * temp**2 * ((p * log_ratio).sum(-1) * weight).sum()
        p_sum = p.sum(-1, keepdim=True)
        share = torch.where(q_tail > 0, p_tail / q_tail, torch.zeros_like(q_tail))
        # tail ids: T (q_j p_sum - p_tail q_j / Q_tail); kept ids: T (q_j p_sum - p_j)
        kd_w = (1 - ce_w) * temp
        same_softmax = ce_w and temp == 1.0  # CE's softmax(z) is q: fold c q_j in directly
        tail_factor = (p_sum - share) * kd_w + (ce_w if same_softmax else 0.0)
        kept = (q_kept * p_sum - p_kept) * kd_w + (q_kept * ce_w if same_softmax else 0.0)
        grad = q.mul_(tail_factor)
        grad.scatter_(-1, ids, kept)
        if same_softmax:
            grad.scatter_add_(-1, targets, torch.full_like(targets, -ce_w, dtype=z.dtype))
        elif ce_grad is not None:
            grad.add_(ce_grad, alpha=ce_w)
        del ce_grad
        grad.mul_(weight.unsqueeze(-1))
        return total, grad


# The divergences (names of :data:`slimforge.distill.losses.DIVERGENCES`) with a closed-form
# chunk gradient, per teacher source; any other divergence runs the same chunks through autograd.
FUSED_ONLINE: dict[str, type[FusedOnlineLoss]] = {"forward_kl": FusedForwardKL, "reverse_kl": FusedReverseKL}
FUSED_CACHED: dict[str, type[FusedCachedForwardKL]] = {"forward_kl": FusedCachedForwardKL}


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


def ce_chunk_loss(targets: torch.Tensor, mask: torch.Tensor, scale: float) -> ChunkLoss:
    """Next-token cross-entropy alone, on one chunk: the objective at ``ce_weight`` 1, with no teacher term.

    Sequence-level KD (Kim & Rush 2016) is this loss on text the teacher generated: the teacher's
    knowledge arrives through the data, so it is not run while training.
    """

    def chunk(logits: torch.Tensor, rows: slice) -> torch.Tensor:
        ce = F.cross_entropy(upcast(logits), targets[rows], reduction="none")
        return (ce * mask[rows]).sum() * scale

    return chunk


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
