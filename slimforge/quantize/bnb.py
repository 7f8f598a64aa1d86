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

from slimforge.models import count_parameters, load_model, write_model_files
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


# bitsandbytes' AVX512-BF16 CPU kernel for 4-bit weights computes tiles of 32 output rows.
PACKED_CPU_TILE_ROWS = 32
# The same rule for model cards, whose readers load with plain transformers (no slimforge).
PLAIN_PATH_SNIPPET = [
    "# On CPUs with AVX512-BF16, bitsandbytes repacks 4-bit layers for a faster kernel and fails",
    "# on widths that kernel cannot tile: keep those layers on the plain path.",
    "for m in model.modules():",
    "    if getattr(m, \"support_avx512bf16_for_cpu\", False) and (",
    f"            m.out_features % {PACKED_CPU_TILE_ROWS} or m.in_features % m.weight.blocksize):",
    "        m.support_avx512bf16_for_cpu = False",
]


def fits_packed_cpu_layout(in_features: int, out_features: int, blocksize: int) -> bool:
    """Whether bitsandbytes can repack a 4-bit weight of this shape for its AVX512-BF16 CPU kernel.

    The repacking (``bitsandbytes.functional._convert_weight_packed_for_cpu``) tiles the output
    rows by 32 and reshapes the scales to whole quantization blocks per input row, so both must
    divide: SmolLM2's 576 fits, the default student's 432 (and tiny test widths) do not.
    """
    return out_features % PACKED_CPU_TILE_ROWS == 0 and in_features % blocksize == 0


def keep_4bit_layers_off_cpu_packing(model: Any, everywhere: bool = False) -> list[str]:
    """Keep bitsandbytes' 4-bit layers that cannot be repacked on the plain CPU path.

    On a CPU with AVX512-BF16, ``Linear4bit.forward`` in eval mode without gradients repacks its
    weight for a faster kernel on the first call, and a shape that does not fit raises there
    (``shape '[576, 6]' is invalid``). Clearing the layer's ``support_avx512bf16_for_cpu`` keeps it
    on dequantize-and-matmul, which every CPU runs; fitting layers keep the fast path. CPUs
    without the instruction never set the flag, so nothing changes there. Call it before the
    model's first forward pass: a weight already repacked stays repacked.

    Args:
        model: any model, possibly wrapped by peft; only bitsandbytes 4-bit layers are touched.
        everywhere: keep every 4-bit layer off the packed path, for a base that will be trained
            (QLoRA): the packed kernel has no backward, so an evaluation between training steps
            would leave later gradients silently wrong.

    Returns:
        The names of the layers this call moved off the packed path.
    """
    moved = []
    for name, module in model.named_modules():
        if not getattr(module, "support_avx512bf16_for_cpu", False):
            continue
        weight = module.weight
        state = getattr(weight, "quant_state", None)
        blocksize = state.blocksize if state is not None else weight.blocksize
        if everywhere or not fits_packed_cpu_layout(module.in_features, module.out_features, blocksize):
            module.support_avx512bf16_for_cpu = False
            moved.append(name)
    if moved and not everywhere:
        log.info("%d bitsandbytes 4-bit layers keep the plain CPU path (widths the AVX512-BF16 kernel "
                 "cannot tile)", len(moved))
    return moved
