"""Quantization-aware distillation (QAT): an integer weight-only model trained through fake quantization.

The stage takes a compressed-tensors artifact of slimforge's integer stages (GPTQ, RTN, AWQ,
mixed precision) and:

1. loads it, decompresses each quantized layer to ``codes * scales`` (exact in fp32) and
   replaces it by a :class:`~slimforge.quantize.fakequant.FakeQuantLinear` on that layer's own
   grid (bits and group size from the layer's scheme), its latent weight and scales starting
   at the parent's;
2. distils it from the teacher with the distillation stage's own trainer, losses and teacher
   cache (:func:`slimforge.distill.stages.train_from_teacher`); the schema says what trains
   (latent weights with LSQ scales, or the scales of frozen codes; the norms' gains) and at
   which relative learning rates (:func:`relative_param_groups`);
3. writes each layer's codes and stored scales back in compressed-tensors, through the
   quantize stages' writer: the artifact computes what the fake-quantized model computed.

QLoRA-KD (``kd`` with LoRA on an NF4 model) is the cheaper alternative: adapters beside a
frozen base, no fake quantization, and an adapter folder as the result.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from slimforge.distill.qat_params import StorageRounding, fake_quant_linears
from slimforge.errors import ConfigError
from slimforge.quantize.fakequant import FakeQuantLinear
from slimforge.stage import StageContext, StageOutput

if TYPE_CHECKING:  # pragma: no cover
    from slimforge.distill.config import QatConfig

log = logging.getLogger(__name__)


# --- the input: an integer weight-only compressed-tensors folder -----------------------------


def require_integer_parent(ctx: StageContext) -> Any:
    """The parent's config, once it is known to be an integer weight-only compressed-tensors folder.

    Raises:
        ConfigError: a GGUF file, a full-precision or bitsandbytes model, W8A8 or FP8 (one line,
            naming the stage and what to put before it).
    """
    from slimforge.distill.config import integer_grid_problem, qat_input_error

    ref = ctx.parent
    gguf = bool(ref.gguf_file or str(ref.path).endswith(".gguf"))
    config = None if gguf else ref.load_config()
    why = "is a GGUF file" if gguf else integer_grid_problem(config)
    if why:
        raise ConfigError(f"stages.{ctx.name}: {qat_input_error(f'its input {ref.label}', why)}")
    return config


def layer_grid(module: nn.Module) -> tuple[int, int]:
    """``(bits, group_size)`` of a loaded compressed-tensors layer (``-1``: per channel)."""
    weights = module.quantization_scheme.weights
    return int(weights.num_bits), int(weights.group_size) if weights.strategy == "group" else -1


def round_norms_to_storage(model: nn.Module, dtype: torch.dtype) -> list[str]:
    """Make each hidden-size norm's gain compute as its ``dtype`` rounding (what the checkpoint stores)."""
    from torch.nn.utils import parametrize

    from slimforge.arch import hidden_norms
    from slimforge.distill.config import meta_model

    # Named on a weightless copy: the arch adapter knows a plain model's parameters, not the
    # packed or fake-quantized layers' extra ones.
    names = list(hidden_norms(meta_model(model.config)))
    for name in names:
        parametrize.register_parametrization(model.get_submodule(name), "weight", StorageRounding(dtype))
    return names


def fake_quantize_model(model: Any, scale_dtype: torch.dtype, norms: bool = False) -> Any:
    """Turn a loaded compressed-tensors model's quantized layers into :class:`FakeQuantLinear`, in place.

    Each layer is decompressed by compressed-tensors (``codes * scales``, exact in fp32) and
    replaced by a fake-quantized layer on its own grid (its scheme's bits and group size), so the
    model starts out computing exactly what the compressed one computes. The quantization marker
    goes, so the model trains and saves as a plain one. ``norms``: the norms' gains compute as
    their ``scale_dtype`` rounding too (:func:`round_norms_to_storage`), so they can train.
    """
    from compressed_tensors.compressors.base import decompress_module

    if norms:
        round_norms_to_storage(model, scale_dtype)
    quantized = [(name, m) for name, m in model.named_modules() if hasattr(m, "quantization_scheme")
                 and getattr(m.quantization_scheme, "weights", None) is not None]
    for name, module in quantized:
        decompress_module(module)
        bits, group_size = layer_grid(module)
        fake = FakeQuantLinear.from_linear(module, module.weight_scale.detach(), bits, group_size, scale_dtype)
        model.set_submodule(name, fake)
    model.hf_quantizer.remove_quantization_config(model)
    return model


def grid_summary(model: nn.Module) -> str:
    """The grids of the fake-quantized layers in a few words: ``int4 g64`` or ``int4 g64 x180, int8 per channel x30``."""
    counts: dict[tuple[int, int], int] = {}
    for module in fake_quant_linears(model).values():
        key = (module.bits, module.group_size)
        counts[key] = counts.get(key, 0) + 1

    def name(bits: int, group_size: int) -> str:
        return f"int{bits} {'per channel' if group_size <= 0 else f'g{group_size}'}"

    if len(counts) == 1:
        return name(*next(iter(counts)))
    return ", ".join(f"{name(*key)} x{n}" for key, n in sorted(counts.items()))


# --- the output: the same format, the trained codes and scales -----------------------------------


def unfake(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, tuple[int, int]]]:
    """Replace each fake-quantized layer by a plain ``nn.Linear`` holding its exported weight, in place.

    Also bakes the norms' storage rounding into their gains.

    Returns:
        module name -> stored scales (fp32), and module name -> ``(bits, group_size)``.
    """
    from torch.nn.utils import parametrize

    scales, grids = {}, {}
    for name, module in fake_quant_linears(model).items():
        scales[name] = module.exported().scales
        grids[name] = (module.bits, module.group_size)
        model.set_submodule(name, module.to_linear())
    for module in list(model.modules()):
        if parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
    return scales, grids


def write_artifact(model: nn.Module, tokenizer: Any, folder: Path, dtype: torch.dtype) -> dict[str, Any]:
    """Write a fake-quantized model as compressed-tensors (its codes and stored scales) into ``folder``.

    Each layer keeps its own grid (a mixed-precision input stays mixed); the fake-quantized
    layers become plain ones on the way (:func:`unfake`).

    Returns:
        The artifact's quantization report (:func:`~slimforge.quantize.report.artifact_report`).
    """
    from slimforge.arch import count_parameters
    from slimforge.quantize.compressed import FORMAT, IntScheme, save_compressed
    from slimforge.quantize.report import artifact_report, linear_numel

    start = time.perf_counter()
    summary = grid_summary(model)
    scales, grids = unfake(model)
    schemes = {name: IntScheme(*grid) for name, grid in grids.items()}
    widths, group_sizes = {g[0] for g in grids.values()}, {g[1] for g in grids.values()}
    numel = linear_numel(model, list(scales))
    params = count_parameters(model)
    quant = {"format": f"compressed-tensors/{FORMAT}", "bits": widths.pop() if len(widths) == 1 else None,
             "group_size": group_sizes.pop() if len(group_sizes) == 1 else None, "symmetric": True,
             "scale_dtype": str(dtype).removeprefix("torch."), "grids": summary, "trained": "qat"}
    if quant["bits"] is None:
        quant["widths"] = {name: grid[0] for name, grid in grids.items()}
    footprint = save_compressed(model, tokenizer, folder, scales, None, -1, False, dtype,
                                {"num_parameters": params, "quantization": quant}, schemes)
    return artifact_report(folder, numel, params, footprint, time.perf_counter() - start, quantization=quant)


def qat_stage(ctx: StageContext) -> StageOutput:
    """Distil the parent's integer layers through fake quantization; write them back on their grids."""
    from slimforge.distill.stages import train_from_teacher
    from slimforge.quantize.common import storage_dtype
    from slimforge.quantize.config import require_compressed_tensors

    cfg: QatConfig = ctx.config
    require_compressed_tensors(cfg.method)
    config = require_integer_parent(ctx)
    dtype = storage_dtype("auto", config)  # the parent's scales and unquantized tensors were stored in it
    student, tokenizer = ctx.parent.load(device=ctx.device, dtype=torch.float32)
    fake_quantize_model(student, dtype, norms="norms" in cfg.trainable)
    grids = grid_summary(student)
    log.info("qat: %d fake-quantized layers (%s), training %s", len(fake_quant_linears(student)), grids,
             ", ".join(cfg.trainable))
    model, meta, metrics = train_from_teacher(ctx, student, tokenizer)
    model.eval()
    meta["distill"]["qat"] = {"trainable": list(cfg.trainable), "grids": grids}
    report = write_artifact(model, tokenizer, ctx.out_dir, dtype)
    metrics.update({k: report[k] for k in ("bits_per_weight", "size_on_disk_bytes")})
    return StageOutput(meta={**report, **meta}, metrics=metrics)
