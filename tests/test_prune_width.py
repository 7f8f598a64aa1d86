"""Width pruning math on tiny models of every family: importance, slicing, parity, reload; target sizes."""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHS, build_model
from transformers import AutoModelForCausalLM

from slimforge import arch
from slimforge.config import FieldError
from slimforge.prune.config import WidthConfig
from slimforge.prune.width import build_pruned_model, prune_width, select_channels
from slimforge.prune.width_targets import WidthTargets, config_accepts, width_param_count

DEAD_HIDDEN = [3, 10, 17, 29]  # of 32
DEAD_MLP = list(range(0, 64, 4))  # 16 of 64
DEAD_HEADS = {"query": [1, 2], "group": [2, 3]}  # 4 heads over 2 KV groups


def ids_for(tokenizer, n=4, length=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, len(tokenizer), (n, length), generator=g)


@torch.no_grad()
def kill_structure(model, head_mode):
    """Make some hidden channels, MLP channels and heads contribute exactly nothing."""
    hd = arch.head_dim(model.config)
    # Random-init activations are ~0.02, so RMSNorm's eps=1e-6 would be ~0.25% of their mean
    # square; the norm rescaling is exact only without it.
    model.config.rms_norm_eps = 1e-12
    for module in model.modules():
        for attr in ("eps", "variance_epsilon"):
            if isinstance(getattr(module, attr, None), float):
                setattr(module, attr, 1e-12)
    model.get_input_embeddings().weight[:, DEAD_HIDDEN] = 0
    for layer in arch.decoder_layers(model):
        o_proj, down = arch.attention_output(layer), arch.mlp_output(layer)
        o_proj.weight[DEAD_HIDDEN] = 0
        down.weight[DEAD_HIDDEN] = 0
        down.weight[:, DEAD_MLP] = 0
        for h in DEAD_HEADS[head_mode]:
            o_proj.weight[:, h * hd:(h + 1) * hd] = 0
    return model


@pytest.mark.parametrize("arch_name", ARCHS)
def test_removing_dead_width_is_lossless_and_reloads(arch_name, tokenizer, tmp_path):
    head_mode = "group" if arch_name in ("qwen2", "gemma2", "phi3") else "query"
    model = kill_structure(build_model(arch_name, tokenizer, layers=2, seed=3), head_mode)
    ids = ids_for(tokenizer)
    with torch.no_grad():
        expected = model(ids).logits
    targets = WidthTargets(intermediate_size=48, num_attention_heads=2,
                           num_key_value_heads=1 if head_mode == "group" else 2, hidden_size=28)
    pruned, kept, importance = prune_width(model, ids, targets, head_mode=head_mode, batch_size=3)
    assert sorted(set(range(32)) - set(kept.hidden.tolist())) == DEAD_HIDDEN
    assert all(sorted(set(range(64)) - set(k.tolist())) == DEAD_MLP for k in kept.mlp)
    assert all(sorted(set(range(4)) - set(q.tolist())) == DEAD_HEADS[head_mode] for q in kept.q_heads)
    cfg = pruned.config
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (
        28, 48, 2, targets.num_key_value_heads)
    assert arch.count_parameters(pruned) == width_param_count(model.config, targets)
    with torch.no_grad():
        got = pruned(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)

    pruned.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, got, rtol=1e-5, atol=1e-5)
        cached = reloaded.generate(ids[:1], max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
        uncached = reloaded.generate(ids[:1], max_new_tokens=6, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(cached, uncached) and cached.shape[1] == ids.shape[1] + 6


def test_norm_rescaling_matters_when_dropped_channels_were_dead(tokenizer):
    model = kill_structure(build_model("llama", tokenizer, layers=2, seed=3), "query")
    ids = ids_for(tokenizer)
    with torch.no_grad():
        expected = model(ids).logits
    targets = WidthTargets(64, 4, 2, 28)
    plain, _, _ = prune_width(model, ids, targets, rescale_norms=False, batch_size=4)
    with torch.no_grad():
        assert not torch.allclose(plain(ids).logits, expected, atol=1e-3)


def test_real_pruning_prefers_important_units(tokenizer):
    """On a live model, keeping the most important half of the MLP beats keeping the least important."""
    model = build_model("llama", tokenizer, layers=2, seed=5)
    ids = ids_for(tokenizer, n=6)
    with torch.no_grad():
        reference = model(ids).logits
    targets = WidthTargets(32, 4, 2, 32)
    best, kept, importance = prune_width(model, ids, targets, batch_size=6)
    importance.mlp = [-m for m in importance.mlp]
    worst = build_pruned_model(model, select_channels(importance, model.config, targets, "query"), targets,
                               importance.norm_energy)
    with torch.no_grad():
        err_best = float((best(ids).logits - reference).pow(2).mean())
        err_worst = float((worst(ids).logits - reference).pow(2).mean())
    assert err_best < err_worst


def test_width_targets_and_budget():
    config = build_model("llama", __import__("conftest").build_tokenizer(), layers=2).config

    def targets(**kw):
        return WidthConfig(round_to=8, **kw).targets(config)

    assert targets(mlp_ratio=0.5) == WidthTargets(32, 4, 2, 32)
    assert targets(heads_ratio=0.5) == WidthTargets(64, 2, 2, 32)
    assert targets(heads_ratio=0.5, head_mode="group") == WidthTargets(64, 2, 1, 32)
    assert targets(hidden_size=24, num_attention_heads=2) == WidthTargets(64, 2, 2, 24)
    full = width_param_count(config, WidthTargets(64, 4, 2, 32))
    budget = targets(param_ratio=0.6)
    assert width_param_count(config, budget) <= 0.6 * full
    assert width_param_count(config, budget) > 0.4 * full
    with pytest.raises(FieldError, match="multiple of 2"):
        targets(num_attention_heads=3)
    with pytest.raises(FieldError, match="whole KV groups of 2 query heads"):
        targets(num_attention_heads=3, head_mode="group")
    with pytest.raises(FieldError, match="cannot grow"):
        targets(intermediate_size=128)
    with pytest.raises(FieldError, match="even the smallest widths of"):
        targets(param_ratio=0.05, budget_axes=["heads"])


def test_hidden_widths_follow_what_transformers_accepts():
    """LlamaConfig refuses hidden % heads != 0 even with head_dim set (SmolLM2: 9 heads, so 576 -> 432, not 448)."""
    from transformers import LlamaConfig, MistralConfig

    llama = LlamaConfig(vocab_size=64, hidden_size=72, intermediate_size=96, num_hidden_layers=1,
                        num_attention_heads=9, num_key_value_heads=3)
    assert not config_accepts(llama, 64, 9, 3) and config_accepts(llama, 54, 9, 3)
    budget = WidthConfig(round_to=2, param_ratio=0.8, budget_axes=["hidden"]).targets(llama)
    assert budget.hidden_size % 9 == 0 and budget.hidden_size < 72
    with pytest.raises(FieldError, match="nearest that fit: 63, 72"):
        WidthConfig(hidden_size=64).targets(llama)
    # Mistral's config has no such rule: head_dim carries the attention width.
    mistral = MistralConfig(vocab_size=64, hidden_size=72, intermediate_size=96, num_hidden_layers=1,
                            num_attention_heads=9, num_key_value_heads=3, head_dim=8)
    assert WidthConfig(hidden_size=64).targets(mistral).hidden_size == 64


@pytest.mark.parametrize("arch_name", ["llama", "gemma"])
def test_the_planned_config_of_a_width_prune_is_the_config_it_builds(arch_name, tokenizer):
    """What later stages are checked against at plan time is exactly what the stage makes."""
    from slimforge.prune.config import DepthConfig
    from slimforge.stage import TeacherInfo

    model = build_model(arch_name, tokenizer, layers=2)
    cfg = WidthConfig(hidden_ratio=0.75, mlp_ratio=0.5, heads_ratio=0.5, round_to=8)
    planned = cfg.planned_config(TeacherInfo(model.config, tokenizer))
    pruned, _, _ = prune_width(model, ids_for(tokenizer), cfg.targets(model.config), batch_size=2)
    fields = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
              "num_hidden_layers")
    assert {f: getattr(planned, f) for f in fields} == {f: getattr(pruned.config, f) for f in fields}
    assert model.config.hidden_size == 32  # the input's config is left alone
    deeper = DepthConfig(num_remove=1).planned_config(TeacherInfo(planned, tokenizer))
    assert deeper.num_hidden_layers == 1 and deeper.hidden_size == pruned.config.hidden_size
