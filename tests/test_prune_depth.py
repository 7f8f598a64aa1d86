"""Depth pruning: block scores against the model's own hidden states, layer choice, and the one way to drop layers."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import build_model

from slimforge import arch
from slimforge.distill.config import DropLayersConfig
from slimforge.distill.students import drop_layers_stage
from slimforge.prune.config import DepthConfig
from slimforge.prune.depth import (
    angular_distance,
    block_influence,
    depth_scores,
    depth_stage,
    drop_layers,
    evenly_spaced_keep,
    keep_from_drop,
    keep_from_ratio,
    layers_to_remove,
)


def ids_for(tokenizer, n=4, length=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, len(tokenizer), (n, length), generator=g)


def test_depth_scores_and_choice(tokenizer):
    x = torch.randn(2, 5, 8)
    assert torch.allclose(block_influence(x, x), torch.zeros(2, 5), atol=1e-6)
    assert torch.allclose(angular_distance(x, -x), torch.ones(2, 5), atol=1e-3)
    model = build_model("llama", tokenizer, layers=4, seed=2)
    block = arch.decoder_layers(model)[2]
    with torch.no_grad():
        for linear in (arch.attention_output(block), arch.mlp_output(block)):
            linear.weight.zero_()  # block 2 becomes the identity
    ids = ids_for(tokenizer)
    bi = depth_scores(model, ids, "block_influence", batch_size=2)
    assert len(bi) == 4 and min(range(4), key=bi.__getitem__) == 2 and bi[2] < 1e-6
    with torch.no_grad():
        states = model(ids, output_hidden_states=True).hidden_states
    ang = depth_scores(model, ids, "angular", span=2, batch_size=3)
    assert len(ang) == 3
    expected = [float(angular_distance(states[i], states[i + 2]).mean()) for i in range(3)]
    assert ang == pytest.approx(expected, abs=1e-4)
    assert layers_to_remove(bi, 2, "block_influence")[0] == 2 or 2 in layers_to_remove(bi, 2, "block_influence")
    assert layers_to_remove([0.5, 0.1, 0.3], 2, "angular") == [1, 2]
    assert layers_to_remove([0.5, 0.1, 0.3, 0.2], 2, "block_influence") == [1, 3]


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


def test_drop_layers_reports_what_it_kept_and_removed(tokenizer):
    model = build_model("llama", tokenizer, layers=5)
    dropped = drop_layers(model, [3, 1])
    assert (dropped.before, dropped.kept, dropped.removed) == (5, [0, 2, 4], [1, 3])
    assert arch.num_layers(model) == 3 and model.config.num_hidden_layers == 3


def _ctx(model, tokenizer, cfg):
    """Just what a stage that needs no calibration data reads of its context."""
    def load(**_):
        return build_model("llama", tokenizer, layers=4, seed=7), tokenizer

    return SimpleNamespace(config=cfg, load_parent=load, parent=SimpleNamespace(load=load),
                           device=torch.device("cpu"), dtype=torch.float32, seed=0)


def test_student_drop_layers_and_depth_list_are_one_removal(tokenizer):
    """Both recipe names give the same weights and config; each keeps its own slimforge.json fields."""
    student = drop_layers_stage(_ctx(None, tokenizer, DropLayersConfig(drop=[1, 2])))
    depth = depth_stage(_ctx(None, tokenizer, DepthConfig(criterion="list", layers=[2, 1])))
    assert student.model.config.to_dict() == depth.model.config.to_dict()
    student_state, depth_state = student.model.state_dict(), depth.model.state_dict()
    assert student_state.keys() == depth_state.keys()
    assert all(torch.equal(student_state[k], depth_state[k]) for k in student_state)
    assert student.meta == {"layers_before": 4, "layers_after": 2, "kept_layers": [0, 3], "dropped_layers": [1, 2]}
    params = arch.count_parameters(build_model("llama", tokenizer, layers=4, seed=7))
    assert depth.meta == {"criterion": "list", "layers_before": 4, "layers_after": 2, "removed_layers": [1, 2],
                          "kept_layers": [0, 3], "scores": [], "parameters_before": params,
                          "parameters_after": arch.count_parameters(depth.model)}
    assert depth.metrics == {"layers_after": 2, "parameters_after": depth.meta["parameters_after"]}
