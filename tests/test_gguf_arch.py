"""GGUF export of Phi-3, Qwen3 and Gemma 1/2/3: read back by transformers, run by llama.cpp.

Each family's tiny model is made to exercise what its row of ``FAMILIES`` handles (Phi-3:
partial rotary and LongRoPE; Gemma 2: a ``query_pre_attn_scalar`` that is not the head size;
Gemma 3: linear rope scaling and a local rotary base of its own) and gets peaked logits
(weights ~ N(0, 0.3), norm weights perturbed: logits up to about +-11), so that a wrong
transform or key moves log-probs by whole nats. The llama.cpp tests are marked ``runtime``
and skip, saying why, where llama.cpp is not built.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import corpus_text, tiny_config
from gguf import GGUFReader
from transformers import AutoConfig, AutoModelForCausalLM

from slimforge.errors import ConfigError, RuntimeMissingError
from slimforge.quantize import gguf_arch
from slimforge.quantize.gguf_arch import FAMILIES, check_gguf_architecture, gguf_config
from slimforge.quantize.gguf_export import (
    LLAMACPP_TOLERANCE,
    intended_model,
    llamacpp_agreement,
    verify_gguf,
    within_tolerance,
    write_gguf,
)
from slimforge.runtimes import install

NEW_FAMILIES = ("phi3", "qwen3", "gemma", "gemma2", "gemma3_text")
READ_BY_TRANSFORMERS = tuple(arch for arch in NEW_FAMILIES if FAMILIES[arch].transformers_loads)
N_CTX, CHUNKS = 64, 4  # llama.cpp's windows: 4 x 31 scored positions, past Gemma's 16-token window


def needs_llamacpp():
    if install.find_llamacpp() is None:
        pytest.skip("llama.cpp is not built: slimforge runtime install llama.cpp")


def family_config(arch: str, vocab_size: int):
    """A 2-layer config of ``arch`` with the settings its GGUF conversion must carry."""
    config = tiny_config(arch, vocab_size, layers=2)
    if arch == "phi3":
        # Within the original context of 32 tokens llama.cpp would still take the long factors:
        # it picks them by its context rounded up to 256; both take them on 64-token windows.
        config.rope_parameters = {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
                                  "long_factor": [1.0, 3.0, 9.0], "short_factor": [1.0, 1.5, 2.0],
                                  "original_max_position_embeddings": 32}
        config.original_max_position_embeddings = 32
    if arch == "gemma3_text":
        config.rope_parameters = {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                                  "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}}
    return config


def peaked_model(config, seed: int = 0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 1:
                param.add_(0.2 * torch.randn_like(param))
            else:
                param.normal_(0.0, 0.3)
    return model


@pytest.fixture(scope="module")
def blocks(tokenizer):
    return torch.tensor(tokenizer(corpus_text())["input_ids"][:3 * N_CTX]).reshape(3, N_CTX)


def export(model, tokenizer, folder, qtype):
    folder.mkdir(parents=True, exist_ok=True)
    return write_gguf(model, tokenizer, folder / "model.gguf", qtype, qtype, "tiny test model")


# --- transformers --------------------------------------------------------------------------


@pytest.mark.parametrize("arch", READ_BY_TRANSFORMERS)
def test_transformers_reads_back_the_weights_the_file_should_hold(arch, tokenizer, blocks, tmp_path):
    model = peaked_model(family_config(arch, len(tokenizer)))
    for qtype in ("F16", "Q8_0"):
        result = export(model, tokenizer, tmp_path / qtype, qtype)
        checked = verify_gguf(tmp_path / qtype, "model.gguf", model, tokenizer, result, blocks)
        assert checked["reader"] == "transformers" and checked["loaded_as"] == type(model).__name__
        assert checked["max_abs_diff_to_expected"] < 1e-4, (arch, qtype, checked)
        assert checked["tokenizer_roundtrip"]
    assert 1e-4 < checked["kl_to_source"] < 1e-2  # Q8_0 drifts from the source, a little


def test_the_loader_gets_from_the_file_what_transformers_alone_misses(tokenizer, tmp_path):
    """transformers' GGUF loader leaves these at its defaults (Qwen3's head size 128, Gemma's
    query scalar 256 and layer pattern, Phi-3's rotary): slimforge's loader reads them from the file."""
    cases = {
        "qwen3": (lambda c: c.head_dim, 8),
        "gemma2": (lambda c: c.query_pre_attn_scalar, 8),  # llama.cpp's scale; the file's Q weights carry the ratio
        "gemma3_text": (lambda c: c.layer_types, ["sliding_attention", "full_attention"]),
        "phi3": (lambda c: c.rope_parameters["rope_type"], "longrope"),
    }
    for arch, (read, value) in cases.items():
        folder = tmp_path / arch
        export(peaked_model(family_config(arch, len(tokenizer))), tokenizer, folder, "F16")
        plain = AutoConfig.from_pretrained(folder, gguf_file="model.gguf")
        fixed = gguf_config(str(folder), "model.gguf")
        assert read(fixed) == value and read(plain) != value, (arch, read(plain))
    assert fixed.rope_parameters["long_factor"] == [1.0, 3.0, 9.0] and fixed.rope_parameters["partial_rotary_factor"] == 0.75


def test_gemma_norms_are_stored_plus_one_and_the_scale_ratio_folded(tokenizer, tmp_path):
    model = peaked_model(family_config("gemma3_text", len(tokenizer)))
    export(model, tokenizer, tmp_path, "F16")
    tensors = {t.name: torch.from_numpy(t.data.copy()).float() for t in GGUFReader(tmp_path / "model.gguf").tensors}
    layer = model.model.layers[0]
    ratio = (8 / 256) ** 0.5  # llama.cpp scales by head_dim ** -0.5, the model by query_pre_attn_scalar ** -0.5
    assert torch.allclose(tensors["blk.0.attn_norm.weight"], layer.input_layernorm.weight + 1)
    assert torch.allclose(tensors["blk.0.attn_q_norm.weight"], (layer.self_attn.q_norm.weight + 1) * ratio)
    assert torch.allclose(tensors["blk.0.attn_k_norm.weight"], layer.self_attn.k_norm.weight + 1)
    fields = {k: f.contents() for k, f in GGUFReader(tmp_path / "model.gguf").fields.items()}
    assert fields["gemma3.attention.sliding_window_pattern"] == [True, False]
    assert fields["gemma3.rope.freq_base_swa"] == 100.0 and fields["gemma3.rope.scaling.factor"] == 8.0


def test_gemma_1_is_verified_by_llama_cpp_which_must_then_be_built(tokenizer, blocks, tmp_path, monkeypatch):
    """transformers has no Gemma 1 GGUF loader: llama.cpp is the reader, and its absence is named."""
    monkeypatch.delenv("SLIMFORGE_LLAMACPP_BIN", raising=False)  # the test session's cache holds no build
    model = peaked_model(family_config("gemma", len(tokenizer)))
    result = export(model, tokenizer, tmp_path, "F16")
    with pytest.raises(RuntimeMissingError, match="slimforge runtime install llama.cpp"):
        verify_gguf(tmp_path, "model.gguf", model, tokenizer, result, blocks)


# --- what llama.cpp cannot express is refused ------------------------------------------------


@pytest.mark.parametrize("arch,change,message", [
    ("gemma2", {"tie_word_embeddings": False}, "needs tied embeddings: llama.cpp's gemma2 graph always uses"),
    ("gemma", {"tie_word_embeddings": False}, "needs tied embeddings"),
    ("gemma2", {"attn_logit_softcapping": None}, "needs attn_logit_softcapping: llama.cpp's gemma2 graph always caps"),
    ("gemma3_text", {"attn_logit_softcapping": 50.0}, "cannot keep attn_logit_softcapping=50.0"),
    ("qwen3", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}},
     "does not handle rope scaling 'yarn'; supported: default, linear"),
    ("phi3", {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}},
     "supported: default, linear, longrope"),
    ("gemma3_text", {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                         "sliding_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}},
     "needs plain rotary embeddings on its sliding layers (llama.cpp runs them unscaled), not 'linear'"),
])
def test_settings_llama_cpp_cannot_run_are_refused_in_one_line(arch, change, message, tokenizer):
    config = tiny_config(arch, len(tokenizer), layers=2)
    for key, value in change.items():
        setattr(config, key, value)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_gguf_architecture(config)


def test_a_phi3_name_needs_the_tokens_llama_cpp_then_looks_up(tokenizer, tmp_path):
    model = peaked_model(family_config("phi3", len(tokenizer)))
    with pytest.raises(ConfigError, match=r"makes llama.cpp apply Phi-3's token rules, which need the tokens "
                                          r"<unk>, <\|endoftext\|>"):
        write_gguf(model, tokenizer, tmp_path / "x.gguf", "F16", "F16", "slimforge-phi3")
    assert not (tmp_path / "x.gguf").exists()


# --- llama.cpp -------------------------------------------------------------------------------


def llamacpp_gap(model, tokenizer, folder, qtype="F16"):
    """llama.cpp running the file against the weights it should hold (F16-rounded)."""
    result = export(model, tokenizer, folder, qtype)
    return llamacpp_agreement(folder / "model.gguf", intended_model(model, result), corpus_text(), N_CTX, CHUNKS)


@pytest.mark.runtime
@pytest.mark.parametrize("arch", ("llama", *NEW_FAMILIES))
def test_llama_cpp_computes_what_transformers_does(arch, tokenizer, tmp_path):
    needs_llamacpp()
    gap = llamacpp_gap(peaked_model(family_config(arch, len(tokenizer))), tokenizer, tmp_path)
    assert gap["tokens"] == CHUNKS * (N_CTX - 1 - N_CTX // 2)
    assert within_tolerance(gap, LLAMACPP_TOLERANCE["float"]), gap
    assert gap["top1_agreement"] >= 0.98, gap


BREAKAGES = {
    "llama without the Q/K reorder": ("llama", {"interleave_rope": False}),
    "gemma without the norm offset": ("gemma", {"norm_offset": 0.0}),
    "gemma2 without the attention-scale fold": ("gemma2", {"query_scale_tensor": None}),
    "gemma3 without its sliding layers": ("gemma3_text", {"keys": (gguf_arch.write_softcaps,
                                                                   gguf_arch.write_local_rope_base)}),
    "phi3 without LongRoPE's keys": ("phi3", {"keys": ()}),
}


@pytest.mark.runtime
@pytest.mark.parametrize("breakage", BREAKAGES)
def test_a_broken_conversion_fails_the_tolerance(breakage, tokenizer, tmp_path, monkeypatch):
    """The round trip is not vacuous: each family's conversion, with one piece left out, exceeds it."""
    needs_llamacpp()
    arch, change = BREAKAGES[breakage]
    monkeypatch.setitem(FAMILIES, arch, dataclasses.replace(FAMILIES[arch], **change))
    gap = llamacpp_gap(peaked_model(family_config(arch, len(tokenizer))), tokenizer, tmp_path)
    max_diff, kl = LLAMACPP_TOLERANCE["float"]
    assert gap["max_abs_logprob_diff"] > 4 * max_diff and gap["mean_kl"] > 10 * kl, gap  # measured: >= 4.5, >= 0.27
