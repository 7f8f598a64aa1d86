"""Structured pruning: whole layers (depth) and channels/heads (width), giving smaller HF models.

Depth: score every decoder block on calibration data, block by block
(:func:`slimforge.prune.calibrate.layerwise`), and remove the least useful ones with
:func:`slimforge.arch.keep_layers`.

- Block Influence (ShortGPT, Men et al. 2024): ``1 - cos(x_in, x_out)`` of a block, mean over tokens;
- angular distance (Gromov et al. 2024): ``arccos(cos(x_l, x_{l+n})) / pi`` between the
  input of block ``l`` and the output of block ``l+n-1``, mean over tokens; the span of
  ``n`` blocks with the smallest distance goes. (Needs the inputs of the last ``n`` blocks.)

Width (Minitron, Muralidharan et al. 2024): importance from activations, aggregated over a
sequence by the mean and over samples by the L2 norm, measured where each unit writes into
the residual stream, so a unit with large activations but a near-zero output weight is not
kept:

- MLP channel ``i``: ``|a_i| * ||W_down[:, i]||``;
- attention head ``h``: ``||W_o[:, h] o_h||`` (its share of the output projection); GQA
  either keeps the same number of query heads in each KV group or drops whole groups;
- hidden channel ``c``: ``|RMSNorm(x)_c|`` over every hidden-size norm.

The kept channels are sliced out of every parameter following the rules of
:func:`slimforge.arch.param_axes` and loaded into a model built from the smaller config, so
the result is exactly what ``AutoModelForCausalLM.from_pretrained`` will rebuild.
"""

from __future__ import annotations

import collections
import copy
import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from slimforge import arch
from slimforge.config import FieldError
from slimforge.models import count_parameters
from slimforge.prune.calibrate import layerwise

log = logging.getLogger(__name__)


# --- depth -----------------------------------------------------------------------------------


def _cosine(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-token cosine similarity of two [..., hidden] tensors, in fp32."""
    return torch.nn.functional.cosine_similarity(x.float(), y.float(), dim=-1, eps=1e-8)


def block_influence(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-token ``1 - cos(x, y)``: how much a block changes its input (ShortGPT)."""
    return 1 - _cosine(x, y)


def angular_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-token ``arccos(cos(x, y)) / pi`` in [0, 1] (Gromov et al.)."""
    return torch.arccos(_cosine(x, y).clamp(-1, 1)) / math.pi


def depth_scores(model: nn.Module, input_ids: torch.Tensor, criterion: str, span: int = 1,
                 batch_size: int = 8, device: torch.device | str | None = None) -> list[float]:
    """Mean per-token score of each block (``block_influence``) or each span start (``angular``).

    Returns:
        ``block_influence``: one score per layer; ``angular``: one per start ``l`` in
        ``[0, layers - span]``, the distance between block ``l``'s input and block
        ``l + span - 1``'s output. Lower means more removable.
    """
    total = arch.num_layers(model)
    if criterion == "block_influence":
        scores = []
        for step in layerwise(model, input_ids, batch_size=batch_size, device=device, desc="depth: block influence"):
            acc = _Mean()
            step.run(fn=lambda x, y, acc=acc: acc.add(block_influence(x, y)), keep_outputs=True)
            scores.append(acc.value)
        return scores
    if not 1 <= span < total:
        raise ValueError(f"the span must be between 1 and {total - 1}, got {span}")
    history: collections.deque[list[torch.Tensor]] = collections.deque(maxlen=span)
    distances = []
    last: list[torch.Tensor] = []
    for step in layerwise(model, input_ids, batch_size=batch_size, device=device, desc="depth: angular distance"):
        if len(history) == span:
            distances.append(_mean_over_batches(angular_distance, history[0], step.inputs))
        history.append(step.inputs)
        step.run(keep_outputs=True)
        last = step.outputs or []
    distances.append(_mean_over_batches(angular_distance, history[0], last))
    return distances


class _Mean:
    def __init__(self) -> None:
        self.total, self.count = 0.0, 0

    def add(self, values: torch.Tensor) -> None:
        self.total += float(values.double().sum())
        self.count += values.numel()

    @property
    def value(self) -> float:
        return self.total / max(self.count, 1)


def _mean_over_batches(fn: Any, xs: list[torch.Tensor], ys: list[torch.Tensor]) -> float:
    acc = _Mean()
    for x, y in zip(xs, ys):
        acc.add(fn(x, y))
    return acc.value


def layers_to_remove(scores: list[float], count: int, criterion: str) -> list[int]:
    """The indices to drop: the ``count`` lowest-scoring blocks, or the best span of ``count``."""
    if criterion == "block_influence":
        order = sorted(range(len(scores)), key=lambda i: (scores[i], i))
        return sorted(order[:count])
    start = min(range(len(scores)), key=lambda i: (scores[i], i))
    return list(range(start, start + count))


# --- width: targets --------------------------------------------------------------------------


@dataclass(frozen=True)
class WidthTargets:
    """The pruned model's dimensions."""

    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    hidden_size: int


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


def _accepted_hidden(config: Any, hidden: int, heads: int, kv_heads: int, round_to: int) -> int:
    """``hidden``, or the nearest smaller width the architecture accepts (a multiple of
    ``round_to`` where one fits, else the nearest accepted width at all)."""
    full = int(config.hidden_size)
    for step in (round_to, 1):
        for candidate in range(hidden - hidden % step, 0, -step):
            if config_accepts(config, candidate, heads, kv_heads):
                return candidate
    return next((h for h in range(hidden, full) if config_accepts(config, h, heads, kv_heads)), full)


def _scaled_targets(config: Any, scale: dict[str, float], head_mode: str, round_to: int) -> WidthTargets:
    heads, kv = int(config.num_attention_heads), arch.num_kv_heads(config)
    per_group = heads // kv
    inter = _round_down(config.intermediate_size * scale.get("mlp", 1.0), round_to, int(config.intermediate_size))
    hidden = _round_down(config.hidden_size * scale.get("hidden", 1.0), round_to, int(config.hidden_size))
    s = scale.get("heads", 1.0)
    if head_mode == "group":
        kv_new = max(1, min(kv, round(kv * s)))
        q_new, kv_keep = kv_new * per_group, kv_new
    else:
        q_new, kv_keep = max(1, min(per_group, round(per_group * s))) * kv, kv
    return WidthTargets(inter, q_new, kv_keep, _accepted_hidden(config, hidden, q_new, kv_keep, round_to))


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


def resolve_width_targets(cfg: Any, config: Any) -> WidthTargets:
    """The pruned dimensions a :class:`~slimforge.prune.config.WidthConfig` asks for.

    Raises:
        FieldError: a target larger than the model, or heads that do not fit its KV groups.
    """
    heads, kv = int(config.num_attention_heads), arch.num_kv_heads(config)
    per_group = heads // kv
    if cfg.param_ratio is not None:
        return _budget_targets(cfg, config)
    t = _scaled_targets(config, {"mlp": cfg.mlp_ratio or 1.0, "hidden": cfg.hidden_ratio or 1.0,
                                 "heads": cfg.heads_ratio or 1.0}, cfg.head_mode, cfg.round_to)
    inter, hidden, q_heads, kv_heads = t.intermediate_size, t.hidden_size, t.num_attention_heads, t.num_key_value_heads
    for name, value, full in (("intermediate_size", cfg.intermediate_size, config.intermediate_size),
                              ("hidden_size", cfg.hidden_size, config.hidden_size),
                              ("num_attention_heads", cfg.num_attention_heads, heads)):
        if value is not None and value > full:
            raise FieldError(name, value, f"the model has only {full}; width pruning cannot grow it")
    inter = cfg.intermediate_size or inter
    hidden = cfg.hidden_size or hidden
    if cfg.num_attention_heads is not None:
        q_heads = cfg.num_attention_heads
        if cfg.head_mode == "query":
            if q_heads % kv:
                raise FieldError("num_attention_heads", q_heads,
                                 f"with head_mode=query every one of the {kv} KV groups keeps the same number of "
                                 f"query heads, so it must be a multiple of {kv}")
        elif q_heads % per_group:
            raise FieldError("num_attention_heads", q_heads,
                             f"with head_mode=group whole KV groups of {per_group} query heads (head_dim "
                             f"{arch.head_dim(config)}) go, so it must be a multiple of {per_group}")
        else:
            kv_heads = q_heads // per_group
    if not config_accepts(config, int(hidden), int(q_heads), int(kv_heads)):
        fits = [h for h in range(int(config.hidden_size), 0, -1) if config_accepts(config, h, int(q_heads), int(kv_heads))]
        below = max((h for h in fits if h < hidden), default=None)
        above = min((h for h in fits if h > hidden), default=None)
        raise FieldError("hidden_size", hidden,
                         f"transformers' {type(config).__name__} refuses it with {q_heads} attention heads "
                         f"(the hidden size must be a multiple of the head count); nearest that fit: "
                         f"{', '.join(str(h) for h in (below, above) if h is not None)}")
    return WidthTargets(int(inter), int(q_heads), int(kv_heads), int(hidden))


def _budget_targets(cfg: Any, config: Any) -> WidthTargets:
    """The largest common shrink of ``budget_axes`` whose model fits ``param_ratio`` of the parameters."""
    full = WidthTargets(int(config.intermediate_size), int(config.num_attention_heads),
                        arch.num_kv_heads(config), int(config.hidden_size))
    budget = cfg.param_ratio * width_param_count(config, full)
    low, high = 0.0, 1.0
    best = _scaled_targets(config, {a: 1e-9 for a in cfg.budget_axes}, cfg.head_mode, cfg.round_to)
    if width_param_count(config, best) > budget:
        raise FieldError("param_ratio", cfg.param_ratio,
                         f"even the smallest widths of {cfg.budget_axes} keep more parameters; "
                         "add axes to budget_axes or prune depth first")
    for _ in range(30):
        mid = (low + high) / 2
        t = _scaled_targets(config, {a: mid for a in cfg.budget_axes}, cfg.head_mode, cfg.round_to)
        if width_param_count(config, t) <= budget:
            low, best = mid, t
        else:
            high = mid
    return best


# --- width: importance -----------------------------------------------------------------------


@dataclass
class WidthImportance:
    """Per-layer MLP channel and head importances, hidden channel importance, norm input energy."""

    mlp: list[torch.Tensor] = field(default_factory=list)  # per layer [intermediate]
    heads: list[torch.Tensor] = field(default_factory=list)  # per layer [num_heads]
    hidden: torch.Tensor | None = None  # [hidden]
    norm_energy: dict[str, torch.Tensor] = field(default_factory=dict)  # module name -> mean x^2 per channel


class _SampleL2:
    """Accumulates the sum over samples of (mean over the sequence of |value|)^2."""

    def __init__(self) -> None:
        self.sq: torch.Tensor | None = None

    def add(self, per_token: torch.Tensor) -> None:  # [batch, seq, units]
        per_sample = per_token.float().abs().mean(dim=1)
        sq = per_sample.pow(2).sum(0).double().cpu()
        self.sq = sq if self.sq is None else self.sq + sq

    @property
    def value(self) -> torch.Tensor:
        return self.sq.sqrt()


class _Energy:
    def __init__(self) -> None:
        self.sum: torch.Tensor | None = None
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        flat = x.reshape(-1, x.shape[-1]).float()
        s = flat.pow(2).sum(0).double().cpu()
        self.sum = s if self.sum is None else self.sum + s
        self.tokens += flat.shape[0]

    @property
    def value(self) -> torch.Tensor:
        return self.sum / max(self.tokens, 1)


def _head_contributions(o_proj: nn.Linear, attn_out: torch.Tensor, heads: int) -> torch.Tensor:
    """[batch, seq, heads]: the norm of each head's term in the output projection."""
    b, s, _ = attn_out.shape
    per_head = attn_out.reshape(b, s, heads, -1)
    w = o_proj.weight.reshape(o_proj.weight.shape[0], heads, -1)  # [hidden, heads, head_dim]
    return torch.einsum("bshd,ohd->bsho", per_head.float(), w.float()).norm(dim=-1)


def width_importance(model: nn.Module, input_ids: torch.Tensor, batch_size: int = 8,
                     device: torch.device | str | None = None) -> WidthImportance:
    """Activation importances for MLP channels, heads and hidden channels, block by block."""
    config = model.config
    heads = int(config.num_attention_heads)
    names = [n for n, _ in model.named_parameters()]
    norm_names = arch.hidden_norm_names(names)
    final_norm_name = "model.norm"
    hidden = _SampleL2()
    energies = {name: _Energy() for name in norm_names}
    out = WidthImportance()

    def norm_hooks(module_names: list[str], root: nn.Module, prefix: str) -> list[Any]:
        handles = []
        for name in module_names:
            if not name.startswith(prefix):
                continue
            norm = root.get_submodule(name[len(prefix):])

            def hook(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor, name: str = name) -> None:
                energies[name].add(args[0])
                hidden.add(output)

            handles.append(norm.register_forward_hook(hook))
        return handles

    total = arch.num_layers(model)
    for step in layerwise(model, input_ids, batch_size=batch_size, device=device, desc="width: importance"):
        prefix = f"model.layers.{step.index}."
        mlp, attn = _SampleL2(), _SampleL2()
        down, o_proj = _mlp_down(step.layer), step.layer.self_attn.o_proj
        handles = norm_hooks(norm_names, step.layer, prefix)
        handles.append(down.register_forward_pre_hook(
            lambda m, args, acc=mlp: acc.add(args[0].abs() * m.weight.float().norm(dim=0))))
        handles.append(o_proj.register_forward_pre_hook(
            lambda m, args, acc=attn: acc.add(_head_contributions(m, args[0], heads))))
        final = step.index == total - 1
        if final:  # the final norm reads the last block's outputs
            handles += norm_hooks([final_norm_name], model, "")
        try:
            step.run(fn=_through_final_norm(model) if final else None, keep_outputs=True)
        finally:
            for handle in handles:
                handle.remove()
        out.mlp.append(mlp.value.float())
        out.heads.append(attn.value.float())
    out.hidden = hidden.value.float()
    out.norm_energy = {name: e.value.float() for name, e in energies.items()}
    return out


def _through_final_norm(model: nn.Module) -> Any:
    """A step callback that runs the final norm on a block's outputs (so its hooks fire)."""
    norm = model.get_decoder().norm

    def run(x: torch.Tensor, y: torch.Tensor) -> None:
        home = next(norm.parameters()).device
        norm.to(y.device)(y)
        norm.to(home)

    return run


def _mlp_down(layer: nn.Module) -> nn.Linear:
    return layer.mlp.down_proj


# --- width: choosing and slicing -------------------------------------------------------------


@dataclass
class KeptChannels:
    """Sorted indices that stay: hidden channels; per layer, query heads, KV heads, MLP channels."""

    hidden: torch.Tensor
    q_heads: list[torch.Tensor]
    kv_heads: list[torch.Tensor]
    mlp: list[torch.Tensor]


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` highest scores, in ascending index order (ties: lower index first)."""
    order = torch.sort(-scores, stable=True).indices[:k]
    return torch.sort(order).values


def select_channels(importance: WidthImportance, config: Any, targets: WidthTargets, head_mode: str) -> KeptChannels:
    """Keep the most important units per the targets (heads consistently with the KV groups)."""
    heads, kv = int(config.num_attention_heads), arch.num_kv_heads(config)
    per_group = heads // kv
    q_kept, kv_kept = [], []
    for head_scores in importance.heads:
        groups = head_scores.reshape(kv, per_group)
        if head_mode == "group":
            kept_groups = _top(groups.pow(2).sum(1).sqrt(), targets.num_key_value_heads)
            q = (kept_groups.unsqueeze(1) * per_group + torch.arange(per_group)).reshape(-1)
            kv_kept.append(kept_groups)
        else:
            q_per_group = targets.num_attention_heads // kv
            q = torch.cat([g * per_group + _top(groups[g], q_per_group) for g in range(kv)])
            kv_kept.append(torch.arange(kv))
        q_kept.append(q)
    return KeptChannels(
        hidden=_top(importance.hidden, targets.hidden_size),
        q_heads=q_kept, kv_heads=kv_kept,
        mlp=[_top(m, targets.intermediate_size) for m in importance.mlp],
    )


def _head_rows(heads: torch.Tensor, hd: int) -> torch.Tensor:
    return (heads.unsqueeze(1) * hd + torch.arange(hd)).reshape(-1)


def _axis_index(axis: str, layer: int | None, kept: KeptChannels, config: Any) -> torch.Tensor:
    hd = arch.head_dim(config)
    if axis == "hidden":
        return kept.hidden
    assert layer is not None, f"axis {axis} outside a decoder block"
    if axis == "q":
        return _head_rows(kept.q_heads[layer], hd)
    if axis == "kv":
        return _head_rows(kept.kv_heads[layer], hd)
    if axis == "qkv":
        q_size, kv_size = config.num_attention_heads * hd, arch.num_kv_heads(config) * hd
        kv_rows = _head_rows(kept.kv_heads[layer], hd)
        return torch.cat([_head_rows(kept.q_heads[layer], hd), q_size + kv_rows, q_size + kv_size + kv_rows])
    if axis == "mlp":
        return kept.mlp[layer]
    if axis == "mlp2":
        return torch.cat([kept.mlp[layer], config.intermediate_size + kept.mlp[layer]])
    raise ValueError(f"unknown axis {axis}")


def slice_state_dict(model: nn.Module, kept: KeptChannels) -> dict[str, torch.Tensor]:
    """Every parameter with only the kept rows/columns (tied weights stay tied: sliced alike)."""
    config = model.config
    out = {}
    params = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    for name, tensor in model.state_dict().items():
        if name not in params:
            continue  # buffers (rotary frequencies, embedding scale) are rebuilt from the config
        layer, axes = arch.param_axes(name, config.model_type)
        value = tensor
        for dim, axis in axes.items():
            value = value.index_select(dim, _axis_index(axis, layer, kept, config).to(value.device))
        out[name] = value.clone()
    return out


def _rescale_norms(state: dict[str, torch.Tensor], config: Any, kept: KeptChannels,
                   energy: dict[str, torch.Tensor], extra: dict[str, float]) -> None:
    """Scale each hidden RMSNorm so its output keeps the size it had over the full width.

    RMSNorm divides by the root-mean-square over all channels; over the kept ones it is
    ``sqrt(E_kept / H')`` instead of ``sqrt(E_all / H)`` (``E``: mean input energy). The
    norm's gain is multiplied by the ratio, in the family's convention (Gemma stores
    ``gain - 1``). ``extra`` holds further factors per norm (the Gemma embedding fix).
    """
    offset = arch.norm_weight_offset(config)
    full, new = int(config.hidden_size), int(len(kept.hidden))
    for name in set(energy) | set(extra):
        factor = extra.get(name, 1.0)
        if name in energy:
            e = energy[name].double()
            kept_energy, all_energy = float(e[kept.hidden].sum()), float(e.sum())
            if kept_energy > 0 and all_energy > 0:
                factor *= math.sqrt(kept_energy * full / (all_energy * new))
        key = f"{name}.weight"
        state[key] = ((state[key].double() + offset) * factor - offset).to(state[key].dtype)


def pruned_config(config: Any, targets: WidthTargets) -> Any:
    """The config of ``config``'s model pruned to ``targets`` (head_dim stays, stated explicitly)."""
    new_config = copy.deepcopy(config)
    new_config.head_dim = arch.head_dim(config)
    new_config.hidden_size = targets.hidden_size
    new_config.intermediate_size = targets.intermediate_size
    new_config.num_attention_heads = targets.num_attention_heads
    new_config.num_key_value_heads = targets.num_key_value_heads
    return new_config


def build_pruned_model(model: nn.Module, kept: KeptChannels, targets: WidthTargets,
                       energy: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """A new model of the smaller config holding the kept weights.

    Args:
        model: the original model.
        kept: what stays.
        targets: the new dimensions (must match ``kept``).
        energy: per hidden norm, mean squared input per channel; given, norms are rescaled
            (see :func:`_rescale_norms`).
    """
    from transformers import AutoModelForCausalLM

    config = model.config
    state = slice_state_dict(model, kept)
    extra: dict[str, float] = {}
    multiplier = arch.embedding_multiplier(config)
    if multiplier is not None and targets.hidden_size != config.hidden_size:
        # Gemma multiplies embeddings by sqrt(hidden_size), which the smaller config lowers:
        # scale the table so block 0 sees the same values; a tied LM head then sees the
        # scaled table too, so the final norm's gain takes the inverse factor.
        c = multiplier / math.sqrt(targets.hidden_size)
        state["model.embed_tokens.weight"] = state["model.embed_tokens.weight"] * c
        if _tied(model):
            extra["model.norm"] = 1 / c
    if energy is not None or extra:
        _rescale_norms(state, config, kept, energy or {}, extra)
    dtype = next(model.parameters()).dtype
    pruned = AutoModelForCausalLM.from_config(pruned_config(config, targets), dtype=dtype)
    if _tied(model):
        state.pop("lm_head.weight", None)
    missing, unexpected = pruned.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and _tied(pruned))]
    if missing or unexpected:
        raise RuntimeError(f"pruned weights do not fit the smaller model: missing {missing}, unexpected {unexpected}")
    if getattr(model, "generation_config", None) is not None:
        pruned.generation_config = copy.deepcopy(model.generation_config)
    return pruned.to(next(model.parameters()).device).eval()


def _tied(model: nn.Module) -> bool:
    out = model.get_output_embeddings()
    return out is not None and out.weight is model.get_input_embeddings().weight


def prune_width(model: nn.Module, input_ids: torch.Tensor, targets: WidthTargets, head_mode: str = "query",
                rescale_norms: bool = True, batch_size: int = 8,
                device: torch.device | str | None = None) -> tuple[nn.Module, KeptChannels, WidthImportance]:
    """Measure importance on ``input_ids``, choose what stays, and build the smaller model."""
    importance = width_importance(model, input_ids, batch_size=batch_size, device=device)
    kept = select_channels(importance, model.config, targets, head_mode)
    pruned = build_pruned_model(model, kept, targets, importance.norm_energy if rescale_norms else None)
    log.info("width pruning: %d -> %d parameters", count_parameters(model), count_parameters(pruned))
    return pruned, kept, importance
