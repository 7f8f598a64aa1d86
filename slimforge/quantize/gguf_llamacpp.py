"""GGUF K-quants and i-quants, written by llama.cpp's own quantizer with an importance matrix.

Python's ``gguf`` package quantizes only the legacy block types (Q8_0, Q5_0, Q4_0). llama.cpp's
mixtures (Q4_K_M, Q5_K_M, Q6_K, IQ4_NL, IQ4_XS, ...:
:data:`slimforge.quantize.config.LLAMACPP_GGUF_TYPES`) come from its
``llama-quantize``, which the GGUF stage runs on a file slimforge writes first:

1. the model as an **F32** GGUF (:func:`slimforge.quantize.gguf_export.write_gguf`), so the
   quantizer starts from the exact weights: an F16 or BF16 file would round them once before
   llama.cpp rounds them again (SmolLM2-135M's weights are neither F16- nor BF16-exact);
2. an **importance matrix**: ``llama-imatrix`` runs that file over calibration windows of the
   run's *training* split (the same windows GPTQ draws, decoded to text, which llama.cpp
   tokenizes itself) and keeps each linear layer's mean squared input per column; the quantizer
   then weighs each weight's rounding error by how much its input column carries;
3. ``llama-quantize`` to the requested type, with the optional per-tensor overrides.

K-quants pack 256-value super-blocks; a tensor whose rows do not divide (SmolLM2's 576-wide
rows) falls back to a 32-block type by llama.cpp's own rule. What the file holds is read back
from it (:func:`file_tensors`): the type of every tensor and how many fell back.

Verification is exact, as for the Python types: each tensor of the written file is dequantized
with ``gguf`` (the code transformers' loader uses), mapped back to transformers' form
(:func:`hf_form`, the inverse of the writer's transform) and loaded into a copy of the source
model; the file read back by transformers (or by llama.cpp, for a family transformers cannot
read) must give that model's logits.
"""

from __future__ import annotations

import copy
import logging
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from slimforge.errors import DataError
from slimforge.quantize.config import GgufConfig
from slimforge.quantize.gguf_arch import family
from slimforge.quantize.gguf_export import (
    PlannedTensor,
    plan_tensors,
    rope_deinterleave,
    write_gguf,
)

if TYPE_CHECKING:  # pragma: no cover
    from slimforge.data import DataBundle

log = logging.getLogger(__name__)


# --- calibration text ----------------------------------------------------------------------


def imatrix_window(cfg: GgufConfig, context_length: int) -> int:
    """The importance matrix's window: ``imatrix_seq_len``, but no longer than the model's context."""
    return min(int(cfg.imatrix_seq_len), int(context_length))


def calibration_text(bundle: DataBundle, tokenizer: Any, windows: int, seq_len: int, seed: int) -> str:
    """``windows`` calibration windows of ``seq_len`` tokens of the training split, as text.

    The windows are :func:`slimforge.data.calibration_samples`' (GPTQ's and Wanda's), plus one
    spare: llama.cpp tokenizes the decoded text itself, which can come out a few tokens shorter.

    Raises:
        DataError: the training split is shorter than one window (what to change is named).
    """
    from slimforge.data import calibration_samples

    total = len(bundle.train) * bundle.block_size
    if total < seq_len:
        raise DataError(f"the importance matrix needs windows of {seq_len} tokens of training text, but the "
                        f"training split holds {total}; add data, lower imatrix_seq_len, or set imatrix=false")
    rows = calibration_samples(bundle, windows + 1, seq_len, seed)
    return "\n\n".join(tokenizer.decode(row, skip_special_tokens=True) for row in rows)


# --- llama-quantize ----------------------------------------------------------------------------


def quantize_arguments(cfg: GgufConfig) -> list[str]:
    """llama-quantize's options for ``cfg``: the embedding / output type and the per-tensor overrides.

    llama.cpp gives a tied embedding the output matrix's type, and an untied one its own: an
    explicit ``output_type`` sets both, so it means the same whatever the model ties.
    """
    args: list[str] = []
    if cfg.output_type is not None:
        args += ["--output-tensor-type", cfg.output_type, "--token-embedding-type", cfg.output_type]
    for pattern, qtype in cfg.tensor_types.items():
        args += ["--tensor-type", f"{pattern}={qtype}"]
    return args


@dataclass
class FileTensor:
    """One tensor as a GGUF file stores it."""

    name: str
    qtype: str
    n_bytes: int


def file_tensors(path: Path) -> dict[str, FileTensor]:
    """The tensors of a GGUF file, by GGUF name, read from its header."""
    from gguf import GGUFReader

    return {t.name: FileTensor(t.name, t.tensor_type.name, int(t.n_bytes)) for t in GGUFReader(path).tensors}


@dataclass
class LlamaCppExport:
    """What :func:`export_with_llamacpp` wrote, in the terms of :class:`slimforge.quantize.gguf_export.Export`."""

    path: Path
    tensor_bytes: dict[str, int]  # HF name (GGUF name for hyperparameter tensors) -> bytes in the file
    types: dict[str, str]  # GGUF name -> type
    pre_tokenizer: str
    output_type: str  # the embedding / output matrix's type, as llama.cpp chose or was told
    fallbacks: int  # tensors whose rows do not fit the type's blocks, given another type by llama.cpp
    imatrix: dict[str, Any] | None = None  # llama-imatrix's windows, window length and seconds
    quantize_seconds: float = 0.0
    extra_args: list[str] = field(default_factory=list)


def export_with_llamacpp(model: Any, tokenizer: Any, path: Path, cfg: GgufConfig, name: str,
                         calibration: str | None, window: int, work_dir: Path) -> LlamaCppExport:
    """Write ``model`` at ``cfg.type`` with llama.cpp's quantizer (see the module docstring).

    Args:
        calibration: the importance matrix's text (:func:`calibration_text`); None for no matrix.
        window: the importance matrix's window length in tokens.
        work_dir: where the F32 file and the matrix live while the stage runs (removed after).

    Raises:
        RuntimeMissingError: llama.cpp's tools are not built (the message names the command).
        RuntimeCheckError: a llama.cpp tool failed; the message quotes its error.
    """
    from slimforge.runtimes import llamacpp

    work_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=work_dir, prefix="gguf-") as tmp:
        source = Path(tmp) / "source-F32.gguf"
        written = write_gguf(model, tokenizer, source, "F32", "F32", name)
        matrix, imatrix_info = None, None
        if calibration is not None:
            text_file, matrix = Path(tmp) / "calibration.txt", Path(tmp) / "imatrix.gguf"
            text_file.write_text(calibration, encoding="utf-8")
            imatrix_info = llamacpp.imatrix(source, text_file, matrix, window, cfg.imatrix_samples)
            imatrix_info = {"windows": cfg.imatrix_samples, "seq_len": window, "seconds": imatrix_info["seconds"]}
        args = quantize_arguments(cfg)
        done = llamacpp.quantize(source, path, cfg.type, matrix, args)
    stored = file_tensors(path)
    hf_names = {item.name: item.hf_name for item in plan_tensors(model, "F32", "F32").tensors}
    tensor_bytes = {hf_names.get(n) or n: t.n_bytes for n, t in stored.items()}
    output = stored.get("output.weight") or stored["token_embd.weight"]
    return LlamaCppExport(path, tensor_bytes, {n: t.qtype for n, t in stored.items()}, written.pre_tokenizer,
                          output.qtype, done["fallback_tensors"], imatrix_info, done["seconds"], args)


def llamacpp_info(export: LlamaCppExport) -> dict[str, Any]:
    """What the stage records about a file llama.cpp quantized."""
    return {"writer": "llama-quantize", "output_type": export.output_type,
            "tensor_types": dict(Counter(export.types.values())), "fallback_tensors": export.fallbacks,
            "imatrix": export.imatrix, "llama_quantize_args": export.extra_args,
            "llama_quantize_seconds": export.quantize_seconds}


# --- what the file holds, in transformers' form -----------------------------------------------


def hf_form(planned: PlannedTensor, stored: np.ndarray, config: Any) -> torch.Tensor:
    """A tensor's values as the file stores them (GGUF form), mapped back to transformers' form.

    The inverse of :func:`slimforge.quantize.gguf_export.transform`: undo the affine
    ``(values + offset) * scale``, then the Q/K row reorder of the families that interleave.
    """
    values = torch.from_numpy(np.ascontiguousarray(stored, dtype=np.float32)).reshape(planned.data.shape)
    if planned.scale != 1.0 or planned.offset:
        values = values / planned.scale - planned.offset
    part = planned.name.split(".")[2] if planned.name.startswith("blk.") else ""
    if family(config).interleave_rope and part in ("attn_q", "attn_k"):
        heads = config.num_attention_heads if part == "attn_q" else config.num_key_value_heads
        values = rope_deinterleave(values, heads)
    return values


def dequantized(tensor: Any) -> np.ndarray:
    """One tensor of a ``GGUFReader`` as fp32, dequantized by ``gguf`` (the code transformers' loader uses)."""
    from gguf import dequantize

    return dequantize(tensor.data, tensor.tensor_type).astype(np.float32)


@torch.no_grad()
def intended_from_file(source: Any, path: Path) -> Any:
    """``source`` carrying exactly the values the GGUF file at ``path`` holds, in transformers' form.

    Raises:
        RuntimeError: the file lacks a tensor the writer plans for ``source`` (a wrong file).
    """
    from gguf import GGUFReader

    intended = copy.deepcopy(source)
    state = intended.state_dict()
    stored = {t.name: t for t in GGUFReader(path).tensors}  # memory-mapped: read one at a time
    for planned in plan_tensors(source, "F32", "F32").tensors:
        if not planned.hf_name:
            continue  # a hyperparameter tensor (LongRoPE factors): no weight of the model
        if planned.name not in stored:
            raise RuntimeError(f"GGUF verification failed: {path.name} has no tensor {planned.name}")
        values = hf_form(planned, dequantized(stored[planned.name]), source.config)
        state[planned.hf_name].copy_(values.to(state[planned.hf_name].dtype))
    return intended
