"""Mixture-of-experts facts a config alone tells (no torch): which families, which layers are sparse.

:mod:`slimforge.moe` is the adapter that reads and edits MoE modules; this module holds the part
that schemas and preflights need before any weights load, and that :mod:`slimforge.arch`'s
``keep_layers`` needs to keep Qwen2/3-MoE's dense/sparse layout right (importing it from
``moe`` would tie the two adapters in a cycle).
"""

from __future__ import annotations

import re
from typing import Any

from slimforge.errors import ConfigError

MOE_MODEL_TYPES = ("mixtral", "phimoe", "qwen2_moe", "qwen3_moe")
# Qwen2/3-MoE decide which layers are sparse from the layer index: ``mlp_only_layers`` lists
# dense layers by index, and ``decoder_sparse_step`` makes every step-th layer sparse.
_SPARSE_LAYOUT_TYPES = ("qwen2_moe", "qwen3_moe")
# Linears of an MoE block that no method prunes or quantizes: the router (``mlp.gate``; PhiMoE's
# ``mlp.router`` IS an ``nn.Linear``) and Qwen2-MoE's ``mlp.shared_expert_gate``. They are small, and
# the routing decision is sensitive to them.
ROUTER_NAMES = ("gate", "router", "shared_expert_gate")
_EXPERT_LINEAR = re.compile(r"(?:^|.*\.)experts\.(\d+)\.(gate_proj|up_proj|down_proj)$")


def is_router_name(name: str) -> bool:
    """Whether a module name (full or local to a block) is a router or a shared-expert gate."""
    return name.rsplit(".", 1)[-1] in ROUTER_NAMES


def expert_of(name: str) -> int | None:
    """The expert index of an :class:`slimforge.moe.UnfusedExperts` linear's name (``...experts.3.up_proj`` -> 3), else None."""
    match = _EXPERT_LINEAR.fullmatch(name)
    return int(match.group(1)) if match else None


def is_moe_config(config: Any) -> bool:
    """Whether ``config`` describes one of the MoE families the adapter knows."""
    return getattr(config, "model_type", None) in MOE_MODEL_TYPES


def refuse_moe(config: Any, method: str, instead: str) -> None:
    """One line refusing ``method`` on an MoE model; nothing for a dense one.

    Raises:
        ConfigError: ``<method> does not support mixture-of-experts models (<type>) yet; use <instead>``.
    """
    if is_moe_config(config):
        raise ConfigError(f"{method} does not support mixture-of-experts models ({config.model_type}) yet; "
                          f"use {instead}")


def expert_widths(config: Any) -> dict[str, int]:
    """Input widths of an MoE config's expert and shared-expert linears beyond ``hidden_size``, by config key."""
    if not is_moe_config(config):
        return {}
    keys = ("moe_intermediate_size", "shared_expert_intermediate_size") if config.model_type.startswith("qwen") \
        else ("intermediate_size",)
    return {key: int(getattr(config, key)) for key in keys if getattr(config, key, None)}


def sparse_layers(config: Any) -> list[bool]:
    """Per layer, whether the config makes it a sparse MoE layer (the families' own rule)."""
    total = int(config.num_hidden_layers)
    if not is_moe_config(config):
        return [False] * total
    if config.model_type not in _SPARSE_LAYOUT_TYPES:
        return [True] * total
    dense = set(getattr(config, "mlp_only_layers", None) or [])
    step = int(getattr(config, "decoder_sparse_step", 1) or 1)
    has_experts = int(getattr(config, "num_experts", 1) or 0) > 0
    return [i not in dense and has_experts and (i + 1) % step == 0 for i in range(total)]


def keep_sparse_layout(config: Any, keep: list[int], before: list[bool]) -> None:
    """After keeping layers ``keep`` (old indices, in order), make the config name the same dense/sparse layers.

    ``before`` is :func:`sparse_layers` of the config before the layers went. Qwen2/3-MoE's layout is a
    function of the new indices, so it is rewritten explicitly: ``decoder_sparse_step=1`` and
    ``mlp_only_layers`` the new indices of the kept dense layers.
    """
    if getattr(config, "model_type", None) not in _SPARSE_LAYOUT_TYPES:
        return
    config.decoder_sparse_step = 1
    config.mlp_only_layers = [new for new, old in enumerate(keep) if not before[old]]


def router_aux_coef(config: Any) -> float:
    """The weight the family gives the load-balancing loss (``router_aux_loss_coef``); 0 for a dense model."""
    return float(getattr(config, "router_aux_loss_coef", 0.0) or 0.0) if is_moe_config(config) else 0.0


def expert_count(config: Any) -> int:
    """Routed experts per MoE block, read from either family's key (0 for a dense config)."""
    return int(getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None) or 0) \
        if is_moe_config(config) else 0


def inactive_parameters_from_config(config: Any) -> int:
    """Parameters a token does not use, from the config alone: ``E - top_k`` routed experts (gate, up and
    down projections, no biases, as the four families have them) in every sparse layer."""
    if not is_moe_config(config):
        return 0
    width = getattr(config, "moe_intermediate_size", None) if config.model_type in _SPARSE_LAYOUT_TYPES else None
    per_expert = 3 * int(config.hidden_size) * int(width or config.intermediate_size)
    unused = max(expert_count(config) - int(config.num_experts_per_tok), 0)
    return sum(sparse_layers(config)) * unused * per_expert
