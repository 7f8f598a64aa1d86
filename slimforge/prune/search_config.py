"""Schema of the ``search`` prune method: architecture search to a parameter budget (no heavy imports)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from slimforge.config import HASHED_WHEN_SET, FieldError, check_choice, check_fraction, check_int
from slimforge.prune.choices import EXPERT_SCORES, HEAD_MODES, WIDTH_AXES
from slimforge.prune.config import CalibrationConfig, _supported

if TYPE_CHECKING:  # pragma: no cover
    from slimforge.prune.search_grid import Shape
    from slimforge.stage import TeacherInfo

_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*$")
PARAM_UNITS = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9}
BYTE_UNITS = {"": 1, "B": 1, "K": 10**3, "KB": 10**3, "M": 10**6, "MB": 10**6, "G": 10**9, "GB": 10**9,
              "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(name: str, value: Any, units: dict[str, int]) -> int:
    """``80000000``, ``"80M"``, ``"1.5B"`` (or bytes: ``"40MB"``, ``"38MiB"``) -> an integer count.

    Raises:
        FieldError: not a positive number with one of ``units``.
    """
    match = _SIZE.match(str(value))
    unit = match.group(2).upper() if match else ""
    if match is None or unit not in units:
        raise FieldError(name, value, f"give a positive count, e.g. 80000000 or 80M (units: {', '.join(u for u in units if u)})")
    count = int(round(float(match.group(1)) * units[unit]))
    if count <= 0:
        raise FieldError(name, value, "must be positive")
    return count


def fmt_count(n: float) -> str:
    """``80123456`` -> ``"80.12M"``."""
    for unit, size in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(int(n))


@dataclass
class SearchConfig(CalibrationConfig):
    """Search depth x width shapes to a size budget; keep the one closest to its input after a short heal.

    Target: ``target_params`` (an integer, or ``80M``, ``1.2B``), or ``target_bytes`` (``40MB``,
    ``38MiB``) with ``bits`` per weight after quantization (parameters = bytes x 8 / bits, every
    weight counted at ``bits``). Candidates land within ``tolerance`` (a fraction) of it.

    The grid: each fraction of ``depth_keep`` (layers kept, rounded) times each of
    ``width_mixes`` (width axes joined by ``+``, shrunk by one common factor solved for the
    target; a mix with ``mlp`` then fine-tunes the MLP width alone); duplicates merged, at most
    ``max_candidates`` kept, evenly spread; a shape whose hidden size, MLP width or query heads keep
    less than ``min_width_ratio`` of the input's is left out (degenerate). Heads follow ``head_mode`` (as width pruning) and
    channel counts are multiples of ``round_to``.

    Each candidate is sliced from importances measured once (Block Influence, and Minitron's
    activation importance on ``num_samples`` windows of ``seq_len`` tokens), healed for
    ``heal_steps`` forward-KL steps of ``heal_batch_size`` training blocks at ``heal_lr``, and
    scored by KL to the stage's input on the last ``score_blocks`` training blocks (never healed
    on; the run's held-out split is left to the evaluation). ``heal_steps: 0`` scores the
    unhealed slices.

    On a mixture-of-experts input the grid is depth x experts instead: each depth level times
    every routed-expert count from all of them down to the router's top-k, with the widths kept
    whole (width pruning does not cut MoE blocks; ``width_mixes``, ``head_mode``, ``round_to``
    and ``min_width_ratio`` are not read). Each kept layer keeps its experts with the highest
    ``expert_score`` (``reap`` or ``frequency``, as the experts method), measured once on the input.
    Every layer must be an MoE layer.
    """

    kind: str = "prune"
    method: str = "search"
    target_params: str | None = None
    target_bytes: str | None = None
    bits: float | None = None
    tolerance: float = 0.02
    depth_keep: list[float] = field(default_factory=lambda: [1.0, 0.9, 0.8, 0.7])
    width_mixes: list[str] = field(default_factory=lambda: ["mlp+heads+hidden", "mlp+hidden", "mlp", "hidden"])
    max_candidates: int = 16
    min_width_ratio: float = 0.25
    head_mode: str = "query"
    round_to: int = 16
    rescale_norms: bool = True
    heal_steps: int = 10
    heal_batch_size: int = 4
    heal_lr: float = 5.0e-4
    score_blocks: int = 8
    num_samples: int = 64
    seq_len: int = 256
    expert_score: str = field(default="reap", metadata=HASHED_WHEN_SET)  # MoE inputs only

    def check(self) -> None:
        super().check()
        given = [k for k in ("target_params", "target_bytes") if getattr(self, k) is not None]
        if len(given) != 1:
            raise FieldError("target_params", self.target_params,
                             f"give exactly one of target_params or target_bytes (got {' and '.join(given) or 'neither'})")
        if self.target_bytes is not None and self.bits is None:
            raise FieldError("bits", self.bits, "target_bytes needs bits, the bits per weight after quantization (e.g. 4)")
        if self.target_params is not None and self.bits is not None:
            raise FieldError("bits", self.bits, "bits goes with target_bytes; with target_params leave it unset")
        if self.bits is not None and not 0 < self.bits <= 32:
            raise FieldError("bits", self.bits, "must be in (0, 32]")
        self.target_count()
        check_fraction("tolerance", self.tolerance)
        if not self.depth_keep:
            raise FieldError("depth_keep", self.depth_keep, "give at least one fraction of the layers to keep")
        for f in self.depth_keep:
            check_fraction("depth_keep", f, low_open=True, high_open=False)
        if not self.width_mixes:
            raise FieldError("width_mixes", self.width_mixes, "give at least one mix, e.g. mlp+heads+hidden")
        for mix in self.width_mixes:
            axes = [a.strip() for a in str(mix).split("+")]
            if not all(a in WIDTH_AXES for a in axes) or len(set(axes)) != len(axes):
                raise FieldError("width_mixes", mix, f"each mix joins distinct axes of {', '.join(WIDTH_AXES)} with +")
        check_int("max_candidates", self.max_candidates, low=1)
        check_fraction("min_width_ratio", self.min_width_ratio, low_open=False, high_open=True)
        check_choice("head_mode", self.head_mode, HEAD_MODES)
        check_int("round_to", self.round_to, low=1)
        check_int("heal_steps", self.heal_steps, low=0)
        check_int("heal_batch_size", self.heal_batch_size, low=1)
        check_int("score_blocks", self.score_blocks, low=1)
        if not self.heal_lr > 0:
            raise FieldError("heal_lr", self.heal_lr, "must be > 0")
        check_choice("expert_score", self.expert_score, EXPERT_SCORES)

    def target_count(self) -> float:
        """The target in parameters (from bytes: bytes x 8 / bits)."""
        if self.target_params is not None:
            return float(parse_size("target_params", self.target_params, PARAM_UNITS))
        return parse_size("target_bytes", self.target_bytes, BYTE_UNITS) * 8 / float(self.bits or 16)

    def _target_words(self) -> tuple[str, str]:
        if self.target_params is not None:
            return "target_params", str(self.target_params)
        return "target_bytes", f"{self.target_bytes}"

    def mixes(self, config: Any = None) -> list[tuple[str, ...]]:
        """The width mixes; on an MoE ``config`` the one empty mix (widths stay whole)."""
        from slimforge.moe_layout import is_moe_config
        from slimforge.prune.search_grid import parse_mix

        if config is not None and is_moe_config(config):
            return [()]
        return [parse_mix(m) for m in self.width_mixes]

    def axes(self, config: Any) -> list[Any]:
        """The axes beyond depth and width: ``experts`` on an MoE ``config``, none on a dense one.

        Raises:
            FieldError: an MoE model with dense layers among its MoE layers.
        """
        from slimforge.moe_layout import is_moe_config, sparse_layers
        from slimforge.prune.search_grid import experts_axis

        if not is_moe_config(config):
            return []
        layout = sparse_layers(config)
        if not all(layout):
            dense = [i for i, sparse in enumerate(layout) if not sparse]
            raise FieldError("method", self.method,
                             f"the search needs every layer to be an MoE layer; this {config.model_type} has dense "
                             f"layers {dense} (mlp_only_layers / decoder_sparse_step); prune its experts with the "
                             "experts method, then its depth with the depth method")
        return [experts_axis(config)]

    def shapes(self, config: Any) -> list[Shape]:
        """The candidate grid for a model of ``config``.

        Raises:
            FieldError: a target at or above the model's size, below the smallest shape the grid
                reaches, or that no grid shape lands within ``tolerance`` of.
        """
        from slimforge.prune import search_grid as search

        target = self.target_count()
        name, value = self._target_words()
        unit = f" (= {fmt_count(target)} parameters at {self.bits:g} bits)" if self.target_bytes is not None else ""
        axes, mixes = self.axes(config), self.mixes(config)
        full = search.shape_param_count(config, search.full_shape(config))
        if target >= full:
            raise FieldError(name, value, f"the target{unit} is not below the model's {full:,} ({fmt_count(full)}) "
                                          "parameters; nothing to prune")
        shallowest = min(search.depth_levels(int(config.num_hidden_layers), self.depth_keep))
        if axes:  # MoE: whole widths, fewest experts
            fewest = tuple((a.name, min(a.levels(config))) for a in axes)
            smallest = search.Shape(shallowest, search.full_targets(config), fewest)
            what = f"{shallowest} layers and {', '.join(f'{v} {k}' for k, v in fewest)} per layer"
        else:
            smallest = search.smallest_shape(config, shallowest, self.head_mode, self.round_to, self.min_width_ratio)
            what = f"{shallowest} layers and minimal widths"
        low = search.shape_param_count(config, smallest, axes)
        if target < low * (1 - self.tolerance):
            raise FieldError(name, value, f"the target{unit} is below the smallest shape this search reaches: "
                                          f"{low:,} ({fmt_count(low)}) parameters at {what}; raise the target, or add "
                                          "a smaller fraction to depth_keep" + ("" if axes else " or lower min_width_ratio"))
        shapes = search.enumerate_shapes(config, target, self.tolerance, self.depth_keep, mixes,
                                         self.head_mode, self.round_to, self.max_candidates, axes=axes,
                                         min_ratio=self.min_width_ratio)
        if not shapes:
            below, above = search.nearest_counts(config, target, self.depth_keep, mixes, self.head_mode,
                                                 self.round_to, self.min_width_ratio, axes)
            near = " and ".join(f"{c:,}" for c in (below, above) if c is not None)
            fixes = "add depth_keep levels" if axes else "lower round_to or min_width_ratio, or add depth_keep " \
                                                          "levels or width_mixes"
            raise FieldError(name, value, f"no shape of the grid lands within {self.tolerance:g} of the target{unit} "
                                          f"(nearest: {near or 'none'} parameters); raise tolerance, or {fixes}")
        return shapes

    def preflight(self, teacher: TeacherInfo) -> None:
        """The target must be reachable from the input's config (no weights loaded)."""
        _supported(teacher)
        self.shapes(teacher.config)

    def check_input(self, parent: TeacherInfo) -> None:
        self.preflight(parent)

    def check_data(self, train_blocks: int) -> None:
        if train_blocks <= self.score_blocks:
            raise FieldError("score_blocks", self.score_blocks,
                             f"the training split has only {train_blocks} blocks; the search needs more than "
                             "score_blocks (it heals on the others)")

    def card_settings(self, meta: dict[str, Any]) -> list[str]:
        name, value = self._target_words()
        out = [f"{name} {value}" + (f" at {self.bits:g} bits" if self.bits is not None else ""),
               f"tolerance {self.tolerance:g}"]
        if meta.get("candidates") is not None:
            out.append(f"{len(meta['candidates'])} candidates, {len(meta.get('pareto') or [])} on the Pareto set")
        out.append(f"heal_steps {self.heal_steps}")
        if meta.get("dims_after"):
            d = meta["dims_after"]
            out.append(f"chose {d['layers']} layers, hidden {d['hidden_size']}, mlp {d['intermediate_size']}, "
                       f"heads {d['num_attention_heads']}/{d['num_key_value_heads']}"
                       + (f", {d['experts']} experts per layer" if "experts" in d else ""))
        return out

    def card_details(self, meta: dict[str, Any]) -> list[str]:
        """The search's own section: every candidate tried, the Pareto set and the one chosen."""
        table = meta.get("candidates_table")
        if not table:
            return []
        steps = meta.get("heal_steps", self.heal_steps)
        return ["## Architecture search", "",
                f"Target {fmt_count(meta.get('target_parameters', 0))} parameters (within {self.tolerance:g}); "
                f"every candidate sliced from importances measured once, healed {steps} KD steps, and scored by "
                f"KL to the input on {meta.get('score_blocks', self.score_blocks)} training blocks it never healed on. "
                f"Pareto set (parameters vs KL): {meta.get('pareto')}; chosen: {meta.get('chosen')}.", "", *table]
