"""Merging a LoRA adapter into its base: a plain full-precision folder, or the base's own
bitsandbytes format again.

A LoRA distillation of a quantized base (QLoRA) saves the adapter alone; the ``merge_lora``
stage turns it into a folder that loads with plain transformers:

- each bitsandbytes layer of the base becomes an ``nn.Linear`` holding the float32 weights its
  forward multiplies by (4-bit code x block scale, int8 code x row scale), computed by
  bitsandbytes' own dequantization straight into float32: transformers' ``model.dequantize()``
  rounds them to the storage dtype first, which is not what the adapter was trained against;
- the adapter is added in float32 (peft's ``merge_and_unload``) and the sum stored in the
  config's ``dtype``;
- with ``requantize``, that merged model is saved and loaded again through the base's own
  ``quantization_config``, exactly as a bnb stage with the base's settings would quantize it.

Why this lives with distillation: it completes a LoRA distillation's result, the way a LoRA over a
full-precision base is merged on save (:mod:`slimforge.distill.stages`).
"""

from __future__ import annotations

import copy
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from slimforge.distill.config import MergeLoraConfig
from slimforge.errors import ConfigError
from slimforge.stage import StageContext, StageOutput

log = logging.getLogger(__name__)


def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """A bitsandbytes linear layer's weight as the float32 ``[out, in]`` matrix it stands for.

    Raises:
        TypeError: ``module`` is not a bitsandbytes ``Linear4bit`` or ``Linear8bitLt``.
    """
    import bitsandbytes as bnb

    weight = module.weight
    if isinstance(module, bnb.nn.Linear4bit):
        state = weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            raise RuntimeError("the 4-bit weight was repacked for the AVX512-BF16 CPU kernel by a forward pass; "
                               "dequantize a freshly loaded model")
        exact = copy.copy(state)
        exact.dtype = torch.float32  # the codes times their scales, not rounded to the storage dtype
        return bnb.functional.dequantize_4bit(weight.data, exact)
    if isinstance(module, bnb.nn.Linear8bitLt):
        scales = weight.SCB if getattr(weight, "SCB", None) is not None else module.state.SCB
        return bnb.functional.int8_vectorwise_dequant(weight.data, scales).float()
    raise TypeError(f"{type(module).__name__} is not a bitsandbytes linear layer")


def dequantize_bnb_layers(model: nn.Module) -> list[str]:
    """Replace every bitsandbytes linear layer of ``model`` by a float32 ``nn.Linear``, in place.

    The model's quantization marker (``hf_quantizer``, ``config.quantization_config``) goes too,
    so it saves as a plain folder.

    Returns:
        The names of the replaced layers.
    """
    import bitsandbytes as bnb

    names = [name for name, m in model.named_modules() if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))]
    for name in names:
        module = model.get_submodule(name)
        weight = dequantized_weight(module)
        plain = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                          device=weight.device, dtype=torch.float32)
        with torch.no_grad():
            plain.weight.copy_(weight)
            if module.bias is not None:
                plain.bias.copy_(module.bias.float())
        model.set_submodule(name, plain)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    return names


def merge_adapter(base: nn.Module, adapter_folder: Path) -> nn.Module:
    """``base`` with the LoRA adapter saved in ``adapter_folder`` added into its weights (peft's merge)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(base, str(adapter_folder)).merge_and_unload()


def require_adapter_input(ctx: StageContext) -> Path:
    """The stage's input folder, which must be a LoRA adapter; anything else is a one-line error."""
    from slimforge.models import is_adapter_folder

    folder = Path(ctx.parent.path).expanduser()
    if ctx.parent.gguf_file or not folder.is_dir() or not is_adapter_folder(folder):
        raise ConfigError(
            f"stages.{ctx.name} (merge_lora) merges a LoRA adapter into its base, but its input {ctx.parent.label} "
            f"({ctx.parent.path}) is not an adapter folder (no adapter_config.json); put it right after a distill "
            "stage with lora.enabled=true on a quantized (bnb_*) model: a LoRA on a full-precision base is "
            "merged already")
    return folder


def base_quantization(config: Any, base: str) -> dict[str, Any] | None:
    """The base's bitsandbytes settings (``config.json``'s ``quantization_config``), None when it is not quantized.

    Raises:
        ConfigError: the base is quantized some other way, which this stage cannot dequantize.
    """
    quant = getattr(config, "quantization_config", None)
    if quant is None:
        return None
    quant = quant if isinstance(quant, dict) else quant.to_dict()
    if quant.get("quant_method") != "bitsandbytes":
        raise ConfigError(f"merge_lora dequantizes bitsandbytes bases, but the adapter's base {base} is "
                          f"{quant.get('quant_method')}; merge the adapter into that model's full-precision "
                          "source instead")
    return quant


def bnb_format(quant: dict[str, Any]) -> str:
    """``bitsandbytes/nf4``, ``bitsandbytes/fp4`` or ``bitsandbytes/int8`` for a ``quantization_config``."""
    return "bitsandbytes/" + ("int8" if quant.get("load_in_8bit") else str(quant.get("bnb_4bit_quant_type", "fp4")))


def merge_lora_stage(ctx: StageContext) -> StageOutput:
    """Merge the input adapter into its (dequantized) base; re-quantize it as the base when asked."""
    from slimforge.arch import count_parameters
    from slimforge.models import load_model, require_adapter_base
    from slimforge.quantize.common import storage_dtype

    cfg: MergeLoraConfig = ctx.config
    folder = require_adapter_input(ctx)
    base = require_adapter_base(folder)
    base_config = ctx.parent.load_config()  # the base's: load_config follows an adapter to it
    quant = base_quantization(base_config, base)
    if cfg.requantize and quant is None:
        raise ConfigError(f"stages.{ctx.name}.requantize=true re-applies the base's bitsandbytes settings, but the "
                          f"adapter's base {base} is not quantized; set requantize=false, and add a quantize stage "
                          "after this one for another format")
    dtype = storage_dtype(cfg.dtype, base_config)
    start = time.perf_counter()
    model = load_model(base, device=ctx.device, dtype=torch.float32, trust_remote_code=ctx.parent.trust_remote_code,
                       allow_pickle=ctx.parent.allow_pickle, with_tokenizer=False)
    dequantized = dequantize_bnb_layers(model) if quant is not None else []
    merged = merge_adapter(model, folder).to(dtype)
    merged.eval()
    tokenizer = ctx.parent.load_tokenizer()
    meta: dict[str, Any] = {"merge": {
        "adapter": str(folder), "base": base, "base_format": bnb_format(quant) if quant else "hf",
        "dequantized_layers": len(dequantized), "dtype": str(dtype).removeprefix("torch."),
        "requantized": cfg.requantize}, "num_parameters": count_parameters(merged)}
    log.info("merged the adapter into %s (%d layers dequantized), %s", base, len(dequantized), meta["merge"]["dtype"])
    if not cfg.requantize:
        meta["merge"]["merge_seconds"] = round(time.perf_counter() - start, 3)
        return StageOutput(model=merged, tokenizer=tokenizer, meta=meta)
    assert quant is not None
    return requantize(ctx, merged, tokenizer, quant, dtype, meta, start)


def bnb_record(quant: dict[str, Any], storage: str) -> dict[str, Any]:
    """What ``slimforge.json`` records about a bitsandbytes quantization, as the bnb stage records it."""
    record: dict[str, Any] = {"format": bnb_format(quant), "storage_dtype": storage,
                              "skip_modules": list(quant.get("llm_int8_skip_modules") or [])}
    if quant.get("load_in_8bit"):
        record["threshold"] = quant.get("llm_int8_threshold")
    else:
        record.update(double_quant=bool(quant.get("bnb_4bit_use_double_quant")),
                      compute_dtype=str(quant.get("bnb_4bit_compute_dtype")), block_size=64)
    return record


def requantize(ctx: StageContext, merged: nn.Module, tokenizer: Any, quant: dict[str, Any], dtype: torch.dtype,
               meta: dict[str, Any], start: float) -> StageOutput:
    """Quantize the merged model with the base's settings into ``ctx.out_dir``, as a bnb stage would.

    The merged weights are saved in ``dtype`` and loaded through the base's ``BitsAndBytesConfig``:
    the bnb stage's path (quantize while loading), so the artifact equals a bnb stage with the
    base's settings run on the plain merged folder.
    """
    from transformers import BitsAndBytesConfig

    from slimforge.models import load_model, write_model_files
    from slimforge.quantize.bnb import bnb_linears
    from slimforge.quantize.common import quiet_bitsandbytes
    from slimforge.quantize.report import artifact_report

    record, params = bnb_record(quant, meta["merge"]["dtype"]), meta["num_parameters"]
    quiet_bitsandbytes()
    # A folder of its own per process: under `accelerate launch` every rank runs a distill-kind stage.
    with tempfile.TemporaryDirectory(prefix="merged-", dir=ctx.work_dir) as scratch:
        merged.save_pretrained(scratch, safe_serialization=True)
        model = load_model(scratch, device=ctx.device, dtype=dtype, with_tokenizer=False,
                           quantization_config=BitsAndBytesConfig.from_dict(quant))
        write_model_files(model, tokenizer, ctx.out_dir, {"num_parameters": params, "quantization": record})
    numel = {name: int(m.in_features) * int(m.out_features) for name, m in bnb_linears(model).items()}
    seconds = time.perf_counter() - start
    report = artifact_report(ctx.out_dir, numel, params, int(model.get_memory_footprint()), seconds,
                             quantization=record)
    meta["merge"]["merge_seconds"] = round(seconds, 3)
    return StageOutput(meta={**report, **meta},
                       metrics={k: report[k] for k in ("bits_per_weight", "size_on_disk_bytes")})
