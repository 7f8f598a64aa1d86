"""Pruning stages: adapt a method's config to the math, and report what went.

Unstructured artifacts keep the parent's shapes; their mask is their zero pattern
(``weight == 0``), which masked distillation rebuilds from the weights. Structured
artifacts are smaller models with updated configs.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import torch
import torch.nn as nn

from slimforge import arch
from slimforge.models import count_parameters
from slimforge.progress import progress_bar
from slimforge.prune.calibrate import layerwise, record_linear_inputs
from slimforge.prune.config import (
    DepthConfig,
    MagnitudeConfig,
    SparseGPTConfig,
    WandaConfig,
    WidthConfig,
)
from slimforge.prune.structured import (
    depth_scores,
    layers_to_remove,
    prune_width,
    resolve_width_targets,
    width_param_count,
)
from slimforge.prune.unstructured import (
    apply_mask,
    magnitude_scores,
    prune_mask,
    sparsegpt_prune,
    wanda_scores,
)
from slimforge.stage import StageContext, StageOutput

log = logging.getLogger(__name__)


# --- shared helpers --------------------------------------------------------------------------


def _load(ctx: StageContext, cfg: Any) -> tuple[nn.Module, Any]:
    """The parent model: on the CPU when blocks are to visit the device one at a time."""
    if getattr(cfg, "offload_model", False):
        return ctx.parent.load(device="cpu", dtype=ctx.dtype)
    return ctx.load_parent()


def _calibration(ctx: StageContext, cfg: Any) -> torch.Tensor:
    from slimforge.data import calibration_samples

    return calibration_samples(ctx.data(), cfg.num_samples, cfg.seq_len, ctx.seed)


def sparsity_report(model: nn.Module) -> dict[str, Any]:
    """Zeros among the decoder blocks' linear weights: per module, per block, overall."""
    per_module, per_layer = {}, {}
    zeros_all = total_all = 0
    for index, layer in enumerate(arch.decoder_layers(model)):
        zeros = total = 0
        for name, module in layer.named_modules():
            if isinstance(module, nn.Linear):
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
            "parameters_before": params_before, "parameters_after": count_parameters(model),
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
    params, nonzero = count_parameters(model), _nonzero(model)
    layers = arch.decoder_layers(model)
    for layer in progress_bar(layers, desc="magnitude", total=len(layers), unit="layer"):
        for module in layer.modules():
            if isinstance(module, nn.Linear):
                keep = prune_mask(magnitude_scores(module.weight), cfg.sparsity, cfg.per, cfg.n, cfg.m)
                apply_mask(module.weight, keep)
    return _unstructured_output(model, tokenizer, cfg, params, nonzero, time.perf_counter() - start)


@torch.no_grad()
def wanda_prune_model(model: nn.Module, input_ids: torch.Tensor, sparsity: float, per: str = "row",
                      n: int | None = None, m: int | None = None, batch_size: int = 8,
                      device: torch.device | str | None = None) -> None:
    """Wanda on every linear of every block, block by block, in place."""
    for step in layerwise(model, input_ids, batch_size=batch_size, device=device, desc="wanda"):
        linears = step.linears()
        with record_linear_inputs(linears) as stats:
            step.run()
        for name, linear in linears.items():
            keep = prune_mask(wanda_scores(linear.weight, stats[name].act_norm), sparsity, per, n, m)
            apply_mask(linear.weight, keep)


@torch.no_grad()
def sparsegpt_prune_model(model: nn.Module, input_ids: torch.Tensor, sparsity: float, per: str = "layer",
                          n: int | None = None, m: int | None = None, block_size: int = 128,
                          percdamp: float = 0.01, batch_size: int = 8,
                          device: torch.device | str | None = None) -> float:
    """SparseGPT on every linear of every block, block by block, in place; returns the summed loss."""
    loss = 0.0
    for step in layerwise(model, input_ids, batch_size=batch_size, device=device, desc="sparsegpt"):
        linears = step.linears()
        with record_linear_inputs(linears, hessian=True) as stats:
            step.run()
        for name, linear in linears.items():
            result = sparsegpt_prune(linear.weight, stats[name].hessian, sparsity=sparsity, n=n, m=m, per=per,
                                     block_size=block_size, percdamp=percdamp)
            linear.weight.copy_(result.weight.to(linear.weight.dtype))
            loss += result.loss
        del stats
    return loss


def wanda_stage(ctx: StageContext) -> StageOutput:
    """Wanda (|W| x input norm) pruning, calibrated block by block."""
    cfg: WandaConfig = ctx.config
    model, tokenizer = _load(ctx, cfg)
    ids = _calibration(ctx, cfg)
    start = time.perf_counter()
    params, nonzero = count_parameters(model), _nonzero(model)
    wanda_prune_model(model, ids, cfg.sparsity, cfg.per, cfg.n, cfg.m, cfg.batch_size, ctx.device)
    return _unstructured_output(model, tokenizer, cfg, params, nonzero, time.perf_counter() - start,
                                {"calibration": {"samples": cfg.num_samples, "seq_len": cfg.seq_len}})


def sparsegpt_stage(ctx: StageContext) -> StageOutput:
    """SparseGPT pruning with OBS error correction, calibrated block by block."""
    cfg: SparseGPTConfig = ctx.config
    model, tokenizer = _load(ctx, cfg)
    ids = _calibration(ctx, cfg)
    start = time.perf_counter()
    params, nonzero = count_parameters(model), _nonzero(model)
    loss = sparsegpt_prune_model(model, ids, cfg.sparsity, cfg.per, cfg.n, cfg.m, cfg.block_size, cfg.percdamp,
                                 cfg.batch_size, ctx.device)
    return _unstructured_output(model, tokenizer, cfg, params, nonzero, time.perf_counter() - start,
                                {"calibration": {"samples": cfg.num_samples, "seq_len": cfg.seq_len},
                                 "reconstruction_loss": loss})


# --- structured ------------------------------------------------------------------------------


def depth_stage(ctx: StageContext) -> StageOutput:
    """Remove decoder layers chosen by Block Influence, angular distance, or a list."""
    cfg: DepthConfig = ctx.config
    model, tokenizer = _load(ctx, cfg)
    total = arch.num_layers(model)
    count = cfg.count(total)
    if count >= total or (cfg.layers and max(cfg.layers) >= total):
        from slimforge.errors import ConfigError

        raise ConfigError(f"cannot remove {cfg.layers or count} from a model with {total} layers; at least one must stay")
    scores = None
    if cfg.criterion == "list":
        drop = sorted(cfg.layers or [])
    else:
        ids = _calibration(ctx, cfg)
        scores = depth_scores(model, ids, cfg.criterion, span=count, batch_size=cfg.batch_size, device=ctx.device)
        drop = layers_to_remove(scores, count, cfg.criterion)
    params = count_parameters(model)
    keep = [i for i in range(total) if i not in set(drop)]
    arch.keep_layers(model, keep)
    log.info("depth pruning (%s) removed layers %s of %d", cfg.criterion, drop, total)
    meta = {"criterion": cfg.criterion, "layers_before": total, "layers_after": len(keep),
            "removed_layers": drop, "kept_layers": keep, "scores": [round(s, 6) for s in scores or []],
            "parameters_before": params, "parameters_after": count_parameters(model)}
    return StageOutput(model=model, tokenizer=tokenizer, meta=meta,
                       metrics={"layers_after": len(keep), "parameters_after": meta["parameters_after"]})


def width_stage(ctx: StageContext) -> StageOutput:
    """Minitron-style width pruning (MLP channels, heads, hidden channels) by activation importance."""
    cfg: WidthConfig = ctx.config
    model, tokenizer = _load(ctx, cfg)
    arch.require_supported(model.config)
    targets = resolve_width_targets(cfg, model.config)
    ids = _calibration(ctx, cfg)
    params = count_parameters(model)
    before = {"hidden_size": int(model.config.hidden_size), "intermediate_size": int(model.config.intermediate_size),
              "num_attention_heads": int(model.config.num_attention_heads),
              "num_key_value_heads": arch.num_kv_heads(model.config)}
    pruned, kept, _ = prune_width(model, ids, targets, cfg.head_mode, cfg.rescale_norms, cfg.batch_size, ctx.device)
    after = count_parameters(pruned)
    expected = width_param_count(model.config, targets)
    if after != expected:
        raise RuntimeError(f"width pruning built {after} parameters where {expected} were planned")
    removed_hidden = sorted(set(range(before["hidden_size"])) - set(kept.hidden.tolist()))
    per_layer = {}
    for i in range(len(kept.mlp)):
        per_layer[str(i)] = {
            "removed_query_heads": sorted(set(range(before["num_attention_heads"])) - set(kept.q_heads[i].tolist())),
            "removed_kv_heads": sorted(set(range(before["num_key_value_heads"])) - set(kept.kv_heads[i].tolist())),
            "removed_mlp_channels": sorted(set(range(before["intermediate_size"])) - set(kept.mlp[i].tolist())),
        }
    meta = {"dims_before": before, "dims_after": dataclasses.asdict(targets), "head_mode": cfg.head_mode,
            "parameters_before": params, "parameters_after": after, "parameter_ratio": round(after / params, 6),
            "removed_hidden_channels": removed_hidden, "removed": per_layer,
            "calibration": {"samples": cfg.num_samples, "seq_len": cfg.seq_len}}
    log.info("width pruning: %s -> %s, %d -> %d parameters (%.1f%%)", before, dataclasses.asdict(targets), params, after,
             100 * after / params)
    del model
    return StageOutput(model=pruned, tokenizer=tokenizer, meta=meta,
                       metrics={"parameters_after": after, "parameter_ratio": meta["parameter_ratio"]})
