"""Unstructured and N:M pruning of a whole model: magnitude, Wanda and SparseGPT stages.

The per-layer math is :mod:`slimforge.prune.unstructured`'s; here it runs over every linear
of every decoder block (Wanda and SparseGPT block by block on calibration windows, each
block on the inputs the already-pruned blocks before it produce), and the stage reports
what went. The artifacts keep the parent's shapes; their mask is their zero pattern
(``weight == 0``), which masked distillation rebuilds from the weights.

Mixture-of-experts models run inside :func:`slimforge.moe.unfused_experts`: each expert's
``gate_proj``/``up_proj``/``down_proj`` is a linear of its own, calibrated on the tokens routed to
that expert; routers and Qwen2-MoE's shared-expert gate are never pruned (the shared expert is an
ordinary MLP and is). An expert routed no calibration token has no input statistics: Wanda and
SparseGPT prune it by magnitude (an identity Hessian), and the stage reports how many there were.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
import torch.nn as nn

from slimforge import arch, moe
from slimforge.calibration.activations import record_linear_inputs
from slimforge.calibration.layerwise import layerwise
from slimforge.calibration.windows import calibration_windows, load_for_calibration
from slimforge.progress import progress_bar
from slimforge.prune.config import MagnitudeConfig, SparseGPTConfig, WandaConfig
from slimforge.prune.unstructured import (
    apply_mask,
    magnitude_scores,
    prune_mask,
    sparsegpt_prune,
    wanda_scores,
)
from slimforge.stage import StageContext, StageOutput

log = logging.getLogger(__name__)


# --- reporting -------------------------------------------------------------------------------


def sparsity_report(model: nn.Module) -> dict[str, Any]:
    """Zeros among the decoder blocks' linear weights (each expert's linears, no routers): per module,
    per block, overall."""
    with moe.unfused_experts(model):
        return _sparsity_report(model)


def _sparsity_report(model: nn.Module) -> dict[str, Any]:
    per_module, per_layer = {}, {}
    zeros_all = total_all = 0
    for index, layer in enumerate(arch.decoder_layers(model)):
        zeros = total = 0
        for name, module in layer.named_modules():
            if isinstance(module, nn.Linear) and not moe.is_router_name(name):
                z, n = int((module.weight == 0).sum()), module.weight.numel()
                per_module[f"layers.{index}.{name}"] = round(z / n, 6)
                zeros, total = zeros + z, total + n
        per_layer[str(index)] = round(zeros / max(total, 1), 6)
        zeros_all, total_all = zeros_all + zeros, total_all + total
    return {"overall": round(zeros_all / max(total_all, 1), 6), "per_layer": per_layer, "per_module": per_module,
            "pruned_weights": zeros_all, "prunable_weights": total_all}


def _nonzero(model: nn.Module) -> int:
    seen, count = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            count += int((p != 0).sum())
    return count


def _unstructured_output(model: nn.Module, tokenizer: Any, cfg: Any, params_before: int,
                         nonzero_before: int, seconds: float, extra: dict[str, Any] | None = None) -> StageOutput:
    report = sparsity_report(model)
    pattern = f"{cfg.n}:{cfg.m}" if cfg.n else "unstructured"
    meta = {"sparsity": report, "pattern": pattern, "target_sparsity": cfg.n / cfg.m if cfg.n else cfg.sparsity,
            "parameters_before": params_before, "parameters_after": arch.count_parameters(model),
            "nonzero_parameters_before": nonzero_before, "nonzero_parameters_after": _nonzero(model),
            "mask": "zero pattern of the weights (weight == 0)", **(extra or {})}
    log.info("%s %s: %.1f%% of the blocks' linear weights are zero", cfg.method, pattern, 100 * report["overall"])
    metrics = {"sparsity": report["overall"], "seconds": round(seconds, 2)}
    return StageOutput(model=model, tokenizer=tokenizer, meta=meta, metrics=metrics)


# --- unstructured ----------------------------------------------------------------------------


@torch.no_grad()
def magnitude_stage(ctx: StageContext) -> StageOutput:
    """Zero the smallest weights of every linear layer in the decoder blocks."""
    cfg: MagnitudeConfig = ctx.config
    model, tokenizer = ctx.load_parent()
    start = time.perf_counter()
    params, nonzero = arch.count_parameters(model), _nonzero(model)
    layers = arch.decoder_layers(model)
    with moe.unfused_experts(model):
        for layer in progress_bar(layers, desc="magnitude", total=len(layers), unit="layer"):
            for name, module in layer.named_modules():
                if isinstance(module, nn.Linear) and not moe.is_router_name(name):
                    keep = prune_mask(magnitude_scores(module.weight), cfg.sparsity, cfg.per, cfg.n, cfg.m)
                    apply_mask(module.weight, keep)
    return _unstructured_output(model, tokenizer, cfg, params, nonzero, time.perf_counter() - start)


@torch.no_grad()
def wanda_prune_model(model: nn.Module, input_ids: torch.Tensor, sparsity: float, per: str = "row",
                      n: int | None = None, m: int | None = None, batch_size: int = 8,
                      device: torch.device | str | None = None,
                      coverage: moe.ExpertCoverage | None = None) -> None:
    """Wanda on every linear of every block (each expert's own, routers left), block by block, in place.

    An expert routed no calibration token is pruned by magnitude (unit activation norms); ``coverage``,
    if given, collects how many tokens each expert was routed.
    """
    with moe.unfused_experts(model):
        for step in layerwise(model, input_ids, batch_size=batch_size, device=device, desc="wanda"):
            linears = step.linears()
            with record_linear_inputs(linears) as stats, moe.routed_tokens(step.layer) as routed:
                step.run()
            if coverage is not None:
                coverage.add(step.index, routed)
            for name, linear in linears.items():
                norm = stats[name].act_norm if name in stats else torch.ones_like(linear.weight[0], dtype=torch.float32)
                keep = prune_mask(wanda_scores(linear.weight, norm), sparsity, per, n, m)
                apply_mask(linear.weight, keep)


@torch.no_grad()
def sparsegpt_prune_model(model: nn.Module, input_ids: torch.Tensor, sparsity: float, per: str = "layer",
                          n: int | None = None, m: int | None = None, block_size: int = 128,
                          percdamp: float = 0.01, batch_size: int = 8,
                          device: torch.device | str | None = None,
                          coverage: moe.ExpertCoverage | None = None) -> float:
    """SparseGPT on every linear of every block (each expert's own, routers left), block by block, in place;
    returns the summed loss.

    An expert routed no calibration token gets an identity Hessian (magnitude pruning); ``coverage``, if
    given, collects how many tokens each expert was routed.
    """
    loss = 0.0
    with moe.unfused_experts(model):
        for step in layerwise(model, input_ids, batch_size=batch_size, device=device, desc="sparsegpt"):
            linears = step.linears()
            with record_linear_inputs(linears, hessian=True) as stats, moe.routed_tokens(step.layer) as routed:
                step.run()
            if coverage is not None:
                coverage.add(step.index, routed)
            for name, linear in linears.items():
                hessian = stats[name].hessian if name in stats else torch.eye(
                    linear.in_features, device=linear.weight.device)
                result = sparsegpt_prune(linear.weight, hessian, sparsity=sparsity, n=n, m=m, per=per,
                                         block_size=block_size, percdamp=percdamp)
                linear.weight.copy_(result.weight.to(linear.weight.dtype))
                loss += result.loss
            del stats
    return loss


def _moe_meta(coverage: moe.ExpertCoverage) -> dict[str, Any]:
    report = coverage.report(fallback="experts routed no calibration token were pruned by magnitude")
    return {"moe": report} if report else {}


def wanda_stage(ctx: StageContext) -> StageOutput:
    """Wanda (|W| x input norm) pruning, calibrated block by block."""
    cfg: WandaConfig = ctx.config
    model, tokenizer = load_for_calibration(ctx, cfg.offload_model)
    ids = calibration_windows(ctx, cfg)
    start = time.perf_counter()
    params, nonzero = arch.count_parameters(model), _nonzero(model)
    coverage = moe.ExpertCoverage()
    wanda_prune_model(model, ids, cfg.sparsity, cfg.per, cfg.n, cfg.m, cfg.batch_size, ctx.device, coverage)
    return _unstructured_output(model, tokenizer, cfg, params, nonzero, time.perf_counter() - start,
                                {"calibration": {"samples": cfg.num_samples, "seq_len": cfg.seq_len},
                                 **_moe_meta(coverage)})


def sparsegpt_stage(ctx: StageContext) -> StageOutput:
    """SparseGPT pruning with OBS error correction, calibrated block by block."""
    cfg: SparseGPTConfig = ctx.config
    model, tokenizer = load_for_calibration(ctx, cfg.offload_model)
    ids = calibration_windows(ctx, cfg)
    start = time.perf_counter()
    params, nonzero = arch.count_parameters(model), _nonzero(model)
    coverage = moe.ExpertCoverage()
    loss = sparsegpt_prune_model(model, ids, cfg.sparsity, cfg.per, cfg.n, cfg.m, cfg.block_size, cfg.percdamp,
                                 cfg.batch_size, ctx.device, coverage)
    return _unstructured_output(model, tokenizer, cfg, params, nonzero, time.perf_counter() - start,
                                {"calibration": {"samples": cfg.num_samples, "seq_len": cfg.seq_len},
                                 "reconstruction_loss": loss, **_moe_meta(coverage)})
