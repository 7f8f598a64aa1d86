"""GGUF export for llama.cpp-family runtimes: Llama (and SmolLM), Mistral, Qwen2, Qwen3, Phi-3, Gemma 1/2/3.

One ``.gguf`` file holds the weights, the architecture's hyperparameters, the tokenizer
(byte-level BPE: tokens, token types, merges, special ids, pre-tokenizer name) and the chat
template, written with the ``gguf`` package's ``GGUFWriter`` and quantized with its Python
quantizers (the types of :data:`slimforge.quantize.config.GGUF_TYPES`).

What each family needs so that llama.cpp's graph computes what transformers does (Q/K row
order, Gemma's norm offset and attention scale, sliding windows, softcaps, rotary scaling)
is one table, :data:`slimforge.quantize.gguf_arch.FAMILIES`; this module applies it.
Common to all: norms stay F32; a weight whose rows do not split into the type's 32-value
blocks falls back to F16; with tied embeddings there is no ``output.weight``: the runtime
reuses ``token_embd``, which then takes ``output_type`` (Q8_0 under the 4- and 5-bit types,
like llama.cpp keeps its output matrix at higher precision).

The written file is verified by loading it back and comparing its logits with those of the
source model carrying the exact values the file should hold (each tensor quantized and
dequantized by the same ``gguf`` quantizer): a mistake in names, metadata or a tensor
transform shows as a large difference, whatever the quantization type. The reader is
transformers' GGUF loader, given the hyperparameters it does not read itself from the
file's own keys (:func:`slimforge.quantize.gguf_arch.transformers_config_fixes`); Gemma 1,
which that loader lacks, is read back by llama.cpp (:func:`llamacpp_agreement`). The drift
from the unquantized source (mean KL, top-1 agreement) is reported alongside.
"""

from __future__ import annotations

import copy
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slimforge.errors import ConfigError
from slimforge.models import load_model
from slimforge.pretokenize import detect_pre_tokenizer
from slimforge.progress import progress_bar
from slimforge.quantize.config import check_gguf_architecture
from slimforge.quantize.gguf_arch import (
    GGUF_MODEL_TYPES,
    GgufFamily,
    check_model_name,
    family,
    head_dim,
    longrope_tensors,
    query_scale_ratio,
    rope_parameters,
    rotary_dims,
)

log = logging.getLogger(__name__)

# A verified file's logits may differ from the expected weights' by this much (relative to the logit scale).
VERIFY_TOLERANCE = 1e-3


def model_arch(found: GgufFamily) -> Any:
    """The ``gguf`` package's enum for a family's llama.cpp architecture."""
    import gguf

    return next(arch for arch, name in gguf.MODEL_ARCH_NAMES.items() if name == found.arch)


def ggml_type(name: str) -> Any:
    import gguf

    return gguf.GGMLQuantizationType[name]


# --- tensors -------------------------------------------------------------------------------


def rope_interleave(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Reorder each head's rows from transformers' halves ``[x_0..x_{d/2-1}, y_0..]`` to llama.cpp's pairs ``[x_0, y_0, ...]``.

    Args:
        weight: a Q or K projection weight (or bias), [n_head * head_dim, ...].
        n_head: heads in this projection (KV heads for K).
    """
    head_dim = weight.shape[0] // n_head
    return weight.reshape(n_head, 2, head_dim // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def rope_deinterleave(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """The inverse of :func:`rope_interleave`."""
    head_dim = weight.shape[0] // n_head
    return weight.reshape(n_head, head_dim // 2, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


@dataclass
class PlannedTensor:
    """One tensor of the file: its GGUF name, values in GGUF row order, and type.

    The stored values are ``(hf_values + offset) * scale``, row-reordered where the family
    needs it; ``hf_name`` is empty for a tensor that carries a hyperparameter (LongRoPE factors).
    """

    hf_name: str
    name: str
    data: np.ndarray  # fp32, GGUF layout
    qtype: str
    offset: float = 0.0
    scale: float = 1.0


@dataclass
class TensorPlan:
    tensors: list[PlannedTensor] = field(default_factory=list)
    fallback_f16: list[str] = field(default_factory=list)


def choose_type(name: str, shape: tuple[int, ...], main: str, output: str) -> str:
    """F32 for vectors, ``output`` for the embedding/output matrix, else ``main``."""
    if len(shape) == 1:
        return "F32"
    return output if name in ("token_embd.weight", "output.weight") else main


def fits_blocks(shape: tuple[int, ...], qtype: str) -> bool:
    import gguf

    block, _ = gguf.GGML_QUANT_SIZES[ggml_type(qtype)]
    return shape[-1] % block == 0


def transform(found: GgufFamily, config: Any, name: str, values: torch.Tensor) -> tuple[torch.Tensor, float, float]:
    """A tensor in the form the family's llama.cpp graph reads: ``(values, offset, scale)`` (see :class:`PlannedTensor`)."""
    block_part = name.split(".")[2] if name.startswith("blk.") else ""
    if found.interleave_rope and block_part == "attn_q":
        values = rope_interleave(values, config.num_attention_heads)
    elif found.interleave_rope and block_part == "attn_k":
        values = rope_interleave(values, config.num_key_value_heads)
    offset = found.norm_offset if name.endswith("norm.weight") else 0.0
    scale = query_scale_ratio(found, config) if block_part == found.query_scale_tensor else 1.0
    if offset or scale != 1.0:
        values = (values + offset) * scale
    return values, offset, scale


def plan_tensors(model: Any, main: str, output: str) -> TensorPlan:
    """Map each parameter to its GGUF name, form (:func:`transform`) and type.

    Raises:
        ConfigError: a parameter has no GGUF name (an unexpected module in the model).
    """
    import gguf

    config = model.config
    found = family(config)
    name_map = gguf.get_tensor_name_map(model_arch(found), config.num_hidden_layers)
    plan = TensorPlan()
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ConfigError(f"GGUF export found a tensor it cannot name: {hf_name}; supported model types are "
                              f"{', '.join(GGUF_MODEL_TYPES)} in their standard layout")
        values, offset, scale = transform(found, config, name, tensor.detach().float().cpu())
        qtype = choose_type(name, tuple(values.shape), main, output)
        if qtype not in ("F32", "F16") and not fits_blocks(tuple(values.shape), qtype):
            plan.fallback_f16.append(name)
            qtype = "F16"
        plan.tensors.append(PlannedTensor(hf_name, name, values.numpy(), qtype, offset, scale))
    for name, factors in longrope_tensors(config).items():
        plan.tensors.append(PlannedTensor("", name, np.asarray(factors, dtype=np.float32), "F32"))
    return plan


def quantize_array(data: np.ndarray, qtype: str) -> np.ndarray:
    """The bytes (or float array) the file stores for ``data`` at ``qtype``."""
    import gguf

    return gguf.quants.quantize(data, ggml_type(qtype))


def dequantize_array(stored: np.ndarray, qtype: str) -> np.ndarray:
    import gguf

    return gguf.quants.dequantize(stored, ggml_type(qtype)).astype(np.float32)


# --- tokenizer -----------------------------------------------------------------------------

def gguf_vocab(tokenizer: Any, vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens in id order and their llama.cpp types (normal, control for special added tokens,
    user-defined for other added tokens, unused for padding rows past the tokenizer's size)."""
    import gguf

    reverse = {idx: tok for tok, idx in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for idx in range(vocab_size):
        if idx not in reverse:
            tokens.append(f"[PAD{idx}]")
            types.append(gguf.TokenType.UNUSED)
        elif idx in added:
            tokens.append(reverse[idx])
            types.append(gguf.TokenType.CONTROL if added[idx].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(reverse[idx])
            types.append(gguf.TokenType.NORMAL)
    return tokens, [int(t) for t in types]


def bpe_merges(tokenizer: Any) -> list[str]:
    import json

    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"].get("merges", [])
    return [m if isinstance(m, str) else " ".join(m) for m in merges]


def add_tokenizer(writer: Any, tokenizer: Any, vocab_size: int, pre: str) -> None:
    """Tokenizer, special ids and chat template, the way llama.cpp reads a gpt2-style vocabulary."""
    tokens, types = gguf_vocab(tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(bpe_merges(tokenizer))
    for kind in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{kind}_token_id", None)
        if token_id is not None and token_id < vocab_size:
            getattr(writer, f"add_{kind}_token_id")(int(token_id))
    probe = tokenizer("a")["input_ids"]
    writer.add_add_bos_token(bool(probe) and tokenizer.bos_token_id is not None and probe[0] == tokenizer.bos_token_id)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        writer.add_chat_template(template)


# --- the file ------------------------------------------------------------------------------


def exact_context_length(config: Any) -> int:
    """The context the file declares: the model's, or its attention window if it slides where
    llama.cpp's graph for the family does not (Mistral, Phi-3, windowed Qwen).

    Within the window, full attention computes the same thing, so the file is exact up to that length.
    """
    context = int(config.max_position_embeddings)
    window = getattr(config, "sliding_window", None)
    slides = bool(getattr(config, "use_sliding_window", True)) and not family(config).sliding_layers
    return int(window) if slides and window and window < context else context


def add_rope_keys(writer: Any, config: Any) -> None:
    """Base frequency, rotating dimensions and linear scaling of the (full-attention) layers."""
    import gguf

    params = rope_parameters(config)
    writer.add_rope_freq_base(float(params["rope_theta"]))
    writer.add_rope_dimension_count(rotary_dims(config))
    if params["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(params["factor"]))


def add_hyperparameters(writer: Any, config: Any, name: str, file_type: Any) -> None:
    import gguf

    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_context_length(exact_context_length(config))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(int(config.num_attention_heads))
    writer.add_head_count_kv(int(config.num_key_value_heads))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(int(config.vocab_size))
    # Always written: readers that assume hidden / heads (transformers' Gemma 2 default of 256) then agree.
    writer.add_key_length(head_dim(config))
    writer.add_value_length(head_dim(config))
    add_rope_keys(writer, config)
    for keys in family(config).keys:
        keys(writer, config)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def file_type(main: str) -> Any:
    """The file type llama.cpp reads from the header: "mostly" the type of the 2-D weights."""
    import gguf

    return gguf.LlamaFileType.ALL_F32 if main == "F32" else gguf.LlamaFileType[f"MOSTLY_{main}"]


@dataclass
class Export:
    """What :func:`write_gguf` wrote."""

    path: Path
    tensor_bytes: dict[str, int]  # HF name (GGUF name for hyperparameter tensors) -> bytes in the file
    hf_types: dict[str, str]  # HF name -> the type its tensor is stored in
    types: dict[str, str]  # GGUF name -> type
    fallback_f16: list[str]
    pre_tokenizer: str
    # HF name -> (offset, scale) of the tensors stored as (values + offset) * scale
    affine: dict[str, tuple[float, float]] = field(default_factory=dict)


def write_gguf(model: Any, tokenizer: Any, path: Path, main: str, output: str, name: str) -> Export:
    """Write ``model`` and ``tokenizer`` to one GGUF file at ``path``.

    Raises:
        ConfigError: unsupported architecture or tokenizer (before anything is written).
    """
    import gguf

    config = model.config
    check_gguf_architecture(config)
    pre = detect_pre_tokenizer(tokenizer)
    check_model_name(name, tokenizer.get_vocab())
    plan = plan_tensors(model, main, output)
    writer = gguf.GGUFWriter(str(path), family(config).arch)
    add_hyperparameters(writer, config, name, file_type(main))
    add_tokenizer(writer, tokenizer, int(config.vocab_size), pre)
    export = Export(path, {}, {}, {}, plan.fallback_f16, pre)
    # Quantizing the tensors (numpy, one core) is the slow part of writing the file.
    for item in progress_bar(plan.tensors, desc="gguf export", total=len(plan.tensors), unit="tensor"):
        stored = quantize_array(item.data, item.qtype)
        if item.qtype in ("F32", "F16"):
            writer.add_tensor(item.name, stored)
        else:
            writer.add_tensor(item.name, stored, raw_dtype=ggml_type(item.qtype))
        export.tensor_bytes[item.hf_name or item.name] = int(stored.nbytes)
        export.types[item.name] = item.qtype
        if item.hf_name:
            export.hf_types[item.hf_name] = item.qtype
        if item.hf_name and (item.offset or item.scale != 1.0):
            export.affine[item.hf_name] = (item.offset, item.scale)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return export


# --- verification --------------------------------------------------------------------------


def intended_model(source: Any, export: Export) -> Any:
    """``source`` carrying exactly the values the file holds, in transformers' own form.

    Each tensor is quantized in transformers' row order, independently of the reorder the file
    got (blocks run along rows, so a correct reorder commutes with the quantizer); a tensor the
    family stores offset or rescaled is quantized in that form and mapped back.
    """
    intended = copy.deepcopy(source)
    state = intended.state_dict()
    for hf_name, qtype in export.hf_types.items():
        offset, scale = export.affine.get(hf_name, (0.0, 1.0))
        values = (state[hf_name].detach().float().cpu().numpy() + offset) * scale
        rounded = dequantize_array(quantize_array(values, qtype), qtype).reshape(values.shape) / scale - offset
        state[hf_name].copy_(torch.from_numpy(rounded).to(state[hf_name].dtype))
    return intended


@torch.no_grad()
def compare_logits(reference: Any, candidate: Any, blocks: torch.Tensor) -> dict[str, float]:
    """Max |logit difference|, mean KL(reference || candidate) per token and top-1 agreement."""
    from slimforge.eval.fidelity import token_kl, top1_agreement

    ref = reference(input_ids=blocks).logits.float()
    cand = candidate(input_ids=blocks).logits.float()
    return {"max_abs_diff": float((ref - cand).abs().max()), "logit_scale": float(ref.abs().max()),
            "kl": float(token_kl(ref, cand).mean()), "top1_agreement": float(top1_agreement(ref, cand).float().mean())}


def verify_gguf(folder: Path, file_name: str, source: Any, tokenizer: Any, export: Export,
                blocks: torch.Tensor) -> dict[str, Any]:
    """Load the file back and check it holds what was meant (see the module docstring).

    Raises:
        RuntimeError: the reloaded logits differ from the expected weights' beyond tolerance.
        RuntimeMissingError: a Gemma 1 file, which only llama.cpp reads, and llama.cpp is not built.
    """
    return verify_against(folder, file_name, source, tokenizer, intended_model(source, export),
                          export.types.values(), blocks)


def verify_against(folder: Path, file_name: str, source: Any, tokenizer: Any, intended: Any, types: Any,
                   blocks: torch.Tensor) -> dict[str, Any]:
    """Load the file back and check it computes what ``intended`` (the source carrying the values
    the file should hold, in transformers' form) computes; report the drift from ``source``.

    Raises:
        RuntimeError: the reloaded logits differ from the expected weights' beyond tolerance.
        RuntimeMissingError: a Gemma 1 file, which only llama.cpp reads, and llama.cpp is not built.
    """
    blocks = blocks[:, : exact_context_length(source.config)]
    if not family(source.config).transformers_loads:
        return verify_with_llamacpp(folder / file_name, intended, source, tokenizer, types, blocks)
    from transformers import AutoTokenizer

    loaded = load_model(str(folder), dtype=torch.float32, gguf_file=file_name, with_tokenizer=False)
    gguf_tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file=file_name)
    exact = compare_logits(intended, loaded, blocks)
    drift = compare_logits(source, loaded, blocks)
    limit = VERIFY_TOLERANCE * max(1.0, exact["logit_scale"])
    if not exact["max_abs_diff"] <= limit:
        raise RuntimeError(f"GGUF verification failed: {file_name} reloads with logits {exact['max_abs_diff']:.3g} "
                           f"away from the weights it should hold (tolerance {limit:.3g})")
    text = tokenizer.decode(blocks[0])
    return {"reader": "transformers", "max_abs_diff_to_expected": exact["max_abs_diff"], "kl_to_source": drift["kl"],
            "top1_agreement_to_source": drift["top1_agreement"], "tokens": int(blocks.numel()),
            "loaded_as": type(loaded).__name__,
            "tokenizer_roundtrip": tokenizer_roundtrip(tokenizer, gguf_tokenizer, text)}


def tokenizer_roundtrip(source_tokenizer: Any, gguf_tokenizer: Any, text: str) -> bool:
    """Whether the tokenizer transformers rebuilds from the file encodes ``text`` to the same ids."""
    return source_tokenizer(text)["input_ids"] == gguf_tokenizer(text)["input_ids"]


# --- verification through llama.cpp --------------------------------------------------------

# How far llama.cpp may stray from the weights the file should hold: (max |log-prob difference| or
# None, mean KL), by the kind of the file's weights. With F32/F16 weights llama.cpp still rounds to
# 16 bits in places (the KV cache, activations entering F16 matmuls, its GELU table: 2^-11 = 4.9e-4
# relative) and saves log-probs on a 16-bit grid over 16 nats (2.4e-4 apart); measured on 2-layer
# models of every family with logits up to +-11: max 0.08, mean KL <= 2e-5. With block types its CPU
# kernels also round each activation row to 8 bits before the dot product: mean KL 1e-3 to 3e-3
# there, and single log-probs move by up to 1. A wrong tensor transform or key measured >= 4.5 and
# a mean KL >= 0.27 on the same models.
LLAMACPP_TOLERANCE = {"float": (0.25, 1e-3), "block": (None, 0.02)}
FLOAT_TYPES = ("F32", "F16", "BF16")


def llamacpp_tolerance(types: Any) -> tuple[float | None, float]:
    """:data:`LLAMACPP_TOLERANCE` for a file whose tensors have ``types``."""
    return LLAMACPP_TOLERANCE["float" if all(t in FLOAT_TYPES for t in types) else "block"]


def within_tolerance(agreement: dict[str, float], tolerance: tuple[float | None, float]) -> bool:
    max_diff, kl = tolerance
    return (max_diff is None or agreement["max_abs_logprob_diff"] <= max_diff) and agreement["mean_kl"] <= kl


def file_bos(path: Path) -> int | None:
    """The BOS id llama.cpp puts first in each window, or None when the file's vocabulary adds none."""
    from gguf import GGUFReader

    fields = GGUFReader(path).fields
    adds = fields.get("tokenizer.ggml.add_bos_token")
    bos = fields.get("tokenizer.ggml.bos_token_id")
    return int(bos.contents()) if adds is not None and adds.contents() and bos is not None else None


@torch.no_grad()
def llamacpp_agreement(path: Path, model: Any, text: str, n_ctx: int, chunks: int) -> dict[str, float]:
    """How closely llama.cpp running ``path`` agrees with ``model`` on ``text``, token for token.

    llama.cpp's log-probs over ``llama-perplexity``'s scored positions (the second half of each
    ``n_ctx`` window) are compared with ``model``'s on exactly llama.cpp's tokens (each window's
    first one replaced by BOS where the vocabulary adds one, as llama.cpp does). llama.cpp
    saves log-probs clipped 16 nats under each position's best; ``model``'s are clipped alike.

    Returns:
        ``max_abs_logprob_diff``, ``mean_kl`` (llama.cpp || model), ``top1_agreement``, ``tokens`` scored.
    """
    from slimforge.runtimes import llamacpp

    with tempfile.TemporaryDirectory() as tmp:
        text_file = Path(tmp) / "text.txt"
        text_file.write_text(text, encoding="utf-8")
        theirs = llamacpp.logprobs(path, text_file, n_ctx, chunks)
    windows = theirs.tokens.clone()
    bos = file_bos(path)
    if bos is not None:
        windows[:, 0] = bos
    first = n_ctx // 2
    ours = model(input_ids=windows).logits[:, first:n_ctx - 1].float().log_softmax(-1)
    floor = theirs.logprobs.min(-1, keepdim=True).values
    ours = torch.maximum(ours, floor)
    diff = (ours - theirs.logprobs).abs()
    p = theirs.logprobs.exp()
    kl = (p * (theirs.logprobs - ours)).sum(-1)
    top1 = (ours.argmax(-1) == theirs.logprobs.argmax(-1)).float()
    return {"max_abs_logprob_diff": float(diff.max()), "mean_kl": float(kl.mean()),
            "top1_agreement": float(top1.mean()), "tokens": int(top1.numel())}


def verify_with_llamacpp(path: Path, intended: Any, source: Any, tokenizer: Any, types: Any,
                         blocks: torch.Tensor) -> dict[str, Any]:
    """Verification by llama.cpp itself, for files transformers cannot read (Gemma 1).

    Raises:
        RuntimeMissingError: llama.cpp is not built (the message names the command that builds it).
        RuntimeError: llama.cpp's log-probs differ from the expected weights' beyond tolerance.
    """
    n_ctx, chunks = int(blocks.shape[1]), max(2, int(blocks.shape[0]))
    # llama.cpp tokenizes the text itself and scores whole windows (at least two): one spare window's worth.
    text = tokenizer.decode(blocks.flatten()) * (chunks // int(blocks.shape[0]) + 1)
    exact = llamacpp_agreement(path, intended, text, n_ctx, chunks)
    tolerance = llamacpp_tolerance(types)
    if not within_tolerance(exact, tolerance):
        raise RuntimeError(f"GGUF verification failed: llama.cpp runs {path.name} with log-probs up to "
                           f"{exact['max_abs_logprob_diff']:.3g} and a mean KL of {exact['mean_kl']:.3g} away from "
                           f"the weights it should hold (tolerance: {tolerance})")
    drift = llamacpp_agreement(path, source, text, n_ctx, chunks)
    return {"reader": "llama.cpp", "max_abs_logprob_diff_to_expected": exact["max_abs_logprob_diff"],
            "kl_to_expected": exact["mean_kl"], "kl_to_source": drift["mean_kl"],
            "top1_agreement_to_source": drift["top1_agreement"], "tokens": exact["tokens"]}
