"""Quantization: bitsandbytes, GPTQ and RTN (compressed-tensors), GGUF export.

This module only declares registry entries; implementations load on first use.
"""

from slimforge.registry import register

register(
    "quantize", "bnb_int8",
    "slimforge.quantize.bnb:bnb_stage", "slimforge.quantize.config:BnbInt8Config",
    "bitsandbytes LLM.int8: int8 weights, 16-bit outlier columns (reloads with plain transformers)",
)
register(
    "quantize", "bnb_nf4",
    "slimforge.quantize.bnb:bnb_stage", "slimforge.quantize.config:Bnb4bitConfig",
    "bitsandbytes NF4 (optional double quantization); the base a QLoRA distillation loads",
)
register(
    "quantize", "bnb_fp4",
    "slimforge.quantize.bnb:bnb_stage", "slimforge.quantize.config:Bnb4bitConfig",
    "bitsandbytes FP4 (optional double quantization)",
)
register(
    "quantize", "rtn",
    "slimforge.quantize.compressed:rtn_stage", "slimforge.quantize.config:RtnConfig",
    "round-to-nearest int3/4/8 weights, per group or channel, as compressed-tensors (the GPTQ baseline)",
)
register(
    "quantize", "gptq",
    "slimforge.quantize.compressed:gptq_stage", "slimforge.quantize.config:GptqConfig",
    "GPTQ int3/4/8 weights on calibration data (shared OBS solver), as compressed-tensors",
)
register(
    "quantize", "gguf",
    "slimforge.quantize.gguf_stage:gguf_stage", "slimforge.quantize.config:GgufConfig",
    "GGUF file (F16, Q8_0, Q4_0, or llama.cpp's K-quants and i-quants such as Q4_K_M, IQ4_NL with an "
    "importance matrix) with tokenizer and chat template, for llama.cpp-family runtimes",
)
register(
    "quantize", "awq",
    "slimforge.quantize.awq_stage:awq_stage", "slimforge.quantize.config:AwqConfig",
    "AWQ: activation-aware per-channel scales (grid-searched exponent) and clipping, then RTN or GPTQ "
    "rounding, as compressed-tensors int3/4/8 weights",
)
register(
    "quantize", "w8a8",
    "slimforge.quantize.w8a8_stage:w8a8_stage", "slimforge.quantize.config:W8A8Config",
    "W8A8: int8 weights and int8 activations (per-token dynamic or static per-tensor) with SmoothQuant, "
    "or FP8 E4M3 weights and activations, as compressed-tensors",
)
register(
    "quantize", "mixed_precision",
    "slimforge.quantize.mixed_stage:mixed_precision_stage", "slimforge.quantize.config:MixedPrecisionConfig",
    "per-layer int3/4/8/16 widths chosen from measured sensitivity (KL to the teacher) to fit an average "
    "bits-per-weight budget, GPTQ-rounded, as one compressed-tensors artifact",
)
