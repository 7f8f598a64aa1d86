"""Unstructured and N:M pruning of one linear layer: magnitude, Wanda, SparseGPT (pure math).

Masks here are *keep* masks: ``True`` marks a weight that stays. N:M groups run along the
input dimension (``m`` consecutive weights of one output row), the layout sparse tensor
cores accelerate; ``n`` of every ``m`` are zeroed (2:4 keeps 2 of 4).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slimforge.calibration.hessian import (
    inverse_hessian_cholesky,
    obs_sweep,
    solver_threads,
    zero_dead_columns,
)
from slimforge.prune.choices import PER_CHOICES


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    """|W|: the weight's own size is its importance."""
    return weight.detach().abs().float()


def wanda_scores(weight: torch.Tensor, act_norm: torch.Tensor) -> torch.Tensor:
    """|W_ij| * ||X_j||: Wanda's score (Sun et al., 2023), ``act_norm`` [in_features]."""
    return weight.detach().abs().float() * act_norm.float().unsqueeze(0)


def lowest_mask(scores: torch.Tensor, count: int) -> torch.Tensor:
    """True at the ``count`` lowest scores along the last dim (ties: lower position first).

    A k-th-value threshold plus a tie fix-up: exact counts at a fraction of a full sort's cost.
    """
    if count <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    kth = torch.kthvalue(scores, count, dim=-1, keepdim=True).values
    below = scores < kth
    ties = scores == kth
    need = count - below.sum(-1, keepdim=True)
    return below | (ties & (torch.cumsum(ties, dim=-1) <= need))


def unstructured_mask(scores: torch.Tensor, sparsity: float, per: str = "row") -> torch.Tensor:
    """Keep mask that zeroes the lowest-scoring ``sparsity`` fraction of weights.

    Args:
        scores: [rows, cols] importance, higher = keep.
        sparsity: fraction to remove, in [0, 1).
        per: ``row`` removes ``floor(cols * sparsity)`` from every output row (Wanda's
            choice); ``layer`` removes ``floor(numel * sparsity)`` across the whole matrix.
    """
    if not 0 <= sparsity < 1:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    if per == "row":
        return ~lowest_mask(scores, int(scores.shape[1] * sparsity))
    if per == "layer":
        return ~lowest_mask(scores.reshape(-1), int(scores.numel() * sparsity)).reshape(scores.shape)
    raise ValueError(f"per must be one of {PER_CHOICES}, got {per!r}")


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep mask zeroing the ``n`` lowest scores in each group of ``m`` consecutive columns.

    Raises:
        ValueError: ``n >= m``, or the column count is not a multiple of ``m``.
    """
    check_nm(n, m, scores.shape[1])
    rows, cols = scores.shape
    return ~lowest_mask(scores.reshape(rows, cols // m, m), n).reshape(rows, cols)


def check_nm(n: int, m: int, cols: int | None = None) -> None:
    if not 1 <= n < m:
        raise ValueError(f"N:M sparsity needs 1 <= N < M, got {n}:{m}")
    if cols is not None and cols % m:
        raise ValueError(f"{cols} input features are not a multiple of M={m}")


def prune_mask(scores: torch.Tensor, sparsity: float, per: str = "row",
               n: int | None = None, m: int | None = None) -> torch.Tensor:
    """N:M mask when ``n`` and ``m`` are given, else the unstructured one."""
    if n and m:
        return nm_mask(scores, n, m)
    return unstructured_mask(scores, sparsity, per)


def apply_mask(weight: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Zero the pruned weights in place; returns ``weight``."""
    with torch.no_grad():
        weight.mul_(keep.to(weight.dtype))
    return weight


@dataclass
class SparseGPTResult:
    weight: torch.Tensor  # fp32 [rows, cols]: pruned and error-corrected
    keep: torch.Tensor  # bool [rows, cols]
    loss: float  # the layer's output error the sweep reports


def sparsegpt_prune(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float = 0.5,
                    n: int | None = None, m: int | None = None, per: str = "layer",
                    block_size: int = 128, percdamp: float = 0.01) -> SparseGPTResult:
    """SparseGPT (Frantar & Alistarh, 2023): prune and update the rest to keep the layer's output.

    The mask is chosen as the sweep goes, from the current (already corrected) weights and
    the OBS score ``w^2 / [H^-1]_jj``: for each block of ``block_size`` columns (unstructured;
    ``per=layer`` ranks across the block's rows, ``per=row`` within each row), or for each
    group of ``m`` columns (N:M). Every pruned weight's error is propagated to the columns
    not yet visited by :func:`slimforge.calibration.hessian.obs_sweep`.

    Args:
        weight: [rows, cols]; not modified.
        hessian: [cols, cols], the mean of ``x x^T`` over calibration tokens.
        sparsity: fraction to remove (ignored for N:M).
        n, m: N:M sparsity, ``n`` zeros per ``m`` columns; ``block_size`` must be a multiple of ``m``.
        per: ``layer`` or ``row``.
        block_size: columns per lazy-update block (and per mask decision).
        percdamp: Hessian dampening, a fraction of its mean diagonal.
    """
    nm = bool(n and m)
    if nm:
        check_nm(n, m, weight.shape[1])
        if block_size % m:
            raise ValueError(f"block_size={block_size} must be a multiple of M={m}")
    elif not 0 <= sparsity < 1:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    with solver_threads(weight.device):
        inv = inverse_hessian_cholesky(hessian, percdamp)
    start_weight = zero_dead_columns(weight.detach().float().clone(), inv.dead.to(weight.device))
    keep = torch.ones_like(start_weight, dtype=torch.bool)

    def prune_column(start: int, col: int, block: torch.Tensor, hinv_diag: torch.Tensor) -> torch.Tensor:
        if nm and col % m == 0:
            scores = block[:, col:col + m] ** 2 / hinv_diag[col:col + m].unsqueeze(0) ** 2
            keep[:, start + col:start + col + m] = nm_mask(scores, n, m)
        elif not nm and col == 0:
            scores = block ** 2 / hinv_diag.unsqueeze(0) ** 2
            keep[:, start:start + block.shape[1]] = unstructured_mask(scores, sparsity, per)
        return block[:, col] * keep[:, start + col]

    with solver_threads(start_weight.device):
        result = obs_sweep(start_weight, inv.upper, prune_column, block_size)
    return SparseGPTResult(weight=result.weight, keep=keep & (result.weight != 0), loss=result.loss)
