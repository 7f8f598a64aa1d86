"""The one OBS / Hessian solver, shared by SparseGPT (pruning) and GPTQ (quantization).

Both methods solve the same layer-wise problem. A linear layer's weight ``W`` [rows, cols]
sees inputs ``x`` [cols]; its layer Hessian is ``H = E[x x^T]`` (over calibration tokens).
The layer's output error after changing ``W`` to ``W'`` is ``tr((W - W') H (W - W')^T)``.
Optimal Brain Surgeon visits the columns in order; each column takes a new value chosen by
the method (zero where a mask prunes, the nearest grid point where a quantizer rounds), and
the error that change makes is moved onto the columns not yet visited, through ``H^-1``.
With the upper Cholesky factor ``U`` of ``H^-1`` (``H^-1 = U^T U``), the update for column
``j`` is ``W[:, j:] -= ((w_j - w'_j) / U[j, j]) * U[j, j:]``, and row ``j`` of ``U`` is all
the inverse Hessian of the remaining columns that is needed (Frantar et al., GPTQ, 2022).

API (stable; SparseGPT in :mod:`slimforge.prune.unstructured` and GPTQ in
:mod:`slimforge.quantize.gptq` build on it):

* :class:`HessianAccumulator` ``(columns, device=None, dtype=torch.float32)``: ``add(x)``
  with inputs ``x`` [..., columns] keeps the running mean of ``x x^T`` over tokens
  (``.hessian``, ``.tokens``). Running mean, not sum, so fp32 stays accurate over many
  tokens; pass ``dtype=torch.float64`` for very long calibration.
* :func:`inverse_hessian_cholesky` ``(hessian, percdamp=0.01)`` -> :class:`InverseHessian`:
  dead columns (zero diagonal: inputs that never fire) get a unit diagonal and are reported
  in ``.dead`` (the caller zeroes those weight columns: :func:`zero_dead_columns`);
  dampening adds ``percdamp * mean(diag(H))`` to the diagonal (raised tenfold, up to three
  times, if Cholesky still fails); ``.upper`` is ``U``, ``.damp`` the dampening used.
* :func:`obs_sweep` ``(weight, hinv_upper, column_update, block_size=128)`` ->
  :class:`SweepResult`: the blocked column sweep with lazy batch updates. ``column_update``
  is the method: ``column_update(start, col, block, hinv_diag) -> new column values``, where
  ``block`` is the current [rows, B] slice of the block that starts at absolute column
  ``start`` (columns before ``col`` are final; ``col`` and later carry every error propagated
  so far), ``col`` the index inside the block, and ``hinv_diag`` the [B] diagonal of ``U``
  for the block (SparseGPT's mask scores are ``w^2 / hinv_diag^2``). Methods that decide per
  group of columns (an N:M mask, a quantization group) do so when ``col`` starts a group;
  keep ``block_size`` a multiple of the group size so a group never straddles two blocks.
  The sweep works in fp32 on a copy; ``SweepResult.weight`` is that copy, ``.loss`` the
  layer's output error ``sum((w - w')^2 / U_jj^2) / 2``.
* :func:`permute_columns` / :func:`unpermute_columns`: GPTQ's ``act_order`` visits columns
  by decreasing Hessian diagonal; permute weight and Hessian, sweep, then undo.
* :func:`solver_threads` ``(device)``: a context manager running a layer's solve on one CPU
  thread (the sweep is thousands of small ops; on a busy CPU, threads stall on each other).

Everything here is pure tensor math: no hooks, no models, no config.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

# (start, col, block, hinv_diag) -> the new values of column ``start + col``, shape [rows].
ColumnUpdate = Callable[[int, int, torch.Tensor, torch.Tensor], torch.Tensor]


class HessianAccumulator:
    """Running mean of ``x x^T`` over every token of a linear layer's inputs."""

    def __init__(self, columns: int, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        self.hessian = torch.zeros(columns, columns, device=device, dtype=dtype)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        """Fold in a batch of inputs ``x`` [..., columns] (any leading shape)."""
        x = x.reshape(-1, x.shape[-1]).to(device=self.hessian.device, dtype=self.hessian.dtype)
        new = x.shape[0]
        if new == 0:
            return
        total = self.tokens + new
        # H <- H * n / (n + t) + X^T X / (n + t), in place.
        self.hessian.mul_(self.tokens / total)
        self.hessian.addmm_(x.t(), x, alpha=1.0 / total)
        self.tokens = total


@dataclass
class InverseHessian:
    """The factor the sweep needs: ``upper`` with ``H^-1 = upper^T @ upper``."""

    upper: torch.Tensor
    dead: torch.Tensor  # bool [cols]: columns whose inputs were always zero
    damp: float


def inverse_hessian_cholesky(hessian: torch.Tensor, percdamp: float = 0.01) -> InverseHessian:
    """Dampen ``hessian`` and return the upper Cholesky factor of its inverse.

    Args:
        hessian: [cols, cols] symmetric positive semi-definite (not modified).
        percdamp: dampening as a fraction of the mean diagonal.

    Raises:
        ValueError: the Hessian stays indefinite even with 1000x the dampening.
    """
    h = hessian.to(torch.float32 if hessian.dtype in (torch.float16, torch.bfloat16) else hessian.dtype).clone()
    diag = torch.diagonal(h)
    dead = diag == 0
    diag[dead] = 1.0
    mean_diag = float(diag.mean())
    damp = percdamp * mean_diag
    for _ in range(4):
        try:
            factor = torch.linalg.cholesky(h + damp * torch.eye(len(h), device=h.device, dtype=h.dtype))
            inverse = torch.cholesky_inverse(factor)
            upper = torch.linalg.cholesky(inverse, upper=True)
            return InverseHessian(upper=upper.float(), dead=dead, damp=damp)
        except torch.linalg.LinAlgError:
            damp = max(damp * 10, 1e-8 * max(mean_diag, 1.0))
    raise ValueError(f"the layer Hessian is not positive definite even with dampening {damp:.3g}; "
                     "use more calibration samples or raise percdamp")


def zero_dead_columns(weight: torch.Tensor, dead: torch.Tensor) -> torch.Tensor:
    """Zero the weight columns whose inputs never fire (their value cannot be measured)."""
    weight[:, dead] = 0
    return weight


@contextlib.contextmanager
def solver_threads(device: torch.device | str) -> Iterator[None]:
    """Run a layer's solve on one CPU thread (no-op on other devices).

    Each op of the sweep touches a few hundred KB, too little to split across threads; on a
    CPU shared with other work, two OpenMP threads wait on each other at every op. Measured on
    a shared 2-core box: a [1536, 128] rank-1 update 0.2 ms on one thread vs 25 ms on two; the
    inverse Cholesky of a 1536-wide Hessian 0.9-1.0 s vs 5-16 s. SparseGPT and GPTQ both use it.
    """
    if torch.device(device).type != "cpu":
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@dataclass
class SweepResult:
    weight: torch.Tensor  # fp32 [rows, cols], the swept weight
    loss: float  # sum over columns of ||w - w'||^2 / U_jj^2, halved


def obs_sweep(weight: torch.Tensor, hinv_upper: torch.Tensor, column_update: ColumnUpdate,
              block_size: int = 128) -> SweepResult:
    """Visit the columns in order, let ``column_update`` set each, and propagate the error.

    Within a block of ``block_size`` columns errors are applied column by column; the
    columns after the block receive the whole block's error in one matmul (lazy batch
    update), which is what makes the sweep fast and gives the same result as block size 1.

    Args:
        weight: [rows, cols]; not modified.
        hinv_upper: [cols, cols] upper Cholesky factor of the dampened inverse Hessian.
        column_update: the method (see the module docstring).
        block_size: columns per lazy-update block.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    w = weight.detach().to(torch.float32).clone()
    hinv = hinv_upper.to(device=w.device, dtype=torch.float32)
    rows, cols = w.shape
    loss = torch.zeros((), dtype=torch.float64, device=w.device)
    for start in range(0, cols, block_size):
        end = min(start + block_size, cols)
        block = w[:, start:end].clone()
        errors = torch.empty_like(block)
        hinv_block = hinv[start:end, start:end]
        hinv_diag = torch.diagonal(hinv_block)
        for col in range(end - start):
            new = column_update(start, col, block, hinv_diag).to(block.dtype)
            err = (block[:, col] - new).div_(hinv_diag[col])
            # Columns after ``col`` in this block absorb the error now ...
            block[:, col:].addr_(err, hinv_block[col, col:], alpha=-1)
            block[:, col] = new  # exactly: pruned weights must be exact zeros
            errors[:, col] = err
        loss += errors.double().pow(2).sum() / 2
        w[:, start:end] = block
        # ... and the columns after the block, all at once.
        if end < cols:
            w[:, end:].sub_(errors @ hinv[start:end, end:])
    return SweepResult(weight=w, loss=float(loss))


def permute_columns(weight: torch.Tensor, hessian: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Order columns by decreasing Hessian diagonal (GPTQ's ``act_order``).

    Returns:
        (permuted weight, permuted hessian, permutation) — undo with :func:`unpermute_columns`.
    """
    perm = torch.argsort(torch.diagonal(hessian), descending=True)
    return weight[:, perm], hessian[perm][:, perm], perm


def unpermute_columns(weight: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Put the columns of a weight swept under ``perm`` back in their original order."""
    return weight[:, torch.argsort(perm)]
