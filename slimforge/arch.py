"""One architecture adapter for the decoder-only families slimforge edits.

Llama, Mistral, Qwen2/3, Phi-3 and Gemma (1-3) all keep their blocks in
``model.model.layers`` and index their KV cache by each attention module's
``layer_idx``. Code that restructures a model goes through here instead of
hard-coding attribute paths per model.
"""

from __future__ import annotations

from typing import Any

from slimforge.errors import ConfigError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "gemma3_text")
# Config entries that are not per-layer lists even when their length happens to match.
_NOT_PER_LAYER = {"architectures", "bad_words_ids", "suppress_tokens", "begin_suppress_tokens"}


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


def num_layers(model: Any) -> int:
    return len(decoder_layers(model))


def keep_layers(model: Any, keep: list[int]) -> Any:
    """Keep only the decoder blocks at indices ``keep`` (in that order), in place.

    Renumbers each kept block's ``layer_idx`` so the KV cache stays aligned, and
    rewrites the config (``num_hidden_layers`` and per-layer lists such as
    ``layer_types``) so that the saved folder reloads as the smaller model.

    Returns:
        The same model object, now with ``len(keep)`` layers.
    """
    import torch.nn as nn

    layers = decoder_layers(model)
    total = len(layers)
    if not keep or len(set(keep)) != len(keep) or any(not 0 <= i < total for i in keep):
        raise ConfigError(f"layers to keep must be distinct indices in [0, {total - 1}], got {keep}")
    kept = nn.ModuleList([layers[i] for i in keep])
    for new_idx, block in enumerate(kept):
        for module in block.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_idx
    model.get_decoder().layers = kept
    config = model.config
    for key, value in list(vars(config).items()):
        if key not in _NOT_PER_LAYER and isinstance(value, list | tuple) and len(value) == total and total > 1:
            setattr(config, key, [value[i] for i in keep])
    config.num_hidden_layers = len(keep)
    return model
