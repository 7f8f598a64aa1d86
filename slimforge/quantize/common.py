"""What every quantization stage does before and around its method: check the input, pick dtypes, find the layers."""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn as nn

from slimforge.arch import decoder_layers
from slimforge.errors import ConfigError
from slimforge.moe_layout import is_router_name
from slimforge.quantize.config import (
    QuantizeConfig,
    dividing_group_sizes_hint,
    require_full_precision,
)

log = logging.getLogger(__name__)



def parent_config(ref: Any) -> Any:
    """The input model's config, read without loading weights (through ``models.load_config``)."""
    return ref.load_config()


def check_parent(ref: Any, cfg: QuantizeConfig) -> Any:
    """Refuse an input this method cannot take, before any weights load; returns its config.

    Raises:
        ConfigError: the input is a GGUF file or a quantized folder (one line, what to do).
    """
    if ref.gguf_file or str(ref.path).endswith(".gguf"):
        raise ConfigError(
            f"quantize method {cfg.method} needs full-precision weights, but its input {ref.label} is a GGUF "
            "file (already quantized); quantize the full-precision model it was exported from instead"
        )
    config = parent_config(ref)
    require_full_precision(config, cfg.method, f"its input {ref.label}")
    return config


def storage_dtype(name: str, config: Any) -> torch.dtype:
    """The dtype for unquantized tensors and scales; ``auto`` keeps the input's own dtype."""
    if name != "auto":
        return getattr(torch, name)
    own = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32"
    return own if isinstance(own, torch.dtype) else getattr(torch, str(own).replace("torch.", ""))


def quantizable_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The decoder blocks' linear layers (full names), without MoE routers; lm_head and embeddings stay."""
    names = {id(m): n for n, m in model.named_modules()}
    out = {}
    for block in decoder_layers(model):
        for local, module in block.named_modules():
            if isinstance(module, nn.Linear) and not is_router_name(local):  # routers stay in full precision
                out[names[id(module)]] = module
    return out


def unquantized_linears(model: nn.Module, quantized: dict[str, nn.Linear]) -> list[str]:
    """Names of the model's linear layers a method leaves in full precision (lm_head, routers)."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and name not in quantized]


def check_group_widths(linears: dict[str, nn.Linear], group_size: int) -> None:
    """Every quantized layer's input width must be a multiple of the group size.

    The config's widths were checked before the weights loaded; this catches any layer whose
    width those config fields do not give, still before any calibration.
    """
    if group_size <= 0:
        return
    widths = sorted({m.in_features for m in linears.values()})
    bad = [w for w in widths if w % group_size]
    if bad:
        raise ConfigError(
            f"group_size={group_size} does not divide the input width of some linear layers "
            f"({', '.join(map(str, bad))}); pick a group size that divides them "
            f"({dividing_group_sizes_hint(widths)}) or -1 (per channel)"
        )


def quiet_bitsandbytes() -> None:
    """bitsandbytes logs a warning per int8 matmul on CPU; keep only errors."""
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
