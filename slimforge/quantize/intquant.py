"""Symmetric integer weight quantization: the grid, round-to-nearest, and its scales.

A weight ``W`` [rows, cols] is cut into groups of ``group_size`` consecutive input columns
(``-1``: the whole row, one scale per output channel). Each group has one scale ``s`` and
integer codes ``q = clamp(round(w / s), -2^(b-1), 2^(b-1) - 1)``; the weight it stands for
is ``q * s``. The scale maps the group's largest magnitude to the middle of the grid's two
ends, ``s = max|w| / ((2^b - 1) / 2)`` (GPTQ's symmetric grid; compressed-tensors' min-max
observer picks the same), so ``-max|w|`` lands on the lowest code and ``+max|w|`` rounds
half a step short of the highest.

These are the conventions of compressed-tensors' ``pack-quantized`` format, which stores
``q`` (packed into int32) and ``s``: :func:`fake_quantize` here agrees with its
``fake_quantize`` to the bit (tested), so what GPTQ optimizes is exactly what is saved.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slimforge.quantize.config import SCALE_SEARCHES


def code_range(bits: int) -> tuple[int, int]:
    """The smallest and largest signed integer code of a ``bits``-wide grid."""
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def groups_of(columns: int, group_size: int) -> int:
    """How many scales each row has."""
    return 1 if group_size <= 0 else columns // group_size


def _group_view(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    rows, cols = weight.shape
    size = cols if group_size <= 0 else group_size
    if cols % size:
        raise ValueError(f"group size {group_size} does not divide the input width {cols}")
    return weight.reshape(rows, cols // size, size)


def round_scales(scales: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """Scales rounded to the dtype they will be stored in (and kept in fp32), zeros made tiny.

    Rounding before use matters: GPTQ compensates the error of the grid it actually rounds
    to, so the grid must be the stored one. An all-zero group gets the storage dtype's
    epsilon instead of a zero scale (its codes are all zero either way).
    """
    dtype = dtype or torch.float32
    scales = scales.to(dtype)
    scales = torch.where(scales == 0, torch.tensor(torch.finfo(dtype).eps, dtype=dtype), scales)
    return scales.float()


def symmetric_scales(weight: torch.Tensor, bits: int, group_size: int,
                     scale_dtype: torch.dtype | None = None) -> torch.Tensor:
    """One scale per group: ``max|w| / ((2^bits - 1) / 2)``.

    Returns:
        fp32 [rows, groups], already rounded to ``scale_dtype``.
    """
    amax = _group_view(weight.float(), group_size).abs().amax(dim=-1)
    return round_scales(amax / ((2**bits - 1) / 2), scale_dtype)


def mse_scales(weight: torch.Tensor, bits: int, group_size: int, scale_dtype: torch.dtype | None = None,
               importance: torch.Tensor | None = None, min_shrink: float = 0.5, steps: int = 26) -> torch.Tensor:
    """Per-group scales that minimise the (importance-weighted) squared rounding error.

    Each group tries ``steps`` clipping ranges, from its full ``max|w|`` down to
    ``min_shrink * max|w|``, and keeps the one whose rounded weights are closest to the
    originals: clipping a few large weights buys a finer grid for all the others. With
    ``importance`` [cols] (GPTQ passes ``diag(H)``, each input column's energy), an error
    counts as much as it moves the layer's output. ``min_shrink=1`` gives :func:`symmetric_scales`.

    Returns:
        fp32 [rows, groups], already rounded to ``scale_dtype``.
    """
    grouped = _group_view(weight.float(), group_size)
    weights = None if importance is None else _group_view(importance.float().reshape(1, -1), group_size)
    amax = grouped.abs().amax(dim=-1)
    best = symmetric_scales(weight, bits, group_size, scale_dtype)
    best_err = torch.full_like(amax, float("inf"))
    for shrink in torch.linspace(1.0, min_shrink, steps).tolist():
        scales = round_scales(amax * shrink / ((2**bits - 1) / 2), scale_dtype)
        err = (_group_view(fake_quantize(weight, scales, bits, group_size), group_size) - grouped) ** 2
        err = (err * weights if weights is not None else err).sum(-1)
        better = err < best_err
        best = torch.where(better, scales, best)
        best_err = torch.where(better, err, best_err)
    return best


def group_scales(weight: torch.Tensor, bits: int, group_size: int, scale_dtype: torch.dtype | None = None,
                 search: str = "minmax", importance: torch.Tensor | None = None) -> torch.Tensor:
    """Scales by ``search``, one of the schema's ``SCALE_SEARCHES``: ``minmax``
    (:func:`symmetric_scales`) or ``mse`` (:func:`mse_scales`)."""
    if search == "mse":
        return mse_scales(weight, bits, group_size, scale_dtype, importance)
    if search == "minmax":
        return symmetric_scales(weight, bits, group_size, scale_dtype)
    raise ValueError(f"scale search must be one of {', '.join(SCALE_SEARCHES)}, got {search!r}")


def quantize_codes(weight: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Integer codes (int8) of ``weight`` on the grid given by ``scales`` [rows, groups]."""
    low, high = code_range(bits)
    grouped = _group_view(weight.float(), group_size)
    codes = torch.clamp(torch.round(grouped / scales.unsqueeze(-1)), low, high)
    return codes.reshape(weight.shape).to(torch.int8)


def dequantize_codes(codes: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """The fp32 weight that codes and scales stand for."""
    grouped = _group_view(codes.float(), group_size)
    return (grouped * scales.unsqueeze(-1)).reshape(codes.shape)


def fake_quantize(weight: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """``weight`` rounded to the grid: quantize, then dequantize (fp32)."""
    return dequantize_codes(quantize_codes(weight, scales, bits, group_size), scales, group_size)


def fake_quantize_column(column: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """One input column [rows] rounded with its per-row scale [rows] (GPTQ's inner step)."""
    low, high = code_range(bits)
    return torch.clamp(torch.round(column / scale), low, high) * scale


@dataclass
class QuantizedWeight:
    """A weight on its grid: ``weight`` holds the values ``codes * scales`` (fp32)."""

    weight: torch.Tensor  # fp32 [rows, cols]
    scales: torch.Tensor  # fp32 [rows, groups]


def rtn_quantize(weight: torch.Tensor, bits: int, group_size: int,
                 scale_dtype: torch.dtype | None = None) -> QuantizedWeight:
    """Round to nearest: min-max scales, every weight to its closest grid point.

    (Without a Hessian to weight the errors, MSE-searched scales did worse here: SmolLM2-135M
    int4 g64, perplexity ratio 1.416 against min-max's 1.362, so RTN stays the plain baseline.)
    """
    scales = symmetric_scales(weight, bits, group_size, scale_dtype)
    return QuantizedWeight(fake_quantize(weight, scales, bits, group_size), scales)
