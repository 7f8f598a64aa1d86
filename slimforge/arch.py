"""One architecture adapter for the decoder-only families slimforge edits.

Llama, Mistral, Qwen2/3, Phi-3 and Gemma (1-3) all keep their blocks in
``model.model.layers`` and index their KV cache by each attention module's
``layer_idx``. Code that restructures or measures a model goes through here instead of
hard-coding attribute paths per model: the block list, each block's attention and MLP
output projections, the final norm, parameter names and the axes width pruning slices.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from slimforge.errors import ConfigError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "gemma3_text")
# Config entries that are not per-layer lists even when their length happens to match.
_NOT_PER_LAYER = {"architectures", "bad_words_ids", "suppress_tokens", "begin_suppress_tokens",
                  "mlp_only_layers"}  # Qwen2/3-MoE: layer indices, rewritten by moe_layout.keep_sparse_layout


def decoder_layers(model: Any) -> Any:
    """The ``nn.ModuleList`` of decoder blocks."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if layers is None:
        model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise ConfigError(
            f"cannot find the decoder layers of a {model_type} model; supported model types: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    return layers


def set_decoder_layers(model: Any, layers: Any) -> None:
    """Put ``layers`` (an ``nn.ModuleList``) in place of the model's decoder blocks."""
    model.get_decoder().layers = layers


def num_layers(model: Any) -> int:
    return len(decoder_layers(model))


# Where each block keeps the projections that write into the residual stream: the same
# path in every supported family (Phi-3 fuses q/k/v and gate/up, but not these two).
_ATTENTION_OUTPUT = "self_attn.o_proj"
_MLP_OUTPUT = "mlp.down_proj"
# State-dict names outside the blocks (the same in every supported family).
EMBEDDING_WEIGHT = "model.embed_tokens.weight"
FINAL_NORM = "model.norm"
LM_HEAD_WEIGHT = "lm_head.weight"


def attention_output(layer: Any) -> Any:
    """A decoder block's attention output projection (``[hidden, heads * head_dim]``)."""
    return layer.get_submodule(_ATTENTION_OUTPUT)


def mlp_output(layer: Any) -> Any:
    """A decoder block's MLP down projection (``[hidden, intermediate]``)."""
    return layer.get_submodule(_MLP_OUTPUT)


def final_norm(model: Any) -> Any:
    """The norm between the last block and the LM head."""
    return model.get_submodule(FINAL_NORM)


def tied_embeddings(model: Any) -> bool:
    """Whether the LM head is the input embedding table itself."""
    out = model.get_output_embeddings()
    return out is not None and out.weight is model.get_input_embeddings().weight


def count_parameters(model: Any) -> int:
    """Parameters of the model, counting tied weights once."""
    seen, total = set(), 0
    for param in model.parameters():
        if id(param) not in seen:
            seen.add(id(param))
            total += param.numel()
    return total


def keep_layers(model: Any, keep: list[int]) -> Any:
    """Keep only the decoder blocks at indices ``keep`` (in that order), in place.

    Renumbers each kept block's ``layer_idx`` so the KV cache stays aligned, and
    rewrites the config (``num_hidden_layers`` and per-layer lists such as
    ``layer_types``) so that the saved folder reloads as the smaller model.

    Returns:
        The same model object, now with ``len(keep)`` layers.
    """
    import torch.nn as nn

    from slimforge import moe_layout

    layers = decoder_layers(model)
    total = len(layers)
    if not keep or len(set(keep)) != len(keep) or any(not 0 <= i < total for i in keep):
        raise ConfigError(f"layers to keep must be distinct indices in [0, {total - 1}], got {keep}")
    kept = nn.ModuleList([layers[i] for i in keep])
    for new_idx, block in enumerate(kept):
        for module in block.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_idx
    set_decoder_layers(model, kept)
    config = model.config
    sparse_before = moe_layout.sparse_layers(config)
    for key, value in list(vars(config).items()):
        if key not in _NOT_PER_LAYER and isinstance(value, list | tuple) and len(value) == total and total > 1:
            setattr(config, key, [value[i] for i in keep])
    config.num_hidden_layers = len(keep)
    moe_layout.keep_sparse_layout(config, keep, sparse_before)
    return model


# --- what pruning needs to know about each family ----------------------------------------

# Gemma's RMSNorm scales by (1 + weight) and its embeddings are multiplied by sqrt(hidden_size).
_GEMMA_TYPES = ("gemma", "gemma2", "gemma3_text")


def require_supported(config: Any) -> None:
    """Refuse, in one line naming the supported ones, a model type the adapter does not know."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            f"model type {model_type!r} is not supported for pruning; supported model types: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}"
        )


def head_dim(config: Any) -> int:
    """Per-head width: the config's ``head_dim`` if set, else hidden / heads (as the models do)."""
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def num_kv_heads(config: Any) -> int:
    return int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)


def linear_input_sizes(config: Any) -> list[int]:
    """Input widths of the decoder blocks' linear layers (hidden, attention output, MLP)."""
    from slimforge.moe_layout import expert_widths

    return [int(config.hidden_size), config.num_attention_heads * head_dim(config), int(config.intermediate_size),
            *expert_widths(config).values()]


def norm_weight_offset(config: Any) -> float:
    """RMSNorm multiplies by ``offset + weight``: 1 for Gemma, 0 for the others."""
    return 1.0 if getattr(config, "model_type", None) in _GEMMA_TYPES else 0.0


def embedding_multiplier(config: Any) -> float | None:
    """The factor the model applies to embeddings (Gemma: sqrt(hidden_size)), else None."""
    return float(config.hidden_size) ** 0.5 if getattr(config, "model_type", None) in _GEMMA_TYPES else None


# Width pruning: for each parameter, which dimension runs along which prunable axis.
# Axes: hidden (residual channels), q / kv (query / key-value head channels), qkv (fused
# q|k|v rows, Phi-3), mlp (intermediate channels), mlp2 (fused gate|up rows, Phi-3).
_LAYER_PARAM_AXES: list[tuple[str, dict[int, str]]] = [
    (r"(input_layernorm|post_attention_layernorm|pre_feedforward_layernorm|post_feedforward_layernorm)\.weight",
     {0: "hidden"}),
    (r"self_attn\.q_proj\.weight", {0: "q", 1: "hidden"}),
    (r"self_attn\.q_proj\.bias", {0: "q"}),
    (r"self_attn\.[kv]_proj\.weight", {0: "kv", 1: "hidden"}),
    (r"self_attn\.[kv]_proj\.bias", {0: "kv"}),
    (r"self_attn\.qkv_proj\.weight", {0: "qkv", 1: "hidden"}),
    (r"self_attn\.qkv_proj\.bias", {0: "qkv"}),
    (r"self_attn\.o_proj\.weight", {0: "hidden", 1: "q"}),
    (r"self_attn\.o_proj\.bias", {0: "hidden"}),
    (r"self_attn\.[qk]_norm\.weight", {}),  # per head_dim, shared by all heads (Qwen3, Gemma3)
    (r"mlp\.(gate|up)_proj\.weight", {0: "mlp", 1: "hidden"}),
    (r"mlp\.(gate|up)_proj\.bias", {0: "mlp"}),
    (r"mlp\.gate_up_proj\.weight", {0: "mlp2", 1: "hidden"}),
    (r"mlp\.down_proj\.weight", {0: "hidden", 1: "mlp"}),
    (r"mlp\.down_proj\.bias", {0: "hidden"}),
]
_TOP_PARAM_AXES = {
    EMBEDDING_WEIGHT: {1: "hidden"},
    f"{FINAL_NORM}.weight": {0: "hidden"},
    LM_HEAD_WEIGHT: {1: "hidden"},
    "lm_head.bias": {},
}
_LAYER_PARAM = re.compile(r"model\.layers\.(\d+)\.(.+)")


def param_axes(name: str, model_type: str | None = None) -> tuple[int | None, dict[int, str]]:
    """``(layer index or None, {dim: axis})`` for a state-dict entry of a supported model.

    Raises:
        ConfigError: a parameter the adapter does not know (an unsupported variant).
    """
    if name in _TOP_PARAM_AXES:
        return None, _TOP_PARAM_AXES[name]
    match = _LAYER_PARAM.fullmatch(name)
    if match:
        for pattern, axes in _LAYER_PARAM_AXES:
            if re.fullmatch(pattern, match.group(2)):
                return int(match.group(1)), axes
    raise ConfigError(
        f"width pruning does not know the parameter {name!r} of this {model_type or 'model'}; "
        f"supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}"
    )


def hidden_norms(model: Any) -> dict[str, int | None]:
    """The RMSNorms over the hidden size: module name -> index of the block holding it
    (``None`` for the final norm)."""
    out = {}
    for name, _ in model.named_parameters():
        layer, axes = param_axes(name, getattr(model.config, "model_type", None))
        if axes == {0: "hidden"} and name.endswith("norm.weight"):
            out[name[: -len(".weight")]] = layer
    return out


# --- channel scaling (AWQ, SmoothQuant) ----------------------------------------------------


@dataclass(frozen=True)
class ScalingGroup:
    """Linears that read one tensor, and the module that writes it, inside one decoder block.

    Dividing the tensor's channels by ``s`` where it is written (``source``) and multiplying the
    readers' input columns by ``s`` leaves the block's function unchanged, so a per-channel
    scale can be moved between activations and weights (AWQ, SmoothQuant). Names are local to
    the block. ``source_rows`` is the row range of a fused source linear that writes the
    tensor (Phi-3's ``gate_up_proj`` writes gate|up; only the up half feeds ``down_proj``
    linearly); ``None`` means all of it.
    """

    name: str  # attn_in, mlp_in, v_o, up_down
    source: str
    targets: tuple[str, ...]
    source_is_norm: bool
    source_rows: tuple[int, int] | None = None


def _has(layer: Any, name: str) -> bool:
    try:
        layer.get_submodule(name)
    except AttributeError:
        return False
    return True


def require_scaling_layout(config: Any, method: str = "channel scaling") -> None:
    """Refuse, from the config alone (a preflight), a model type whose block layout is not known here.

    Raises:
        ConfigError: one line naming the model type and the supported ones.
    """
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            f"{method} needs a known decoder-block layout, and model type {model_type!r} is not one; "
            f"supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )


def scaling_groups(layer: Any, config: Any, method: str = "channel scaling") -> list[ScalingGroup]:
    """The :class:`ScalingGroup` s of one decoder block of a supported family.

    The attention input (input norm -> q/k/v), the MLP input (the norm before the MLP ->
    gate/up), the MLP's inner product (up -> down; exact because the gated activation
    multiplies ``up`` linearly), and v -> o where the value and output widths match (no
    grouped-query attention: with GQA one value channel feeds several heads' columns).

    Raises:
        ConfigError: the model type is not one whose block layout is known here.
    """
    require_scaling_layout(config, method)
    model_type = config.model_type
    fused = _has(layer, "self_attn.qkv_proj")
    q_width = config.num_attention_heads * head_dim(config)
    kv_width = num_kv_heads(config) * head_dim(config)
    attn = ("self_attn.qkv_proj",) if fused else ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    mlp_norm = "pre_feedforward_layernorm" if _has(layer, "pre_feedforward_layernorm") else "post_attention_layernorm"
    mlp_fused = _has(layer, "mlp.gate_up_proj")
    groups = [
        ScalingGroup("attn_in", "input_layernorm", attn, True),
        ScalingGroup("mlp_in", mlp_norm, ("mlp.gate_up_proj",) if mlp_fused else ("mlp.gate_proj", "mlp.up_proj"),
                     True),
    ]
    if kv_width == q_width:
        groups.append(ScalingGroup("v_o", "self_attn.qkv_proj" if fused else "self_attn.v_proj",
                                   ("self_attn.o_proj",), False,
                                   (2 * q_width, 3 * q_width) if fused else None))
    inter = int(config.intermediate_size)
    groups.append(ScalingGroup("up_down", "mlp.gate_up_proj" if mlp_fused else "mlp.up_proj", ("mlp.down_proj",),
                               False, (inter, 2 * inter) if mlp_fused else None))
    for group in groups:
        for name in (group.source, *group.targets):
            if not _has(layer, name):
                raise ConfigError(f"{method}: a {model_type} decoder block has no {name!r}, which its layout "
                                  "should have; this model's modules differ from the family's")
    return groups


# The projections whose outputs meet in the attention scores q.k^T (Phi-3's fused qkv writes v too).
_QUERY_KEY = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.qkv_proj")


def query_key_projections(layer: Any) -> list[str]:
    """Names (local to the block) of the linears that write queries or keys: their errors act
    through a softmax of products, which a per-linear output error does not measure."""
    return [name for name in _QUERY_KEY if _has(layer, name)]
