"""What each model family needs in a GGUF file for llama.cpp to compute what transformers does.

One :class:`GgufFamily` per transformers ``model_type`` (:data:`FAMILIES`) says which of
llama.cpp's graphs runs it and how that graph differs from the Hugging Face model: tensors
to reorder, offset or rescale, hyperparameter keys to write, settings the graph cannot
express (refused by :func:`check_gguf_architecture`, torch-free, before any weights load),
and the hyperparameters transformers' own GGUF loader does not read back
(:func:`transformers_config_fixes`). Read from the pinned llama.cpp's converter and its
graphs (``src/models/<arch>.cpp``):

* **Llama, Mistral** rotate adjacent pairs of a head's dimensions where transformers rotates
  its halves: Q/K rows are reordered per head. Mistral runs llama.cpp's ``llama`` graph.
* **Qwen2, Qwen3, Phi-3, Gemma** use llama.cpp's NEOX rotary (halves): no reorder. Qwen3
  normalizes each Q and K head (``attn_q_norm``/``attn_k_norm``). Phi-3 keeps its fused
  ``qkv`` and ``gate|up`` matrices in the order transformers has them, rotates the first
  ``partial_rotary_factor`` of each head, and carries LongRoPE as two frequency-factor
  tensors plus an attention factor.
* **Sliding windows**: only the Gemma 2/3 graphs run them, per layer (the layer pattern is
  written as one flag per layer, so a depth-pruned model keeps its own). Elsewhere (Mistral,
  Phi-3, windowed Qwen) the file declares the window as its context length: within it, full
  attention computes the same thing.
* **Gemma 1/2/3** compute ``x * (1 + w)`` in RMSNorm where llama.cpp computes ``x * w``: every
  norm weight is stored plus one. The embedding is scaled by sqrt(hidden) inside llama.cpp's
  graph, and Gemma 1/2's graphs always read the output matrix from ``token_embd`` (so the
  model must be tied). Gemma 2 always caps attention and final logits (``tanh``), with the
  model's caps written as keys. Gemma 2/3 ignore ``query_pre_attn_scalar``: llama.cpp scales
  queries by ``1/sqrt(head_dim)``, or ``1/sqrt(hidden/heads)`` at the 27B model's layer count,
  so the ratio to the model's own scale is folded into the query weights (Gemma 2) or into
  the query norm, which comes after the projection (Gemma 3). Gemma 3 runs its sliding
  layers with their own rotary base (``rope.freq_base_swa``) and its global layers with the
  model's linear rope scaling.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slimforge.errors import ConfigError

SLIDING = "sliding_attention"


# --- reading a transformers config ----------------------------------------------------------


def head_dim(config: Any) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def rope_parameters(config: Any, layer_type: str = "full_attention") -> dict[str, Any]:
    """The rotary settings of ``layer_type``'s layers: transformers 5's ``rope_parameters`` (flat,
    or per layer type as Gemma 3 has them), else transformers 4's ``rope_scaling`` + ``rope_theta``."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if not isinstance(params, dict):
        params = {}
    if isinstance(params.get(layer_type), dict):
        params = params[layer_type]
    elif any(isinstance(v, dict) for v in params.values()):
        params = {}
    params = dict(params)
    params.setdefault("rope_type", params.get("type") or "default")
    if params.get("rope_theta") is None:
        local = getattr(config, "rope_local_base_freq", None) if layer_type == SLIDING else None
        theta = local if local is not None else getattr(config, "rope_theta", None)
        params["rope_theta"] = float(theta if theta is not None else 10000.0)
    return params


def rope_settings(config: Any) -> tuple[str, float]:
    """``(rope_type, rope_theta)`` of the model's full-attention layers."""
    params = rope_parameters(config)
    return str(params["rope_type"]), float(params["rope_theta"])


def rotary_dims(config: Any) -> int:
    """How many of a head's dimensions rotate (``partial_rotary_factor`` of them; all by default)."""
    factor = rope_parameters(config).get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None))
    return int(head_dim(config) * float(factor if factor is not None else 1.0))


def layer_types(config: Any) -> list[str]:
    """Each layer's attention kind as transformers runs it (full everywhere when the config has no list)."""
    found = getattr(config, "layer_types", None)
    return list(found) if found else ["full_attention"] * int(config.num_hidden_layers)


def sliding_pattern(config: Any) -> list[bool]:
    """Per layer: does it attend through the sliding window."""
    return [kind == SLIDING for kind in layer_types(config)]


# --- llama.cpp's attention scale (Gemma 2/3) --------------------------------------------------


def llamacpp_query_scalar(large_layer_count: int | None, n_layer: int, hidden: int, n_head: int,
                          dim: int) -> int:
    """The ``query_pre_attn_scalar`` llama.cpp's Gemma 2/3 graph implies: it scales queries by
    ``1/sqrt(hidden // heads)`` for a model with the 27B's layer count, else ``1/sqrt(head_dim)``."""
    return hidden // n_head if n_layer == large_layer_count else dim


def query_scale_ratio(family: GgufFamily, config: Any) -> float:
    """What the query weights are multiplied by so that llama.cpp's attention scale gives the model's own."""
    own = getattr(config, "query_pre_attn_scalar", None)
    if family.query_scale_tensor is None or own is None:
        return 1.0
    theirs = llamacpp_query_scalar(family.large_layer_count, int(config.num_hidden_layers), int(config.hidden_size),
                                   int(config.num_attention_heads), head_dim(config))
    return math.sqrt(theirs / float(own))


# --- hyperparameter keys beyond the common ones ------------------------------------------------


def write_softcaps(writer: Any, config: Any) -> None:
    attn = getattr(config, "attn_logit_softcapping", None)
    final = getattr(config, "final_logit_softcapping", None)
    if attn is not None:
        writer.add_attn_logit_softcapping(float(attn))
    if final is not None:
        writer.add_final_logit_softcapping(float(final))


def write_sliding_layers(writer: Any, config: Any) -> None:
    """One flag per layer, always (llama.cpp's default patterns assume the unpruned model), and the window."""
    writer.add_sliding_window_pattern(sliding_pattern(config))
    if getattr(config, "sliding_window", None):
        writer.add_sliding_window(int(config.sliding_window))


def write_local_rope_base(writer: Any, config: Any) -> None:
    if any(sliding_pattern(config)):
        writer.add_rope_freq_base_swa(float(rope_parameters(config, SLIDING)["rope_theta"]))


def longrope_attention_factor(params: dict[str, Any], context: int) -> float:
    """LongRoPE's cos/sin scale, as transformers derives it when the config gives none."""
    if params.get("attention_factor") is not None:
        return float(params["attention_factor"])
    original = int(params["original_max_position_embeddings"])
    factor = params.get("factor") or context / original
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))


def original_context(config: Any, params: dict[str, Any]) -> int:
    return int(params.get("original_max_position_embeddings") or config.original_max_position_embeddings)


def write_longrope(writer: Any, config: Any) -> None:
    """LongRoPE's keys; its factors are tensors (:func:`longrope_tensors`)."""
    params = rope_parameters(config)
    if params["rope_type"] != "longrope":
        return
    params.setdefault("original_max_position_embeddings", original_context(config, params))
    writer.add_rope_scaling_orig_ctx_len(int(params["original_max_position_embeddings"]))
    writer.add_rope_scaling_attn_factors(longrope_attention_factor(params, int(config.max_position_embeddings)))


def longrope_tensors(config: Any) -> dict[str, list[float]]:
    """LongRoPE's per-frequency factors, as llama.cpp's phi3 graph reads them (used past / within the
    original context)."""
    params = rope_parameters(config)
    if params["rope_type"] != "longrope":
        return {}
    return {"rope_factors_long.weight": list(params["long_factor"]),
            "rope_factors_short.weight": list(params["short_factor"])}


# --- checks ------------------------------------------------------------------------------------


def require_tied(family: GgufFamily, config: Any) -> None:
    if not getattr(config, "tie_word_embeddings", False):
        raise ConfigError(f"GGUF export of {config.model_type} needs tied embeddings: llama.cpp's {family.arch} graph "
                          "always uses the embedding matrix as the output matrix; tie lm_head to the embedding first")


def require_softcaps(family: GgufFamily, config: Any) -> None:
    missing = [k for k in ("attn_logit_softcapping", "final_logit_softcapping") if getattr(config, k, None) is None]
    if missing:
        raise ConfigError(f"GGUF export of {config.model_type} needs {' and '.join(missing)}: llama.cpp's "
                          f"{family.arch} graph always caps those logits; set the model's cap values")


def refuse_attention_softcap(family: GgufFamily, config: Any) -> None:
    if getattr(config, "attn_logit_softcapping", None) is not None:
        raise ConfigError(f"GGUF export of {config.model_type} cannot keep attn_logit_softcapping="
                          f"{config.attn_logit_softcapping}: llama.cpp's {family.arch} graph has no attention cap")


def check_rope(family: GgufFamily, config: Any) -> None:
    """Rotary scaling llama.cpp can run for this family: plain, linear, or the family's own."""
    rope_type = rope_settings(config)[0]
    allowed = ("default", "linear", *family.rope_types)
    if rope_type not in allowed:
        raise ConfigError(f"GGUF export of {config.model_type} does not handle rope scaling {rope_type!r}; "
                          f"supported: {', '.join(allowed)}")
    per_layer_type = isinstance((getattr(config, "rope_parameters", None) or {}).get(SLIDING), dict)
    # Sliding layers with rotary settings of their own (Gemma 3) run unscaled in llama.cpp.
    if per_layer_type and rope_parameters(config, SLIDING)["rope_type"] != "default":
        raise ConfigError(f"GGUF export of {config.model_type} needs plain rotary embeddings on its sliding layers "
                          f"(llama.cpp runs them unscaled), not {rope_parameters(config, SLIDING)['rope_type']!r}")
    if rope_type == "longrope" and rotary_dims(config) // 2 != len(rope_parameters(config)["short_factor"]):
        raise ConfigError(f"GGUF export of {config.model_type}: LongRoPE factors must number half the rotary "
                          f"dimensions ({rotary_dims(config) // 2})")


# llama.cpp gives a model whose general.name contains one of these its Phi-3 token rules, which
# look these tokens up in the vocabulary (and fail to load the file when one is missing).
LLAMACPP_PHI3_NAMES = ("phi-3", "phi3")
LLAMACPP_PHI3_TOKENS = ("</s>", "<unk>", "<s>", "<|endoftext|>")


def check_model_name(name: str, vocabulary: Any) -> None:
    """Refuse a ``general.name`` that makes llama.cpp look for Phi-3 tokens the vocabulary lacks.

    Raises:
        ConfigError: naming the missing tokens and what to do.
    """
    if not any(key in name.lower() for key in LLAMACPP_PHI3_NAMES):
        return
    missing = [token for token in LLAMACPP_PHI3_TOKENS if token not in vocabulary]
    if missing:
        raise ConfigError(f"GGUF model name {name!r} makes llama.cpp apply Phi-3's token rules, which need the tokens "
                          f"{', '.join(missing)} that this vocabulary lacks (llama.cpp would fail to load the file); "
                          "set model_name to a name without 'phi3' or 'phi-3'")


def default_model_name(model_type: str, vocabulary: Any) -> str:
    """``slimforge-<model_type>``, without "phi3" where llama.cpp would then miss Phi-3's tokens."""
    name = f"slimforge-{model_type}"
    missing = any(token not in vocabulary for token in LLAMACPP_PHI3_TOKENS)
    return name.replace("phi3", "phi") if missing else name


# --- transformers' GGUF loader: what it does not read back -------------------------------------


def fix_head_dim(family: GgufFamily, meta: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    return {"head_dim": int(meta["attention.key_length"])} if "attention.key_length" in meta else {}


def file_head_dim(meta: dict[str, Any]) -> int:
    return int(meta.get("attention.key_length") or meta["embedding_length"] // meta["attention.head_count"])


def file_rope(meta: dict[str, Any], extra: dict[str, Any], theta_key: str = "rope.freq_base") -> dict[str, Any]:
    """transformers 5 ``rope_parameters`` for what the file declares."""
    params: dict[str, Any] = {"rope_type": "default", "rope_theta": float(meta.get(theta_key, 10000.0))}
    dims = meta.get("rope.dimension_count")
    if dims is not None and int(dims) != file_head_dim(meta):
        params["partial_rotary_factor"] = int(dims) / file_head_dim(meta)
    if meta.get("rope.scaling.type") == "linear" and float(meta.get("rope.scaling.factor", 1.0)) != 1.0:
        params.update(rope_type="linear", factor=float(meta["rope.scaling.factor"]))
    if "rope_factors_long.weight" in extra:
        params.update(rope_type="longrope", long_factor=extra["rope_factors_long.weight"],
                      short_factor=extra["rope_factors_short.weight"],
                      original_max_position_embeddings=int(meta["rope.scaling.original_context_length"]),
                      attention_factor=float(meta.get("rope.scaling.attn_factor", 1.0)))
    return params


def fix_rope(family: GgufFamily, meta: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    fixes: dict[str, Any] = {"rope_parameters": file_rope(meta, extra)}
    if "rope.scaling.original_context_length" in meta:
        fixes["original_max_position_embeddings"] = int(meta["rope.scaling.original_context_length"])
    return fixes


def fix_gemma_attention(family: GgufFamily, meta: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """The attention scale llama.cpp implies, the caps the file holds (or none), the per-layer windows."""
    n_layer = int(meta["block_count"])
    fixes: dict[str, Any] = {
        "query_pre_attn_scalar": llamacpp_query_scalar(family.large_layer_count, n_layer, int(meta["embedding_length"]),
                                                       int(meta["attention.head_count"]), file_head_dim(meta)),
        "final_logit_softcapping": meta.get("final_logit_softcapping"),
        "attn_logit_softcapping": meta.get("attn_logit_softcapping"),
    }
    pattern = meta.get("attention.sliding_window_pattern")
    if isinstance(pattern, list):
        fixes["layer_types"] = [SLIDING if flag else "full_attention" for flag in pattern]
    elif "attention.sliding_window" not in meta:
        fixes["layer_types"] = ["full_attention"] * n_layer
    return fixes


def fix_gemma3_rope(family: GgufFamily, meta: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Global layers as the file's rope keys say; sliding layers plain, at ``rope.freq_base_swa``
    (llama.cpp's default 10000 when absent)."""
    full = file_rope(meta, extra)
    sliding = {"rope_type": "default", "rope_theta": float(meta.get("rope.freq_base_swa", 10000.0))}
    if "partial_rotary_factor" in full:
        sliding["partial_rotary_factor"] = full["partial_rotary_factor"]
    return {"rope_parameters": {"full_attention": full, SLIDING: sliding}}


# --- the families --------------------------------------------------------------------------------

Check = Callable[["GgufFamily", Any], None]
Keys = Callable[[Any, Any], None]
Fix = Callable[["GgufFamily", dict[str, Any], dict[str, Any]], dict[str, Any]]


@dataclass(frozen=True)
class GgufFamily:
    """How one transformers family maps onto one of llama.cpp's graphs.

    Attributes:
        arch: llama.cpp's architecture name (``general.architecture``).
        interleave_rope: Q/K rows reordered per head from halves to adjacent pairs.
        norm_offset: added to every stored RMSNorm weight.
        query_scale_tensor: the block tensor (GGUF name without ``blk.N.`` and ``.weight``) that
            absorbs the ratio of the model's attention scale to llama.cpp's.
        large_layer_count: the layer count at which llama.cpp's graph switches its attention scale.
        sliding_layers: llama.cpp runs the family's per-layer sliding windows.
        rope_types: rotary scalings beyond plain and linear that the family's graph runs.
        checks: settings llama.cpp's graph cannot express, refused with a one-line error.
        keys: hyperparameter writers ``(writer, config)`` beyond the common keys.
        transformers_loads: transformers' GGUF loader knows the architecture.
        fixes: hyperparameters that loader misses, from the file's metadata.
    """

    arch: str
    interleave_rope: bool = False
    norm_offset: float = 0.0
    query_scale_tensor: str | None = None
    large_layer_count: int | None = None
    sliding_layers: bool = False
    rope_types: tuple[str, ...] = ()
    checks: tuple[Check, ...] = ()
    keys: tuple[Keys, ...] = ()
    transformers_loads: bool = True
    fixes: tuple[Fix, ...] = field(default=(fix_head_dim, fix_rope))


FAMILIES: dict[str, GgufFamily] = {
    "llama": GgufFamily("llama", interleave_rope=True),
    "mistral": GgufFamily("llama", interleave_rope=True),
    "qwen2": GgufFamily("qwen2"),
    "phi3": GgufFamily("phi3", rope_types=("longrope",), keys=(write_longrope,)),
    "qwen3": GgufFamily("qwen3"),
    "gemma": GgufFamily("gemma", norm_offset=1.0, checks=(require_tied,), transformers_loads=False),
    "gemma2": GgufFamily("gemma2", norm_offset=1.0, query_scale_tensor="attn_q", large_layer_count=46,
                         sliding_layers=True, checks=(require_tied, require_softcaps),
                         keys=(write_softcaps, write_sliding_layers),
                         fixes=(fix_head_dim, fix_rope, fix_gemma_attention)),
    "gemma3_text": GgufFamily("gemma3", norm_offset=1.0, query_scale_tensor="attn_q_norm", large_layer_count=62,
                              sliding_layers=True, checks=(refuse_attention_softcap,),
                              keys=(write_softcaps, write_sliding_layers, write_local_rope_base),
                              fixes=(fix_head_dim, fix_gemma3_rope, fix_gemma_attention)),
}
GGUF_MODEL_TYPES = tuple(FAMILIES)


def family(config: Any) -> GgufFamily:
    """The family of a model config.

    Raises:
        ConfigError: a model type the writer does not handle, naming those it does.
    """
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise ConfigError(f"GGUF export does not support model type {model_type!r}; supported: "
                          f"{', '.join(GGUF_MODEL_TYPES)} (SmolLM is llama)")
    return FAMILIES[model_type]


def family_of_arch(arch: str) -> GgufFamily | None:
    """The family written as llama.cpp architecture ``arch`` (Mistral's files are ``llama``)."""
    return next((f for f in FAMILIES.values() if f.arch == arch), None)


def check_gguf_architecture(config: Any) -> None:
    """Refuse, before any weights load, a model the GGUF writer or llama.cpp's graph cannot take.

    Raises:
        ConfigError: an unsupported model type (naming the supported ones) or a setting of a
            supported one that llama.cpp's graph for it cannot express.
    """
    found = family(config)
    check_rope(found, config)
    for check in found.checks:
        check(found, config)


def transformers_config_fixes(arch: str, meta: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Config values transformers' GGUF loader leaves at its defaults for a file of llama.cpp
    architecture ``arch``, read from the file instead.

    Args:
        arch: the file's ``general.architecture``.
        meta: the file's ``<arch>.*`` keys, prefix removed.
        extra: small tensors that carry hyperparameters (LongRoPE factors), by GGUF name.
    """
    found = family_of_arch(arch)
    fixes: dict[str, Any] = {}
    for fix in found.fixes if found else ():
        fixes.update(fix(found, meta, extra))
    return fixes


def gguf_config(folder: str, file_name: str) -> Any:
    """The transformers config of a GGUF file: transformers' own reading, with what it misses read from the file.

    Only fields the config has are set (Phi-3's has no ``head_dim``: it is always hidden / heads).
    """
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder, gguf_file=file_name)
    values = config.to_dict()
    fixes = {k: v for k, v in file_config_fixes(str(Path(folder) / file_name)).items() if k in values}
    return type(config).from_dict({**values, **fixes}) if fixes else config


def file_config_fixes(path: str) -> dict[str, Any]:
    """:func:`transformers_config_fixes` for the GGUF file at ``path`` (its keys only; LongRoPE's small tensors)."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    arch = str(reader.fields["general.architecture"].contents())
    prefix = f"{arch}."
    meta = {key[len(prefix):]: f.contents() for key, f in reader.fields.items() if key.startswith(prefix)}
    extra = {t.name: [float(v) for v in t.data] for t in reader.tensors if t.name.startswith("rope_factors_")}
    return transformers_config_fixes(arch, meta, extra)
