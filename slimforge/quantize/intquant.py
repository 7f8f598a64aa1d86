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
    """Round to nearest: min-max scales, every weight to its closest grid point."""
    scales = symmetric_scales(weight, bits, group_size, scale_dtype)
    return QuantizedWeight(fake_quantize(weight, scales, bits, group_size), scales)
