"""Every pruning choice has one list of names (slimforge/prune/choices.py): the schemas accept
exactly those names and the math handles each of them, so a name added to one side only fails here."""

from __future__ import annotations

import pytest
import torch
from conftest import build_model, build_tokenizer

from slimforge.config import FieldError
from slimforge.prune.choices import (
    DEPTH_CRITERIA,
    EXPERT_SCORES,
    HEAD_MODES,
    PER_CHOICES,
    WIDTH_AXES,
)
from slimforge.prune.config import DepthConfig, MagnitudeConfig, SparseGPTConfig, WidthConfig
from slimforge.prune.depth import choose_layers
from slimforge.prune.unstructured import sparsegpt_prune, unstructured_mask
from slimforge.prune.width import WidthImportance, select_channels
from slimforge.prune.width_targets import WidthTargets, full_targets, scaled_targets

# Which WidthTargets field each budget axis shrinks.
AXIS_FIELDS = {"mlp": "intermediate_size", "heads": "num_attention_heads", "hidden": "hidden_size"}


@pytest.fixture(scope="module")
def tiny():
    return build_model("llama", build_tokenizer(), layers=4, seed=1)


@pytest.mark.parametrize("per", PER_CHOICES)
def test_every_per_choice_is_accepted_and_pruned_by_its_own_rule(per):
    MagnitudeConfig(per=per).check()
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(8, 16, generator=g) * torch.arange(1, 9).unsqueeze(1)  # rows of very different size
    keep = unstructured_mask(scores, 0.5, per)
    assert int((~keep).sum()) == 64
    assert (keep.sum(1) == 8).all() == (per == "row")  # per row: every row loses half; per layer: small rows lose more
    x = torch.randn(64, 16, generator=g)
    result = sparsegpt_prune(torch.randn(8, 16, generator=g), x.T @ x / 64, 0.5, per=per, block_size=16)
    assert int((result.weight == 0).sum()) == 64


@pytest.mark.parametrize("criterion", DEPTH_CRITERIA)
def test_every_depth_criterion_is_accepted_and_chooses_layers(criterion, tiny):
    cfg = DepthConfig(criterion=criterion, num_remove=None if criterion == "list" else 2,
                      layers=[1, 2] if criterion == "list" else None)
    cfg.check()
    ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    drop, scores = choose_layers(tiny, criterion, cfg.count(4), cfg.layers, lambda: ids, batch_size=2)
    assert len(drop) == 2 and len(set(drop)) == 2 and all(0 <= i < 4 for i in drop)
    assert bool(scores) == (criterion != "list")


@pytest.mark.parametrize("head_mode", HEAD_MODES)
def test_every_head_mode_is_accepted_and_keeps_whole_kv_groups(head_mode, tiny):
    WidthConfig(heads_ratio=0.5, head_mode=head_mode).check()
    config = tiny.config  # 4 query heads over 2 KV heads
    targets = scaled_targets(config, {"heads": 0.5}, head_mode, round_to=8)
    assert targets.num_attention_heads == 2
    assert targets.num_key_value_heads == {"query": 2, "group": 1}[head_mode]
    importance = WidthImportance(mlp=[torch.rand(64)], heads=[torch.tensor([0.1, 0.4, 0.3, 0.2])],
                                 hidden=torch.rand(32))
    kept = select_channels(importance, config, targets, head_mode)
    assert kept.q_heads[0].tolist() == {"query": [1, 2], "group": [0, 1]}[head_mode]
    assert len(kept.kv_heads[0]) == targets.num_key_value_heads


@pytest.mark.parametrize("axis", WIDTH_AXES)
def test_every_width_axis_is_accepted_and_shrinks_its_own_dimension(axis, tiny):
    WidthConfig(param_ratio=0.8, budget_axes=[axis]).check()
    full = full_targets(tiny.config)
    shrunk = scaled_targets(tiny.config, {axis: 0.5}, "query", round_to=8)
    changed = {f for f in AXIS_FIELDS.values() if getattr(shrunk, f) != getattr(full, f)}
    assert changed == {AXIS_FIELDS[axis]}
    assert set(AXIS_FIELDS) == set(WIDTH_AXES)


def test_a_name_outside_the_lists_is_refused_by_schema_and_math(tiny):
    config = tiny.config
    targets = WidthTargets(64, 2, 1, 32)
    refusals = [
        (lambda: MagnitudeConfig(per="column").check(), FieldError),
        (lambda: SparseGPTConfig(per="column").check(), FieldError),
        (lambda: unstructured_mask(torch.rand(4, 8), 0.5, "column"), ValueError),
        (lambda: DepthConfig(criterion="random", num_remove=1).check(), FieldError),
        (lambda: choose_layers(tiny, "random", 1), ValueError),
        (lambda: WidthConfig(heads_ratio=0.5, head_mode="key").check(), FieldError),
        (lambda: scaled_targets(config, {"heads": 0.5}, "key", 8), ValueError),
        (lambda: select_channels(WidthImportance([torch.rand(64)], [torch.rand(4)], torch.rand(32)),
                                 config, targets, "key"), ValueError),
        (lambda: WidthConfig(param_ratio=0.5, budget_axes=["vocab"]).check(), FieldError),
        (lambda: scaled_targets(config, {"vocab": 0.5}, "query", 8), ValueError),
    ]
    for refuse, error in refusals:
        with pytest.raises(error):
            refuse()


@pytest.mark.parametrize("score", EXPERT_SCORES)
def test_every_expert_score_is_accepted_and_ranks_experts(score):
    from slimforge.prune.expert_config import ExpertsConfig
    from slimforge.prune.expert_scores import ExpertStats, expert_scores

    ExpertsConfig(score=score, ratio=0.5).check()
    stats = ExpertStats(tokens=torch.tensor([4.0, 0.0, 2.0], dtype=torch.float64),
                        weighted_norm=torch.tensor([2.0, 0.0, 3.0], dtype=torch.float64))
    ranked = expert_scores(stats, score)
    assert ranked.shape == (3,) and float(ranked[1]) == 0.0  # an expert no token chose scores 0
    assert ranked.argmax().item() == {"reap": 2, "frequency": 0}[score]  # mean gate x norm 1.5 > 0.5; count 4 > 2
