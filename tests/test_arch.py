"""The architecture adapter on every supported family: layer dropping (parity, reload, cached generation),
the modules and parameters pruning reads."""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHS, build_model
from transformers import AutoModelForCausalLM

from slimforge import arch
from slimforge.arch import decoder_layers, keep_layers
from slimforge.errors import ConfigError


def _identity_reference(model, keep):
    """The original model with the dropped blocks turned into identities: what keep_layers must equal."""
    for idx, block in enumerate(decoder_layers(model)):
        if idx not in keep:
            block.forward = lambda hidden_states, *args, **kwargs: hidden_states
    return model


@pytest.mark.parametrize("arch", ARCHS)
def test_keep_layers_matches_identity_reference_and_reloads(arch, tokenizer, tmp_path):
    keep = [0, 2, 3]
    ids = torch.tensor([tokenizer("Now is the winter of our discontent made glorious summer")["input_ids"]])
    reference = _identity_reference(build_model(arch, tokenizer, seed=1), keep)
    pruned = keep_layers(build_model(arch, tokenizer, seed=1), keep)
    with torch.no_grad():
        expected = reference(ids).logits
        got = pruned(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert pruned.config.num_hidden_layers == 3
    assert [b.self_attn.layer_idx for b in decoder_layers(pruned)] == [0, 1, 2]
    original_types = getattr(build_model(arch, tokenizer).config, "layer_types", None)
    if original_types is not None:
        assert pruned.config.layer_types == [original_types[i] for i in keep]

    pruned.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.num_hidden_layers == 3
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, got, rtol=1e-5, atol=1e-5)
        # Greedy decoding with the KV cache must agree with recomputing from scratch:
        # a stale layer_idx would read another layer's cache.
        cached = reloaded.generate(ids, max_new_tokens=8, do_sample=False, use_cache=True, pad_token_id=0)
        uncached = reloaded.generate(ids, max_new_tokens=8, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(cached, uncached)
    assert cached.shape[1] == ids.shape[1] + 8


def test_keep_layers_rejects_bad_indices(tokenizer):
    model = build_model("llama", tokenizer)
    for keep in ([], [0, 0], [5], [-1]):
        with pytest.raises(ConfigError, match="distinct indices"):
            keep_layers(model, keep)


@pytest.mark.parametrize("arch_name", ARCHS)
def test_adapter_finds_the_projections_norms_and_parameters(arch_name, tokenizer):
    model = build_model(arch_name, tokenizer, layers=2)
    config = model.config
    q_width = config.num_attention_heads * arch.head_dim(config)
    for index, block in enumerate(decoder_layers(model)):
        attn_out, mlp_out = arch.attention_output(block), arch.mlp_output(block)
        assert (attn_out.in_features, attn_out.out_features) == (q_width, config.hidden_size)
        assert (mlp_out.in_features, mlp_out.out_features) == (config.intermediate_size, config.hidden_size)
        assert model.get_submodule(f"model.layers.{index}") is block
    assert arch.final_norm(model).weight.shape == (config.hidden_size,)
    norms = arch.hidden_norms(model)
    assert norms[arch.FINAL_NORM] is None
    assert sorted({layer for layer in norms.values() if layer is not None}) == [0, 1]
    assert all(model.get_submodule(name).weight.shape == (config.hidden_size,) for name in norms)
    names = {name for name, _ in model.named_parameters()}
    assert arch.EMBEDDING_WEIGHT in names
    assert arch.tied_embeddings(model) == (arch.LM_HEAD_WEIGHT not in names) == config.tie_word_embeddings
    assert arch.count_parameters(model) == sum(p.numel() for p in model.parameters())
