"""Integer weight-only stages (RTN, GPTQ), saved in compressed-tensors' ``pack-quantized`` format.

compressed-tensors is the format llm-compressor writes: transformers loads it with the
``compressed-tensors`` package installed, and vLLM serves it (its WNA16 kernels take 4- and
8-bit weights with group sizes 32, 64, 128 or per channel). Its own classes do the work
here: ``apply_quantization_config`` attaches the scheme and the scale parameters,
``ModelCompressor`` packs the integer codes into int32 and writes the
``quantization_config`` into ``config.json``. The methods only choose the scales and the
values the weights round to; since those already lie exactly on the grid, the library's
quantizer recovers the very codes the method chose.

Only symmetric grids are written: compressed-tensors 0.20 with transformers 5 cannot reload
packed zero points (a shape mismatch on load), so an asymmetric checkpoint would not load.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch

from slimforge.arch import count_parameters
from slimforge.config import FieldError
from slimforge.models import write_model_files
from slimforge.progress import progress_bar
from slimforge.quantize.common import (
    check_group_widths,
    check_parent,
    quantizable_linears,
    storage_dtype,
    unquantized_linears,
)
from slimforge.quantize.config import (
    GptqConfig,
    IntWeightConfig,
    RtnConfig,
    require_compressed_tensors,
)
from slimforge.quantize.intquant import rtn_quantize
from slimforge.quantize.report import artifact_report, linear_numel
from slimforge.stage import StageContext, StageOutput

log = logging.getLogger(__name__)

FORMAT = "pack-quantized"


def quantization_args(bits: int, group_size: int, act_order: bool = False) -> Any:
    """compressed-tensors' description of a symmetric int grid (``group`` or ``channel`` strategy)."""
    from compressed_tensors.quantization import QuantizationArgs

    return QuantizationArgs(
        num_bits=bits, type="int", symmetric=True,
        strategy="group" if group_size > 0 else "channel",
        group_size=group_size if group_size > 0 else None,
        actorder="weight" if act_order else None,
    )


def compress_in_place(model: Any, scales: dict[str, torch.Tensor], bits: int, group_size: int,
                      act_order: bool = False) -> Any:
    """Turn the named linear layers (weights already on their grids) into packed compressed-tensors modules.

    Args:
        model: the model; each layer named in ``scales`` holds ``codes * scale`` values.
        scales: module name -> fp32 [out_features, groups] scales.

    Returns:
        The ``ModelCompressor``, whose ``update_config(folder)`` writes the format's config.
    """
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationConfig,
        QuantizationScheme,
        QuantizationStatus,
        apply_quantization_config,
    )

    modules = dict(model.named_modules())
    quantized = {name: modules[name] for name in scales}
    scheme = QuantizationScheme(targets=["Linear"], weights=quantization_args(bits, group_size, act_order))
    config = QuantizationConfig(config_groups={"group_0": scheme},
                                ignore=unquantized_linears(model, quantized))
    apply_quantization_config(model, config, show_progress=False)
    for name, module in quantized.items():
        param = module.weight_scale
        param.data.copy_(scales[name].reshape(param.shape).to(param.dtype))
        module.quantization_status = QuantizationStatus.FROZEN
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format=FORMAT)
    compressor.compress_model(model)
    return compressor


def save_compressed(model: Any, tokenizer: Any, folder: Path, scales: dict[str, torch.Tensor], bits: int,
                    group_size: int, act_order: bool, dtype: torch.dtype, meta: dict[str, Any]) -> int:
    """Pack, convert the rest to ``dtype``, and write a folder plain transformers reloads.

    Returns:
        The packed model's memory footprint in bytes (what a runtime that keeps it packed holds).
    """
    compressor = compress_in_place(model, scales, bits, group_size, act_order)
    model.to(dtype)  # floating tensors only: scales (exact, pre-rounded), embeddings, norms
    footprint = int(model.get_memory_footprint())
    write_model_files(model, tokenizer, folder, meta)
    compressor.update_config(str(folder))
    return footprint


def _quantization_meta(cfg: IntWeightConfig, dtype: torch.dtype, act_order: bool) -> dict[str, Any]:
    return {"format": f"compressed-tensors/{FORMAT}", "bits": cfg.bits, "group_size": cfg.group_size,
            "symmetric": True, "act_order": act_order, "scale_dtype": str(dtype).replace("torch.", "")}


def _prepare(ctx: StageContext) -> tuple[Any, Any, dict[str, torch.nn.Linear], torch.dtype]:
    """Checks before any work, then the parent model and the layers to quantize."""
    cfg: IntWeightConfig = ctx.config
    require_compressed_tensors(cfg.method)
    config = check_parent(ctx.parent, cfg)
    try:  # the plan checks this where it can tell the input's widths; here, for every other input
        cfg.check_widths(config, f"its input {ctx.parent.label}")
    except FieldError as err:
        raise err.at(f"stages.{ctx.name}") from None
    dtype = storage_dtype(cfg.storage_dtype, config)
    model, tokenizer = ctx.load_parent()
    linears = quantizable_linears(model)
    check_group_widths(linears, cfg.group_size)
    return model, tokenizer, linears, dtype


def _finish(ctx: StageContext, model: Any, tokenizer: Any, linears: dict[str, Any],
            scales: dict[str, torch.Tensor], dtype: torch.dtype, seconds: float, act_order: bool,
            extra: dict[str, Any]) -> StageOutput:
    cfg: IntWeightConfig = ctx.config
    numel = linear_numel(model, list(linears))
    params = count_parameters(model)
    quant = _quantization_meta(cfg, dtype, act_order)
    footprint = save_compressed(model, tokenizer, ctx.out_dir, scales, cfg.bits, cfg.group_size, act_order,
                                dtype, {"num_parameters": params, "quantization": quant})
    meta = artifact_report(ctx.out_dir, numel, params, footprint, seconds, quantization={**quant, **extra})
    metrics = {k: meta[k] for k in ("bits_per_weight", "size_on_disk_bytes", "quantize_seconds")}
    log.info("%s: %d-bit g%d, %.2f bits/weight, %.1f MB on disk, %.1f s", cfg.method, cfg.bits, cfg.group_size,
             meta["bits_per_weight"], meta["size_on_disk_bytes"] / 1e6, seconds)
    return StageOutput(meta=meta, metrics=metrics)


def rtn_stage(ctx: StageContext) -> StageOutput:
    """Round to nearest, layer by layer, no calibration: the baseline GPTQ must beat."""
    cfg: RtnConfig = ctx.config
    model, tokenizer, linears, dtype = _prepare(ctx)
    start = time.perf_counter()
    scales = {}
    with torch.no_grad():
        for name, linear in progress_bar(linears.items(), desc="rtn", total=len(linears), unit="linear"):
            result = rtn_quantize(linear.weight, cfg.bits, cfg.group_size, dtype)
            linear.weight.copy_(result.weight.to(linear.weight.dtype))
            scales[name] = result.scales
    seconds = time.perf_counter() - start
    return _finish(ctx, model, tokenizer, linears, scales, dtype, seconds, False, {})


def gptq_stage(ctx: StageContext) -> StageOutput:
    """GPTQ on calibration windows from the training split, block by block."""
    from slimforge.calibration.windows import calibration_windows
    from slimforge.quantize.gptq import gptq_quantize_model

    cfg: GptqConfig = ctx.config
    model, tokenizer, linears, dtype = _prepare(ctx)
    ids = calibration_windows(ctx, cfg)
    start = time.perf_counter()
    result = gptq_quantize_model(model, ids, cfg.bits, cfg.group_size, cfg.act_order, cfg.percdamp,
                                 cfg.block_size, cfg.batch_size, ctx.device, dtype, only=set(linears),
                                 scale_search=cfg.scale_search)
    seconds = time.perf_counter() - start
    missing = sorted(set(linears) - set(result["scales"]))
    if missing:
        raise RuntimeError(f"GPTQ did not reach layers {missing[:3]}")
    scales = {name: result["scales"][name] for name in linears}
    losses = [result["loss"][name] for name in linears]
    extra = {"calibration_tokens": int(ids.numel()), "percdamp": cfg.percdamp, "block_size": cfg.block_size,
             "scale_search": cfg.scale_search,
             "mean_layer_loss": sum(losses) / len(losses), "dead_columns": result["dead_columns"]}
    return _finish(ctx, model, tokenizer, linears, scales, dtype, seconds, cfg.act_order, extra)
