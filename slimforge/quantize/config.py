"""Schemas of the quantization methods, and the checks that run before any weights load.

Every method needs full-precision weights as input (quantizing a quantized model twice
compounds both errors), so each ``preflight`` refuses a teacher that is already quantized;
the stage repeats the check against its actual parent, which preflight cannot see when the
stage is not first in the pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from slimforge.config import (
    FieldError,
    StageConfig,
    calibration_card_data,
    check_choice,
    check_fraction,
    check_int,
)
from slimforge.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from slimforge.stage import TeacherInfo

# Storage dtype of everything a method leaves unquantized (embeddings, norms, lm_head) and of
# its scales; "auto" keeps the parent's own dtype.
STORAGE_DTYPES = ("bfloat16", "float16", "float32", "auto")
COMPUTE_DTYPES = ("auto", "bfloat16", "float16", "float32")
# Weight-only integer formats (compressed-tensors pack-quantized): the bit widths GPTQ and RTN
# write, and the group sizes vLLM's WNA16 kernels take (-1 = one scale per output channel).
INT_BITS = (3, 4, 8)
# How a group's scale is chosen; slimforge.quantize.intquant.group_scales implements each one.
SCALE_SEARCHES = ("minmax", "mse")
GROUP_SIZES = (-1, 32, 64, 128)
# The GGUF tensor types the export writes (the gguf package quantizes them in Python), each with
# the type the embedding / output matrix takes by default: llama.cpp keeps that matrix at higher
# precision under 4- and 5-bit types, and Q8_0 is the nearest such type written here. The file
# type, the writer and the tests (every type exported, reloaded and verified) all read this table.
GGUF_TYPES: dict[str, str] = {"F16": "F16", "Q8_0": "Q8_0", "Q5_0": "Q8_0", "Q4_0": "Q8_0"}
GGUF_MODEL_TYPES = ("llama", "mistral", "qwen2")


def parent_quantization(config: Any) -> str | None:
    """The quantization method a model config declares (``quant_method``), or None."""
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        return None
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    return str(getattr(method, "value", method) or "unknown")


def require_full_precision(config: Any, method: str, source: str) -> None:
    """Refuse an input that is already quantized.

    Raises:
        ConfigError: naming the input's quantization and what to give instead.
    """
    found = parent_quantization(config)
    if found:
        raise ConfigError(
            f"quantize method {method} needs full-precision weights, but {source} is already quantized "
            f"({found}); quantize the full-precision model it was made from instead"
        )


def require_compressed_tensors(method: str) -> None:
    """The format's library must be installed (without importing it: that loads torch)."""
    import importlib.util

    if importlib.util.find_spec("compressed_tensors") is None:
        raise ConfigError(
            f"quantize method {method} writes compressed-tensors checkpoints and needs that package: "
            "pip install 'compressed-tensors>=0.20' (Python >= 3.11)"
        )


def linear_input_widths(config: Any) -> dict[str, int]:
    """The input widths of a decoder config's linear layers, by the config fields they come from."""
    hidden = getattr(config, "hidden_size", None)
    heads = getattr(config, "num_attention_heads", None)
    head_dim = getattr(config, "head_dim", None) or (hidden // heads if hidden and heads else None)
    widths = {
        "hidden_size": hidden,
        "intermediate_size": getattr(config, "intermediate_size", None),
        "num_attention_heads*head_dim": heads * head_dim if heads and head_dim else None,
    }
    return {name: int(width) for name, width in widths.items() if width}


def width_mismatches(config: Any, group_size: int) -> list[str]:
    """Linear input widths of a decoder config that ``group_size`` does not divide."""
    if group_size <= 0:
        return []
    return [f"{name}={width}" for name, width in linear_input_widths(config).items() if width % group_size]


def dividing_group_sizes_hint(widths: list[int]) -> str:
    """Which supported group sizes divide every one of ``widths``, as words for an error message."""
    fits = [g for g in GROUP_SIZES if g > 0 and all(w % g == 0 for w in widths)]
    if not fits:
        return f"none of {', '.join(str(g) for g in GROUP_SIZES if g > 0)} does"
    if len(fits) == 1:
        return f"{fits[0]} does"
    return f"{', '.join(map(str, fits[:-1]))} or {fits[-1]} do"


@dataclass
class QuantizeConfig(StageConfig):
    """Fields and checks every quantization method has."""

    kind: str = "quantize"

    def preflight(self, teacher: TeacherInfo) -> None:
        """The teacher is this stage's input when the stage comes first: it must be full precision."""
        require_full_precision(teacher.config, self.method, "the teacher")

    def recorded_quantization(self, meta: dict[str, Any]) -> dict[str, Any]:
        """What the stage recorded about its quantization in ``slimforge.json`` (empty if nothing)."""
        return meta.get("quantization") or {}


# --- bitsandbytes ------------------------------------------------------------------------


@dataclass
class BnbConfig(QuantizeConfig):
    """bitsandbytes, through transformers' ``BitsAndBytesConfig``; saved so plain transformers reloads it.

    ``skip_modules`` stay in ``storage_dtype`` (lm_head by default: with tied embeddings it is
    the embedding matrix). ``cpu_offload`` keeps the skipped modules in fp32 on the CPU while
    the rest sits on a GPU; it needs CUDA.
    """

    skip_modules: list[str] = field(default_factory=lambda: ["lm_head"])
    cpu_offload: bool = False
    storage_dtype: str = "bfloat16"

    def check(self) -> None:
        check_choice("storage_dtype", self.storage_dtype, STORAGE_DTYPES)

    def card_settings(self, meta: dict[str, Any]) -> list[str]:
        return [str(self.recorded_quantization(meta).get("format") or self.method)]

    def artifact_format(self, meta: dict[str, Any]) -> str | None:
        return "bitsandbytes"

    def preflight(self, teacher: TeacherInfo) -> None:
        super().preflight(teacher)
        self.check_device()

    def check_device(self, device_type: str | None = None) -> None:
        """Refuse CUDA-only options when no CUDA device will run the stage."""
        if not self.cpu_offload:
            return
        if device_type is None:
            import torch

            device_type = "cuda" if torch.cuda.is_available() else "cpu"
        if device_type != "cuda":
            raise FieldError("cpu_offload", True, "fp32 CPU offload splits a model between a CUDA GPU and "
                             "the CPU and needs CUDA; this machine has none, so set cpu_offload=false")


@dataclass
class BnbInt8Config(BnbConfig):
    """LLM.int8: int8 weights with per-row scales; input columns with an outlier above
    ``threshold`` stay in 16-bit for the matmul. 4.0 by default, below LLM.int8's 6.0: small
    models lose more (SmolLM2-135M: perplexity ratio 1.028 at 6.0, 1.013 at 4.0)."""

    method: str = "bnb_int8"
    threshold: float = 4.0

    def check(self) -> None:
        super().check()
        if not self.threshold > 0:
            raise FieldError("threshold", self.threshold, "must be > 0 (6.0 is LLM.int8's default)")

    def card_settings(self, meta: dict[str, Any]) -> list[str]:
        return [*super().card_settings(meta), f"outlier threshold {self.threshold}"]


@dataclass
class Bnb4bitConfig(BnbConfig):
    """NF4 (``bnb_nf4``) or FP4 (``bnb_fp4``) in blocks of 64, with optional double quantization
    of the block scales; ``compute_dtype`` is what the matmuls run in (``auto``: the run's dtype)."""

    method: str = "bnb_nf4"
    double_quant: bool = False
    compute_dtype: str = "auto"

    def check(self) -> None:
        super().check()
        check_choice("compute_dtype", self.compute_dtype, COMPUTE_DTYPES)

    def card_settings(self, meta: dict[str, Any]) -> list[str]:
        return [*super().card_settings(meta), *(["double quantization"] if self.double_quant else [])]


# --- integer weight-only (compressed-tensors) ---------------------------------------------


@dataclass
class IntWeightConfig(QuantizeConfig):
    """Symmetric integer weights with one scale per ``group_size`` input columns (``-1``: per
    output channel), saved as compressed-tensors ``pack-quantized``. The decoder's linear
    layers are quantized; embeddings and lm_head stay in ``storage_dtype``."""

    method: str = "rtn"
    bits: int = 4
    group_size: int = 128
    storage_dtype: str = "bfloat16"

    def check(self) -> None:
        check_choice("storage_dtype", self.storage_dtype, STORAGE_DTYPES)
        if self.bits not in INT_BITS:
            raise FieldError("bits", self.bits, f"{self.method} writes {', '.join(map(str, INT_BITS))}-bit weights")
        if self.group_size not in GROUP_SIZES:
            raise FieldError("group_size", self.group_size,
                             f"{self.method} supports group sizes {', '.join(map(str, GROUP_SIZES))} (-1: per channel)")

    def preflight(self, teacher: TeacherInfo) -> None:
        super().preflight(teacher)
        require_compressed_tensors(self.method)
        self.check_widths(teacher.config, "the teacher")

    def card_settings(self, meta: dict[str, Any]) -> list[str]:
        groups = "per channel" if self.group_size == -1 else f"groups of {self.group_size}"
        return [f"int{self.bits}, {groups}"]

    def artifact_format(self, meta: dict[str, Any]) -> str | None:
        return "compressed-tensors"

    def check_input(self, parent: TeacherInfo) -> None:
        """A later stage's input, as the stages before it plan it (a width prune's sizes)."""
        self.check_widths(parent.config, "the model the stages before it will make")

    def check_widths(self, config: Any, source: str) -> None:
        """``group_size`` must divide every linear input width of ``config``.

        Raises:
            FieldError: naming the widths it does not divide and the group sizes that would.
        """
        bad = width_mismatches(config, self.group_size)
        if bad:
            hint = dividing_group_sizes_hint(list(linear_input_widths(config).values()))
            raise FieldError("group_size", self.group_size,
                             f"must divide every linear input width, but {source} has {', '.join(bad)}; "
                             f"pick a group size that divides them ({hint}) or -1 (per channel)")


@dataclass
class RtnConfig(IntWeightConfig):
    """Round to nearest: each group's scale from its largest magnitude, no calibration."""

    method: str = "rtn"


@dataclass
class GptqConfig(IntWeightConfig):
    """GPTQ: layer by layer, quantize one input column at a time and move its error onto the
    columns not yet quantized, weighted by the inverse Hessian of the layer's inputs.

    ``act_order`` visits columns by decreasing input energy, with group scales fixed from the
    unquantized weight first (the checkpoint layout stays plain groups, no ``g_idx``).
    ``scale_search``: ``mse`` (default) picks each group's clipping to minimise its rounding
    error weighted by each input column's energy (``diag(H)``); ``minmax`` uses the group's
    largest magnitude (llm-compressor's default observer).
    Calibration: ``num_samples`` windows of ``seq_len`` tokens from the training split.
    """

    method: str = "gptq"
    act_order: bool = True
    scale_search: str = "mse"
    percdamp: float = 0.01
    block_size: int = 128
    num_samples: int = 128
    seq_len: int = 512
    batch_size: int = 8

    def check(self) -> None:
        super().check()
        check_fraction("percdamp", self.percdamp, low_open=True, high_open=True)
        check_choice("scale_search", self.scale_search, SCALE_SEARCHES)
        check_int("block_size", self.block_size, low=1)
        check_int("num_samples", self.num_samples, low=1)
        check_int("seq_len", self.seq_len, low=2)
        check_int("batch_size", self.batch_size, low=1)
        if self.group_size > 0 and self.block_size % self.group_size:
            raise FieldError("block_size", self.block_size,
                             f"must be a multiple of group_size={self.group_size}, so no group straddles two blocks")

    def uses_data(self) -> bool:
        return True

    def card_settings(self, meta: dict[str, Any]) -> list[str]:
        return [*super().card_settings(meta), f"act_order {self.act_order}"]

    def card_data(self, meta: dict[str, Any], source: str) -> str | None:
        return calibration_card_data(meta, self.num_samples, self.seq_len, source)


# --- GGUF --------------------------------------------------------------------------------


@dataclass
class GgufConfig(QuantizeConfig):
    """Export to one GGUF file for llama.cpp-family runtimes (Llama, SmolLM, Mistral, Qwen2).

    ``type`` quantizes the 2-D weights; norms stay F32. The embedding / output matrix takes
    ``output_type`` (default: ``type``, but Q8_0 under the 4- and 5-bit types, as llama.cpp
    keeps it at higher precision). ``verify`` loads the file back with transformers and checks
    its logits against the weights the file should hold, on ``verify_blocks`` held-out blocks.
    """

    method: str = "gguf"
    type: str = "Q8_0"
    output_type: str | None = None
    file_name: str | None = None
    model_name: str | None = None
    verify: bool = True
    verify_blocks: int = 2

    def check(self) -> None:
        check_choice("type", self.type, tuple(GGUF_TYPES))
        check_choice("output_type", self.output_type, tuple(GGUF_TYPES))
        check_int("verify_blocks", self.verify_blocks, low=1)
        if self.file_name is not None and (not self.file_name.endswith(".gguf") or "/" in self.file_name):
            raise FieldError("file_name", self.file_name, "must be a plain file name ending in .gguf")

    def resolved_output_type(self) -> str:
        return self.output_type if self.output_type is not None else GGUF_TYPES.get(self.type, self.type)

    def preflight(self, teacher: TeacherInfo) -> None:
        super().preflight(teacher)
        check_gguf_architecture(teacher.config)

    def uses_data(self) -> bool:
        return self.verify  # held-out blocks to compare logits on (the card names no data: none made the file)

    def card_settings(self, meta: dict[str, Any]) -> list[str]:
        output = self.recorded_quantization(meta).get("output_type") or self.resolved_output_type()
        return [f"type {self.type}, output {output}"]

    def artifact_format(self, meta: dict[str, Any]) -> str | None:
        return "gguf"


def check_gguf_architecture(config: Any) -> None:
    """Refuse, naming the supported ones, an architecture GGUF export does not handle."""
    model_type = getattr(config, "model_type", None)
    if model_type not in GGUF_MODEL_TYPES:
        raise ConfigError(
            f"GGUF export does not support model type {model_type!r}; supported: "
            f"{', '.join(GGUF_MODEL_TYPES)} (SmolLM is llama)"
        )
    rope_type, _ = rope_settings(config)
    if rope_type != "default":
        raise ConfigError(
            f"GGUF export does not handle rope scaling {rope_type!r} yet; export a model with plain rotary embeddings"
        )


def rope_settings(config: Any) -> tuple[str, float]:
    """``(rope_type, rope_theta)`` from a transformers 5 (``rope_parameters``) or 4 (``rope_scaling``) config."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if not isinstance(params, dict):
        params = {}
    rope_type = params.get("rope_type", params.get("type")) or "default"
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    return str(rope_type), float(theta if theta is not None else 10000.0)
