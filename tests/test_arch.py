"""Layer dropping on every supported family: parity, reload with plain transformers, cached generation."""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHS, build_model
from transformers import AutoModelForCausalLM

from slimforge.arch import decoder_layers, keep_layers
from slimforge.errors import ConfigError
from slimforge.prune.depth import evenly_spaced_keep, keep_from_drop, keep_from_ratio


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


def test_layer_choice_math():
    assert evenly_spaced_keep(30, 20)[0] == 0 and evenly_spaced_keep(30, 20)[-1] == 29
    assert len(set(evenly_spaced_keep(30, 20))) == 20
    assert evenly_spaced_keep(10, 4) == [0, 3, 6, 9]
    assert evenly_spaced_keep(5, 5) == [0, 1, 2, 3, 4]
    assert evenly_spaced_keep(5, 1) == [0]
    assert keep_from_drop(6, [1, 4]) == [0, 2, 3, 5]
    assert keep_from_ratio(30, 0.5) == evenly_spaced_keep(30, 15)
    with pytest.raises(ValueError):
        evenly_spaced_keep(4, 5)
