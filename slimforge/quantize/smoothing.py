"""Moving per-channel scales between activations and weights (AWQ, SmoothQuant): the fold.

For a :class:`slimforge.arch.ScalingGroup`, the tensor ``x`` its source writes becomes ``x / s``
and each reader's weight ``W`` becomes ``W * s`` (columns): ``(W * s)(x / s) = W x``, so the
block computes the same function in exact arithmetic. A norm source divides its weight (for
Gemma's ``offset + weight`` form the whole factor is divided); a linear source divides the
rows (and bias) that write the tensor. The arithmetic runs in fp32 and is written back in
the parameter's dtype.
"""

from __future__ import annotations

from typing import Any

import torch

from slimforge.arch import ScalingGroup


def group_readers(layer: Any, group: ScalingGroup) -> list[torch.nn.Linear]:
    """The linears that read the group's tensor."""
    return [layer.get_submodule(name) for name in group.targets]


@torch.no_grad()
def fold_scales(layer: Any, group: ScalingGroup, scales: torch.Tensor, norm_offset: float = 0.0) -> None:
    """Divide the group's tensor by ``scales`` [channels] at its source and multiply its readers' columns.

    Args:
        layer: the decoder block holding the group.
        group: which source and readers (names local to ``layer``).
        scales: positive per-channel factors.
        norm_offset: the norm's weight offset (1 for Gemma's ``(1 + w)``; see ``arch.norm_weight_offset``).
    """
    s = scales.detach().float()
    if not bool((s > 0).all()) or not bool(torch.isfinite(s).all()):
        raise ValueError("channel scales must be positive and finite")
    source = layer.get_submodule(group.source)
    if group.source_is_norm:
        w = source.weight
        w.copy_(((w.float() + norm_offset) / s.to(w.device) - norm_offset).to(w.dtype))
    else:
        start, stop = group.source_rows or (0, source.weight.shape[0])
        rows = source.weight[start:stop]
        rows.copy_((rows.float() / s.to(rows.device).unsqueeze(1)).to(rows.dtype))
        if source.bias is not None:
            bias = source.bias[start:stop]
            bias.copy_((bias.float() / s.to(bias.device)).to(bias.dtype))
    for linear in group_readers(layer, group):
        w = linear.weight
        w.copy_((w.float() * s.to(w.device).unsqueeze(0)).to(w.dtype))
