"""Unstructured and N:M pruning math on a bare nn.Linear, against simple references."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from slimforge.prune.unstructured import (
    apply_mask,
    magnitude_scores,
    nm_mask,
    sparsegpt_prune,
    unstructured_mask,
    wanda_scores,
)


def calibration(tokens=2048, cols=64, seed=0):
    """Correlated inputs whose features differ in scale by 100x, like LLM activations with outliers."""
    g = torch.Generator().manual_seed(seed)
    factors = torch.randn(tokens, 16, generator=g) @ torch.randn(16, cols, generator=g)
    x = factors + 0.3 * torch.randn(tokens, cols, generator=g)
    return x * torch.logspace(-1, 1, cols)[torch.randperm(cols, generator=g)]


def linear(rows=32, cols=64, seed=1):
    torch.manual_seed(seed)
    return nn.Linear(cols, rows, bias=False)


def output_error(layer, weight, x):
    with torch.no_grad():
        return float(((x @ layer.weight.t() - x @ weight.t()) ** 2).mean())


def test_scores():
    w = torch.tensor([[1.0, -2.0], [-3.0, 0.5]])
    assert torch.equal(magnitude_scores(w), w.abs())
    assert torch.equal(wanda_scores(w, torch.tensor([10.0, 1.0])), torch.tensor([[10.0, 2.0], [30.0, 0.5]]))


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9])
def test_per_row_sparsity_is_exact_and_drops_the_lowest(sparsity):
    scores = torch.rand(7, 40)
    keep = unstructured_mask(scores, sparsity, per="row")
    assert (keep.sum(1) == 40 - int(40 * sparsity)).all()
    if sparsity:
        assert (scores[~keep].reshape(7, -1).max(1).values <= scores.masked_fill(~keep, 9).min(1).values).all()


def test_per_layer_sparsity_is_exact_but_uneven_across_rows():
    scores = torch.rand(8, 50) * torch.arange(1, 9).unsqueeze(1)  # later rows score higher
    keep = unstructured_mask(scores, 0.5, per="layer")
    assert int((~keep).sum()) == 200
    assert (~keep)[0].sum() > (~keep)[7].sum()
    assert float(scores[~keep].max()) <= float(scores[keep].min())


def test_ties_still_give_the_exact_count():
    keep = unstructured_mask(torch.ones(3, 10), 0.5, per="row")
    assert (keep.sum(1) == 5).all()


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_nm_mask_has_exactly_n_zeros_per_group_and_drops_the_lowest(n, m):
    scores = torch.rand(6, 32)
    keep = nm_mask(scores, n, m)
    groups = keep.reshape(6, -1, m)
    assert ((~groups).sum(-1) == n).all()
    s = scores.reshape(6, -1, m)
    assert (s.masked_fill(groups, 9).min(-1).values <= s.masked_fill(~groups, -9).max(-1).values).all()
    assert (s.masked_fill(groups, -9).max(-1).values <= s.masked_fill(~groups, 9).min(-1).values).all()


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        unstructured_mask(torch.rand(2, 4), 1.0)
    with pytest.raises(ValueError, match="1 <= N < M"):
        nm_mask(torch.rand(2, 8), 4, 4)
    with pytest.raises(ValueError, match="multiple of M"):
        nm_mask(torch.rand(2, 6), 2, 4)
    with pytest.raises(ValueError, match="block_size"):
        sparsegpt_prune(torch.rand(2, 8), torch.eye(8), n=2, m=4, block_size=6)


def test_sparsegpt_with_identity_hessian_is_magnitude_pruning():
    w = torch.randn(8, 16)
    result = sparsegpt_prune(w, torch.eye(16), sparsity=0.5, per="row", block_size=16, percdamp=0.0)
    torch.testing.assert_close(result.weight, w * unstructured_mask(w.abs(), 0.5, per="row"))


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_reconstruction_error_sparsegpt_below_wanda_below_magnitude(pattern):
    layer = linear()
    x = calibration()
    w = layer.weight.detach()
    n, m = (2, 4) if pattern == "2:4" else (None, None)
    act_norm = x.norm(dim=0)

    def masked(scores):
        keep = nm_mask(scores, n, m) if n else unstructured_mask(scores, 0.5, per="row")
        return apply_mask(w.clone(), keep)

    magnitude = masked(magnitude_scores(w))
    wanda = masked(wanda_scores(w, act_norm))
    sgpt = sparsegpt_prune(w, x.t() @ x / len(x), sparsity=0.5, n=n, m=m, block_size=16)
    errors = [output_error(layer, q, x) for q in (sgpt.weight, wanda, magnitude)]
    assert errors[0] < errors[1] < errors[2], errors
    assert errors[0] < 0.7 * errors[1]
    # Same sparsity for all three, and the pruned weights are exactly zero.
    assert int((sgpt.weight == 0).sum()) == int((wanda == 0).sum()) == w.numel() // 2
    if n:
        assert ((sgpt.weight.reshape(32, -1, 4) == 0).sum(-1) == 2).all()


def test_sparsegpt_dead_inputs_are_zeroed():
    x = calibration(cols=16)
    x[:, 5] = 0
    result = sparsegpt_prune(torch.randn(4, 16), x.t() @ x / len(x), sparsity=0.25, block_size=8)
    assert (result.weight[:, 5] == 0).all()


def test_lowest_mask_matches_a_stable_sort_with_ties():
    from slimforge.prune.unstructured import lowest_mask

    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 5, (50, 37), generator=g).float()  # many ties
    for count in (0, 1, 10, 36):
        reference = torch.zeros_like(scores, dtype=torch.bool)
        reference.scatter_(1, torch.sort(scores, dim=-1, stable=True).indices[:, :count], True)
        assert torch.equal(lowest_mask(scores, count), reference)
