"""W8A8 as a stage: SmoothQuant, weight rounding and activation scales, block by block; saved as compressed-tensors.

Each decoder block is calibrated on the outputs of the blocks before it as already quantized,
activation rounding included (every finished linear rounds its input as the saved model will,
:func:`slimforge.quantize.w8a8.quantize_inputs`). One pass over the block records, per linear,
its inputs' largest magnitude per channel and, for GPTQ, their Hessian; everything after works
from those: SmoothQuant's scales for each chosen :class:`slimforge.arch.ScalingGroup`, folded
exactly (:func:`slimforge.quantize.smoothing.fold_scales`; the readers' inputs become ``x / s``,
so their largest values become ``max|x_j| / s_j`` and their Hessian ``H / (s s^T)``), then each
weight's min-max scales and its rounding (RTN, or GPTQ on the shared solver with the W8A8 grid),
then a static layer's input scale.

The folder is compressed-tensors' ``int-quantized`` (int8 codes) or ``float-quantized`` (E4M3
codes) with the activation scheme in ``config.json``: transformers reloads it and rounds every
quantized linear's input in the forward pass, as the calibration did; vLLM serves it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from slimforge.config import FieldError
from slimforge.quantize.config import W8A8Config
from slimforge.stage import StageContext, StageOutput, TeacherInfo

log = logging.getLogger(__name__)

# compressed-tensors' names for each W8A8 type: its format, and its QuantizationArgs type.
FORMATS = {"int8": "int-quantized", "fp8": "float-quantized"}
ALPHA_SEARCH_ROWS = 4096
CT_TYPES = {"int8": "int", "fp8": "float"}


@dataclass
class W8A8Result:
    """What W8A8 did to a model: the scales to save, and what the report says about it."""

    weight_scales: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> fp32 [rows, 1] or [1, 1]
    input_scales: dict[str, torch.Tensor] = field(default_factory=dict)  # static: name -> fp32 [1]
    smoothed: dict[str, list[float]] = field(default_factory=dict)  # group -> per block: max s / min s
    alphas: dict[str, list[float]] = field(default_factory=dict)  # alpha search: group -> per block: the chosen alpha
    loss: dict[str, float] = field(default_factory=dict)  # GPTQ: name -> the sweep's output-error estimate
    hooks: list[Any] = field(default_factory=list)  # the activation rounding of every finished linear

    def remove_hooks(self) -> None:
        for handle in self.hooks:
            handle.remove()
        self.hooks = []


def smooth_block(layer: Any, config: Any, stats: Any, cfg: W8A8Config, norm_offset: float,
                 result: W8A8Result) -> dict[str, torch.Tensor]:
    """Fold SmoothQuant's scales into the block's chosen groups.

    Returns:
        Local linear name -> the divisor ``s`` its input now carries (readers of smoothed groups only).
    """
    from slimforge.arch import scaling_groups
    from slimforge.quantize.smoothing import fold_scales, group_readers
    from slimforge.quantize.w8a8 import reader_column_max, search_alpha, smoothquant_scales

    divisors = {}
    for group in scaling_groups(layer, config, f"quantize method {cfg.method}"):
        if group.name not in cfg.smoothquant_groups:
            continue
        inputs = stats[group.targets[0]]  # the readers share one input, and its statistics
        act_max = inputs.act_max
        weights = [reader.weight for reader in group_readers(layer, group)]
        alpha = cfg.smoothquant_alpha
        if cfg.smoothquant_alpha_grid:
            alpha, _ = search_alpha(inputs.rows, weights, act_max, cfg.smoothquant_alpha_grid, cfg.type,
                                    cfg.weight_scales == "channel", cfg.activations == "static")
            result.alphas.setdefault(group.name, []).append(alpha)
        scales = smoothquant_scales(act_max, reader_column_max(weights), alpha)
        fold_scales(layer, group, scales, norm_offset)
        divisors.update(dict.fromkeys(group.targets, scales))
        result.smoothed.setdefault(group.name, []).append(float(scales.max() / scales.min()))
    return divisors


def round_weight(weight: torch.Tensor, hessian: torch.Tensor | None, cfg: W8A8Config,
                 scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, float | None]:
    """One weight on its 8-bit grid: ``(values (fp32), scales, GPTQ loss or None)``.

    The scales are min-max, fixed before rounding; GPTQ (given ``hessian``) then moves each
    column's rounding error onto the columns not yet rounded, on the same grid.
    """
    from slimforge.quantize.w8a8 import fake_quantize, weight_scales

    kind = cfg.type
    scales = weight_scales(weight, kind, cfg.weight_scales == "channel", scale_dtype)
    if hessian is None:
        return fake_quantize(weight.detach().float(), scales.to(weight.device), kind), scales, None
    from slimforge.quantize.gptq import gptq_quantize_weight

    rows = scales.expand(weight.shape[0], 1).to(weight.device)
    result = gptq_quantize_weight(weight, hessian, 8, -1, act_order=cfg.act_order, percdamp=cfg.percdamp,
                                  block_size=cfg.block_size, scales=rows,
                                  grid=lambda column, scale: fake_quantize(column, scale, kind))
    return result.weight, scales, result.loss


def quantize_linear(name: str, linear: torch.nn.Linear, inputs: Any, divisor: torch.Tensor | None,
                    cfg: W8A8Config, scale_dtype: torch.dtype, result: W8A8Result) -> None:
    """Round one linear's weight, fix its static input scale, and start rounding its inputs.

    Args:
        inputs: the :class:`slimforge.calibration.activations.InputStats` of its calibration inputs
            (None when ``cfg`` measures nothing).
        divisor: the SmoothQuant scales its input now carries (None: its group was not smoothed).
    """
    from slimforge.quantize.w8a8 import quantize_inputs, static_scale

    hessian = None
    if inputs is not None and cfg.rounding == "gptq":
        hessian = inputs.hessian if divisor is None else inputs.hessian / torch.outer(divisor, divisor)
    weight, result.weight_scales[name], loss = round_weight(linear.weight, hessian, cfg, scale_dtype)
    linear.weight.copy_(weight.to(linear.weight.dtype))
    if loss is not None:
        result.loss[name] = loss
    scale = None
    if cfg.activations == "static":
        amax = inputs.act_max if divisor is None else inputs.act_max / divisor
        scale = result.input_scales[name] = static_scale(amax.max().cpu(), cfg.type, scale_dtype)
    result.hooks.append(quantize_inputs(linear, cfg.type, scale))


@torch.no_grad()
def w8a8_quantize_model(model: Any, input_ids: torch.Tensor | None, cfg: W8A8Config, device: torch.device,
                        scale_dtype: torch.dtype, only: set[str]) -> W8A8Result:
    """Smooth, round and calibrate every decoder block in place.

    Args:
        model: a causal LM of a family :mod:`slimforge.arch` knows.
        input_ids: int64 [n, seq_len] calibration tokens (None when ``cfg`` measures nothing).
        cfg: the method's settings.
        device: where each block runs.
        scale_dtype: the dtype scales are stored in (they are rounded to it before use).
        only: full names of the linears to quantize.

    Returns:
        A :class:`W8A8Result`; its ``hooks`` round every quantized linear's input, so until they
        are removed the model computes what the saved folder computes.
    """
    from slimforge.arch import norm_weight_offset
    from slimforge.calibration.activations import record_linear_inputs
    from slimforge.calibration.layerwise import layerwise

    result = W8A8Result()
    try:
        if not cfg.uses_data():  # per-token scales and RTN: nothing to measure, no walk
            for name, linear in ((n, m) for n, m in model.named_modules() if n in only):
                quantize_linear(name, linear, None, None, cfg, scale_dtype, result)
            return result
        names = {id(module): name for name, module in model.named_modules()}
        offset = norm_weight_offset(model.config)
        # The alpha search measures output errors on a sample of each input's rows: about ALPHA_SEARCH_ROWS.
        stride = max(1, input_ids.numel() // ALPHA_SEARCH_ROWS) if cfg.smooths() and cfg.smoothquant_alpha_grid else 0
        for step in layerwise(model, input_ids, batch_size=cfg.batch_size, device=device, desc="w8a8"):
            linears = {local: m for local, m in step.linears().items() if names[id(m)] in only}
            with record_linear_inputs(linears, hessian=cfg.rounding == "gptq", sample_stride=stride) as stats:
                step.run()
            divisors = smooth_block(step.layer, model.config, stats, cfg, offset, result) if cfg.smooths() else {}
            for local, linear in linears.items():
                quantize_linear(names[id(linear)], linear, stats[local], divisors.get(local), cfg, scale_dtype,
                                result)
    except BaseException:
        result.remove_hooks()
        raise
    return result


def quantization_scheme(cfg: W8A8Config) -> Any:
    """compressed-tensors' scheme for the config: 8-bit weights and 8-bit input activations, symmetric."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    kind = CT_TYPES[cfg.type]
    dynamic = cfg.activations == "dynamic"
    weights = QuantizationArgs(num_bits=8, type=kind, symmetric=True, strategy=cfg.weight_scales)
    inputs = QuantizationArgs(num_bits=8, type=kind, symmetric=True, strategy="token" if dynamic else "tensor",
                              dynamic=dynamic)
    return QuantizationScheme(targets=["Linear"], weights=weights, input_activations=inputs)


def compress_w8a8(model: Any, linears: dict[str, torch.nn.Linear], result: W8A8Result, cfg: W8A8Config) -> Any:
    """Turn the quantized linears (weights on their grids) into compressed-tensors modules with their scales.

    Returns:
        The ``ModelCompressor``, whose ``update_config(folder)`` writes the format's config.
    """
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationConfig,
        QuantizationStatus,
        apply_quantization_config,
    )

    from slimforge.quantize.common import unquantized_linears

    config = QuantizationConfig(config_groups={"group_0": quantization_scheme(cfg)},
                                ignore=unquantized_linears(model, linears))
    apply_quantization_config(model, config, show_progress=False)
    for name, module in linears.items():
        for param, value in ((module.weight_scale, result.weight_scales[name]),
                             (getattr(module, "input_scale", None), result.input_scales.get(name))):
            if value is not None:
                param.data.copy_(value.reshape(param.shape).to(param.dtype))
        module.quantization_status = QuantizationStatus.FROZEN
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format=FORMATS[cfg.type])
    compressor.compress_model(model)
    return compressor


def to_storage_dtype(model: Any, dtype: torch.dtype) -> None:
    """Every floating parameter but the 8-bit codes in ``dtype`` (``model.to`` would widen FP8 codes too)."""
    for module in model.modules():
        for param in module.parameters(recurse=False):
            if param.dtype.is_floating_point and param.dtype.itemsize > 1:
                param.data = param.data.to(dtype)


def _report(result: W8A8Result, cfg: W8A8Config, tokens: int) -> dict[str, Any]:
    """The method's part of ``slimforge.json``."""
    report: dict[str, Any] = {"format": f"compressed-tensors/{FORMATS[cfg.type]}", "type": cfg.type,
                              "activations": cfg.activations, "weight_scales": cfg.weight_scales,
                              "rounding": cfg.rounding, "smoothquant_alpha": cfg.smoothquant_alpha,
                              "calibration_tokens": tokens}
    if result.smoothed:
        # How far each group's divisors spread (largest / smallest), averaged over blocks.
        report["smoothing_spread"] = {g: round(sum(v) / len(v), 3) for g, v in result.smoothed.items()}
    if result.alphas:
        report["smoothquant_alphas"] = {g: [round(a, 3) for a in v] for g, v in result.alphas.items()}
    if result.loss:
        report["mean_layer_loss"] = sum(result.loss.values()) / len(result.loss)
    if result.input_scales:
        values = [float(s) for s in result.input_scales.values()]
        report["input_scale_range"] = [min(values), max(values)]
    return report


def check_writable(model: Any, cfg: W8A8Config) -> None:
    """Every weight in the decoder blocks must be an ``nn.Linear``'s: the writer's scheme targets that
    layer type, and any other (GPT-2's Conv1D, fused experts) would stay unquantized unannounced.

    Raises:
        ConfigError: naming the first such weights, before any calibration.
    """
    from slimforge.arch import decoder_layers
    from slimforge.errors import ConfigError

    others = [f"layers.{i}.{local}.{param_name} ({type(module).__name__} {tuple(param.shape)})"
              for i, block in enumerate(decoder_layers(model)) for local, module in block.named_modules()
              if not isinstance(module, torch.nn.Linear)
              for param_name, param in module.named_parameters(recurse=False) if param.ndim >= 2]
    if others:
        raise ConfigError(f"quantize method {cfg.method} ({cfg.type}) writes compressed-tensors schemes for "
                          f"nn.Linear layers, and this model's decoder also holds {', '.join(others[:2])}"
                          f"{f' and {len(others) - 2} more' if len(others) > 2 else ''}, which that writer "
                          "cannot express; quantize a model whose decoder weights are all nn.Linear")


def _prepare(ctx: StageContext) -> tuple[Any, Any, dict[str, torch.nn.Linear], torch.dtype]:
    """Checks before any work (the actual input, which the plan may not have seen), then the model."""
    from slimforge.quantize.common import check_parent, quantizable_linears, storage_dtype
    from slimforge.quantize.config import require_compressed_tensors

    cfg: W8A8Config = ctx.config
    require_compressed_tensors(cfg.method)
    config = check_parent(ctx.parent, cfg)
    try:
        cfg.check_input(TeacherInfo(config=config, tokenizer=None))
    except FieldError as err:
        raise err.at(f"stages.{ctx.name}") from None
    dtype = storage_dtype(cfg.storage_dtype, config)
    model, tokenizer = ctx.load_parent()
    check_writable(model, cfg)
    return model, tokenizer, quantizable_linears(model), dtype


def w8a8_stage(ctx: StageContext) -> StageOutput:
    """W8A8 int8 or FP8 on calibration windows from the training split, as compressed-tensors."""
    from slimforge.arch import count_parameters
    from slimforge.calibration.windows import calibration_windows
    from slimforge.models import write_model_files
    from slimforge.quantize.report import artifact_report, linear_numel

    cfg: W8A8Config = ctx.config
    model, tokenizer, linears, dtype = _prepare(ctx)
    ids = calibration_windows(ctx, cfg) if cfg.uses_data() else None
    start = time.perf_counter()
    result = w8a8_quantize_model(model, ids, cfg, ctx.device, dtype, only=set(linears))
    result.remove_hooks()  # compressed-tensors' own forward rounds the inputs from here on
    seconds = time.perf_counter() - start
    missing = sorted(set(linears) - set(result.weight_scales))
    if missing:
        raise RuntimeError(f"W8A8 did not reach layers {missing[:3]}")
    numel = linear_numel(model, list(linears))
    params = count_parameters(model)
    quant = _report(result, cfg, 0 if ids is None else int(ids.numel()))
    compressor = compress_w8a8(model, linears, result, cfg)
    to_storage_dtype(model, dtype)
    footprint = int(model.get_memory_footprint())
    write_model_files(model, tokenizer, ctx.out_dir, {"num_parameters": params, "quantization": quant})
    compressor.update_config(str(ctx.out_dir))
    meta = artifact_report(ctx.out_dir, numel, params, footprint, seconds, quantization=quant)
    metrics = {k: meta[k] for k in ("bits_per_weight", "size_on_disk_bytes", "quantize_seconds")}
    log.info("w8a8: %s %s activations, %.2f bits/weight, %.1f MB on disk, %.1f s", cfg.type, cfg.activations,
             meta["bits_per_weight"], meta["size_on_disk_bytes"] / 1e6, seconds)
    return StageOutput(meta=meta, metrics=metrics)
