"""Schemas of the quantization methods, and the checks that run before any weights load.

Every method needs full-precision weights as input (quantizing a quantized model twice
compounds both errors), so each ``preflight`` refuses a teacher that is already quantized;
the stage repeats the check against its actual parent, which preflight cannot see when the
stage is not first in the pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from slimforge.arch import require_scaling_layout
from slimforge.config import (
    HASHED_WHEN_SET,
    FieldError,
    StageConfig,
    calibration_card_data,
    check_choice,
    check_choices,
    check_fraction,
    check_int,
)
from slimforge.errors import ConfigError
from slimforge.moe_layout import expert_widths, refuse_moe

# The model families GGUF export handles, and their checks, live with the family table.
from slimforge.quantize.gguf_arch import check_gguf_architecture

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
# Which tokens build an MoE expert's GPTQ Hessian: every calibration token, or those routed to it.
MOE_CALIBRATIONS = ("all", "routed")
# What the methods that refuse mixture-of-experts models point to instead.
_MOE_INSTEAD = "quantize method gptq or rtn (they quantize every expert; the folder is saved dequantized on the int grid)"
GROUP_SIZES = (-1, 32, 64, 128)
# The GGUF tensor types the export writes (the gguf package quantizes them in Python), each with
# the type the embedding / output matrix takes by default: llama.cpp keeps that matrix at higher
# precision under 4- and 5-bit types, and Q8_0 is the nearest such type written here. The file
# type, the writer and the tests (every type exported, reloaded and verified) all read this table.
GGUF_TYPES: dict[str, str] = {"F16": "F16", "Q8_0": "Q8_0", "Q5_0": "Q8_0", "Q4_0": "Q8_0"}
# llama.cpp's own mixtures (llama-quantize's file types), which Python's gguf package cannot
# quantize: written by llama-quantize from an exact F32 GGUF, with an importance matrix by default
# (slimforge.quantize.gguf_llamacpp). K-quants pack 256-value super-blocks, IQ4_NL 32-value
# blocks; a tensor whose rows do not divide falls back to a 32-block type by llama.cpp's rule.
LLAMACPP_GGUF_TYPES = ("Q3_K_M", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K", "IQ4_NL", "IQ4_XS")
# The tensor types llama-quantize may be told to give one tensor (``output_type``, ``tensor_types``).
LLAMACPP_TENSOR_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q6_K", "Q5_K", "Q5_1", "Q5_0", "Q4_K", "Q4_1", "Q4_0",
                         "IQ4_NL", "IQ4_XS", "Q3_K", "Q2_K")


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
        **expert_widths(config),  # MoE experts' and shared experts' own widths
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
        self.check_input(teacher)
        self.check_device()

    def check_input(self, parent: TeacherInfo) -> None:
        # transformers' bitsandbytes replaces nn.Linear only: fused experts would stay 16-bit, unannounced.
        refuse_moe(parent.config, f"bitsandbytes ({self.method})", _MOE_INSTEAD)

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
        self.check_bits()
        if self.group_size not in GROUP_SIZES:
            raise FieldError("group_size", self.group_size,
                             f"{self.method} supports group sizes {', '.join(map(str, GROUP_SIZES))} (-1: per channel)")

    def check_bits(self) -> None:
        """The one width every layer gets (a method choosing widths per layer overrides this)."""
        if self.bits not in INT_BITS:
            raise FieldError("bits", self.bits, f"{self.method} writes {', '.join(map(str, INT_BITS))}-bit weights")

    def preflight(self, teacher: TeacherInfo) -> None:
        super().preflight(teacher)
        require_compressed_tensors(self.method)
        self.check_widths(teacher.config, "the teacher")

    def card_settings(self, meta: dict[str, Any]) -> list[str]:
        groups = "per channel" if self.group_size == -1 else f"groups of {self.group_size}"
        return [f"int{self.bits}, {groups}"]

    def artifact_format(self, meta: dict[str, Any]) -> str | None:
        # An MoE model is saved dequantized, a plain folder (slimforge.quantize.compressed.DEQUANTIZED_FORMAT).
        return "hf" if self.recorded_quantization(meta).get("format") == "dequantized" else "compressed-tensors"

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

    Mixture-of-experts models: each expert is quantized on a Hessian of its own, and an expert is
    routed only a share of the calibration tokens. ``moe_calibration``: ``all`` (default, as
    llm-compressor's "calibrate all experts") builds every expert's Hessian from every token, while
    each block's output still follows the true routing; ``routed`` uses only the tokens routed to the
    expert, and rounds to nearest an expert routed fewer than ``moe_min_tokens`` (default: the
    layer's input width, below which its Hessian is rank-deficient). Routers are never quantized.
    """

    method: str = "gptq"
    act_order: bool = True
    scale_search: str = "mse"
    percdamp: float = 0.01
    block_size: int = 128
    num_samples: int = 128
    seq_len: int = 512
    batch_size: int = 8
    moe_calibration: str = field(default="all", metadata=HASHED_WHEN_SET)
    moe_min_tokens: int | None = field(default=None, metadata=HASHED_WHEN_SET)

    def check(self) -> None:
        super().check()
        check_fraction("percdamp", self.percdamp, low_open=True, high_open=True)
        check_choice("scale_search", self.scale_search, SCALE_SEARCHES)
        check_int("block_size", self.block_size, low=1)
        check_int("num_samples", self.num_samples, low=1)
        check_int("seq_len", self.seq_len, low=2)
        check_int("batch_size", self.batch_size, low=1)
        check_choice("moe_calibration", self.moe_calibration, MOE_CALIBRATIONS)
        check_int("moe_min_tokens", self.moe_min_tokens, low=1)
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
    """Export to one GGUF file for llama.cpp-family runtimes (Llama, SmolLM, Mistral, Qwen2/3, Phi-3, Gemma 1/2/3).

    ``type`` quantizes the 2-D weights; norms stay F32. F16, Q8_0, Q5_0 and Q4_0 are written in
    Python; llama.cpp's mixtures (Q4_K_M, Q5_K_M, Q6_K, IQ4_NL, IQ4_XS, ...) by llama.cpp's own
    ``llama-quantize`` (built once with ``slimforge runtime install llama.cpp``) from an exact F32
    file, with an importance matrix (``imatrix``, on by default for them) that ``llama-imatrix``
    computes over ``imatrix_samples`` windows of ``imatrix_seq_len`` tokens of the run's training
    split. ``tensor_types`` maps a tensor-name regex to a type for llama-quantize
    (``{ffn_down: Q6_K}``). The embedding / output matrix takes ``output_type`` (default: ``type``,
    but Q8_0 under the 4- and 5-bit Python types, as llama.cpp keeps it at higher precision; for
    llama.cpp's types, llama.cpp's own choice, or any of its tensor types, Q6_K to IQ4_NL, whose
    blocks divide the embedding width). ``verify`` loads the file back with transformers and checks
    it holds the weights it should, on ``verify_blocks`` held-out blocks.
    """

    method: str = "gguf"
    type: str = "Q8_0"
    output_type: str | None = None
    file_name: str | None = None
    model_name: str | None = None
    verify: bool = True
    verify_blocks: int = 2
    imatrix: bool | None = field(default=None, metadata=HASHED_WHEN_SET)
    imatrix_samples: int = field(default=128, metadata=HASHED_WHEN_SET)
    imatrix_seq_len: int = field(default=512, metadata=HASHED_WHEN_SET)
    tensor_types: dict[str, str] = field(default_factory=dict, metadata=HASHED_WHEN_SET)

    def check(self) -> None:
        check_choice("type", self.type, (*GGUF_TYPES, *LLAMACPP_GGUF_TYPES))
        check_choice("output_type", self.output_type,
                     LLAMACPP_TENSOR_TYPES if self.by_llamacpp() else tuple(GGUF_TYPES))
        check_int("verify_blocks", self.verify_blocks, low=1)
        check_int("imatrix_samples", self.imatrix_samples, low=1)
        check_int("imatrix_seq_len", self.imatrix_seq_len, low=16)
        if self.file_name is not None and (not self.file_name.endswith(".gguf") or "/" in self.file_name):
            raise FieldError("file_name", self.file_name, "must be a plain file name ending in .gguf")
        if not self.by_llamacpp():
            python_types = ", ".join(GGUF_TYPES)
            if self.imatrix:
                raise FieldError("imatrix", self.imatrix, f"only llama.cpp's types ({', '.join(LLAMACPP_GGUF_TYPES)}) "
                                 f"use an importance matrix, not type={self.type}; pick one or set imatrix=false")
            if self.tensor_types:
                raise FieldError("tensor_types", dict(self.tensor_types), f"sets llama-quantize's per-tensor types, "
                                 f"which {python_types} (written in Python) do not use; pick a llama.cpp type")
        check_tensor_types(self.tensor_types)

    def by_llamacpp(self) -> bool:
        """Whether llama.cpp's ``llama-quantize`` writes this type (Python's gguf package cannot)."""
        return self.type in LLAMACPP_GGUF_TYPES

    def uses_imatrix(self) -> bool:
        return self.by_llamacpp() and self.imatrix is not False

    def resolved_output_type(self) -> str | None:
        """The embedding / output matrix's type; None: llama.cpp's own choice for its mixture."""
        if self.output_type is not None or self.by_llamacpp():
            return self.output_type
        return GGUF_TYPES.get(self.type, self.type)

    def check_teacher(self, teacher: TeacherInfo) -> None:
        """llama.cpp's tools must be built before a stage at any position needs them; a family they
        could not take anyway is named first (no stage changes a model's family)."""
        if self.by_llamacpp():
            from slimforge.runtimes.install import require_llamacpp

            refuse_moe(teacher.config, "GGUF export", "quantize method gptq or rtn for a plain folder")
            check_gguf_architecture(teacher.config)
            require_llamacpp()

    def preflight(self, teacher: TeacherInfo) -> None:
        super().preflight(teacher)
        self.check_input(teacher)

    def check_input(self, parent: TeacherInfo) -> None:
        """The architecture, and the embedding width against an explicit ``output_type``'s blocks."""
        refuse_moe(parent.config, "GGUF export", "quantize method gptq or rtn for a plain folder")
        check_gguf_architecture(parent.config)
        if self.by_llamacpp() and self.output_type is not None:
            check_row_blocks("output_type", self.output_type, int(parent.config.hidden_size), "the embedding width")

    def uses_data(self) -> bool:
        # Held-out blocks to compare logits on; training windows for the importance matrix.
        return self.verify or self.uses_imatrix()

    def card_settings(self, meta: dict[str, Any]) -> list[str]:
        recorded = self.recorded_quantization(meta)
        output = recorded.get("output_type") or self.resolved_output_type() or "llama.cpp's choice"
        settings = [f"type {self.type}, output {output}"]
        if recorded.get("imatrix") or (not recorded and self.uses_imatrix()):
            settings.append("importance matrix (llama-imatrix)")
        return settings

    def card_data(self, meta: dict[str, Any], source: str) -> str | None:
        imatrix = self.recorded_quantization(meta).get("imatrix")
        if not imatrix:
            return None  # verification reads held-out text, but no data made the file
        return (f"importance matrix from {imatrix.get('windows', self.imatrix_samples)} windows of "
                f"{imatrix.get('seq_len', self.imatrix_seq_len)} tokens from {source}")

    def artifact_format(self, meta: dict[str, Any]) -> str | None:
        return "gguf"


def check_tensor_types(tensor_types: dict[str, str]) -> None:
    """Each ``tensor_types`` key must be a regex (llama-quantize matches it anywhere in a tensor's
    GGUF name) and each value one of :data:`LLAMACPP_TENSOR_TYPES`.

    Raises:
        FieldError: naming the bad entry.
    """
    import re

    for pattern, qtype in tensor_types.items():
        try:
            re.compile(pattern)
        except re.error as err:
            raise FieldError("tensor_types", {pattern: qtype}, f"key {pattern!r} is not a regular expression "
                             f"({err}); give a GGUF tensor-name pattern such as ffn_down or blk\\.[0-3]\\.") from None
        if "=" in pattern or not pattern.strip():
            raise FieldError("tensor_types", {pattern: qtype}, "a key is a GGUF tensor-name pattern such as "
                             "attn_v or ffn_down, without '=' and not empty")
        if qtype not in LLAMACPP_TENSOR_TYPES:
            raise FieldError("tensor_types", {pattern: qtype},
                             f"the type of {pattern!r} must be one of {', '.join(LLAMACPP_TENSOR_TYPES)}")


def check_row_blocks(name: str, qtype: str, width: int, what: str) -> None:
    """A tensor type whose blocks do not divide ``width`` cannot hold rows of that width.

    Raises:
        FieldError: naming the block size and the listed types whose blocks would fit.
    """
    import gguf

    def block(t: str) -> int:
        return int(gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[t]][0])

    if width % block(qtype):
        fits = [t for t in LLAMACPP_TENSOR_TYPES if width % block(t) == 0]
        raise FieldError(name, qtype, f"packs {block(qtype)}-value blocks, which do not divide {what} ({width}); "
                         f"pick one of {', '.join(fits)}")


# --- AWQ (owner: AWQ) ----------------------------------------------------------------------

# How AWQ rounds the scaled weights; slimforge.quantize.awq_stage has one rounding per name.
AWQ_ROUNDINGS = ("rtn", "gptq")


@dataclass
class AwqConfig(GptqConfig):
    """AWQ: activation-aware channel scales folded into the model, then RTN or GPTQ rounding.

    Block by block (each calibrated on the blocks before it as already quantized), every group of
    linears reading one tensor (norm -> q/k/v, norm -> gate/up, up -> down, v -> o without GQA)
    tries ``grid`` exponents ``a`` in [0, 1) for channel scales ``mean|x|^a`` (``duo_scaling``:
    divided by the weights' relative magnitude ``^(1-a)``) and keeps the one whose rounded readers
    disturb their outputs least (or none). ``clip_search`` then picks each group's range per row
    from ``clip_grid`` shrink factors down to ``clip_min_shrink`` by output error (not for q/k,
    whose errors act through the attention softmax); ``null`` (default): on with RTN, off with GPTQ,
    whose own ``scale_search`` measured better under its error feedback. ``rounding``: ``rtn``, or
    ``gptq`` with the GPTQ fields (``act_order``, ``percdamp``, ``block_size``, ``scale_search``).
    """

    method: str = "awq"
    rounding: str = "gptq"
    grid: int = 20
    duo_scaling: bool = True
    clip_search: bool | None = None
    clip_grid: int = 20
    clip_min_shrink: float = 0.5

    def check(self) -> None:
        super().check()
        check_choice("rounding", self.rounding, AWQ_ROUNDINGS)
        check_int("grid", self.grid, low=1)
        check_int("clip_grid", self.clip_grid, low=2)
        check_fraction("clip_min_shrink", self.clip_min_shrink, low_open=True, high_open=True)

    def clips(self) -> bool:
        """Whether the clipping search runs: as set, else only before RTN."""
        return self.clip_search if self.clip_search is not None else self.rounding == "rtn"

    def preflight(self, teacher: TeacherInfo) -> None:
        # The layout first: an unknown family is the problem to name, whatever its widths.
        refuse_moe(teacher.config, "AWQ", _MOE_INSTEAD)
        require_scaling_layout(teacher.config, f"quantize method {self.method}")
        super().preflight(teacher)

    def check_input(self, parent: TeacherInfo) -> None:
        refuse_moe(parent.config, "AWQ", _MOE_INSTEAD)
        require_scaling_layout(parent.config, f"quantize method {self.method}")
        super().check_input(parent)

    def card_settings(self, meta: dict[str, Any]) -> list[str]:
        groups = "per channel" if self.group_size == -1 else f"groups of {self.group_size}"
        scales = f"AWQ scales (grid {self.grid}{', duo' if self.duo_scaling else ''})"
        rounding = f"GPTQ rounding, act_order {self.act_order}" if self.rounding == "gptq" else "RTN rounding"
        return [f"int{self.bits}, {groups}", scales, *(["clip search"] if self.clips() else []), rounding]


# --- W8A8: int8 with SmoothQuant, FP8 (owner: W8A8) -----------------------------------------

# The 8-bit grids W8A8 writes: int8 (compressed-tensors ``int-quantized``) and FP8 E4M3
# (``float-quantized``); slimforge.quantize.w8a8 has the grid of each name.
W8A8_TYPES = ("int8", "fp8")
# How activations get their scale: per token at run time, or one per tensor fixed from calibration.
W8A8_ACTIVATIONS = ("dynamic", "static")
# One weight scale per output channel, or one per tensor.
W8A8_WEIGHT_SCALES = ("channel", "tensor")
# The channel-scaling groups of a decoder block SmoothQuant may smooth (slimforge.arch.ScalingGroup
# names): the norm-fed inputs (SmoothQuant's own), the MLP's down projection (its input, act(gate) *
# up, has the largest outliers; up's rows absorb the scales), and v -> o where there is no GQA.
SMOOTHING_GROUPS = ("attn_in", "mlp_in", "up_down", "v_o")
# Config fields that count a mixture-of-experts model's experts (Mixtral; Qwen-MoE; DeepSeek).
EXPERT_COUNTS = ("num_local_experts", "num_experts", "n_routed_experts")


@dataclass
class W8A8Config(QuantizeConfig):
    """W8A8: 8-bit weights and 8-bit activations, int8 or FP8 E4M3, as compressed-tensors.

    ``type``: ``int8`` (``int-quantized``) or ``fp8`` (``float-quantized``, E4M3). Weights get one
    min-max scale per output channel (``weight_scales: tensor``: one per tensor) and are rounded by
    ``rounding``: ``gptq`` (with ``act_order``, ``percdamp``, ``block_size``, as the ``gptq``
    method) or ``rtn``. ``activations``: ``dynamic`` (each token scaled by its own largest value at
    run time) or ``static`` (one scale per layer from the largest input seen in calibration).
    ``smoothquant_alpha`` in [0, 1] first divides each input channel of the ``smoothquant_groups``
    by ``max|X|^alpha / max|W|^(1-alpha)``, folded exactly into the norm or linear that writes it
    (``null``: no smoothing, whatever the grid). ``smoothquant_alpha_grid`` (a list) instead picks alpha per group and
    block from the list: the one whose smoothed, rounded readers' outputs move least on a sample of
    the block's calibration inputs (:func:`slimforge.quantize.w8a8.search_alpha`; round to nearest
    weights stand in for GPTQ's). Calibration: ``num_samples`` windows of ``seq_len`` tokens from the
    training split, block by block, each block on the outputs of the blocks before it as already
    quantized (activations included). Embeddings, norms and lm_head stay in ``storage_dtype``.
    """

    method: str = "w8a8"
    type: str = "int8"
    activations: str = "dynamic"
    weight_scales: str = "channel"
    smoothquant_alpha: float | None = 0.5
    smoothquant_groups: list[str] = field(default_factory=lambda: ["attn_in", "mlp_in", "up_down"])
    smoothquant_alpha_grid: list[float] | None = field(default=None, metadata=HASHED_WHEN_SET)
    rounding: str = "gptq"
    act_order: bool = True
    percdamp: float = 0.01
    block_size: int = 128
    num_samples: int = 128
    seq_len: int = 512
    batch_size: int = 8
    storage_dtype: str = "bfloat16"

    def check(self) -> None:
        check_choice("type", self.type, W8A8_TYPES)
        check_choice("activations", self.activations, W8A8_ACTIVATIONS)
        check_choice("weight_scales", self.weight_scales, W8A8_WEIGHT_SCALES)
        check_choice("rounding", self.rounding, AWQ_ROUNDINGS)  # the same two roundings as AWQ's
        check_choice("storage_dtype", self.storage_dtype, STORAGE_DTYPES)
        alpha = self.smoothquant_alpha
        if alpha is not None and not 0.0 <= alpha <= 1.0:  # NaN fails too
            raise FieldError("smoothquant_alpha", alpha, "SmoothQuant's migration strength must be in [0, 1] "
                             "(0 evens out the weights' columns, 1 the activations' channels, 0.5 shares the "
                             "range), or null for no smoothing")
        check_choices("smoothquant_groups", self.smoothquant_groups, SMOOTHING_GROUPS)
        grid = self.smoothquant_alpha_grid
        if grid is not None and (not grid or not all(isinstance(a, (int, float)) and 0.0 <= a <= 1.0 for a in grid)):
            raise FieldError("smoothquant_alpha_grid", grid, "must list migration strengths in [0, 1] to try "
                                 "per group and block (e.g. [0.3, 0.4, 0.5, 0.6, 0.7, 0.8]), or be null")

        if alpha is not None and not self.smoothquant_groups:
            raise FieldError("smoothquant_groups", [], f"smoothquant_alpha={alpha} needs groups to smooth "
                             f"(from {', '.join(SMOOTHING_GROUPS)}); or set smoothquant_alpha=null")
        check_fraction("percdamp", self.percdamp, low_open=True, high_open=True)
        check_int("block_size", self.block_size, low=1)
        check_int("num_samples", self.num_samples, low=1)
        check_int("seq_len", self.seq_len, low=2)
        check_int("batch_size", self.batch_size, low=1)

    def smooths(self) -> bool:
        return self.smoothquant_alpha is not None

    def uses_data(self) -> bool:
        # Per-token scales need nothing measured: only smoothing, static scales and GPTQ calibrate.
        return self.smooths() or self.activations == "static" or self.rounding == "gptq"

    def preflight(self, teacher: TeacherInfo) -> None:
        # The model's structure first: it is the problem to name, whatever else is wrong.
        self.check_input(teacher)
        super().preflight(teacher)
        require_compressed_tensors(self.method)

    def check_input(self, parent: TeacherInfo) -> None:
        """What the input's config alone rules out: smoothing a family whose block layout arch.py does
        not know, v -> o smoothing under grouped-query attention, and mixture-of-experts models."""
        config, what = parent.config, f"quantize method {self.method} ({self.type})"
        refuse_moe(config, f"W8A8 ({self.type})", _MOE_INSTEAD)
        experts = next((getattr(config, key) for key in EXPERT_COUNTS if getattr(config, key, None)), None)
        if experts:
            raise ConfigError(f"{what} writes compressed-tensors schemes for nn.Linear layers, and this "
                              f"{getattr(config, 'model_type', 'model')}'s {experts} experts per block are fused "
                              "3-D tensors that writer cannot express; quantize a dense model")
        if not self.smooths():
            return
        require_scaling_layout(config, f"{what} with SmoothQuant")
        heads = getattr(config, "num_attention_heads", None)
        if "v_o" in self.smoothquant_groups and (getattr(config, "num_key_value_heads", None) or heads) != heads:
            raise FieldError("smoothquant_groups", list(self.smoothquant_groups),
                             "names v_o, but this model uses grouped-query attention (one value channel feeds "
                             "several heads), so v -> o has no channel-wise scale to fold; drop v_o")

    def card_settings(self, meta: dict[str, Any]) -> list[str]:
        grid = "int8" if self.type == "int8" else "FP8 E4M3"
        acts = "dynamic per-token" if self.activations == "dynamic" else "static per-tensor"
        settings = [f"W8A8 {grid}, weights per {self.weight_scales}, {acts} activations"]
        if self.smooths():
            alpha = (f"searched in {list(self.smoothquant_alpha_grid)}" if self.smoothquant_alpha_grid
                     else self.smoothquant_alpha)
            settings.append(f"SmoothQuant alpha {alpha} ({', '.join(self.smoothquant_groups)})")
        settings.append(f"{self.rounding.upper()} rounding" + (f", act_order {self.act_order}"
                                                              if self.rounding == "gptq" else ""))
        return settings

    def card_data(self, meta: dict[str, Any], source: str) -> str | None:
        if not self.uses_data():
            return None
        return calibration_card_data(meta, self.num_samples, self.seq_len, source)

    def artifact_format(self, meta: dict[str, Any]) -> str | None:
        return "compressed-tensors"


# --- mixed precision to a bit budget (owner: mixed precision) ------------------------------

# The widths a mixed-precision stage chooses among: the integer grids, and 16 for a layer kept
# in ``storage_dtype`` (listed in the format's ignore list). slimforge.quantize.mixed reads both.
MIXED_WIDTHS = (*INT_BITS, 16)
KEPT_WIDTH = 16
_DTYPE_BITS = {"bfloat16": 16, "float16": 16, "float32": 32}


def storage_bits(storage_dtype: str, config: Any = None) -> int:
    """Bits of one value in ``storage_dtype`` (``auto``: the model config's own dtype), torch-free."""
    name = storage_dtype
    if name == "auto":
        own = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32"
        name = str(own).replace("torch.", "")
    return _DTYPE_BITS.get(name, 32)


def nominal_bits_per_weight(width: int, group_size: int, scale_bits: int) -> float:
    """What a layer stores per weight at ``width``, codes and scales, ignoring per-layer overheads.

    A lower bound of the exact count (:func:`slimforge.quantize.mixed.stored_bits`, which adds
    word padding, the shape tensor and any bias), within a few hundredths of it on real shapes;
    per channel, the one scale per row is left out. The plan's budget check uses it.
    """
    if width == KEPT_WIDTH:
        return float(scale_bits)
    return width + (scale_bits / group_size if group_size > 0 else 0.0)


@dataclass
class MixedPrecisionConfig(GptqConfig):
    """Per-layer widths to an average bit budget, from each layer's measured sensitivity, GPTQ-rounded.

    For every group of linears that read one tensor (q/k/v, gate/up; o and down alone: the
    shards vLLM fuses into one layer and needs on one scheme) and every width in ``candidates``
    below 16, the group is GPTQ-quantized alone and its sensitivity is the KL from the
    unquantized input model to the result on ``sensitivity_samples`` windows of
    ``sensitivity_seq_len`` tokens (16: kept in ``storage_dtype``, sensitivity 0). The widths
    that minimise the summed sensitivity while the decoder linears store at most ``bits_budget``
    bits per weight on average (codes, scales and all, as the artifact's ``bits_per_weight``
    counts them: int4 in groups of 64 with bf16 scales is 4.25) are then chosen exactly, and the
    model is quantized block by block with GPTQ at those widths into one compressed-tensors
    folder, one scheme per width. The GPTQ fields are those of the ``gptq`` method; ``bits`` is
    not used (each layer's width is chosen).
    """

    method: str = "mixed_precision"
    bits: int | None = None
    bits_budget: float = 4.25
    candidates: list[int] = field(default_factory=lambda: list(MIXED_WIDTHS))
    sensitivity_samples: int = 8
    sensitivity_seq_len: int = 128

    def check_bits(self) -> None:
        if self.bits is not None:
            raise FieldError("bits", self.bits, f"{self.method} chooses each layer's width from candidates; "
                             "leave bits unset and give bits_budget (and candidates) instead")
        widths = ", ".join(map(str, MIXED_WIDTHS))
        if not self.candidates:
            raise FieldError("candidates", [], f"needs at least two widths to choose from, among {widths}")
        if any(w not in MIXED_WIDTHS for w in self.candidates):
            raise FieldError("candidates", list(self.candidates), f"each must be one of {widths} "
                             "(16: the layer stays in storage_dtype)")
        if len(set(self.candidates)) != len(self.candidates) or len(self.candidates) < 2:
            raise FieldError("candidates", list(self.candidates), f"needs at least two different widths, each "
                             f"listed once, among {widths}")
        if not self.bits_budget > 0:
            raise FieldError("bits_budget", self.bits_budget, "must be > 0 bits per weight")

    def check(self) -> None:
        super().check()
        check_int("sensitivity_samples", self.sensitivity_samples, low=1)
        check_int("sensitivity_seq_len", self.sensitivity_seq_len, low=2)

    def preflight(self, teacher: TeacherInfo) -> None:
        refuse_moe(teacher.config, "mixed-precision quantization", _MOE_INSTEAD)
        super().preflight(teacher)
        self.check_budget(teacher.config)

    def check_input(self, parent: TeacherInfo) -> None:
        refuse_moe(parent.config, "mixed-precision quantization", _MOE_INSTEAD)
        super().check_input(parent)
        self.check_budget(parent.config)

    def check_budget(self, config: Any) -> None:
        """``bits_budget`` must lie strictly between what the narrowest and the widest candidate store.

        Below the narrowest, nothing fits; at or above the widest, every layer simply takes the
        widest width, a uniform model that needs no sensitivity pass (the ``gptq`` method, or no
        quantization at all), so both are refused. Nominal costs here; the stage repeats the
        check with the exact ones once the layers' shapes are known, still before calibrating.

        Raises:
            FieldError: naming the bound and what to do.
        """
        scale_bits = storage_bits(self.storage_dtype, config)
        low, high = min(self.candidates), max(self.candidates)
        self.refuse_budget(nominal_bits_per_weight(low, self.group_size, scale_bits), low,
                           nominal_bits_per_weight(high, self.group_size, scale_bits), high)

    def refuse_budget(self, smallest: float, low: int, largest: float, high: int) -> None:
        """Refuse a budget outside (``smallest``, ``largest``), the bits per weight of widths ``low`` and ``high``."""
        import math

        if self.bits_budget < smallest:
            least = f"{math.ceil(smallest * 1000) / 1000:g}"  # rounded up: a budget of this much fits
            raise FieldError("bits_budget", self.bits_budget,
                             f"is below {least}, what the narrowest candidate (width {low}) stores per weight "
                             f"with its scales; raise bits_budget to at least {least}")
        if self.bits_budget >= largest:
            most = f"{math.floor(largest * 1000) / 1000:g}"
            raise FieldError("bits_budget", self.bits_budget,
                             f"reaches {most}, what the widest candidate (width {high}) stores per weight, so every "
                             f"layer would simply take width {high}; lower bits_budget below {most}, or use the "
                             "gptq method for one width everywhere")

    def card_settings(self, meta: dict[str, Any]) -> list[str]:
        groups = "per channel" if self.group_size == -1 else f"groups of {self.group_size}"
        widths = "/".join(str(w) for w in sorted(self.candidates))
        settings = [f"int{widths} to {self.bits_budget:g} bits/weight", groups, f"act_order {self.act_order}"]
        chosen = self.recorded_quantization(meta).get("widths")
        return [*settings, widths_map_text(chosen)] if chosen else settings

    def card_data(self, meta: dict[str, Any], source: str) -> str | None:
        return (f"{calibration_card_data(meta, self.num_samples, self.seq_len, source)}; sensitivity on "
                f"{self.sensitivity_samples} further windows of {self.sensitivity_seq_len} tokens")


def widths_by_block(widths: dict[str, int]) -> tuple[list[str], list[tuple[str, list[int]]]]:
    """A per-layer width map as a table: the linears' names inside a block, and one row per run of
    consecutive blocks with the same widths (``("0-2", [4, 4, 4, 8, 3, 3, 4])``).

    Args:
        widths: full module name (``model.layers.<i>.<local>``) -> width.
    """
    import re

    blocks: dict[int, dict[str, int]] = {}
    for name, width in widths.items():
        found = re.search(r"layers\.(\d+)\.(.+)$", name)
        if found:
            blocks.setdefault(int(found.group(1)), {})[found.group(2)] = int(width)
    columns = list(dict.fromkeys(local for block in blocks.values() for local in block))
    rows: list[tuple[str, list[int]]] = []
    first = previous = None
    for index in sorted(blocks):
        row = [blocks[index].get(local, 0) for local in columns]
        if previous is not None and row == rows[-1][1] and index == previous + 1:
            rows[-1] = (f"{first}-{index}", row)
        else:
            first = index
            rows.append((str(index), row))
        previous = index
    return columns, rows


def widths_map_text(widths: dict[str, int]) -> str:
    """:func:`widths_by_block` in one line: ``widths per block (q_proj k_proj ...): 0-2 4 4 ...; 3 ...``."""
    columns, rows = widths_by_block(widths)
    header = " ".join(c.rsplit(".", 1)[-1] for c in columns)
    return f"widths per block ({header}): " + "; ".join(f"{label}: {' '.join(map(str, row))}" for label, row in rows)
