"""The shared OBS solver against simple references: accumulation, inverse factor, sweep."""

from __future__ import annotations

import pytest
import torch

from slimforge.calibration.hessian import (
    HessianAccumulator,
    inverse_hessian_cholesky,
    obs_sweep,
    permute_columns,
    unpermute_columns,
    zero_dead_columns,
)


def correlated_inputs(tokens: int, cols: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / cols**0.5 + torch.eye(cols)
    return (torch.randn(tokens, cols, generator=g) @ mix) * torch.linspace(0.2, 3.0, cols)


def round_quarter(start, col, block, hinv_diag):
    return torch.round(block[:, col] * 4) / 4


def naive_obs(weight, hessian, rule, percdamp=0.01):
    """Optimal Brain Surgeon one column at a time, re-inverting the remaining Hessian each step."""
    w = weight.double().clone()
    h = hessian.double().clone()
    h += percdamp * torch.diagonal(h).mean() * torch.eye(len(h), dtype=h.dtype)
    remaining = list(range(w.shape[1]))
    for q in range(w.shape[1]):
        hinv = torch.linalg.inv(h[remaining][:, remaining])
        new = rule(q, w[:, q])
        err = (w[:, q] - new) / hinv[0, 0]
        w[:, remaining] -= err.unsqueeze(1) * hinv[0].unsqueeze(0)
        w[:, q] = new
        remaining = remaining[1:]
    return w.float()


def test_accumulator_is_the_mean_of_xxt_over_uneven_batches():
    x = correlated_inputs(53, 12)
    acc = HessianAccumulator(12)
    for chunk in (x[:5], x[5:6], x[6:40].reshape(2, 17, 12), x[40:]):
        acc.add(chunk)
    assert acc.tokens == 53
    torch.testing.assert_close(acc.hessian, x.t() @ x / 53, rtol=1e-5, atol=1e-5)


def test_inverse_factor_and_dead_columns():
    x = correlated_inputs(200, 10)
    x[:, 3] = 0  # an input that never fires
    h = x.t() @ x / 200
    inv = inverse_hessian_cholesky(h, percdamp=0.05)
    assert inv.dead.tolist() == [i == 3 for i in range(10)]
    damped = h.clone().double()
    damped[3, 3] = 1
    damped += inv.damp * torch.eye(10, dtype=torch.float64)
    torch.testing.assert_close((inv.upper.t() @ inv.upper).double(), torch.linalg.inv(damped), rtol=1e-4, atol=1e-6)
    assert torch.allclose(inv.upper, torch.triu(inv.upper))
    w = torch.randn(4, 10)
    assert (zero_dead_columns(w, inv.dead)[:, 3] == 0).all()


def test_indefinite_hessian_is_rescued_by_more_dampening_or_refused():
    h = torch.diag(torch.tensor([1.0, 1.0, -0.5]))
    assert inverse_hessian_cholesky(h, percdamp=0.01).damp > 0.5
    with pytest.raises(ValueError, match="not positive definite"):
        inverse_hessian_cholesky(torch.diag(torch.tensor([1.0, 1.0, -1e6])), percdamp=0.01)


def test_identity_hessian_equals_plain_rounding_and_masking():
    w = torch.randn(6, 16)
    upper = torch.eye(16)
    rounded = obs_sweep(w, upper, round_quarter, block_size=5)
    torch.testing.assert_close(rounded.weight, torch.round(w * 4) / 4)
    mask = torch.rand(6, 16) > 0.5
    masked = obs_sweep(w, upper, lambda s, c, block, d: block[:, c] * mask[:, s + c], block_size=4)
    torch.testing.assert_close(masked.weight, w * mask)
    assert masked.loss == pytest.approx(float((w * ~mask).pow(2).sum() / 2), rel=1e-5)


@pytest.mark.parametrize("block_size", [1, 3, 8, 64])
def test_blocked_sweep_equals_naive_obs(block_size):
    torch.manual_seed(0)
    cols = 24
    x = correlated_inputs(400, cols)
    h = x.t() @ x / 400
    w = torch.randn(5, cols)
    mask = torch.rand(5, cols) > 0.4
    inv = inverse_hessian_cholesky(h, percdamp=0.01)
    for rule, ref_rule in (
        (round_quarter, lambda q, col: torch.round(col * 4) / 4),
        (lambda s, c, block, d: block[:, c] * mask[:, s + c], lambda q, col: col * mask[:, q].double()),
    ):
        got = obs_sweep(w, inv.upper, rule, block_size=block_size).weight
        torch.testing.assert_close(got, naive_obs(w, h, ref_rule), rtol=1e-4, atol=1e-4)


def test_sweep_lowers_the_output_error_of_plain_rounding():
    g = torch.Generator().manual_seed(1)
    # Strongly correlated inputs: 32 features driven by 6 factors plus a little noise.
    x = torch.randn(500, 6, generator=g) @ torch.randn(6, 32, generator=g) + 0.05 * torch.randn(500, 32, generator=g)
    h = x.t() @ x / 500
    w = torch.randn(8, 32)
    inv = inverse_hessian_cholesky(h)
    swept = obs_sweep(w, inv.upper, round_quarter).weight
    plain = torch.round(w * 4) / 4

    def out_err(q):
        return float(((x @ (w - q).t()) ** 2).mean())

    assert out_err(swept) < 0.5 * out_err(plain)
    assert torch.equal(swept, torch.round(swept * 4) / 4)  # still on the grid


def test_permutation_round_trip():
    h = torch.diag(torch.tensor([1.0, 5.0, 3.0, 0.5]))
    w = torch.arange(8.0).reshape(2, 4)
    pw, ph, perm = permute_columns(w, h)
    assert perm.tolist() == [1, 2, 0, 3]
    assert torch.diagonal(ph).tolist() == [5.0, 3.0, 1.0, 0.5]
    assert torch.equal(unpermute_columns(pw, perm), w)


def test_solver_threads_uses_one_cpu_thread_and_restores():
    from slimforge.calibration.hessian import solver_threads

    before = torch.get_num_threads()
    with solver_threads("cpu"):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
