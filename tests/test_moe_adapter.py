"""The MoE adapter (slimforge/moe.py) on tiny random models of each MoE family."""

from __future__ import annotations

import pytest
import torch

from slimforge import moe
from slimforge.errors import ConfigError
from tests.conftest import MOE_ARCHS, build_model, build_moe_model


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_adapter_finds_every_block_router_and_experts(arch, tokenizer):
    model = build_moe_model(arch, tokenizer, experts=4)
    blocks = moe.moe_blocks(model)
    assert [b.layer_index for b in blocks] == [0, 1, 2, 3]
    for block in blocks:
        assert block.num_experts == 4
        gate, up, down = moe.expert_weights(block, 1)
        assert gate.shape == up.shape == (48, 32) and down.shape == (32, 48)
        assert (block.shared_expert is not None) == (arch == "qwen2_moe")


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_unfused_view_computes_the_same_function_and_writes_edits_back(arch, tokenizer):
    model = build_moe_model(arch, tokenizer)
    ids = torch.randint(3, len(tokenizer), (2, 12))
    with torch.no_grad():
        ref = model(ids).logits
        with moe.unfused_experts(model) as blocks:
            names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".experts." in n]
            assert len(names) == 4 * 4 * 3 and "model.layers.0.mlp.experts.3.down_proj" in names
            torch.testing.assert_close(model(ids).logits, ref, rtol=1e-5, atol=1e-5)
            blocks[0].experts[2].up_proj.weight.zero_()
        _, up, _ = moe.expert_weights(moe.moe_blocks(model)[0], 2)
        assert float(up.abs().sum()) == 0.0
        assert type(moe.moe_blocks(model)[0].experts).__name__.endswith("Experts")
        assert not isinstance(moe.moe_blocks(model)[0].experts, moe.UnfusedExperts)


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_removing_experts_no_token_routes_to_is_lossless_and_reloads(arch, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    model = build_moe_model(arch, tokenizer, experts=4)
    ids = torch.randint(3, len(tokenizer), (2, 12))  # 24 tokens < hidden 32: any router logits can be set exactly
    with torch.no_grad():
        for block in moe.moe_blocks(model):  # layer by layer, experts 1 and 3 get logit -100 on every token
            seen = []
            hook = block.router.register_forward_pre_hook(lambda _m, args, seen=seen: seen.append(args[0].reshape(-1, 32)))
            model(ids)
            hook.remove()
            row = torch.linalg.lstsq(seen[0].double(), torch.full((24, 1), -100.0, dtype=torch.float64)).solution
            block.router.weight[1] = row[:, 0].float()
            block.router.weight[3] = row[:, 0].float()
            _, _, chosen = moe.route(block, seen[0])
            assert not set(chosen.flatten().tolist()) & {1, 3}
        ref = model(ids).logits
    # The experts that remain, and what each token routes to, must not change.
    moe.keep_experts(model, [[0, 2]] * 4)
    assert moe.num_experts(model.config) == 2
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref, rtol=1e-5, atol=1e-5)
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, ref, rtol=1e-5, atol=1e-5)
    out = again.generate(ids[:1, :4], max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 7)


def test_bad_expert_edits_are_refused_in_one_line(tokenizer):
    dense = build_model("llama", tokenizer)
    with pytest.raises(ConfigError, match="has no experts"):
        moe.require_moe(dense)
    model = build_moe_model("mixtral", tokenizer, experts=4, top_k=2)
    with pytest.raises(ConfigError, match="fewer than the 2"):
        moe.keep_experts(model, [[0]] * 4)
    with pytest.raises(ConfigError, match="every expert"):
        moe.keep_experts(model, [[]] * 4)
    with pytest.raises(ConfigError, match="same number"):
        moe.keep_experts(model, [[0, 1], [0, 1, 2], [0, 1], [0, 1]])
    with pytest.raises(ConfigError, match=r"top_k=5 must lie in \[1, 4\]"):
        moe.set_top_k(model, 5)
