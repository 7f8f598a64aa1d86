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

A layer may have its own grid (:class:`IntScheme`, width and group size; mixed precision): the
config then has one group per distinct scheme, each naming its layers, and the layers a method
leaves in full precision go in the ignore list with ``lm_head``. A uniform model keeps the one
group that targets every ``Linear``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

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


class IntScheme(NamedTuple):
    """One layer's grid in the format: its width and its group size (``-1``: one scale per output channel)."""

    bits: int
    group_size: int


def layer_schemes(names: list[str], bits: int | None, group_size: int,
                  schemes: Mapping[str, IntScheme] | None = None) -> dict[str, IntScheme]:
    """Each named layer's scheme: its own from ``schemes``, else ``(bits, group_size)``."""
    own = schemes or {}
    missing = [name for name in names if name not in own and bits is None]
    if missing:
        raise ValueError(f"no width for layers {missing[:3]}: give bits or a scheme for each")
    return {name: own.get(name) or IntScheme(int(bits), group_size) for name in names}  # type: ignore[arg-type]


def config_groups(schemes: Mapping[str, IntScheme], act_order: bool = False) -> dict[str, Any]:
    """compressed-tensors' config groups: one per distinct scheme, targeting its layers by full name.

    A single scheme targets every ``Linear`` instead (the ignore list names the rest), which is
    what a uniform method has always written. vLLM matches a fused layer (``qkv_proj``) only
    when all its shards name one group, so a method giving layers their own widths must give
    shards that read one input the same one.
    """
    from compressed_tensors.quantization import QuantizationScheme

    distinct = sorted(set(schemes.values()))
    if len(distinct) == 1:
        return {"group_0": QuantizationScheme(targets=["Linear"],
                                              weights=quantization_args(*distinct[0], act_order))}
    return {f"group_{i}": QuantizationScheme(targets=sorted(n for n, s in schemes.items() if s == scheme),
                                             weights=quantization_args(*scheme, act_order))
            for i, scheme in enumerate(distinct)}


def compress_in_place(model: Any, scales: dict[str, torch.Tensor], bits: int | None, group_size: int,
                      act_order: bool = False, schemes: Mapping[str, IntScheme] | None = None) -> Any:
    """Turn the named linear layers (weights already on their grids) into packed compressed-tensors modules.

    Args:
        model: the model; each layer named in ``scales`` holds ``codes * scale`` values.
        scales: module name -> fp32 [out_features, groups] scales.
        bits, group_size: the grid of every layer ``schemes`` does not name.
        schemes: module name -> its own :class:`IntScheme` (a mixed-precision model).

    Returns:
        The ``ModelCompressor``, whose ``update_config(folder)`` writes the format's config.
    """
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationConfig,
        QuantizationStatus,
        apply_quantization_config,
    )

    modules = dict(model.named_modules())
    quantized = {name: modules[name] for name in scales}
    config = QuantizationConfig(config_groups=config_groups(layer_schemes(list(scales), bits, group_size, schemes),
                                                            act_order),
                                ignore=unquantized_linears(model, quantized))
    apply_quantization_config(model, config, show_progress=False)
    for name, module in quantized.items():
        param = module.weight_scale
        param.data.copy_(scales[name].reshape(param.shape).to(param.dtype))
        module.quantization_status = QuantizationStatus.FROZEN
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format=FORMAT)
    compressor.compress_model(model)
    return compressor


def save_compressed(model: Any, tokenizer: Any, folder: Path, scales: dict[str, torch.Tensor], bits: int | None,
                    group_size: int, act_order: bool, dtype: torch.dtype, meta: dict[str, Any],
                    schemes: Mapping[str, IntScheme] | None = None) -> int:
    """Pack, convert the rest to ``dtype``, and write a folder plain transformers reloads.

    ``bits``, ``group_size`` and ``schemes`` as in :func:`compress_in_place`.

    Returns:
        The packed model's memory footprint in bytes (what a runtime that keeps it packed holds).
    """
    compressor = compress_in_place(model, scales, bits, group_size, act_order, schemes)
    model.to(dtype)  # floating tensors only: scales (exact, pre-rounded), embeddings, norms
    footprint = int(model.get_memory_footprint())
    write_model_files(model, tokenizer, folder, meta)
    compressor.update_config(str(folder))
    return footprint


def _quantization_meta(cfg: IntWeightConfig, dtype: torch.dtype, act_order: bool,
                       widths: dict[str, int] | None = None) -> dict[str, Any]:
    """What ``slimforge.json`` records about the grid; with per-layer ``widths``, the map too (and
    ``bits`` only if they agree)."""
    chosen = set((widths or {}).values())
    bits = cfg.bits if not widths else (chosen.pop() if len(chosen) == 1 else None)
    meta = {"format": f"compressed-tensors/{FORMAT}", "bits": bits, "group_size": cfg.group_size,
            "symmetric": True, "act_order": act_order, "scale_dtype": str(dtype).replace("torch.", "")}
    return {**meta, "widths": widths} if widths else meta


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
            extra: dict[str, Any], widths: dict[str, int] | None = None) -> StageOutput:
    """Save the quantized model and report what it costs.

    Args:
        linears: every layer the method was given (``bits_per_weight`` is averaged over them all).
        scales: the layers quantized (a layer of ``linears`` not here stays in ``dtype``).
        widths: per-layer widths over ``linears`` (16: left in ``dtype``) when the method chose
            them per layer; default: ``cfg.bits`` everywhere.
    """
    from slimforge import moe

    cfg: IntWeightConfig = ctx.config
    numel = linear_numel(model, list(linears))
    params = count_parameters(model)
    quant = _quantization_meta(cfg, dtype, act_order, widths)
    schemes = {name: IntScheme(widths[name], cfg.group_size) for name in scales} if widths else None
    if moe.is_moe_config(model.config):  # the packed format cannot hold fused experts: see EXPERTS_SAVED
        quant["format"] = DEQUANTIZED_FORMAT
        model.to(dtype)
        footprint = int(model.get_memory_footprint())
        write_model_files(model, tokenizer, ctx.out_dir, {"num_parameters": params, "quantization": quant})
    else:
        footprint = save_compressed(model, tokenizer, ctx.out_dir, scales, cfg.bits, cfg.group_size, act_order,
                                    dtype, {"num_parameters": params, "quantization": quant}, schemes)
    meta = artifact_report(ctx.out_dir, numel, params, footprint, seconds, quantization={**quant, **extra})
    metrics = {k: meta[k] for k in ("bits_per_weight", "size_on_disk_bytes", "quantize_seconds")}
    grid = f"int{quant['bits']}" if quant["bits"] else "int" + "/".join(map(str, sorted(set((widths or {}).values()))))
    log.info("%s: %s g%d, %.2f bits/weight, %.1f MB on disk, %.1f s", cfg.method, grid, cfg.group_size,
             meta["bits_per_weight"], meta["size_on_disk_bytes"] / 1e6, seconds)
    return StageOutput(meta=meta, metrics=metrics)


# compressed-tensors packs ``nn.Linear`` modules, and transformers 5 keeps an MoE block's experts fused
# in two 3D parameters: a packed MoE folder does not reload (transformers cannot fuse the saved
# per-expert tensors back; seen with compressed-tensors 0.20, transformers 5.24). An MoE model is
# therefore quantized all the same (experts in the unfused view) and saved as a plain folder of its
# dequantized weights, every one on its int grid, in the storage dtype: it reloads with plain
# transformers and keeps the quantized model's function, but not the packed size.
DEQUANTIZED_FORMAT = "dequantized"
EXPERTS_SAVED = ("the whole model dequantized on the int grid in the storage dtype (compressed-tensors cannot "
                 "pack fused 3D experts)")


def _moe_meta(model: Any, report: dict[str, Any] | None) -> dict[str, Any]:
    """What ``slimforge.json`` says of an MoE model's experts (nothing for a dense one)."""
    from slimforge import moe

    if not moe.is_moe_config(model.config):
        return {}
    expert_weights = sum(b.experts.gate_up_proj.numel() + b.experts.down_proj.numel() for b in moe.moe_blocks(model))
    return {"moe": {**(report or {}), "experts_saved": EXPERTS_SAVED, "expert_weights": expert_weights}}


def rtn_stage(ctx: StageContext) -> StageOutput:
    """Round to nearest, layer by layer, no calibration: the baseline GPTQ must beat."""
    from slimforge import moe

    cfg: RtnConfig = ctx.config
    model, tokenizer, linears, dtype = _prepare(ctx)
    start = time.perf_counter()
    scales = {}
    with torch.no_grad(), moe.unfused_experts(model):
        targets = quantizable_linears(model)  # with each expert's linears, in the unfused view
        for name, linear in progress_bar(targets.items(), desc="rtn", total=len(targets), unit="linear"):
            result = rtn_quantize(linear.weight, cfg.bits, cfg.group_size, dtype)
            linear.weight.copy_(result.weight.to(linear.weight.dtype))
            if name in linears:
                scales[name] = result.scales
    seconds = time.perf_counter() - start
    return _finish(ctx, model, tokenizer, linears, scales, dtype, seconds, False, _moe_meta(model, None))


def gptq_stage(ctx: StageContext) -> StageOutput:
    """GPTQ on calibration windows from the training split, block by block."""
    from slimforge.calibration.windows import calibration_windows
    from slimforge.quantize.gptq import gptq_quantize_model

    cfg: GptqConfig = ctx.config
    model, tokenizer, linears, dtype = _prepare(ctx)
    ids = calibration_windows(ctx, cfg)
    start = time.perf_counter()
    from slimforge import moe

    only = None if moe.is_moe_config(model.config) else set(linears)  # MoE: the experts' linears too
    result = gptq_quantize_model(model, ids, cfg.bits, cfg.group_size, cfg.act_order, cfg.percdamp,
                                 cfg.block_size, cfg.batch_size, ctx.device, dtype, only=only,
                                 scale_search=cfg.scale_search, moe_calibration=cfg.moe_calibration,
                                 moe_min_tokens=cfg.moe_min_tokens)
    seconds = time.perf_counter() - start
    missing = sorted(set(linears) - set(result["scales"]))
    if missing:
        raise RuntimeError(f"GPTQ did not reach layers {missing[:3]}")
    scales = {name: result["scales"][name] for name in linears}
    losses = [result["loss"][name] for name in linears]
    extra = {"calibration_tokens": int(ids.numel()), "percdamp": cfg.percdamp, "block_size": cfg.block_size,
             "scale_search": cfg.scale_search,
             "mean_layer_loss": sum(losses) / len(losses), "dead_columns": result["dead_columns"],
             **_moe_meta(model, result.get("moe"))}
    return _finish(ctx, model, tokenizer, linears, scales, dtype, seconds, cfg.act_order, extra)
