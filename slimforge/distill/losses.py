"""Distillation losses as pure functions.

Every divergence takes student and teacher **log-probabilities** over the same
categories (the full vocabulary, or a teacher cache's top-k plus one "tail"
bucket) and returns one value per token. :func:`kd_loss` adds temperature (with
the T^2 correction of Hinton et al., which keeps gradient magnitudes independent
of T), masking of padding and prompt tokens, and the mean over kept tokens.

Divergences (P = teacher, Q = student, at temperature T):

- ``forward_kl``: KL(P || Q), mode-covering; the classic KD loss.
- ``reverse_kl``: KL(Q || P), mode-seeking (MiniLLM).
- ``jsd``: generalized Jensen-Shannon with weight ``beta`` (GKD, Agarwal et al. 2024):
  beta * KL(P || M) + (1 - beta) * KL(Q || M), M = beta * P + (1 - beta) * Q;
  ``beta = 0.5`` is the symmetric JSD. ``beta`` must lie strictly inside (0, 1):
  at the ends the loss vanishes (use ``forward_kl`` / ``reverse_kl`` instead).
- ``tvd``: total variation distance, 0.5 * sum |P - Q|.
- ``skew_forward_kl``: KL(P || alpha * P + (1 - alpha) * Q) (DistiLLM, Ko et al. 2024);
  ``alpha = 0`` is forward KL.
- ``skew_reverse_kl``: KL(Q || alpha * Q + (1 - alpha) * P); ``alpha = 0`` is reverse KL.
- ``jeffreys``: KL(P || Q) + KL(Q || P), the symmetric KL (Jeffreys divergence): the
  mode-covering and mode-seeking terms with equal weight, and no parameter to tune.
- ``adaptive_kl``: AKL (Wu et al., 2025, "Rethinking Kullback-Leibler Divergence in Knowledge
  Distillation for Large Language Models"): forward and reverse KL weighted per token by where
  the student is wrong. The teacher's *head* is its most likely tokens up to half its mass, the
  rest its *tail*; with ``g_head`` and ``g_tail`` the student's L1 gap to the teacher on each,
  AKL = g_head / (g_head + g_tail) * KL(P || Q) + g_tail / (g_head + g_tail) * KL(Q || P).
  Forward KL (which fixes the head first) leads where the head is off, reverse KL where the
  tail is. The weights are constants for the gradient, as in the authors' method. Over a
  teacher cache's top-k buckets the tail bucket counts as one category.

The names recipes may use, and the parameter each takes, are listed once, in
:data:`slimforge.distill.loss_names.KD_LOSSES`; a divergence here is found by its name.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from slimforge.distill.loss_names import KD_LOSSES

Divergence = Callable[..., torch.Tensor]


def upcast(x: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 -> fp32 for softmax-type math; fp32 and fp64 stay as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _kl(p_logp: torch.Tensor, q_logp: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row, from log-probabilities; 0 * log 0 counts as 0."""
    p = p_logp.exp()
    # Mask the log-ratio before multiplying: where p == 0 the ratio may be
    # -inf - -inf = nan, and a product with nan poisons the gradient even when masked.
    log_ratio = torch.where(p > 0, p_logp - q_logp, torch.zeros_like(p))
    return (p * log_ratio).sum(-1)


def _log_mix(a_logp: torch.Tensor, b_logp: torch.Tensor, weight_a: float) -> torch.Tensor:
    """log(weight_a * A + (1 - weight_a) * B), computed stably in log space."""
    return torch.logaddexp(a_logp + math.log(weight_a), b_logp + math.log1p(-weight_a))


def forward_kl(s_logp: torch.Tensor, t_logp: torch.Tensor) -> torch.Tensor:
    return _kl(t_logp, s_logp)


def reverse_kl(s_logp: torch.Tensor, t_logp: torch.Tensor) -> torch.Tensor:
    return _kl(s_logp, t_logp)


def jsd(s_logp: torch.Tensor, t_logp: torch.Tensor, beta: float = 0.5) -> torch.Tensor:
    m_logp = _log_mix(t_logp, s_logp, beta)
    return beta * _kl(t_logp, m_logp) + (1 - beta) * _kl(s_logp, m_logp)


def tvd(s_logp: torch.Tensor, t_logp: torch.Tensor) -> torch.Tensor:
    return 0.5 * (t_logp.exp() - s_logp.exp()).abs().sum(-1)


def skew_forward_kl(s_logp: torch.Tensor, t_logp: torch.Tensor, alpha: float = 0.1) -> torch.Tensor:
    if alpha == 0:
        return forward_kl(s_logp, t_logp)
    return _kl(t_logp, _log_mix(t_logp, s_logp, alpha))


def skew_reverse_kl(s_logp: torch.Tensor, t_logp: torch.Tensor, alpha: float = 0.1) -> torch.Tensor:
    if alpha == 0:
        return reverse_kl(s_logp, t_logp)
    return _kl(s_logp, _log_mix(s_logp, t_logp, alpha))


def jeffreys(s_logp: torch.Tensor, t_logp: torch.Tensor) -> torch.Tensor:
    return _kl(t_logp, s_logp) + _kl(s_logp, t_logp)


AKL_HEAD_MASS = 0.5  # the teacher's head: its most likely tokens until their mass reaches this (the paper's mu)


def adaptive_kl(s_logp: torch.Tensor, t_logp: torch.Tensor) -> torch.Tensor:
    fkl, rkl = _kl(t_logp, s_logp), _kl(s_logp, t_logp)
    with torch.no_grad():
        p, gap = t_logp.exp(), (t_logp.exp() - s_logp.exp()).abs()
        p_sorted, order = p.sort(dim=-1, descending=True)
        # A token is in the head when the mass of the tokens ranked above it is still below mu:
        # the head is the smallest top set whose mass reaches mu (ties broken by the sort).
        head = (p_sorted.cumsum(-1) - p_sorted) < AKL_HEAD_MASS
        gap_sorted = gap.gather(-1, order)
        g_head = (gap_sorted * head).sum(-1)
        g_all = gap_sorted.sum(-1)
        w_head = torch.where(g_all > 0, g_head / g_all.clamp_min(torch.finfo(g_all.dtype).tiny),
                             torch.full_like(g_all, 0.5))
    return w_head * fkl + (1 - w_head) * rkl


def _divergence_table() -> dict[str, tuple[Divergence, str | None]]:
    """Each name of :data:`KD_LOSSES` with the function of that name in this module, and its parameter."""
    defined = globals()
    missing = [name for name in KD_LOSSES if not callable(defined.get(name))]
    if missing:
        raise ImportError(f"slimforge.distill.loss_names lists {missing}, which slimforge.distill.losses does not define")
    return {name: (defined[name], param) for name, param in KD_LOSSES.items()}


# The divergences recipes may name (``distill.loss``), with the parameter each one takes, if any.
DIVERGENCES: dict[str, tuple[Divergence, str | None]] = _divergence_table()


def divergence(name: str, s_logp: torch.Tensor, t_logp: torch.Tensor,
               beta: float = 0.5, alpha: float = 0.1) -> torch.Tensor:
    """Per-row divergence ``name`` between student and teacher log-probabilities."""
    fn, param = DIVERGENCES[name]
    if param == "beta":
        return fn(s_logp, t_logp, beta=beta)
    if param == "alpha":
        return fn(s_logp, t_logp, alpha=alpha)
    return fn(s_logp, t_logp)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None = None,
            loss: str = "forward_kl", temperature: float = 1.0, beta: float = 0.5, alpha: float = 0.1,
            reduction: str = "mean") -> torch.Tensor:
    """The reference distillation loss over full-vocabulary logits.

    Args:
        student_logits: [..., V] student logits (any float dtype; computed in fp32).
        teacher_logits: [..., V] teacher logits for the same positions.
        mask: [...] 1 for tokens that count (0 for padding and prompt tokens).
        loss: a name from :data:`DIVERGENCES`.
        temperature: softmax temperature T > 0; the loss is scaled by T^2.
        beta, alpha: parameters of ``jsd`` and the skew KLs.
        reduction: ``mean`` over kept tokens, or ``sum``.

    Returns:
        A scalar.
    """
    vocab = student_logits.shape[-1]
    s_logp = F.log_softmax(upcast(student_logits).reshape(-1, vocab) / temperature, dim=-1)
    t_logp = F.log_softmax(upcast(teacher_logits).reshape(-1, vocab) / temperature, dim=-1)
    per_token = divergence(loss, s_logp, t_logp, beta=beta, alpha=alpha) * temperature**2
    return reduce_masked(per_token, mask, reduction)


def reduce_masked(per_token: torch.Tensor, mask: torch.Tensor | None, reduction: str = "mean") -> torch.Tensor:
    """Sum or mean of per-token values over the tokens the mask keeps."""
    if mask is not None:
        keep = mask.reshape(-1).to(per_token.dtype)
        total = (per_token * keep).sum()
        count = keep.sum()
    else:
        total, count = per_token.sum(), torch.tensor(float(per_token.numel()))
    if reduction == "sum":
        return total
    return total / count.clamp_min(1)


def next_token_ce(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None,
                  reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of ``logits`` [..., V] against ``targets`` [...], over kept tokens, in fp32."""
    vocab = logits.shape[-1]
    per_token = F.cross_entropy(upcast(logits).reshape(-1, vocab), targets.reshape(-1), reduction="none")
    return reduce_masked(per_token, mask, reduction)


def mixed_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
               mask: torch.Tensor | None = None, ce_weight: float = 0.0, **kd_kwargs) -> torch.Tensor:
    """(1 - ce_weight) * KD + ce_weight * next-token cross-entropy on the data."""
    total = (1 - ce_weight) * kd_loss(student_logits, teacher_logits, mask, **kd_kwargs)
    if ce_weight:
        total = total + ce_weight * next_token_ce(student_logits, targets, mask)
    return total


def topk_bucket_logprobs(student_logits: torch.Tensor, indices: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Student log-probabilities over a teacher cache's buckets: its top-k ids plus the tail.

    Args:
        student_logits: [N, V].
        indices: [N, k] vocabulary ids the teacher cache kept.
        temperature: T, as used when the cache was built.

    Returns:
        [N, k + 1] log-probabilities: the k kept ids, then the log of the
        student's remaining mass, computed without forming 1 - sum(p).
    """
    z = upcast(student_logits) / temperature
    log_norm = torch.logsumexp(z, dim=-1, keepdim=True)
    kept = z.gather(-1, indices.long()) - log_norm
    tail = torch.logsumexp(z.scatter(-1, indices.long(), float("-inf")), dim=-1, keepdim=True) - log_norm
    return torch.cat([kept, tail], dim=-1)
