"""The candidate grid of the architecture search: shapes, their exact parameter counts, and the grid.

Pure config math (no weights), like :mod:`slimforge.prune.width_targets`: the schema
(:meth:`slimforge.prune.search_config.SearchConfig.shapes`) builds the grid before any model loads,
so an unreachable target fails in one line. How the grid is built: :mod:`slimforge.prune.search`.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from slimforge import arch, moe_layout
from slimforge.prune.width_targets import (
    WidthTargets,
    _axis_sizes,
    _param_shapes,
    full_targets,
    scaled_targets,
)

# --- shapes and their sizes ------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """A candidate architecture: decoder layers kept and the width targets.

    ``extra`` holds further axes as ``(name, size)`` pairs (the extension point for an
    ``experts`` axis on MoE models); the dense search leaves it empty.
    """

    layers: int
    width: WidthTargets
    extra: tuple[tuple[str, int], ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {"layers": self.layers, **dataclasses.asdict(self.width), **dict(self.extra)}

    def describe(self) -> str:
        w = self.width
        extra = "".join(f" {k} {v}" for k, v in self.extra)
        return (f"{self.layers} layers, hidden {w.hidden_size}, mlp {w.intermediate_size}, "
                f"heads {w.num_attention_heads}/{w.num_key_value_heads}{extra}")


@dataclass(frozen=True)
class ExtraAxis:
    """A further search axis beyond depth and width: the extension point for MoE models' ``experts``.

    Attributes:
        name: the axis, as a :class:`Shape`'s ``extra`` names it.
        levels: a config -> the sizes to try (the grid multiplies depth levels by them).
        count: (config, shape) -> the change the shape's size on this axis makes to the dense count
            of :func:`shape_param_count` (negative: parameters it removes).
    """

    name: str
    levels: Callable[[Any], Sequence[int]]
    count: Callable[[Any, Shape], int]


_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def shape_param_count(config: Any, shape: Shape, axes: Sequence[ExtraAxis] = ()) -> int:
    """Parameters of ``config``'s model cut to ``shape`` (tied weights once), from the parameter shapes.

    Decoder layers are alike in size, so the count is that of the first ``shape.layers`` of them.
    ``axes`` count the shape's extra axes. At full width every tensor keeps its size, so tensors
    width pruning does not know (an MoE block's router and fused experts) are counted as they are.
    """
    shapes = _param_shapes(config)
    whole = shape.width == full_targets(config)
    sizes = _axis_sizes(config, shape.width)
    total = 0
    for name, dims in shapes.items():
        if whole:
            match = _LAYER.search(name)
            layer, dim_axes = (int(match.group(1)) if match else None), {}
        else:
            layer, dim_axes = arch.param_axes(name, config.model_type)
        if layer is not None and layer >= shape.layers:
            continue
        total += math.prod(sizes[dim_axes[d]] if d in dim_axes else n for d, n in enumerate(dims))
    by_name = {a.name: a for a in axes}
    for name, _ in shape.extra:
        total += by_name[name].count(config, shape)
    return total


# --- the experts axis (mixture-of-experts inputs) ----------------------------------------------


@functools.lru_cache(maxsize=8)
def _expert_layer_params(config_json: str) -> int:
    """Parameters one routed expert adds to one MoE layer (its gate, up and down, and its router row),
    measured exactly: a one-layer model of the config with one expert fewer, on the meta device."""
    import json

    from transformers import AutoConfig

    data = json.loads(config_json)
    config = AutoConfig.for_model(**data)
    config.num_hidden_layers = 1
    key = "num_local_experts" if getattr(config, "num_local_experts", None) else "num_experts"
    total = moe_layout.expert_count(config)
    counts = []
    for experts in (total, total - 1):
        setattr(config, key, experts)
        counts.append(sum(math.prod(d) for d in _param_shapes(config).values()))
    return counts[0] - counts[1]


def expert_layer_params(config: Any) -> int:
    """Parameters one routed expert holds in one MoE layer of ``config``, router row included."""
    return _expert_layer_params(config.to_json_string(use_diff=False))


def experts_axis(config: Any) -> ExtraAxis:
    """The search's ``experts`` axis on an MoE input: routed experts kept per layer, from all of them down to
    the router's top-k (fewer would leave a token routed to experts that are gone).

    Every layer must be sparse (the dense count treats layers as alike); the caller checks
    :func:`slimforge.moe_layout.sparse_layers` first.
    """
    total, k = moe_layout.expert_count(config), int(config.num_experts_per_tok)

    def count(c: Any, shape: Shape) -> int:
        return -(total - dict(shape.extra)["experts"]) * expert_layer_params(c) * shape.layers

    return ExtraAxis("experts", lambda c: list(range(total, max(k, 1) - 1, -1)), count)


def full_shape(config: Any) -> Shape:
    return Shape(int(config.num_hidden_layers), full_targets(config))


def depth_levels(total: int, depth_keep: Sequence[float]) -> list[int]:
    """Layer counts for the fractions ``depth_keep`` of ``total`` (rounded, at least one), deepest first."""
    return sorted({max(1, min(total, round(total * f))) for f in depth_keep}, reverse=True)


def parse_mix(mix: str) -> tuple[str, ...]:
    """``"mlp+heads"`` -> ``("mlp", "heads")``."""
    return tuple(a.strip() for a in mix.split("+") if a.strip())


def smallest_shape(config: Any, layers: int, head_mode: str, round_to: int, min_ratio: float = 0.0) -> Shape:
    """The smallest legal shape with ``layers`` layers: every width axis at its minimum (``min_ratio`` of it)."""
    scale = max(min_ratio, 1e-9)
    return Shape(layers, scaled_targets(config, {"mlp": scale, "heads": scale, "hidden": scale}, head_mode, round_to))


def keeps_enough(config: Any, shape: Shape, min_ratio: float) -> bool:
    """Whether every width axis of ``shape`` keeps at least ``min_ratio`` of ``config``'s (a degenerate
    shape, such as an MLP of a few channels beside full attention, is not worth scoring)."""
    w, full = shape.width, full_targets(config)
    return all(new >= min_ratio * old - 1e-9 for new, old in (
        (w.hidden_size, full.hidden_size), (w.intermediate_size, full.intermediate_size),
        (w.num_attention_heads, full.num_attention_heads)))


def _refine_mlp(config: Any, shape: Shape, target: float, round_to: int, axes: Sequence[ExtraAxis] = ()) -> Shape:
    """``shape`` with the MLP width re-solved alone to land nearest ``target`` (the count is linear in it)."""
    full = int(config.intermediate_size)
    step = min(round_to, full)

    def with_mlp(size: int) -> Shape:
        return dataclasses.replace(shape, width=dataclasses.replace(shape.width, intermediate_size=size))

    def count(s: Shape) -> int:
        return shape_param_count(config, s, axes)

    low, high = count(with_mlp(step)), count(with_mlp(2 * step)) if 2 * step <= full else None
    if high is None or high == low:
        return shape
    per_unit = (high - low) / step
    ideal = step + (target - low) / per_unit
    best = shape
    for size in {math.floor(ideal / step) * step, math.ceil(ideal / step) * step}:
        size = min(full, max(step, size))
        trial = with_mlp(size)
        if abs(count(trial) - target) < abs(count(best) - target):
            best = trial
    return best


def solve_shape(config: Any, layers: int, mix: Sequence[str], target: float, head_mode: str,
                round_to: int, extra: tuple[tuple[str, int], ...] = (), axes: Sequence[ExtraAxis] = ()) -> Shape:
    """The shape with ``layers`` layers whose ``mix`` axes, shrunk by one common factor, land nearest ``target``.

    Bisection on the factor for the largest count at most ``target`` and the smallest above it; the
    nearer wins. A mix holding ``mlp`` then re-solves the MLP width alone (:func:`_refine_mlp`).
    """
    def at(scale: float) -> Shape:
        return Shape(layers, scaled_targets(config, {a: scale for a in mix}, head_mode, round_to), extra)

    if not mix:  # no width axis: the widths stay whole (the MoE search, depth x experts)
        return Shape(layers, full_targets(config), extra)

    def count(s: Shape) -> int:
        return shape_param_count(config, s, axes)

    below, above = at(1e-9), at(1.0)
    if count(above) <= target:
        best = above
    elif count(below) > target:
        best = below
    else:
        low, high = 0.0, 1.0
        for _ in range(24):
            mid = (low + high) / 2
            trial = at(mid)
            if count(trial) <= target:
                low, below = mid, trial
            else:
                high, above = mid, trial
        best = min((below, above), key=lambda s: abs(count(s) - target))
    if "mlp" in mix:
        best = _refine_mlp(config, best, target, round_to, axes)
    return best


def enumerate_shapes(config: Any, target: float, tolerance: float, depth_keep: Sequence[float],
                     mixes: Sequence[Sequence[str]], head_mode: str, round_to: int,
                     max_candidates: int | None = None, axes: Sequence[ExtraAxis] = (),
                     min_ratio: float = 0.0) -> list[Shape]:
    """The candidate grid: depth levels x extra axes' levels x width mixes, each solved for ``target``,
    kept within ``tolerance`` and when every width axis keeps at least ``min_ratio`` (:func:`keeps_enough`).

    Returns distinct shapes in grid order (deepest first, then the extra levels, then the mixes in
    order); with more than ``max_candidates``, an evenly spaced subset of them.
    """
    out: list[Shape] = []
    extras = [tuple(zip([a.name for a in axes], sizes)) for sizes in itertools.product(*(a.levels(config) for a in axes))]
    for layers in depth_levels(int(config.num_hidden_layers), depth_keep):
        for extra in extras:
            for mix in mixes:
                shape = solve_shape(config, layers, mix, target, head_mode, round_to, extra, axes)
                if abs(shape_param_count(config, shape, axes) - target) <= tolerance * target and shape not in out \
                        and keeps_enough(config, shape, min_ratio):
                    out.append(shape)
    return spread(out, max_candidates)


def spread(items: list[Any], limit: int | None) -> list[Any]:
    """At most ``limit`` of ``items``, evenly spaced (first and last kept)."""
    if limit is None or len(items) <= limit:
        return items
    if limit == 1:
        return items[:1]
    step = (len(items) - 1) / (limit - 1)
    return [items[round(i * step)] for i in range(limit)]


def nearest_counts(config: Any, target: float, depth_keep: Sequence[float], mixes: Sequence[Sequence[str]],
                   head_mode: str, round_to: int, min_ratio: float = 0.0,
                   axes: Sequence[ExtraAxis] = ()) -> tuple[int | None, int | None]:
    """The grid's solved counts nearest ``target`` from below and from above (for an error message)."""
    extras = [tuple(zip([a.name for a in axes], sizes)) for sizes in itertools.product(*(a.levels(config) for a in axes))]
    shapes = [solve_shape(config, d, mix, target, head_mode, round_to, extra, axes)
              for d in depth_levels(int(config.num_hidden_layers), depth_keep) for extra in extras for mix in mixes]
    counts = [shape_param_count(config, s, axes) for s in shapes if keeps_enough(config, s, min_ratio)]
    below = max((c for c in counts if c <= target), default=None)
    above = min((c for c in counts if c > target), default=None)
    return below, above
