"""Schemas of the pruning methods (no heavy imports: validation runs before torch loads)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from slimforge.config import (
    FieldError,
    StageConfig,
    calibration_card_data,
    check_choice,
    check_fraction,
    check_int,
    named_settings,
)
from slimforge.prune.choices import DEPTH_CRITERIA, HEAD_MODES, PER_CHOICES, WIDTH_AXES

if TYPE_CHECKING:  # pragma: no cover
    from slimforge.prune.width_targets import WidthTargets
    from slimforge.stage import TeacherInfo


def _supported(teacher: TeacherInfo) -> None:
    """A dense family ``arch`` knows, or an MoE family ``moe`` knows (depth and unstructured pruning)."""
    from slimforge.arch import require_supported
    from slimforge.moe_layout import is_moe_config

    if not is_moe_config(teacher.config):
        require_supported(teacher.config)


@dataclass
class CalibrationConfig(StageConfig):
    """Calibration settings shared by the methods that look at activations.

    ``num_samples`` windows of ``seq_len`` tokens come from the training split
    (``data.calibration_samples``); ``batch_size`` sequences go through a block at once.
    ``offload_model`` keeps the model on the CPU and moves one decoder block at a time to
    the device, for teachers larger than the device's memory.
    """

    num_samples: int = 128
    seq_len: int = 512
    batch_size: int = 8
    offload_model: bool = False

    def check(self) -> None:
        check_int("num_samples", self.num_samples, low=1)
        check_int("seq_len", self.seq_len, low=2)
        check_int("batch_size", self.batch_size, low=1)

    def uses_data(self) -> bool:
        return True

    def card_data(self, meta: dict[str, Any], source: str) -> str | None:
        return calibration_card_data(meta, self.num_samples, self.seq_len, source) if self.uses_data() else None


def _check_sparsity(cfg: MagnitudeConfig) -> None:
    check_fraction("sparsity", cfg.sparsity, low_open=False, high_open=True)
    check_choice("per", cfg.per, PER_CHOICES)
    if (cfg.n is None) != (cfg.m is None):
        raise FieldError("n", cfg.n, f"give both n and m for N:M sparsity (got n={cfg.n}, m={cfg.m})")
    if cfg.n is not None and cfg.m is not None:
        check_int("m", cfg.m, low=2)
        if not 1 <= cfg.n < cfg.m:
            raise FieldError("n", cfg.n, f"N:M sparsity needs 1 <= N < M (got {cfg.n}:{cfg.m})")


def _sparsity_settings(cfg: MagnitudeConfig) -> list[str]:
    """The card's words for a sparsity target: ``2:4 sparsity`` or ``sparsity 0.5``, and ``per``."""
    return [f"{cfg.n}:{cfg.m} sparsity" if cfg.n else f"sparsity {cfg.sparsity}", f"per {cfg.per}"]


def _unchanged_shape(parent: TeacherInfo) -> Any:
    """Unstructured pruning zeroes weights in place: its output has its input's config."""
    return parent.config


def _preflight_nm(cfg: MagnitudeConfig, teacher: TeacherInfo) -> None:
    _supported(teacher)
    if cfg.m is None:
        return
    from slimforge.arch import linear_input_sizes

    bad = sorted({size for size in linear_input_sizes(teacher.config) if size % cfg.m})
    if bad:
        raise FieldError("m", cfg.m, f"the model's linear layers take {bad} inputs, which are not multiples of M")


@dataclass
class MagnitudeConfig(StageConfig):
    """Zero the smallest weights of every linear layer in the decoder blocks.

    ``sparsity`` is the fraction removed, per output ``row`` or per ``layer`` (matrix).
    ``n`` and ``m`` (both or neither) ask for N:M sparsity instead: ``n`` zeros in every
    ``m`` consecutive input weights (2:4, 4:8); ``sparsity`` is then ``n / m``.
    """

    kind: str = "prune"
    method: str = "magnitude"
    sparsity: float = 0.5
    per: str = "layer"
    n: int | None = None
    m: int | None = None

    def check(self) -> None:
        _check_sparsity(self)

    def preflight(self, teacher: TeacherInfo) -> None:
        _preflight_nm(self, teacher)

    def check_input(self, parent: TeacherInfo) -> None:
        _preflight_nm(self, parent)

    def planned_config(self, parent: TeacherInfo) -> Any:
        return _unchanged_shape(parent)

    def card_settings(self, meta: dict[str, Any]) -> list[str]:
        return _sparsity_settings(self)


@dataclass
class WandaConfig(CalibrationConfig):
    """Wanda: prune by |W| x input-activation norm, per output row by default (Sun et al., 2023)."""

    kind: str = "prune"
    method: str = "wanda"
    sparsity: float = 0.5
    per: str = "row"
    n: int | None = None
    m: int | None = None

    def check(self) -> None:
        super().check()
        _check_sparsity(self)  # type: ignore[arg-type]

    def preflight(self, teacher: TeacherInfo) -> None:
        _preflight_nm(self, teacher)  # type: ignore[arg-type]

    def check_input(self, parent: TeacherInfo) -> None:
        _preflight_nm(self, parent)  # type: ignore[arg-type]

    def planned_config(self, parent: TeacherInfo) -> Any:
        return _unchanged_shape(parent)

    def card_settings(self, meta: dict[str, Any]) -> list[str]:
        return _sparsity_settings(self)  # type: ignore[arg-type]


@dataclass
class SparseGPTConfig(WandaConfig):
    """SparseGPT: OBS pruning with error correction (Frantar & Alistarh, 2023).

    The mask is chosen per ``block_size`` columns as the sweep goes (``per=layer`` ranks
    across the block's rows, ``per=row`` within each row); ``percdamp`` dampens the
    Hessian by that fraction of its mean diagonal.
    """

    method: str = "sparsegpt"
    per: str = "layer"
    block_size: int = 128
    percdamp: float = 0.01

    def check(self) -> None:
        super().check()
        check_int("block_size", self.block_size, low=1)
        check_fraction("percdamp", self.percdamp, low_open=False, high_open=True)
        if self.m is not None and self.block_size % self.m:
            raise FieldError("block_size", self.block_size, f"must be a multiple of m={self.m}")


@dataclass
class DepthConfig(CalibrationConfig):
    """Remove whole decoder layers; the result is a smaller model with renumbered layers.

    ``criterion``: ``block_influence`` removes the ``num_remove`` layers whose output is
    most like their input (ShortGPT: lowest ``1 - cos(in, out)``, mean over tokens);
    ``angular`` removes the contiguous span of ``num_remove`` layers whose input and
    output are closest in angle (Gromov et al., 2024, averaged over tokens); ``list``
    removes the layers in ``layers``. Give ``num_remove`` or ``remove_ratio`` (fraction of
    layers, rounded) for the first two.
    """

    kind: str = "prune"
    method: str = "depth"
    criterion: str = "block_influence"
    num_remove: int | None = None
    remove_ratio: float | None = None
    layers: list[int] | None = None
    num_samples: int = 32
    seq_len: int = 256

    def check(self) -> None:
        super().check()
        check_choice("criterion", self.criterion, DEPTH_CRITERIA)
        if self.criterion == "list":
            if not self.layers or min(self.layers) < 0 or len(set(self.layers)) != len(self.layers):
                raise FieldError("layers", self.layers, "criterion=list needs distinct layer indices >= 0")
            return
        given = [k for k in ("num_remove", "remove_ratio") if getattr(self, k) is not None]
        if len(given) != 1:
            raise FieldError("num_remove", self.num_remove,
                             f"give exactly one of num_remove or remove_ratio (got {given or 'none'})")
        check_int("num_remove", self.num_remove, low=1)
        check_fraction("remove_ratio", self.remove_ratio)

    def count(self, total: int) -> int:
        """How many layers go, out of ``total``."""
        if self.criterion == "list":
            return len(self.layers or [])
        if self.num_remove is not None:
            return self.num_remove
        return max(1, round(total * float(self.remove_ratio or 0)))

    def preflight(self, teacher: TeacherInfo) -> None:
        _supported(teacher)
        total = int(teacher.config.num_hidden_layers)
        if self.criterion == "list" and max(self.layers or [0]) >= total:
            raise FieldError("layers", self.layers, f"layer indices must be < {total}, the model's layer count")
        if self.count(total) >= total:
            field_name = {"list": "layers"}.get(self.criterion, "num_remove" if self.num_remove else "remove_ratio")
            raise FieldError(field_name, getattr(self, field_name),
                             f"would remove {self.count(total)} of the model's {total} layers; at least one must stay")

    def check_input(self, parent: TeacherInfo) -> None:
        self.preflight(parent)

    def planned_config(self, parent: TeacherInfo) -> Any:
        """The input's config with fewer layers (which ones, the calibration decides)."""
        import copy

        config = copy.deepcopy(parent.config)
        config.num_hidden_layers = int(config.num_hidden_layers) - self.count(int(config.num_hidden_layers))
        return config

    def uses_data(self) -> bool:
        return self.criterion != "list"  # a given list needs no calibration

    def card_settings(self, meta: dict[str, Any]) -> list[str]:
        return [f"criterion {self.criterion}", *named_settings(self, ("num_remove", "remove_ratio", "layers"))]


@dataclass
class WidthConfig(CalibrationConfig):
    """Minitron-style width pruning by activation importance; the result is a smaller HF model.

    Targets, per axis, as a ratio of the parent's size or an absolute size (absolute wins):

    - MLP channels: ``mlp_ratio`` / ``intermediate_size``;
    - attention heads: ``heads_ratio`` / ``num_attention_heads``. With ``head_mode=query``
      every KV group keeps the same number of its query heads (K/V untouched); with
      ``head_mode=group`` whole KV groups go, with their query heads;
    - hidden (embedding) channels: ``hidden_ratio`` / ``hidden_size``: embeddings, every
      norm, every projection, and the (tied) LM head.

    Or a budget: ``param_ratio``, the fraction of the parent's parameters to keep; one
    common shrink factor is then found for the ``budget_axes``. Channel counts are rounded
    to multiples of ``round_to``. ``rescale_norms`` rescales each RMSNorm by the share of
    its input energy the kept channels carried (exact when the dropped channels were zero).
    """

    kind: str = "prune"
    method: str = "width"
    mlp_ratio: float | None = None
    heads_ratio: float | None = None
    hidden_ratio: float | None = None
    intermediate_size: int | None = None
    num_attention_heads: int | None = None
    hidden_size: int | None = None
    param_ratio: float | None = None
    budget_axes: list[str] = field(default_factory=lambda: list(WIDTH_AXES))
    head_mode: str = "query"
    round_to: int = 16
    rescale_norms: bool = True
    num_samples: int = 64
    seq_len: int = 256

    def check(self) -> None:
        super().check()
        check_choice("head_mode", self.head_mode, HEAD_MODES)
        check_int("round_to", self.round_to, low=1)
        for name in ("mlp_ratio", "heads_ratio", "hidden_ratio"):
            check_fraction(name, getattr(self, name), low_open=True, high_open=False)
        check_fraction("param_ratio", self.param_ratio)
        for name in ("intermediate_size", "num_attention_heads", "hidden_size"):
            check_int(name, getattr(self, name), low=1)
        for axis in self.budget_axes:
            check_choice("budget_axes", axis, WIDTH_AXES)
        targets = [self.mlp_ratio, self.heads_ratio, self.hidden_ratio, self.intermediate_size,
                   self.num_attention_heads, self.hidden_size]
        if self.param_ratio is not None and any(t is not None for t in targets):
            raise FieldError("param_ratio", self.param_ratio, "give either a parameter budget or per-axis targets, not both")
        if self.param_ratio is None and all(t is None for t in targets):
            raise FieldError("param_ratio", None, "give a target: param_ratio, or a ratio/size for mlp, heads or hidden")
        if self.param_ratio is not None and not self.budget_axes:
            raise FieldError("budget_axes", self.budget_axes, "name at least one of mlp, heads, hidden")

    def preflight(self, teacher: TeacherInfo) -> None:
        """Targets must fit the teacher's shape: whole heads per KV group, no growth."""
        from slimforge.moe_layout import refuse_moe

        refuse_moe(teacher.config, "width pruning", "depth pruning, or wanda/sparsegpt on the expert weights")
        _supported(teacher)
        self.targets(teacher.config)

    def check_input(self, parent: TeacherInfo) -> None:
        self.preflight(parent)

    def card_settings(self, meta: dict[str, Any]) -> list[str]:
        targets = named_settings(self, ("param_ratio", "mlp_ratio", "heads_ratio", "hidden_ratio",
                                        "intermediate_size", "num_attention_heads", "hidden_size"))
        return [*targets, f"head_mode {self.head_mode}"]

    def planned_config(self, parent: TeacherInfo) -> Any:
        """The pruned model's config: the targets are sizes known before calibration."""
        from slimforge.prune.width_targets import pruned_config

        return pruned_config(parent.config, self.targets(parent.config))

    def targets(self, config: Any) -> WidthTargets:
        """The pruned dimensions these settings ask of a model of ``config``.

        Raises:
            FieldError: a target larger than the model, heads that do not fit its KV groups, a
                hidden size its architecture refuses, or a budget no width reaches.
        """
        from slimforge.prune import width_targets as wt

        if self.param_ratio is not None:
            budget = wt.budget_targets(config, self.param_ratio, self.budget_axes, self.head_mode, self.round_to)
            if budget is None:
                raise FieldError("param_ratio", self.param_ratio,
                                 f"even the smallest widths of {self.budget_axes} keep more parameters; "
                                 "add axes to budget_axes or prune depth first")
            return budget
        scaled = wt.scaled_targets(config, {"mlp": self.mlp_ratio or 1.0, "hidden": self.hidden_ratio or 1.0,
                                            "heads": self.heads_ratio or 1.0}, self.head_mode, self.round_to)
        self._check_sizes_fit(config)
        inter = self.intermediate_size or scaled.intermediate_size
        hidden = self.hidden_size or scaled.hidden_size
        q_heads, kv_heads = scaled.num_attention_heads, scaled.num_key_value_heads
        if self.num_attention_heads is not None:
            q_heads = self.num_attention_heads
            kv_heads = wt.kept_kv_heads(config, q_heads, self.head_mode)
        if not wt.config_accepts(config, hidden, q_heads, kv_heads):
            raise FieldError("hidden_size", hidden,
                             f"transformers' {type(config).__name__} refuses it with {q_heads} attention heads "
                             f"(the hidden size must be a multiple of the head count); nearest that fit: "
                             f"{', '.join(str(h) for h in wt.nearest_accepted_hidden(config, hidden, q_heads, kv_heads))}")
        return wt.WidthTargets(int(inter), int(q_heads), int(kv_heads), int(hidden))

    def _check_sizes_fit(self, config: Any) -> None:
        """Absolute sizes no larger than the model's, and query heads in whole KV groups."""
        from slimforge.arch import head_dim, num_kv_heads

        for name, full in (("intermediate_size", config.intermediate_size), ("hidden_size", config.hidden_size),
                           ("num_attention_heads", config.num_attention_heads)):
            value = getattr(self, name)
            if value is not None and value > full:
                raise FieldError(name, value, f"the model has only {full}; width pruning cannot grow it")
        if self.num_attention_heads is None:
            return
        kv = num_kv_heads(config)
        per_group = int(config.num_attention_heads) // kv
        if self.head_mode == "query" and self.num_attention_heads % kv:
            raise FieldError("num_attention_heads", self.num_attention_heads,
                             f"with head_mode=query every one of the {kv} KV groups keeps the same number of "
                             f"query heads, so it must be a multiple of {kv}")
        if self.head_mode == "group" and self.num_attention_heads % per_group:
            raise FieldError("num_attention_heads", self.num_attention_heads,
                             f"with head_mode=group whole KV groups of {per_group} query heads (head_dim "
                             f"{head_dim(config)}) go, so it must be a multiple of {per_group}")
