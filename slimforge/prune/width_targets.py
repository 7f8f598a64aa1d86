"""Width pruning's target sizes: from ratios or a parameter budget to the pruned model's config.

Pure config math (no weights): the schema (:meth:`slimforge.prune.config.WidthConfig.targets`)
validates a recipe's targets with it before any model loads, and later stages are checked
against :func:`pruned_config`. Inputs are assumed valid; the schema says what is wrong.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

from slimforge import arch
from slimforge.prune.choices import HEAD_MODES, WIDTH_AXES


@dataclass(frozen=True)
class WidthTargets:
    """The pruned model's dimensions."""

    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    hidden_size: int


def full_targets(config: Any) -> WidthTargets:
    """The unpruned dimensions of ``config``."""
    return WidthTargets(int(config.intermediate_size), int(config.num_attention_heads),
                        arch.num_kv_heads(config), int(config.hidden_size))


def _round_down(value: float, multiple: int, full: int) -> int:
    """``value`` rounded to a multiple of ``multiple`` (at least one multiple, at most ``full``)."""
    if value >= full:
        return full
    return min(full, max(multiple, int(round(value / multiple)) * multiple))


def config_accepts(config: Any, hidden: int, heads: int, kv_heads: int) -> bool:
    """Whether transformers' own validation accepts these widths for ``config``'s architecture.

    Some configs tie widths together regardless of ``head_dim``: transformers' LlamaConfig
    refuses a hidden size that is not a multiple of the number of attention heads.
    """
    trial = copy.deepcopy(config)
    trial.head_dim = arch.head_dim(config)
    trial.hidden_size, trial.num_attention_heads, trial.num_key_value_heads = hidden, heads, kv_heads
    validate = getattr(trial, "validate_architecture", None)
    try:
        if validate is not None:
            validate()
    except ValueError:
        return False
    return True


def nearest_accepted_hidden(config: Any, hidden: int, heads: int, kv_heads: int) -> list[int]:
    """The accepted hidden sizes nearest ``hidden``, below then above (one or both)."""
    fits = [h for h in range(int(config.hidden_size), 0, -1) if config_accepts(config, h, heads, kv_heads)]
    below = max((h for h in fits if h < hidden), default=None)
    above = min((h for h in fits if h > hidden), default=None)
    return [h for h in (below, above) if h is not None]


def _accepted_hidden(config: Any, hidden: int, heads: int, kv_heads: int, round_to: int) -> int:
    """``hidden``, or the nearest smaller width the architecture accepts (a multiple of
    ``round_to`` where one fits, else the nearest accepted width at all)."""
    full = int(config.hidden_size)
    for step in (round_to, 1):
        for candidate in range(hidden - hidden % step, 0, -step):
            if config_accepts(config, candidate, heads, kv_heads):
                return candidate
    return next((h for h in range(hidden, full) if config_accepts(config, h, heads, kv_heads)), full)


def kept_kv_heads(config: Any, query_heads: int, head_mode: str) -> int:
    """The KV heads that stay with ``query_heads`` query heads: all of them with
    ``head_mode=query`` (each group keeps some of its query heads), or the groups whose whole
    set of query heads stays with ``head_mode=group``."""
    kv = arch.num_kv_heads(config)
    if head_mode == "query":
        return kv
    if head_mode == "group":
        return query_heads // (int(config.num_attention_heads) // kv)
    raise ValueError(f"head_mode must be one of {HEAD_MODES}, got {head_mode!r}")


def _scaled_heads(config: Any, scale: float, head_mode: str) -> int:
    """Query heads after shrinking by ``scale`` (whole KV groups, or the same count per group)."""
    heads, kv = int(config.num_attention_heads), arch.num_kv_heads(config)
    per_group = heads // kv
    if head_mode == "group":
        return max(1, min(kv, round(kv * scale))) * per_group
    if head_mode == "query":
        return max(1, min(per_group, round(per_group * scale))) * kv
    raise ValueError(f"head_mode must be one of {HEAD_MODES}, got {head_mode!r}")


def scaled_targets(config: Any, scale: dict[str, float], head_mode: str, round_to: int) -> WidthTargets:
    """Each axis of ``scale`` (:data:`~slimforge.prune.config.WIDTH_AXES`) shrunk by its factor.

    Channel counts are rounded to multiples of ``round_to``; the hidden size then to the
    nearest the architecture accepts with the new head counts.
    """
    unknown = set(scale) - set(WIDTH_AXES)
    if unknown:
        raise ValueError(f"axes must be among {WIDTH_AXES}, got {sorted(unknown)}")
    inter = _round_down(config.intermediate_size * scale.get("mlp", 1.0), round_to, int(config.intermediate_size))
    hidden = _round_down(config.hidden_size * scale.get("hidden", 1.0), round_to, int(config.hidden_size))
    q_heads = _scaled_heads(config, scale.get("heads", 1.0), head_mode)
    kv_heads = kept_kv_heads(config, q_heads, head_mode)
    return WidthTargets(inter, q_heads, kv_heads, _accepted_hidden(config, hidden, q_heads, kv_heads, round_to))


def width_param_count(config: Any, targets: WidthTargets) -> int:
    """Parameters of the pruned model (tied weights once), from the parameter shapes."""
    shapes = _param_shapes(config)
    sizes = _axis_sizes(config, targets)
    total = 0
    for name, shape in shapes.items():
        _, axes = arch.param_axes(name, config.model_type)
        total += math.prod(sizes[axes[d]] if d in axes else n for d, n in enumerate(shape))
    return total


# config JSON -> parameter shapes: a parameter budget's search asks ~30 times for the same config,
# and building even a meta-device model costs ~0.4 s (SmolLM2-135M: 13 s a search without this).
_SHAPES: dict[str, dict[str, tuple[int, ...]]] = {}


def _param_shapes(config: Any) -> dict[str, tuple[int, ...]]:
    """Shapes of a model of ``config``, built on the meta device (no memory, no init)."""
    import torch
    from transformers import AutoModelForCausalLM

    key = config.to_json_string(use_diff=False)
    if key not in _SHAPES:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(copy.deepcopy(config))
        if len(_SHAPES) >= 8:
            _SHAPES.clear()
        _SHAPES[key] = {name: tuple(p.shape) for name, p in model.named_parameters()}  # tied weights once
    return _SHAPES[key]


def _axis_sizes(config: Any, t: WidthTargets) -> dict[str, int]:
    hd = arch.head_dim(config)
    return {"hidden": t.hidden_size, "q": t.num_attention_heads * hd, "kv": t.num_key_value_heads * hd,
            "qkv": (t.num_attention_heads + 2 * t.num_key_value_heads) * hd,
            "mlp": t.intermediate_size, "mlp2": 2 * t.intermediate_size}


def budget_targets(config: Any, param_ratio: float, axes: list[str], head_mode: str,
                   round_to: int) -> WidthTargets | None:
    """The largest common shrink of ``axes`` whose model keeps at most ``param_ratio`` of the
    parameters (bisection on exact counts), or None when even the smallest widths keep more."""
    budget = param_ratio * width_param_count(config, full_targets(config))
    low, high = 0.0, 1.0
    best = scaled_targets(config, {a: 1e-9 for a in axes}, head_mode, round_to)
    if width_param_count(config, best) > budget:
        return None
    for _ in range(30):
        mid = (low + high) / 2
        t = scaled_targets(config, {a: mid for a in axes}, head_mode, round_to)
        if width_param_count(config, t) <= budget:
            low, best = mid, t
        else:
            high = mid
    return best


def pruned_config(config: Any, targets: WidthTargets) -> Any:
    """The config of ``config``'s model pruned to ``targets`` (head_dim stays, stated explicitly)."""
    new_config = copy.deepcopy(config)
    new_config.head_dim = arch.head_dim(config)
    new_config.hidden_size = targets.hidden_size
    new_config.intermediate_size = targets.intermediate_size
    new_config.num_attention_heads = targets.num_attention_heads
    new_config.num_key_value_heads = targets.num_key_value_heads
    return new_config
