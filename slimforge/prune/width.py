"""Width pruning (Minitron, Muralidharan et al. 2024): MLP channels, heads and hidden channels.

Importance comes from activations, aggregated over a sequence by the mean and over samples
by the L2 norm, measured where each unit writes into the residual stream, so a unit with
large activations but a near-zero output weight is not kept:

- MLP channel ``i``: ``|a_i| * ||W_down[:, i]||``;
- attention head ``h``: ``||W_o[:, h] o_h||`` (its share of the output projection); GQA
  either keeps the same number of query heads in each KV group or drops whole groups;
- hidden channel ``c``: ``|RMSNorm(x)_c|`` over every hidden-size norm.

The sizes to prune to are :mod:`slimforge.prune.width_targets`'s. The kept channels are
sliced out of every parameter following :func:`slimforge.arch.param_axes` and loaded into a
model built from the smaller config, so the result is exactly what
``AutoModelForCausalLM.from_pretrained`` will rebuild.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from slimforge import arch
from slimforge.calibration.layerwise import layerwise
from slimforge.prune.choices import HEAD_MODES
from slimforge.prune.width_targets import WidthTargets, pruned_config, width_param_count

if TYPE_CHECKING:  # pragma: no cover
    from slimforge.prune.config import WidthConfig
    from slimforge.stage import StageContext, StageOutput

log = logging.getLogger(__name__)


# --- importance ------------------------------------------------------------------------------


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
    heads = int(model.config.num_attention_heads)
    norms = arch.hidden_norms(model)  # module name -> its block (None: the final norm)
    hidden = _SampleL2()
    energies = {name: _Energy() for name in norms}
    out = WidthImportance()

    def norm_hooks(layer: int | None) -> list[Any]:
        handles = []
        for name in (n for n, at in norms.items() if at == layer):
            def hook(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor, name: str = name) -> None:
                energies[name].add(args[0])
                hidden.add(output)

            handles.append(model.get_submodule(name).register_forward_hook(hook))
        return handles

    total = arch.num_layers(model)
    for step in layerwise(model, input_ids, batch_size=batch_size, device=device, desc="width: importance"):
        mlp, attn = _SampleL2(), _SampleL2()
        handles = norm_hooks(step.index)
        handles.append(arch.mlp_output(step.layer).register_forward_pre_hook(
            lambda m, args, acc=mlp: acc.add(args[0].abs() * m.weight.float().norm(dim=0))))
        handles.append(arch.attention_output(step.layer).register_forward_pre_hook(
            lambda m, args, acc=attn: acc.add(_head_contributions(m, args[0], heads))))
        final = step.index == total - 1
        if final:  # the final norm reads the last block's outputs
            handles += norm_hooks(None)
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
    norm = arch.final_norm(model)

    def run(x: torch.Tensor, y: torch.Tensor) -> None:
        home = next(norm.parameters()).device
        norm.to(y.device)(y)
        norm.to(home)

    return run


# --- choosing and slicing --------------------------------------------------------------------


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


def _kept_heads(head_scores: torch.Tensor, kv: int, targets: WidthTargets,
                head_mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's kept (query heads, KV heads), consistent with the KV groups."""
    per_group = len(head_scores) // kv
    groups = head_scores.reshape(kv, per_group)
    if head_mode == "group":
        kept_groups = _top(groups.pow(2).sum(1).sqrt(), targets.num_key_value_heads)
        return (kept_groups.unsqueeze(1) * per_group + torch.arange(per_group)).reshape(-1), kept_groups
    if head_mode == "query":
        q_per_group = targets.num_attention_heads // kv
        return torch.cat([g * per_group + _top(groups[g], q_per_group) for g in range(kv)]), torch.arange(kv)
    raise ValueError(f"head_mode must be one of {HEAD_MODES}, got {head_mode!r}")


def select_channels(importance: WidthImportance, config: Any, targets: WidthTargets, head_mode: str) -> KeptChannels:
    """Keep the most important units per the targets (heads consistently with the KV groups)."""
    kv = arch.num_kv_heads(config)
    heads = [_kept_heads(scores, kv, targets, head_mode) for scores in importance.heads]
    return KeptChannels(
        hidden=_top(importance.hidden, targets.hidden_size),
        q_heads=[q for q, _ in heads], kv_heads=[k for _, k in heads],
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
    tied = arch.tied_embeddings(model)
    if multiplier is not None and targets.hidden_size != config.hidden_size:
        # Gemma multiplies embeddings by sqrt(hidden_size), which the smaller config lowers:
        # scale the table so block 0 sees the same values; a tied LM head then sees the
        # scaled table too, so the final norm's gain takes the inverse factor.
        c = multiplier / math.sqrt(targets.hidden_size)
        state[arch.EMBEDDING_WEIGHT] = state[arch.EMBEDDING_WEIGHT] * c
        if tied:
            extra[arch.FINAL_NORM] = 1 / c
    if energy is not None or extra:
        _rescale_norms(state, config, kept, energy or {}, extra)
    dtype = next(model.parameters()).dtype
    pruned = AutoModelForCausalLM.from_config(pruned_config(config, targets), dtype=dtype)
    if tied:
        state.pop(arch.LM_HEAD_WEIGHT, None)
    missing, unexpected = pruned.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == arch.LM_HEAD_WEIGHT and arch.tied_embeddings(pruned))]
    if missing or unexpected:
        raise RuntimeError(f"pruned weights do not fit the smaller model: missing {missing}, unexpected {unexpected}")
    if getattr(model, "generation_config", None) is not None:
        pruned.generation_config = copy.deepcopy(model.generation_config)
    return pruned.to(next(model.parameters()).device).eval()


def prune_width(model: nn.Module, input_ids: torch.Tensor, targets: WidthTargets, head_mode: str = "query",
                rescale_norms: bool = True, batch_size: int = 8,
                device: torch.device | str | None = None) -> tuple[nn.Module, KeptChannels, WidthImportance]:
    """Measure importance on ``input_ids``, choose what stays, and build the smaller model."""
    importance = width_importance(model, input_ids, batch_size=batch_size, device=device)
    kept = select_channels(importance, model.config, targets, head_mode)
    pruned = build_pruned_model(model, kept, targets, importance.norm_energy if rescale_norms else None)
    log.info("width pruning: %d -> %d parameters", arch.count_parameters(model), arch.count_parameters(pruned))
    return pruned, kept, importance


# --- the stage -------------------------------------------------------------------------------


def _removed(full: int, kept: torch.Tensor) -> list[int]:
    return sorted(set(range(full)) - set(kept.tolist()))


def width_stage(ctx: StageContext) -> StageOutput:
    """Minitron-style width pruning (MLP channels, heads, hidden channels) by activation importance."""
    from slimforge.calibration.windows import calibration_windows, load_for_calibration
    from slimforge.stage import StageOutput

    cfg: WidthConfig = ctx.config
    model, tokenizer = load_for_calibration(ctx, cfg.offload_model)
    arch.require_supported(model.config)
    targets = cfg.targets(model.config)  # the parent's real sizes
    ids = calibration_windows(ctx, cfg)
    params = arch.count_parameters(model)
    before = {"hidden_size": int(model.config.hidden_size), "intermediate_size": int(model.config.intermediate_size),
              "num_attention_heads": int(model.config.num_attention_heads),
              "num_key_value_heads": arch.num_kv_heads(model.config)}
    pruned, kept, _ = prune_width(model, ids, targets, cfg.head_mode, cfg.rescale_norms, cfg.batch_size, ctx.device)
    after = arch.count_parameters(pruned)
    expected = width_param_count(model.config, targets)
    if after != expected:
        raise RuntimeError(f"width pruning built {after} parameters where {expected} were planned")
    per_layer = {
        str(i): {"removed_query_heads": _removed(before["num_attention_heads"], kept.q_heads[i]),
                 "removed_kv_heads": _removed(before["num_key_value_heads"], kept.kv_heads[i]),
                 "removed_mlp_channels": _removed(before["intermediate_size"], kept.mlp[i])}
        for i in range(len(kept.mlp))
    }
    meta = {"dims_before": before, "dims_after": dataclasses.asdict(targets), "head_mode": cfg.head_mode,
            "parameters_before": params, "parameters_after": after, "parameter_ratio": round(after / params, 6),
            "removed_hidden_channels": _removed(before["hidden_size"], kept.hidden), "removed": per_layer,
            "calibration": {"samples": cfg.num_samples, "seq_len": cfg.seq_len}}
    log.info("width pruning: %s -> %s, %d -> %d parameters (%.1f%%)", before, dataclasses.asdict(targets), params, after,
             100 * after / params)
    del model
    return StageOutput(model=pruned, tokenizer=tokenizer, meta=meta,
                       metrics={"parameters_after": after, "parameter_ratio": meta["parameter_ratio"]})
