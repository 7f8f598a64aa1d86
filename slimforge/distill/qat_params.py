"""What a quantization-aware distillation trains, and at which learning rates.

Kept apart from :mod:`slimforge.distill.qat` (the stage) so the schema's hooks
(:meth:`~slimforge.distill.config.QatConfig.set_trainable`, ``param_groups``) can use it without
importing the stage, which imports the schema.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from slimforge.quantize.fakequant import FakeQuantLinear, straight_through


def fake_quant_linears(model: nn.Module) -> dict[str, FakeQuantLinear]:
    """The model's fake-quantized layers, by full module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, FakeQuantLinear)}


class StorageRounding(nn.Module):
    """A parametrization: the tensor rounded to its storage dtype, straight-through for the gradient."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return straight_through(x, x.detach().to(self.dtype).to(x.dtype))


def qat_parameters(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """What a QAT stage can train, by :data:`~slimforge.distill.config.QAT_TRAINABLE` name.

    ``weights`` and ``scales`` are the fake-quantized layers' latent weights and scales; ``norms``
    the gains of the norms :func:`slimforge.distill.qat.round_norms_to_storage` keeps on their storage grid.
    """
    layers = list(fake_quant_linears(model).values())
    norms = [m.parametrizations.weight.original for m in model.modules()
             if isinstance(getattr(m, "parametrizations", None), nn.ModuleDict) and "weight" in m.parametrizations
             and any(isinstance(p, StorageRounding) for p in m.parametrizations.weight)]
    return {"weights": [m.weight for m in layers], "scales": [m.weight_scale for m in layers], "norms": norms}


def relative_param_groups(model: nn.Module, lr: float, scale_lr: float) -> list[dict[str, Any]]:
    """The optimizer's groups for QAT: one per trained tensor, its learning rate relative to its size.

    A fake-quantized layer's latent weight trains at ``lr`` times the layer's mean scale (its
    grid step), its scales at ``scale_lr`` times the same, without weight decay; a norm's gain at
    ``lr`` times its mean magnitude (the offset included: Gemma's norms multiply by ``1 + w``).
    Anything else trainable (hidden-state projections) forms one group at ``lr`` as given.
    """
    from slimforge.arch import norm_weight_offset

    groups: list[dict[str, Any]] = []
    for layer in fake_quant_linears(model).values():
        step = float(layer.weight_scale.detach().abs().mean())
        if layer.weight.requires_grad:
            groups.append({"params": [layer.weight], "lr": lr * step})
        if layer.weight_scale.requires_grad:
            groups.append({"params": [layer.weight_scale], "lr": scale_lr * step, "weight_decay": 0.0})
    config = getattr(model, "config", None) or getattr(getattr(model, "student", None), "config", None)
    offset = norm_weight_offset(config) if config is not None else 0.0
    for gain in qat_parameters(model)["norms"]:
        if gain.requires_grad:
            groups.append({"params": [gain], "lr": lr * float((gain.detach() + offset).abs().mean()),
                           "weight_decay": 0.0})
    grouped = {id(p) for g in groups for p in g["params"]}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in grouped]
    return groups + ([{"params": rest}] if rest else [])
