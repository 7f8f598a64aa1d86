"""GGUF export for llama.cpp-family runtimes: Llama (and SmolLM), Mistral, Qwen2.

One ``.gguf`` file holds the weights, the architecture's hyperparameters, the tokenizer
(byte-level BPE: tokens, token types, merges, special ids, pre-tokenizer name) and the chat
template, written with the ``gguf`` package's ``GGUFWriter`` and quantized with its Python
quantizers (the types of :data:`slimforge.quantize.config.GGUF_TYPES`).

llama.cpp's conventions that a converter must follow:

* Llama and Mistral apply rotary embeddings to adjacent pairs of a head's dimensions, where
  transformers rotates the two halves; their Q and K projection rows are reordered per head
  (:func:`rope_interleave`). Qwen2 runs llama.cpp's "NEOX" rotary, on halves: no reorder.
* Mistral is the ``llama`` architecture in GGUF (llama.cpp has no separate Mistral graph),
  which has no sliding-window attention: a model whose window is shorter than its context
  declares the window as its context length (:func:`exact_context_length`).
* Norms stay F32; a weight whose rows do not split into the type's 32-value blocks falls
  back to F16; with tied embeddings there is no ``output.weight``: the runtime reuses
  ``token_embd``, which then takes ``output_type`` (Q8_0 under the 4- and 5-bit types, like
  llama.cpp keeps its output matrix at higher precision).

The written file is verified by loading it back with transformers' GGUF loader and
comparing its logits with those of the source model carrying the exact values the file
should hold (each tensor quantized and dequantized by the same ``gguf`` quantizer): a
mistake in names, metadata or the Q/K reorder shows as a large difference, whatever the
quantization type. The drift from the unquantized source (mean KL, top-1 agreement) is
reported alongside.
"""

from __future__ import annotations

import copy
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slimforge.arch import count_parameters
from slimforge.errors import ConfigError
from slimforge.models import load_model
from slimforge.pretokenize import detect_pre_tokenizer
from slimforge.progress import progress_bar
from slimforge.quantize.common import check_parent, quantizable_linears
from slimforge.quantize.config import GgufConfig, check_gguf_architecture, rope_settings
from slimforge.quantize.report import artifact_report, linear_numel
from slimforge.stage import StageContext, StageOutput

log = logging.getLogger(__name__)

# Models whose Q/K rows transformers keeps in half-split rotary order but llama.cpp wants interleaved.
INTERLEAVED_ROPE = ("llama", "mistral")
# A verified file's logits may differ from the expected weights' by this much (relative to the logit scale).
VERIFY_TOLERANCE = 1e-3


def gguf_arch(model_type: str) -> Any:
    import gguf

    return gguf.MODEL_ARCH.QWEN2 if model_type == "qwen2" else gguf.MODEL_ARCH.LLAMA


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
    """One tensor of the file: its GGUF name, values in GGUF row order, and type."""

    hf_name: str
    name: str
    data: np.ndarray  # fp32, GGUF layout
    qtype: str


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


def plan_tensors(model: Any, main: str, output: str) -> TensorPlan:
    """Map each parameter to its GGUF name, row order and type.

    Raises:
        ConfigError: a parameter has no GGUF name (an unexpected module in the model).
    """
    import gguf

    config = model.config
    name_map = gguf.get_tensor_name_map(gguf_arch(config.model_type), config.num_hidden_layers)
    n_head, n_kv = config.num_attention_heads, config.num_key_value_heads
    plan = TensorPlan()
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ConfigError(f"GGUF export found a tensor it cannot name: {hf_name}; "
                              f"supported model types are llama, mistral and qwen2 in their standard layout")
        values = tensor.detach().float().cpu()
        if config.model_type in INTERLEAVED_ROPE and ".attn_q." in name:
            values = rope_interleave(values, n_head)
        elif config.model_type in INTERLEAVED_ROPE and ".attn_k." in name:
            values = rope_interleave(values, n_kv)
        qtype = choose_type(name, tuple(values.shape), main, output)
        if qtype not in ("F32", "F16") and not fits_blocks(tuple(values.shape), qtype):
            plan.fallback_f16.append(name)
            qtype = "F16"
        plan.tensors.append(PlannedTensor(hf_name, name, values.numpy(), qtype))
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
    """The context the file declares: the model's, or its attention window if it slides.

    llama.cpp's llama graph has no sliding-window attention; within the window, full
    attention computes the same thing, so the file is exact up to that length.
    """
    context = int(config.max_position_embeddings)
    window = getattr(config, "sliding_window", None)
    slides = config.model_type == "mistral" or bool(getattr(config, "use_sliding_window", False))
    return int(window) if slides and window and window < context else context


def add_hyperparameters(writer: Any, config: Any, name: str, file_type: Any) -> None:
    import gguf

    _, theta = rope_settings(config)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_context_length(exact_context_length(config))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(int(heads))
    writer.add_head_count_kv(int(config.num_key_value_heads))
    writer.add_rope_freq_base(float(theta))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(int(config.vocab_size))
    writer.add_rope_dimension_count(int(head_dim))
    if head_dim * heads != config.hidden_size:
        writer.add_key_length(int(head_dim))
        writer.add_value_length(int(head_dim))
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def file_type(main: str) -> Any:
    """The file type llama.cpp reads from the header: "mostly" the type of the 2-D weights."""
    import gguf

    return gguf.LlamaFileType[f"MOSTLY_{main}"]


@dataclass
class Export:
    """What :func:`write_gguf` wrote."""

    path: Path
    tensor_bytes: dict[str, int]  # HF name -> bytes in the file
    hf_types: dict[str, str]  # HF name -> the type its tensor is stored in
    types: dict[str, str]  # GGUF name -> type
    fallback_f16: list[str]
    pre_tokenizer: str


def write_gguf(model: Any, tokenizer: Any, path: Path, main: str, output: str, name: str) -> Export:
    """Write ``model`` and ``tokenizer`` to one GGUF file at ``path``.

    Raises:
        ConfigError: unsupported architecture or tokenizer (before anything is written).
    """
    import gguf

    config = model.config
    check_gguf_architecture(config)
    pre = detect_pre_tokenizer(tokenizer)
    plan = plan_tensors(model, main, output)
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf_arch(config.model_type)])
    add_hyperparameters(writer, config, name, file_type(main))
    add_tokenizer(writer, tokenizer, int(config.vocab_size), pre)
    sizes, hf_types, types = {}, {}, {}
    # Quantizing the tensors (numpy, one core) is the slow part of writing the file.
    for item in progress_bar(plan.tensors, desc="gguf export", total=len(plan.tensors), unit="tensor"):
        stored = quantize_array(item.data, item.qtype)
        if item.qtype in ("F32", "F16"):
            writer.add_tensor(item.name, stored)
        else:
            writer.add_tensor(item.name, stored, raw_dtype=ggml_type(item.qtype))
        sizes[item.hf_name] = int(stored.nbytes)
        hf_types[item.hf_name] = types[item.name] = item.qtype
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Export(path, sizes, hf_types, types, plan.fallback_f16, pre)


# --- verification --------------------------------------------------------------------------


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
    """Load the file back with transformers and check it holds what was meant (see the module docstring).

    Raises:
        RuntimeError: the reloaded logits differ from the expected weights' beyond tolerance.
    """
    blocks = blocks[:, : exact_context_length(source.config)]
    intended = copy.deepcopy(source)
    state = intended.state_dict()
    for hf_name, qtype in export.hf_types.items():
        # Quantized in transformers' own row order, independently of the reorder the file got:
        # blocks run along rows, so a correct reorder commutes with the quantizer.
        values = state[hf_name].detach().float().cpu().numpy()
        rounded = dequantize_array(quantize_array(values, qtype), qtype).reshape(values.shape)
        state[hf_name].copy_(torch.from_numpy(rounded).to(state[hf_name].dtype))
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
    return {"max_abs_diff_to_expected": exact["max_abs_diff"], "kl_to_source": drift["kl"],
            "top1_agreement_to_source": drift["top1_agreement"], "tokens": int(blocks.numel()),
            "loaded_as": type(loaded).__name__,
            "tokenizer_roundtrip": tokenizer_roundtrip(tokenizer, gguf_tokenizer, text)}


def tokenizer_roundtrip(source_tokenizer: Any, gguf_tokenizer: Any, text: str) -> bool:
    """Whether the tokenizer transformers rebuilds from the file encodes ``text`` to the same ids."""
    return source_tokenizer(text)["input_ids"] == gguf_tokenizer(text)["input_ids"]


# --- the stage -----------------------------------------------------------------------------


def gguf_stage(ctx: StageContext) -> StageOutput:
    """Export the parent to one GGUF file, verify it, and report its size."""
    from slimforge.data import blocks_tensor

    cfg: GgufConfig = ctx.config
    config = check_parent(ctx.parent, cfg)
    check_gguf_architecture(config)
    main, output = cfg.type, cfg.resolved_output_type()
    # On the CPU in fp32: the gguf quantizers are numpy, and verification compares fp32 logits.
    model, tokenizer = ctx.parent.load(device="cpu", dtype=torch.float32)
    detect_pre_tokenizer(tokenizer)
    file_name = cfg.file_name or f"model-{main}.gguf"
    start = time.perf_counter()
    export = write_gguf(model, tokenizer, ctx.out_dir / file_name, main, output,
                        cfg.model_name or f"slimforge-{config.model_type}")
    seconds = time.perf_counter() - start
    numel = linear_numel(model, list(quantizable_linears(model)))
    params = count_parameters(model)
    info = {"type": main, "output_type": output, "pre_tokenizer": export.pre_tokenizer,
            "context_length": exact_context_length(config),
            "tensor_types": dict(Counter(export.types.values())), "fallback_f16": export.fallback_f16}
    if cfg.verify:
        blocks = blocks_tensor(ctx.data().heldout, cfg.verify_blocks)
        info["verify"] = verify_gguf(ctx.out_dir, file_name, model, tokenizer, export, blocks)
        log.info("gguf: reloaded %s: KL to source %.4g, top-1 agreement %.3f", file_name,
                 info["verify"]["kl_to_source"], info["verify"]["top1_agreement_to_source"])
    # The exact tokenizer beside the file: slimforge's loader prefers it to transformers' rebuild.
    tokenizer.save_pretrained(ctx.out_dir)
    footprint = sum(export.tensor_bytes.values())
    meta = artifact_report(ctx.out_dir, numel, params, footprint, seconds, tensor_bytes=export.tensor_bytes,
                           quantization={"format": "gguf", **info})
    meta.update(gguf_file=file_name, architecture=type(model).__name__, model_type=config.model_type)
    metrics = {k: meta[k] for k in ("bits_per_weight", "size_on_disk_bytes", "quantize_seconds")}
    return StageOutput(meta=meta, metrics=metrics)
