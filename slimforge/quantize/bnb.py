"""bitsandbytes stages: LLM.int8, NF4 and FP4, through transformers' ``BitsAndBytesConfig``.

The parent is loaded with the quantization config, so bitsandbytes quantizes each linear
layer as it arrives (on CPU as on CUDA), and the result is saved with ``save_pretrained``:
plain ``AutoModelForCausalLM.from_pretrained(folder)`` reloads it with bitsandbytes
installed. An NF4 artifact is also the input QLoRA-style distillation loads (a frozen 4-bit
base under LoRA adapters).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from slimforge.arch import count_parameters
from slimforge.models import load_model, write_model_files
from slimforge.quantize.common import check_parent, quiet_bitsandbytes, storage_dtype
from slimforge.quantize.config import Bnb4bitConfig, BnbConfig, BnbInt8Config
from slimforge.quantize.report import artifact_report
from slimforge.stage import StageContext, StageOutput

log = logging.getLogger(__name__)


def bnb_quantization_config(cfg: BnbConfig, compute_dtype: torch.dtype) -> Any:
    """The ``BitsAndBytesConfig`` a bitsandbytes method stands for."""
    from transformers import BitsAndBytesConfig

    common = {"llm_int8_skip_modules": list(cfg.skip_modules) or None,
              "llm_int8_enable_fp32_cpu_offload": cfg.cpu_offload}
    if isinstance(cfg, BnbInt8Config):
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=cfg.threshold, **common)
    assert isinstance(cfg, Bnb4bitConfig)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=cfg.method.removeprefix("bnb_"),
                              bnb_4bit_use_double_quant=cfg.double_quant,
                              bnb_4bit_compute_dtype=compute_dtype, **common)


def count_original_parameters(config: Any) -> int:
    """Parameters of the full-precision model, from its config, without allocating weights."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return count_parameters(model)


def bnb_stage(ctx: StageContext) -> StageOutput:
    """Quantize the parent with bitsandbytes while loading it, then save it."""
    cfg: BnbConfig = ctx.config
    cfg.check_device(ctx.device.type)
    config = check_parent(ctx.parent, cfg)
    quiet_bitsandbytes()
    dtype = storage_dtype(cfg.storage_dtype, config)
    compute = ctx.dtype if getattr(cfg, "compute_dtype", "auto") == "auto" else getattr(torch, cfg.compute_dtype)
    params = count_original_parameters(config)
    start = time.perf_counter()
    model, tokenizer = load_model(ctx.parent.path, device=ctx.device, dtype=dtype,
                                  revision=ctx.parent.revision, trust_remote_code=ctx.parent.trust_remote_code,
                                  allow_pickle=ctx.parent.allow_pickle,
                                  quantization_config=bnb_quantization_config(cfg, compute))
    seconds = time.perf_counter() - start
    linears = bnb_linears(model)
    numel = {name: int(m.in_features) * int(m.out_features) for name, m in linears.items()}
    quant = {"format": f"bitsandbytes/{cfg.method.removeprefix('bnb_')}",
             "skip_modules": list(cfg.skip_modules), "storage_dtype": str(dtype).replace("torch.", "")}
    if isinstance(cfg, BnbInt8Config):
        quant["threshold"] = cfg.threshold
    else:
        quant.update(double_quant=cfg.double_quant, compute_dtype=str(compute).replace("torch.", ""), block_size=64)
    footprint = int(model.get_memory_footprint())
    write_model_files(model, tokenizer, ctx.out_dir, {"num_parameters": params, "quantization": quant})
    meta = artifact_report(ctx.out_dir, numel, params, footprint, seconds, quantization=quant)
    metrics = {k: meta[k] for k in ("bits_per_weight", "size_on_disk_bytes", "quantize_seconds")}
    log.info("%s: %.2f bits/weight, %.1f MB on disk, %.1f s", cfg.method, meta["bits_per_weight"],
             meta["size_on_disk_bytes"] / 1e6, seconds)
    return StageOutput(meta=meta, metrics=metrics)


def bnb_linears(model: Any) -> dict[str, Any]:
    """The decoder blocks' linear layers that bitsandbytes replaced (``Linear8bitLt`` / ``Linear4bit``)."""
    import bitsandbytes as bnb

    kinds = (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit)
    found = {name: m for name, m in model.named_modules() if isinstance(m, kinds)}
    if not found:
        raise RuntimeError("bitsandbytes quantized no linear layer of the model")
    return found
