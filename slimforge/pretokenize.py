"""llama.cpp's names for byte-level BPE pre-tokenizers, and their Hugging Face equivalents.

GGUF files name how text is split before BPE (``tokenizer.ggml.pre``); a Hugging Face
tokenizer holds the splitting rules themselves. Both directions need the same table:

* GGUF export names the rules a tokenizer has (:func:`detect_pre_tokenizer`);
* GGUF import restores the rules a file names where transformers' rebuild of the tokenizer
  loses them (:func:`restore_pre_tokenizer`). transformers rebuilds SmolLM's ``smollm``
  pre-tokenizer as plain GPT-2 byte-level splitting, which merges digit runs that SmolLM
  splits one digit at a time, so numbers tokenize differently from the original model.

The rules are compared by behaviour, by splitting a probe string, not by their JSON form.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from slimforge.errors import ConfigError

log = logging.getLogger(__name__)

# A probe that tells the supported pre-tokenizers apart (digits, contractions, spaces, scripts).
PRE_TOKENIZER_PROBE = "Hello world! It's 2024... don't\n\n  123456 x 7.5\tÀÉ ünïcode 東京 \u00a0end   "


def pre_tokenizer_candidates() -> dict[str, Any]:
    """llama.cpp's names for the byte-level pre-tokenizers slimforge recognises, with their rules."""
    from tokenizers import Regex, pre_tokenizers
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    def split(regex: str) -> Any:
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(regex), behavior="isolated"),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    return {
        "gpt-2": byte_level,
        "smollm": pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level]),
        "qwen2": split(GGUF_PRE_TOKENIZER_SPLITS["qwen2"]),
        "llama-bpe": split(GGUF_PRE_TOKENIZER_SPLITS["llama-bpe"]),
    }


def _backend(tokenizer: Any) -> Any:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    model = json.loads(backend.to_str())["model"] if backend is not None else {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or backend.pre_tokenizer is None:
        return None
    return backend


def detect_pre_tokenizer(tokenizer: Any) -> str:
    """llama.cpp's name for how ``tokenizer`` splits text before BPE, found by splitting a probe.

    Raises:
        ConfigError: the tokenizer is not byte-level BPE, or splits text in a way not recognised.
    """
    backend = _backend(tokenizer)
    if backend is None:
        raise ConfigError("GGUF export handles byte-level BPE tokenizers (SmolLM, Qwen2, Llama 3, GPT-2 style); "
                          "this model's tokenizer is not one")
    seen = backend.pre_tokenizer.pre_tokenize_str(PRE_TOKENIZER_PROBE)
    for name, candidate in pre_tokenizer_candidates().items():
        if candidate.pre_tokenize_str(PRE_TOKENIZER_PROBE) == seen:
            return name
    raise ConfigError("GGUF export does not recognise this tokenizer's pre-tokenizer (known: "
                      f"{', '.join(pre_tokenizer_candidates())}); llama.cpp would split text differently")


def gguf_pre_tokenizer_name(gguf_path: str) -> str | None:
    """The ``tokenizer.ggml.pre`` a GGUF file declares, or None."""
    from gguf import GGUFReader

    field = GGUFReader(gguf_path).fields.get("tokenizer.ggml.pre")
    return None if field is None else str(field.contents())


def restore_pre_tokenizer(tokenizer: Any, name: str | None) -> bool:
    """Give ``tokenizer`` the splitting rules llama.cpp's ``name`` stands for, where it lacks them.

    Returns True when the rules were replaced. Unknown names, and tokenizers that already
    split like ``name``, are left alone.
    """
    candidates = pre_tokenizer_candidates()
    backend = _backend(tokenizer)
    if name not in candidates or backend is None:
        return False
    wanted = candidates[name]
    if backend.pre_tokenizer.pre_tokenize_str(PRE_TOKENIZER_PROBE) == wanted.pre_tokenize_str(PRE_TOKENIZER_PROBE):
        return False
    backend.pre_tokenizer = wanted
    log.info("restored the GGUF's %r pre-tokenizer, which transformers' tokenizer rebuild lost", name)
    return True
