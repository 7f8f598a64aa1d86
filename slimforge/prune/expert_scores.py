"""The math of expert pruning: per-expert saliency, which experts stay, and merging, on plain tensors.

REAP (Lasby et al. 2025, "REAP: Router-weighted Expert Activation Pruning"): expert ``j``'s
saliency in a layer is the mean, over the calibration tokens routed to ``j`` (``j`` among the
token's top-k), of the router's gate weight times the L2 norm of the expert's output::

    S_j = 1/|X_j| * sum_{x in X_j} g_j(x) * ||f_j(x)||_2

``frequency`` (how many tokens chose ``j``) is the simple baseline. An expert no token chose
scores 0 under both. Sums are accumulated batch by batch in float64 (:class:`ExpertStats`),
so nothing of a layer's activations is held.

Merging (``merge_into``): each removed expert joins the survivor whose output is most like its
own on the tokens routed to it (mean cosine, :func:`accumulate_similarity`); a survivor and the
experts merged into it are averaged weighted by how many calibration tokens each received
(:func:`frequency_weighted_average`, as in M-SMoE, Li et al. 2023).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from slimforge.prune.choices import EXPERT_SCORES

ExpertFn = Callable[[int, torch.Tensor], torch.Tensor]  # (expert, tokens [n, H]) -> outputs [n, H]


@dataclass
class ExpertStats:
    """Running sums of one MoE layer over calibration batches, per expert (float64 [E] each)."""

    tokens: torch.Tensor  # how many tokens were routed to the expert (one per token and slot)
    weighted_norm: torch.Tensor  # sum over those tokens of gate weight x ||expert output||_2

    @classmethod
    def zeros(cls, num_experts: int) -> ExpertStats:
        return cls(torch.zeros(num_experts, dtype=torch.float64), torch.zeros(num_experts, dtype=torch.float64))


def slot_output_norms(hidden: torch.Tensor, indices: torch.Tensor, expert_fn: ExpertFn) -> torch.Tensor:
    """``||f_e(x)||_2`` for each token ``x`` and each of its routed slots ``e = indices[t, s]``.

    Args:
        hidden: [T, H] the tokens the MoE block saw.
        indices: [T, k] the experts each token was routed to.
        expert_fn: an expert's unweighted output for some tokens.

    Returns:
        float32 [T, k].
    """
    norms = torch.zeros(indices.shape, dtype=torch.float32, device=hidden.device)
    for expert in torch.unique(indices).tolist():
        token, slot = torch.where(indices == expert)
        norms[token, slot] = expert_fn(int(expert), hidden[token]).float().norm(dim=-1)
    return norms


def accumulate_stats(stats: ExpertStats, indices: torch.Tensor, weights: torch.Tensor,
                     norms: torch.Tensor | None = None) -> None:
    """Add one batch's routing to ``stats``, in place.

    Args:
        indices: [T, k] routed experts; weights: [T, k] their gate weights (what the block
            multiplies each output by); norms: [T, k] output norms (:func:`slot_output_norms`),
            or None when only frequencies are needed.
    """
    flat = indices.reshape(-1).cpu()
    stats.tokens.index_add_(0, flat, torch.ones(flat.numel(), dtype=torch.float64))
    if norms is not None:
        contribution = (weights.double() * norms.double()).reshape(-1).cpu()
        stats.weighted_norm.index_add_(0, flat, contribution)


def reap_scores(stats: ExpertStats) -> torch.Tensor:
    """REAP saliency per expert: mean gate-weighted output norm over the tokens routed to it (0 if none)."""
    return torch.where(stats.tokens > 0, stats.weighted_norm / stats.tokens.clamp(min=1), 0.0)


def frequency_scores(stats: ExpertStats) -> torch.Tensor:
    """How many calibration tokens chose each expert."""
    return stats.tokens.clone()


def expert_scores(stats: ExpertStats, score: str) -> torch.Tensor:
    """The saliency ``score`` (one of :data:`EXPERT_SCORES`) names."""
    if score == "reap":
        return reap_scores(stats)
    if score == "frequency":
        return frequency_scores(stats)
    raise ValueError(f"score must be one of {EXPERT_SCORES}, got {score!r}")


def kept_count(total: int, num_experts: int | None, ratio: float | None) -> int:
    """Experts per layer that stay: ``num_experts``, or ``total`` less ``round(total * ratio)``."""
    if num_experts is not None:
        return int(num_experts)
    if ratio is not None:
        return total - round(total * ratio)
    return total


def choose_kept(scores: torch.Tensor, keep: int) -> list[int]:
    """The ``keep`` highest-scoring experts, in index order (ties: the lower index stays)."""
    if not 1 <= keep <= scores.numel():
        raise ValueError(f"cannot keep {keep} of {scores.numel()} experts")
    order = sorted(range(scores.numel()), key=lambda e: (-float(scores[e]), e))
    return sorted(order[:keep])


# --- merging -----------------------------------------------------------------------------------


def accumulate_similarity(sums: torch.Tensor, counts: torch.Tensor, hidden: torch.Tensor, indices: torch.Tensor,
                          removed: list[int], survivors: list[int], expert_fn: ExpertFn) -> None:
    """Add one batch's output cosines between each removed expert and every survivor, in place.

    On the tokens routed to removed expert ``removed[r]``, ``sums[r, s]`` gains the summed
    cosine between its output and survivor ``survivors[s]``'s, and ``counts[r]`` the tokens.

    Args:
        sums: float64 [R, S]; counts: float64 [R].
    """
    for r, expert in enumerate(removed):
        token = torch.where((indices == expert).any(dim=-1))[0]
        if token.numel() == 0:
            continue
        x = hidden[token]
        own = expert_fn(expert, x).float()
        for s, survivor in enumerate(survivors):
            other = expert_fn(survivor, x).float()
            sums[r, s] += float(torch.nn.functional.cosine_similarity(own, other, dim=-1, eps=1e-8).double().sum())
        counts[r] += token.numel()


def merge_targets(similarity: torch.Tensor, survivors: list[int]) -> list[int]:
    """For each removed expert (a row of ``similarity`` [R, S]), the survivor it is most like (ties: first)."""
    return [survivors[int(torch.argmax(row))] for row in similarity]


def merge_groups(survivors: list[int], removed: list[int], targets: list[int]) -> dict[int, list[int]]:
    """Survivor -> itself and the removed experts merged into it (survivors with none are left out)."""
    groups: dict[int, list[int]] = {}
    for expert, target in zip(removed, targets, strict=True):
        groups.setdefault(target, [target]).append(expert)
    return {s: groups[s] for s in survivors if s in groups}


def frequency_weighted_average(weights: list[torch.Tensor], counts: list[float]) -> torch.Tensor:
    """``sum_i n_i W_i / sum_i n_i`` in float32; the first (the survivor's own) when no token chose any."""
    total = float(sum(counts))
    if total <= 0:
        return weights[0].float().clone()
    out = torch.zeros_like(weights[0], dtype=torch.float32)
    for weight, count in zip(weights, counts, strict=True):
        out.add_(weight.float(), alpha=float(count) / total)
    return out
