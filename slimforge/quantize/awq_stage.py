"""AWQ as a stage: block by block, search and fold each group's channel scales, clip, then round (RTN or GPTQ).

Each decoder block is calibrated on the outputs of the blocks before it *after* they were
quantized, as GPTQ is. One pass over the block records, per linear, the inputs' mean
magnitude and Hessian; everything after works from those: the scale search of each
:class:`slimforge.arch.ScalingGroup` (:func:`slimforge.quantize.awq.search_scales`), the exact
fold (:func:`slimforge.quantize.smoothing.fold_scales`), whose effect on the readers' Hessians is
known in closed form (inputs ``x / s`` have Hessian ``H / (s s^T)``), the clipping search and
the rounding. The weights end on the grid of their scales and are saved in compressed-tensors'
``pack-quantized`` format like RTN and GPTQ, so transformers reloads them and vLLM serves them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from slimforge.quantize.config import AwqConfig
from slimforge.stage import StageContext, StageOutput

log = logging.getLogger(__name__)


@dataclass
class AwqResult:
    """What AWQ did to a model, for the artifact's report."""

    scales: dict[str, torch.Tensor] = field(default_factory=dict)  # module name -> fp32 [rows, groups]
    exponents: list[dict[str, float | None]] = field(default_factory=list)  # per block: group -> a (None: unscaled)
    loss_ratio: dict[str, list[float]] = field(default_factory=dict)  # group -> per block: scaled / unscaled loss
    clipped: int = 0  # linears whose scales the clipping search chose


def _search_loss(readers: dict[str, torch.nn.Linear], hessian: torch.Tensor, cfg: AwqConfig,
                 scale_dtype: torch.dtype) -> Callable[[torch.Tensor], float]:
    """``loss(scales)``: the readers' summed output error after scaling and rounding to nearest."""
    from slimforge.quantize.awq import scaled_rounding_error

    def loss(scales: torch.Tensor) -> float:
        return sum(scaled_rounding_error(r.weight, hessian, scales, cfg.bits, cfg.group_size, scale_dtype)
                   for r in readers.values())

    return loss


def scale_block(layer: Any, config: Any, stats: Any, hessians: dict[str, torch.Tensor], cfg: AwqConfig,
                scale_dtype: torch.dtype, result: AwqResult) -> None:
    """Search and fold every scaling group of one block; ``hessians`` become those of the scaled inputs.

    Args:
        layer: the decoder block (on the compute device).
        config: the model's config.
        stats: the block's :class:`slimforge.calibration.activations.InputRecorder`.
        hessians: local linear name -> Hessian of its inputs; updated in place for each folded group.
    """
    from slimforge.arch import norm_weight_offset, scaling_groups
    from slimforge.quantize.awq import search_scales, weight_channel_means
    from slimforge.quantize.smoothing import fold_scales

    exponents: dict[str, float | None] = {}
    for group in scaling_groups(layer, config, "quantize method awq"):
        if any(name not in hessians for name in group.targets):
            continue  # a reader this stage leaves unquantized: nothing to protect
        readers = {name: layer.get_submodule(name) for name in group.targets}
        hessian = hessians[group.targets[0]]
        weight_mean = (weight_channel_means([r.weight for r in readers.values()], cfg.group_size)
                       if cfg.duo_scaling else None)
        choice = search_scales(stats[group.targets[0]].act_abs, _search_loss(readers, hessian, cfg, scale_dtype),
                               cfg.grid, weight_mean)
        exponents[group.name] = choice.exponent
        result.loss_ratio.setdefault(group.name, []).append(choice.loss / max(choice.unscaled_loss, 1e-30))
        if choice.exponent is None:
            continue
        fold_scales(layer, group, choice.scales, norm_weight_offset(config))
        s = choice.scales.to(hessian.device)
        scaled = hessian / (s.unsqueeze(1) * s.unsqueeze(0))
        for name in group.targets:
            hessians[name] = scaled
    result.exponents.append(exponents)


Rounding = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None", AwqConfig, torch.dtype],
                    tuple[torch.Tensor, torch.Tensor]]


def _round_rtn(weight: torch.Tensor, hessian: torch.Tensor, scales: torch.Tensor | None, cfg: AwqConfig,
               scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    from slimforge.quantize.intquant import fake_quantize, symmetric_scales

    if scales is None:
        scales = symmetric_scales(weight, cfg.bits, cfg.group_size, scale_dtype)
    return fake_quantize(weight, scales, cfg.bits, cfg.group_size), scales


def _round_gptq(weight: torch.Tensor, hessian: torch.Tensor, scales: torch.Tensor | None, cfg: AwqConfig,
                scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    from slimforge.quantize.gptq import gptq_quantize_weight

    result = gptq_quantize_weight(weight, hessian, cfg.bits, cfg.group_size, act_order=cfg.act_order,
                                  percdamp=cfg.percdamp, block_size=cfg.block_size, scale_dtype=scale_dtype,
                                  scale_search=cfg.scale_search, scales=scales)
    return result.weight, result.scales


# ``(weight, hessian, scales or None, cfg, scale dtype) -> (weight on the grid, its scales)``, one per
# name in the schema's ``AWQ_ROUNDINGS``; None scales: the rounding chooses them.
ROUNDINGS: dict[str, Rounding] = {"rtn": _round_rtn, "gptq": _round_gptq}


def round_block(layer: Any, linears: dict[str, torch.nn.Linear], hessians: dict[str, torch.Tensor], cfg: AwqConfig,
                scale_dtype: torch.dtype) -> dict[str, tuple[torch.Tensor, bool]]:
    """Clip and round every linear of the block in place.

    Returns:
        local name -> (fp32 [rows, groups] scales, whether the clipping search chose them).
    """
    from slimforge.arch import query_key_projections
    from slimforge.quantize.awq import clip_scales

    rounding = ROUNDINGS[cfg.rounding]
    # q/k errors act through the softmax of q.k^T: their own output error misleads the clip (AWQ skips them too).
    unclipped = set(query_key_projections(layer))
    out = {}
    for local, linear in linears.items():
        weight = linear.weight.detach().float()
        clipped = None
        if cfg.clips() and local not in unclipped:
            clipped = clip_scales(weight, hessians[local], cfg.bits, cfg.group_size, scale_dtype,
                                  cfg.clip_grid, cfg.clip_min_shrink)
        rounded, scales = rounding(weight, hessians[local], clipped, cfg, scale_dtype)
        linear.weight.data.copy_(rounded.to(linear.weight.dtype))
        out[local] = (scales.cpu(), clipped is not None)
    return out


@torch.no_grad()
def awq_quantize_model(model: Any, input_ids: torch.Tensor, cfg: AwqConfig, device: torch.device,
                       scale_dtype: torch.dtype, only: set[str] | None = None) -> AwqResult:
    """Apply AWQ to every decoder block in place: scales folded, weights clipped and rounded.

    Args:
        model: a causal LM of a family :func:`slimforge.arch.scaling_groups` knows.
        input_ids: int64 [n, seq_len] calibration tokens.
        cfg: the method's settings (bits, groups, search, rounding).
        device: where each block runs.
        scale_dtype: the dtype scales are stored in.
        only: full module names to quantize (default: every linear in the blocks).

    Returns:
        An :class:`AwqResult`; the model's quantized linears now lie on the grids of its ``scales``.
    """
    from slimforge.calibration.activations import record_linear_inputs
    from slimforge.calibration.layerwise import layerwise

    names = {id(module): name for name, module in model.named_modules()}
    result = AwqResult()
    for step in layerwise(model, input_ids, batch_size=cfg.batch_size, device=device, desc="awq"):
        linears = {local: m for local, m in step.linears().items() if only is None or names[id(m)] in only}
        with record_linear_inputs(linears, hessian=True) as stats:
            step.run()
        hessians = {local: stats[local].hessian for local in linears}
        scale_block(step.layer, model.config, stats, hessians, cfg, scale_dtype, result)
        for local, (scales, clipped) in round_block(step.layer, linears, hessians, cfg, scale_dtype).items():
            result.scales[names[id(linears[local])]] = scales
            result.clipped += int(clipped)
        log.debug("awq: block %d exponents %s", step.index, result.exponents[-1])
    return result


def _report(result: AwqResult, cfg: AwqConfig, tokens: int) -> dict[str, Any]:
    """The method's part of ``slimforge.json``: the chosen exponents and what they bought."""
    return {
        "calibration_tokens": tokens, "rounding": cfg.rounding, "grid": cfg.grid, "duo_scaling": cfg.duo_scaling,
        "clip_search": cfg.clips(), "clipped_linears": result.clipped,
        "exponents": result.exponents,
        # Below 1: the scales cut that group's rounding error (RTN at search time) by that factor.
        "mean_loss_ratio": {name: sum(v) / len(v) for name, v in result.loss_ratio.items()},
        **({"percdamp": cfg.percdamp, "block_size": cfg.block_size, "scale_search": cfg.scale_search}
           if cfg.rounding == "gptq" else {}),
    }


def awq_stage(ctx: StageContext) -> StageOutput:
    """AWQ on calibration windows from the training split, then RTN or GPTQ rounding, as compressed-tensors."""
    from slimforge.calibration.windows import calibration_windows
    from slimforge.quantize.compressed import _finish, _prepare

    cfg: AwqConfig = ctx.config
    model, tokenizer, linears, dtype = _prepare(ctx)
    ids = calibration_windows(ctx, cfg)
    start = time.perf_counter()
    result = awq_quantize_model(model, ids, cfg, ctx.device, dtype, only=set(linears))
    seconds = time.perf_counter() - start
    missing = sorted(set(linears) - set(result.scales))
    if missing:
        raise RuntimeError(f"AWQ did not reach layers {missing[:3]}")
    scales = {name: result.scales[name] for name in linears}
    act_order = cfg.rounding == "gptq" and cfg.act_order
    return _finish(ctx, model, tokenizer, linears, scales, dtype, seconds, act_order,
                   _report(result, cfg, int(ids.numel())))
