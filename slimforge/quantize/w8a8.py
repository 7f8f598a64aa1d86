"""W8A8: 8-bit weights *and* 8-bit activations, int8 or FP8 (E4M3), and SmoothQuant's migration.

Both operands of every decoder matmul are rounded, each with a scale ``s`` that maps its
largest magnitude to the edge of the grid, ``s = max|v| / h``:

- **int8**: ``h = 127.5`` (half the span of [-128, 127]; the symmetric grid of
  :mod:`slimforge.quantize.intquant`), values ``clamp(round(v / s), -128, 127) * s``;
- **FP8 E4M3**: ``h = 448`` (E4M3's largest finite value), values ``fp8(clamp(v / s)) * s``,
  where ``fp8`` rounds to the nearest of E4M3's 3-mantissa-bit values (ties to even).

Weights take one scale per output channel (or one per tensor). Activations take one scale per
token, computed at run time from the token's own largest magnitude (*dynamic*), or one scale
per tensor fixed from calibration (*static*: inputs beyond the calibrated range clip).

These are compressed-tensors' conventions for its ``int-quantized`` and ``float-quantized``
formats, and :func:`fake_quantize` computes what its ``fake_quantize`` computes, in the same
order and dtypes, so it agrees to the bit (tested): a model this module emulates is the model
transformers reloads from the saved folder.

SmoothQuant (Xiao et al., 2023) makes activations easier to round by dividing each input
channel ``j`` by ``s_j = max|X_j|^a / max|W_j|^(1-a)`` and multiplying the weights' column
``j`` by it (folded exactly, :func:`slimforge.quantize.smoothing.fold_scales`): ``a`` is how
much of outlier channels' range moves from the activations into the weights (``a = 1`` makes
every channel's largest input the same, ``a = 0`` every weight column's largest value).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
from torch.utils.hooks import RemovableHandle

from slimforge.quantize.intquant import round_scales

INT8_LOW, INT8_HIGH = -128, 127
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max, without importing a float8 dtype at module load
# max|v| maps to h: half the grid's span, compressed-tensors' symmetric min-max scale.
HALF_RANGE = {"int8": (INT8_HIGH - INT8_LOW) / 2, "fp8": FP8_MAX}


def half_range(kind: str) -> float:
    """``h`` of the grid ``kind`` (``int8`` or ``fp8``): a scale is ``max|v| / h``."""
    try:
        return HALF_RANGE[kind]
    except KeyError:
        raise ValueError(f"W8A8 grids are {', '.join(HALF_RANGE)}, not {kind!r}") from None


def round_to_grid(scaled: torch.Tensor, kind: str) -> torch.Tensor:
    """Values already divided by their scale, clamped and rounded to the grid (same dtype as ``scaled``)."""
    if kind == "int8":
        return torch.round(scaled.clamp(INT8_LOW, INT8_HIGH))
    if kind == "fp8":
        return scaled.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).to(scaled.dtype)
    raise ValueError(f"W8A8 grids are {', '.join(HALF_RANGE)}, not {kind!r}")


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, kind: str) -> torch.Tensor:
    """``x`` on the grid of ``scale`` (broadcast against ``x``): quantize, then dequantize.

    The operations and their dtypes follow compressed-tensors' quantize-dequantize (``x / s``,
    clamp, round, back to ``x / s``'s dtype, then to the scale's dtype and times ``s``), so
    the result is bit-identical to what a reloaded folder computes.
    """
    scaled = x / scale
    return round_to_grid(scaled, kind).to(scale.dtype) * scale


def weight_scales(weight: torch.Tensor, kind: str, per_channel: bool = True,
                  scale_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Min-max weight scales: [rows, 1] per output channel, or [1, 1] for the whole tensor.

    Rounded to ``scale_dtype`` (the checkpoint's) and kept in fp32: the grid used is the stored one.
    """
    w = weight.detach().float().abs()
    amax = w.amax(dim=1, keepdim=True) if per_channel else w.amax().reshape(1, 1)
    return round_scales(amax / half_range(kind), scale_dtype)


def dynamic_token_scales(x: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-token scales [..., 1] of activations ``x`` [..., features], in ``x``'s dtype.

    An all-zero token gets the dtype's epsilon instead of a zero scale (its values stay zero).
    """
    scale = x.abs().amax(dim=-1, keepdim=True) / half_range(kind)
    return torch.where(scale == 0, torch.tensor(torch.finfo(scale.dtype).eps, dtype=scale.dtype, device=scale.device),
                       scale)


def static_scale(amax: torch.Tensor | float, kind: str, scale_dtype: torch.dtype | None = None) -> torch.Tensor:
    """One activation scale [1] for inputs whose largest calibrated magnitude was ``amax``."""
    return round_scales(torch.as_tensor(amax, dtype=torch.float32).reshape(1) / half_range(kind), scale_dtype)


def fake_quantize_activation(x: torch.Tensor, kind: str, scale: torch.Tensor | None = None) -> torch.Tensor:
    """Activations rounded as the saved model rounds them: per token (``scale`` None) or with a static ``scale``."""
    return fake_quantize(x, dynamic_token_scales(x, kind) if scale is None else scale.to(x.device), kind)


def quantize_inputs(linear: nn.Module, kind: str, scale: torch.Tensor | None = None) -> RemovableHandle:
    """Round ``linear``'s input before every forward (:func:`fake_quantize_activation`); remove the handle to stop."""

    def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        return (fake_quantize_activation(args[0], kind, scale), *args[1:])

    return linear.register_forward_pre_hook(hook)


def reader_column_max(weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """``max|W_j|`` per input channel over every reader of one tensor (their rows stacked)."""
    return torch.cat([w.detach().float().abs() for w in weights], dim=0).amax(dim=0)


def smoothquant_scales(act_max: torch.Tensor, weight_max: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's per-channel divisors ``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)``.

    A channel whose inputs or weights are all zero has nothing to migrate and keeps ``s_j = 1``.

    Args:
        act_max: largest calibrated input magnitude per channel [channels].
        weight_max: :func:`reader_column_max` of the channel's readers [channels].
        alpha: migration strength in [0, 1].
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"SmoothQuant's alpha must be in [0, 1], got {alpha}")
    a, w = act_max.float(), weight_max.float().to(act_max.device)
    live = (a > 0) & (w > 0)
    scales = a.clamp_min(1e-12).pow(alpha) / w.clamp_min(1e-12).pow(1.0 - alpha)
    return torch.where(live, scales, torch.ones_like(scales))


def smoothed_output_error(x: torch.Tensor, weights: Sequence[torch.Tensor], act_max: torch.Tensor, alpha: float,
                          kind: str, per_channel: bool = True, static: bool = False) -> float:
    """How far the readers' outputs move when their shared input is smoothed at ``alpha`` and both sides rounded.

    ``sum_r ||Q_a(X / s) Q_w(W_r * s)^T - X W_r^T||^2`` over input rows ``x`` [n, channels], with ``s``
    SmoothQuant's divisors for ``alpha``, ``Q_w`` min-max round to nearest (per output channel, or per
    tensor) and ``Q_a`` per-token (or, ``static``, one scale from the largest smoothed ``act_max``).
    """
    x = x.float()
    scales = smoothquant_scales(act_max, reader_column_max(weights), alpha).to(x.device)
    smoothed = x / scales
    act_scale = static_scale((act_max.float().to(x.device) / scales).max(), kind) if static else None
    x_q = fake_quantize_activation(smoothed, kind, act_scale)
    total = 0.0
    for weight in weights:
        w = weight.detach().float().to(x.device)
        w_s = w * scales
        w_q = fake_quantize(w_s, weight_scales(w_s, kind, per_channel), kind)
        total += float((x_q @ w_q.T - x @ w.T).pow(2).sum())
    return total


def search_alpha(x: torch.Tensor, weights: Sequence[torch.Tensor], act_max: torch.Tensor, grid: Sequence[float],
                 kind: str, per_channel: bool = True, static: bool = False) -> tuple[float, list[float]]:
    """The ``alpha`` of ``grid`` with the least :func:`smoothed_output_error`, and every grid point's error.

    Ties go to the earlier grid point.
    """
    errors = [smoothed_output_error(x, weights, act_max, a, kind, per_channel, static) for a in grid]
    best = min(range(len(grid)), key=lambda i: errors[i])
    return float(grid[best]), errors
