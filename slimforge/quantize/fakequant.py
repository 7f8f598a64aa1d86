"""Fake quantization for quantization-aware training: :mod:`~slimforge.quantize.intquant`'s grid, made trainable.

A fake-quantized weight is the weight the integer grid stands for, computed in the forward
pass from a latent fp32 weight ``w`` and a latent per-group scale ``s``:

    s_r   = s rounded to its storage dtype (bf16 by default), as the checkpoint will hold it
    w_hat = s_r * clamp(round(w / s_r), q_min, q_max)

which is exactly :func:`~slimforge.quantize.intquant.fake_quantize` with ``s_r``: the export
(:func:`export_weight`) writes the codes ``clamp(round(w / s_r))`` and the scales ``s_r``, so
the saved model computes what training computed, bit for bit.

The backward pass is LSQ's (Esser et al. 2020, "Learned Step Size Quantization"), with the
clip taken before the rounding as in the paper (the forward value is the same either way):

- weight: straight through the rounding, stopped where the clamp bites:
  ``dL/dw = dL/dw_hat * [q_min <= w/s_r <= q_max]``;
- scale: ``dw_hat/ds = round(w/s_r) - w/s_r`` inside the range, ``q_min`` or ``q_max`` where
  clamped, summed over the group and multiplied by LSQ's gradient scale
  ``1 / sqrt(group_numel * q_max)``, which keeps the scale's step comparable to the weights';
- the rounding of the scale to its storage dtype: straight through.

Started from a GPTQ layer, every latent weight sits on its grid point, where ``round(v) - v``
is zero: LSQ's scales learn only once the weights have moved. With the codes frozen instead
(:func:`scaled_codes`, :meth:`FakeQuantLinear.freeze_codes`), the quantizer is ``s_r * q`` and
the scale's gradient is its exact one, ``q`` (EfficientQAT's end-to-end step-size training):
the cheap option, since flipping a code takes many small steps.

:class:`LsqFakeQuantize` is LSQ as one autograd function (it keeps the int8 codes for the
backward pass instead of the autograd graph of five element-wise ops);
:func:`fake_quantize_reference` is the same thing as a plain differentiable expression, the
reference the tests hold it to on values and gradients.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from slimforge.quantize.intquant import (
    QuantizedWeight,
    _group_view,
    code_range,
    dequantize_codes,
    fake_quantize,
    groups_of,
    quantize_codes,
    round_scales,
)


def lsq_gradient_scale(group_numel: int, bits: int) -> float:
    """LSQ's factor on the scale's gradient: ``1 / sqrt(weights per scale * q_max)``."""
    return 1.0 / math.sqrt(group_numel * code_range(bits)[1])


def stored_scales(scales: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """The scales a checkpoint holds for latent ``scales``: positive, rounded to ``dtype`` (kept in fp32).

    A latent scale pushed to zero or below by training becomes the smallest positive value
    instead of flipping the grid's sign.
    """
    dtype = dtype or torch.float32
    return round_scales(scales.float().clamp_min(torch.finfo(dtype).tiny), dtype)


def _expand(scales: torch.Tensor) -> torch.Tensor:
    return scales.unsqueeze(-1)


class LsqFakeQuantize(torch.autograd.Function):
    """``w_hat`` from the latent weight and scales, with LSQ's straight-through gradients (module docstring)."""

    @staticmethod
    def forward(ctx: Any, weight: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int,
                scale_dtype: torch.dtype | None, grad_factor: float) -> torch.Tensor:
        low, high = code_range(bits)
        s_r = stored_scales(scales, scale_dtype)
        codes = _group_view(weight.float(), group_size) / _expand(s_r)
        codes.round_().clamp_(low, high)  # in place: a weight-sized tensor less per layer and step
        ctx.save_for_backward(weight, s_r, codes.to(torch.int8))
        ctx.grid = (low, high, group_size, grad_factor)
        return codes.mul_(_expand(s_r)).reshape(weight.shape).to(weight.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        weight, s_r, codes = ctx.saved_tensors
        low, high, group_size, grad_factor = ctx.grid
        ratio = _group_view(weight.float(), group_size) / _expand(s_r)
        grouped_grad = _group_view(grad.float(), group_size)
        passed = torch.where((ratio >= low) & (ratio <= high), grouped_grad, 0.0)  # straight through, not clamped
        # d(w_hat)/ds = q - w/s inside the range and q (the bound) where clamped, so the scale's
        # gradient is sum(g * q) - sum(g_inside * w/s); two dot products, no float mask.
        grad_scales = torch.linalg.vecdot(grouped_grad, codes.float()) - torch.linalg.vecdot(passed, ratio)
        return passed.reshape(weight.shape).to(weight.dtype), (grad_scales * grad_factor).to(s_r.dtype), \
            None, None, None, None


def fake_quantize_lsq(weight: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int,
                      scale_dtype: torch.dtype | None = torch.bfloat16) -> torch.Tensor:
    """The fake-quantized ``weight`` [rows, cols] on the grid of ``scales`` [rows, groups], trainable in both."""
    numel = weight.shape[1] // groups_of(weight.shape[1], group_size)
    return LsqFakeQuantize.apply(weight, scales, bits, group_size, scale_dtype, lsq_gradient_scale(numel, bits))


class _StraightThrough(torch.autograd.Function):
    """``rounded`` forward, identity backward: the straight-through estimator of a rounding of ``x``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, rounded: torch.Tensor) -> torch.Tensor:
        return rounded.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def straight_through(x: torch.Tensor, rounded: torch.Tensor) -> torch.Tensor:
    """``rounded`` (a rounding of ``x``) in the forward pass, the gradient passed to ``x`` unchanged."""
    return _StraightThrough.apply(x, rounded)


class _GradScale(torch.autograd.Function):
    """Identity forward, gradient times ``factor`` backward (LSQ's gradient scale)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.factor, None


def fake_quantize_reference(weight: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int,
                            scale_dtype: torch.dtype | None = torch.bfloat16) -> torch.Tensor:
    """:func:`fake_quantize_lsq` written as the textbook expression, for autograd to differentiate.

    ``grad_scale(s)`` then straight-through rounding to the storage dtype, then
    ``s_r * round_ste(clamp(w / s_r, q_min, q_max))``: slower and hungrier (autograd keeps every
    intermediate), and the reference the tests hold the autograd function to.
    """
    low, high = code_range(bits)
    numel = weight.shape[1] // groups_of(weight.shape[1], group_size)
    scaled = _GradScale.apply(scales.float(), lsq_gradient_scale(numel, bits))
    s_r = straight_through(scaled, stored_scales(scaled.detach(), scale_dtype))
    clipped = torch.clamp(_group_view(weight.float(), group_size) / _expand(s_r), low, high)
    codes = straight_through(clipped, torch.round(clipped.detach()))
    return (codes * _expand(s_r)).reshape(weight.shape)


def scaled_codes(codes: torch.Tensor, scales: torch.Tensor, group_size: int,
                 scale_dtype: torch.dtype | None = torch.bfloat16) -> torch.Tensor:
    """Fixed integer ``codes`` [rows, cols] times the stored ``scales``, trainable in the scales.

    With the codes fixed the quantizer is ``s_r * q``, whose exact gradient is ``q``: a group's
    scale learns from ``sum(g * q)`` (EfficientQAT's end-to-end step-size training). The
    rounding of the scales to their storage dtype is straight-through, as in :func:`fake_quantize_lsq`.
    """
    s_r = straight_through(scales, stored_scales(scales.detach(), scale_dtype))
    return (_group_view(codes.float(), group_size) * _expand(s_r)).reshape(codes.shape)


def export_weight(weight: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int,
                  scale_dtype: torch.dtype | None) -> QuantizedWeight:
    """What a checkpoint stores for a fake-quantized layer: the weight on its grid and the stored scales.

    The same numbers :func:`fake_quantize_lsq` computes (tested to the bit), through
    :mod:`~slimforge.quantize.intquant`'s own quantizer, whose codes compressed-tensors packs.
    """
    s_r = stored_scales(scales.detach(), scale_dtype)
    return QuantizedWeight(fake_quantize(weight.detach().float(), s_r, bits, group_size), s_r)


class FakeQuantLinear(nn.Linear):
    """An ``nn.Linear`` whose forward multiplies by its fake-quantized weight.

    ``weight`` is the latent fp32 weight, ``weight_scale`` [out_features, groups] the latent
    scales; both are parameters, trained through :func:`fake_quantize_lsq`. After
    :meth:`freeze_codes` the codes are a fixed int8 buffer and the layer computes
    :func:`scaled_codes` instead: only its scales (and bias) can change it. The bias is used as it is.
    """

    codes: torch.Tensor | None

    def __init__(self, in_features: int, out_features: int, bias: bool, bits: int, group_size: int,
                 scale_dtype: torch.dtype | None, device: Any = None) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=torch.float32)
        self.bits, self.group_size, self.scale_dtype = bits, group_size, scale_dtype
        groups = groups_of(in_features, group_size)
        self.weight_scale = nn.Parameter(torch.ones(out_features, groups, device=device))
        self.register_buffer("codes", None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, scales: torch.Tensor, bits: int, group_size: int,
                    scale_dtype: torch.dtype | None) -> FakeQuantLinear:
        """A fake-quantized copy of ``linear`` (its weight as the latent weight) with initial ``scales``."""
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, bits, group_size,
                     scale_dtype, device=linear.weight.device)
        with torch.no_grad():
            module.weight.copy_(linear.weight.float())
            module.weight_scale.copy_(scales.reshape(module.weight_scale.shape).float())
            if linear.bias is not None:
                module.bias.data = linear.bias.data.clone()
        return module

    def freeze_codes(self) -> None:
        """Fix the integer codes at the ones the layer computes now; the latent weight stops training."""
        with torch.no_grad():
            s_r = stored_scales(self.weight_scale, self.scale_dtype)
            self.codes = quantize_codes(self.weight, s_r, self.bits, self.group_size)
        self.weight.requires_grad_(False)

    def quantized_weight(self) -> torch.Tensor:
        if self.codes is not None:
            return scaled_codes(self.codes, self.weight_scale, self.group_size, self.scale_dtype)
        return fake_quantize_lsq(self.weight, self.weight_scale, self.bits, self.group_size, self.scale_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.quantized_weight(), self.bias)

    def exported(self) -> QuantizedWeight:
        """The weight on its grid and the stored scales: what the forward pass multiplies by."""
        if self.codes is None:
            return export_weight(self.weight, self.weight_scale, self.bits, self.group_size, self.scale_dtype)
        s_r = stored_scales(self.weight_scale.detach(), self.scale_dtype)
        return QuantizedWeight(dequantize_codes(self.codes, s_r, self.group_size), s_r)

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` holding :meth:`exported`'s weight (fp32) and this layer's bias."""
        plain = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                          device=self.weight.device, dtype=torch.float32)
        with torch.no_grad():
            plain.weight.copy_(self.exported().weight)
            if self.bias is not None:
                plain.bias.data = self.bias.data.clone()
        return plain

    def extra_repr(self) -> str:
        groups = "per channel" if self.group_size <= 0 else f"g{self.group_size}"
        return f"{super().extra_repr()}, int{self.bits} {groups}{', codes frozen' if self.codes is not None else ''}"
