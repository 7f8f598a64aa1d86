"""Channel scaling groups (arch) and the scale fold (AWQ, SmoothQuant): folding changes nothing.

For every supported family, random positive scales folded into every group of every block
leave the logits unchanged (fp32), while the weights did change; dropping one half of a
fold (readers only) does change them, so each group is a real pair.
"""

from __future__ import annotations

import pytest
import torch

from slimforge.arch import decoder_layers, norm_weight_offset, scaling_groups
from slimforge.errors import ConfigError
from slimforge.quantize.smoothing import fold_scales, group_readers
from tests.conftest import ARCHS, build_model


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("arch", ARCHS)
def test_folding_random_scales_keeps_the_function(arch, tokenizer):
    model = build_model(arch, tokenizer, layers=2)
    ids = torch.randint(3, len(tokenizer), (2, 12), generator=torch.Generator().manual_seed(0))
    before = _logits(model, ids)
    gen = torch.Generator().manual_seed(1)
    names = set()
    for layer in decoder_layers(model):
        for group in scaling_groups(layer, model.config):
            names.add(group.name)
            width = group_readers(layer, group)[0].in_features
            old = group_readers(layer, group)[0].weight.clone()
            fold_scales(layer, group, torch.rand(width, generator=gen) * 1.5 + 0.5, norm_weight_offset(model.config))
            assert not torch.equal(old, group_readers(layer, group)[0].weight)
    torch.testing.assert_close(_logits(model, ids), before, atol=2e-5, rtol=2e-5)
    assert {"attn_in", "mlp_in", "up_down"} <= names
    # Tiny configs use 4 query heads over 2 KV heads: v -> o is not a channel-wise pair there.
    assert "v_o" not in names


@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_v_to_o_group_without_grouped_query_attention(arch, tokenizer):
    from transformers import AutoModelForCausalLM

    from tests.conftest import tiny_config

    config = tiny_config(arch, len(tokenizer), layers=1)
    config.num_key_value_heads = config.num_attention_heads
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    ids = torch.randint(3, len(tokenizer), (1, 10))
    before = _logits(model, ids)
    layer = decoder_layers(model)[0]
    group = next(g for g in scaling_groups(layer, config) if g.name == "v_o")
    fold_scales(layer, group, torch.rand(group_readers(layer, group)[0].in_features) + 0.5)
    torch.testing.assert_close(_logits(model, ids), before, atol=2e-5, rtol=2e-5)


def test_readers_alone_change_the_function(tokenizer):
    """The check above could not pass by folding nothing: scaling only the readers moves the logits."""
    model = build_model("llama", tokenizer, layers=1)
    ids = torch.randint(3, len(tokenizer), (1, 10))
    before = _logits(model, ids)
    layer = decoder_layers(model)[0]
    group = scaling_groups(layer, model.config)[0]
    with torch.no_grad():
        for linear in group_readers(layer, group):
            linear.weight.mul_(2.0)
    assert (_logits(model, ids) - before).abs().max() > 1e-3


def test_unknown_layout_is_refused():
    class Config:
        model_type = "gpt2"

    with pytest.raises(ConfigError, match="model type 'gpt2' is not one; supported model types"):
        scaling_groups(None, Config(), "awq")


def test_bad_scales_are_refused(tokenizer):
    model = build_model("llama", tokenizer, layers=1)
    layer = decoder_layers(model)[0]
    group = scaling_groups(layer, model.config)[0]
    with pytest.raises(ValueError, match="positive"):
        fold_scales(layer, group, torch.zeros(32))
