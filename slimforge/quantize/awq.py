"""AWQ's math as pure functions: activation-aware channel scales, their search, and the clipping search.

AWQ (Lin et al., 2023) protects the input channels that carry large activations. A group of
linears reading one tensor ``x`` (a :class:`slimforge.arch.ScalingGroup`) gets per-channel
factors ``s``: the readers' weight columns are multiplied by ``s`` before rounding and the
tensor is divided by ``s`` where it is written, so the function is unchanged before rounding
while the salient columns take more of each group's grid. Candidates are
``s = mean|x|^a`` (with duo scaling ``mean|x|^a / mean|w|^(1-a)``, ``mean|w|`` each weight's
magnitude relative to its group's largest), normalised so that ``sqrt(max(s) * min(s)) = 1``,
for ``a`` on a grid in [0, 1); the candidate whose rounded readers disturb the output least
wins, and no scaling at all is always a candidate, so the search never makes its loss worse.

The loss here is each reader's output error on the calibration inputs, from their Hessian
``H = E[x x^T]`` (no activations are kept): scaling then rounding turns ``W`` into
``Q(W diag(s)) diag(1/s)``, and the error is ``tr(D H D^T)`` with ``D`` the difference. The
clipping search then picks, per output row and group, the fraction of the group's range whose
rounding moves that group's share of the output least, ``d_g^T H_gg d_g`` (AWQ's auto-clip,
over every calibration token rather than a sample). :func:`slimforge.quantize.intquant.mse_scales`
is the same search with only ``diag(H)``; the off-diagonal block counts correlated inputs whose
errors cancel or add.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from slimforge.quantize.intquant import (
    fake_quantize,
    groups_of,
    round_scales,
    rtn_quantize,
    symmetric_scales,
)

# Scales below this are clamped, as AWQ does: a channel that never fires would otherwise get 0.
MIN_SCALE = 1e-4


def exponent_grid(steps: int) -> list[float]:
    """The exponents the search tries: ``0, 1/steps, ..., (steps - 1)/steps`` (AWQ's grid of 20)."""
    if steps < 1:
        raise ValueError(f"the exponent grid needs at least one step, got {steps}")
    return [i / steps for i in range(steps)]


def weight_channel_means(weights: Sequence[torch.Tensor], group_size: int) -> torch.Tensor:
    """Duo scaling's weight term: the mean over all readers' rows of ``|w|`` relative to its group's max.

    Args:
        weights: the readers' weights, each [rows_i, channels].
        group_size: input columns per quantization group (``-1``: the whole row).

    Returns:
        fp32 [channels].
    """
    rows = torch.cat([w.detach().float() for w in weights]).abs()
    size = rows.shape[1] if group_size <= 0 else group_size
    grouped = rows.reshape(rows.shape[0], -1, size)
    relative = grouped / grouped.amax(dim=-1, keepdim=True).clamp_min(1e-6)
    return relative.reshape(rows.shape).mean(0)


def channel_scales(act_mean: torch.Tensor, exponent: float, weight_mean: torch.Tensor | None = None) -> torch.Tensor:
    """One candidate: ``mean|x|^a`` (divided by ``weight_mean^(1-a)`` with duo scaling), normalised.

    Args:
        act_mean: mean ``|x|`` per input channel [channels].
        exponent: ``a`` in [0, 1].
        weight_mean: :func:`weight_channel_means` of the readers, or None (activations only).

    Returns:
        fp32 [channels], positive, with ``sqrt(max * min) = 1`` so the grid stays centred.
    """
    scales = act_mean.float().pow(exponent)
    if weight_mean is not None:
        scales = scales / (weight_mean.float().pow(1 - exponent) + MIN_SCALE)
    scales = scales.clamp_min(MIN_SCALE)
    return scales / (scales.max() * scales.min()).sqrt()


@dataclass
class ScaleChoice:
    """What the scale search kept for one group."""

    scales: torch.Tensor  # fp32 [channels]; all ones when no candidate beat leaving the group as is
    exponent: float | None  # the winning ``a``; None when no scaling won
    loss: float  # the loss of ``scales``
    unscaled_loss: float  # the loss without any scaling, for the report


def search_scales(act_mean: torch.Tensor, loss: Callable[[torch.Tensor], float], steps: int,
                  weight_mean: torch.Tensor | None = None) -> ScaleChoice:
    """The candidate on the exponent grid with the lowest ``loss``, or no scaling if none is lower.

    Args:
        act_mean: mean ``|x|`` per channel of the group's tensor.
        loss: ``loss(scales) -> float``, the error of the group's readers rounded after scaling
            (e.g. :func:`scaled_rounding_error` summed over the readers).
        steps: exponents tried (:func:`exponent_grid`).
        weight_mean: duo scaling's weight term, or None.
    """
    ones = torch.ones_like(act_mean, dtype=torch.float32)
    unscaled = loss(ones)
    best = ScaleChoice(ones, None, unscaled, unscaled)
    for exponent in exponent_grid(steps):
        scales = channel_scales(act_mean, exponent, weight_mean)
        value = loss(scales)
        if value < best.loss:
            best = ScaleChoice(scales, exponent, value, unscaled)
    return best


def output_error(difference: torch.Tensor, hessian: torch.Tensor) -> float:
    """``tr(D H D^T)``: the mean squared output change a weight change ``D`` makes on inputs with ``H = E[x x^T]``."""
    d = difference.float()
    return float(((d @ hessian.float()) * d).sum())


def scaled_rounding_error(weight: torch.Tensor, hessian: torch.Tensor, scales: torch.Tensor, bits: int,
                          group_size: int, scale_dtype: torch.dtype | None = None) -> float:
    """A reader's output error when its columns are scaled by ``scales``, rounded to nearest, and its input divided back.

    Args:
        weight: [rows, channels], unscaled.
        hessian: [channels, channels] of the unscaled inputs.
        scales: [channels].
        bits, group_size, scale_dtype: the grid (min-max scales, as AWQ searches with RTN).
    """
    s = scales.float().to(weight.device)
    w = weight.detach().float()
    rounded = rtn_quantize(w * s, bits, group_size, scale_dtype).weight / s
    return output_error(w - rounded, hessian)


def diagonal_blocks(hessian: torch.Tensor, group_size: int) -> torch.Tensor:
    """The Hessian's blocks along its diagonal, one per quantization group: [groups, size, size]."""
    cols = hessian.shape[0]
    size = cols if group_size <= 0 else group_size
    groups = cols // size
    return hessian.float().reshape(groups, size, groups, size).diagonal(dim1=0, dim2=2).permute(2, 0, 1)


def group_output_errors(weight: torch.Tensor, rounded: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """Per row and group, ``d_g^T H_gg d_g``: how much rounding that group moves its share of the output.

    Returns:
        fp32 [rows, groups].
    """
    groups, size, _ = blocks.shape
    d = (weight.float() - rounded.float()).reshape(weight.shape[0], groups, size)
    return torch.einsum("rgi,gij,rgj->rg", d, blocks, d)


def clip_scales(weight: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int,
                scale_dtype: torch.dtype | None = None, steps: int = 20, min_shrink: float = 0.5) -> torch.Tensor:
    """AWQ's clipping search: per row and group, the range ``shrink * max|w|`` whose rounding errs least.

    Each of ``steps`` shrink factors from 1 (min-max) down to ``min_shrink`` gives every group a
    scale; each group keeps the one with the lowest :func:`group_output_errors`, so min-max is
    the worst a group can end with.

    Returns:
        fp32 [rows, groups] scales, already rounded to ``scale_dtype``.
    """
    w = weight.detach().float()
    rows, cols = w.shape
    blocks = diagonal_blocks(hessian, group_size)
    amax = w.reshape(rows, groups_of(cols, group_size), -1).abs().amax(dim=-1)
    best = symmetric_scales(w, bits, group_size, scale_dtype)
    best_err = group_output_errors(w, fake_quantize(w, best, bits, group_size), blocks)
    for shrink in torch.linspace(1.0, min_shrink, steps).tolist()[1:]:
        scales = round_scales(amax * shrink / ((2**bits - 1) / 2), scale_dtype)
        err = group_output_errors(w, fake_quantize(w, scales, bits, group_size), blocks)
        better = err < best_err
        best = torch.where(better, scales, best)
        best_err = torch.where(better, err, best_err)
    return best
