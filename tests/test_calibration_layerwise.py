"""Layer-by-layer calibration: same activations as the model's own forward, on every family."""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHS, build_model

from slimforge.calibration.activations import record_linear_inputs
from slimforge.calibration.layerwise import layerwise


def calib_ids(tokenizer, n=3, length=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, len(tokenizer), (n, length), generator=g)


@pytest.mark.parametrize("arch", ARCHS)
def test_layerwise_reproduces_the_models_hidden_states(arch, tokenizer):
    model = build_model(arch, tokenizer, layers=3)
    ids = calib_ids(tokenizer, n=5, length=24)  # longer than gemma's sliding window of 16
    with torch.no_grad():
        expected = model(input_ids=ids, output_hidden_states=True).hidden_states
    seen = []
    for step in layerwise(model, ids, batch_size=2):
        inputs = torch.cat([x for x in step.inputs])
        seen.append(inputs)
        torch.testing.assert_close(inputs, expected[step.index], rtol=1e-5, atol=1e-5)
        if step.index % 2:
            step.run(keep_outputs=True)  # both ways of propagating must agree
    assert len(seen) == 3


def test_propagation_uses_the_changed_block(tokenizer):
    model = build_model("llama", tokenizer, layers=2)
    ids = calib_ids(tokenizer)
    firsts = []
    for step in layerwise(model, ids, batch_size=3):
        if step.index == 0:
            for linear in step.linears().values():
                linear.weight.data.zero_()  # the block becomes the identity (residual only)
        else:
            firsts.append(torch.cat(step.inputs))
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids)
    torch.testing.assert_close(firsts[0], embeds)


def test_linears_fed_the_same_tensor_share_statistics(tokenizer):
    model = build_model("llama", tokenizer, layers=1)
    ids = calib_ids(tokenizer, n=4, length=10)
    captured = {}

    def keep_input(module, args):
        captured.setdefault("mlp_in", []).append(args[0].detach().reshape(-1, args[0].shape[-1]))

    for step in layerwise(model, ids, batch_size=3):
        handle = step.layer.mlp.gate_proj.register_forward_pre_hook(keep_input)
        with record_linear_inputs(step.linears(), hessian=True) as stats:
            step.run()
        handle.remove()
    assert stats["self_attn.q_proj"] is stats["self_attn.k_proj"] is stats["self_attn.v_proj"]
    assert stats["mlp.gate_proj"] is stats["mlp.up_proj"]
    assert stats["mlp.down_proj"] is not stats["mlp.gate_proj"]
    x = torch.cat(captured["mlp_in"])
    gate = stats["mlp.gate_proj"]
    assert gate.tokens == 40
    torch.testing.assert_close(gate.hessian, x.t() @ x / 40, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gate.act_norm, x.norm(dim=0), rtol=1e-5, atol=1e-6)
    assert stats["mlp.down_proj"].hessian.shape == (64, 64)
