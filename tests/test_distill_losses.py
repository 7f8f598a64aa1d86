"""Distillation losses: definitions, temperature, masking, and the chunked path's parity (values and grads).

Every test that runs "each divergence" reads the one list of names (``loss_names.KD_LOSSES``, through
``losses.DIVERGENCES``), so a new divergence is checked against its textbook formula and through the naive,
chunked-online and chunked-cached paths without touching these tests beyond its formula in ``TEXTBOOK``.
"""

from __future__ import annotations

import inspect
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, cli_env

from slimforge.config import FieldError
from slimforge.distill import losses
from slimforge.distill.chunked import chunked_head_loss, softcap_transform
from slimforge.distill.config import DistillConfig
from slimforge.distill.loss_names import KD_LOSSES
from slimforge.distill.losses import (
    DIVERGENCES,
    divergence,
    kd_loss,
    mixed_loss,
    topk_bucket_logprobs,
)
from slimforge.distill.objective import (
    FUSED_CACHED,
    FUSED_ONLINE,
    LossSpec,
    cached_chunk_loss,
    ce_chunk_loss,
    naive_loss,
    online_chunk_loss,
    teacher_buckets,
)


@pytest.fixture(autouse=True)
def _float64():
    """Tight tolerances for the reference comparisons."""
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


def _dists(n=5, v=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, v, generator=g, dtype=torch.float64) * 2
    t = torch.randn(n, v, generator=g, dtype=torch.float64) * 2
    return s, t


def _kl(a, b):
    return sum(x * math.log(x / y) for x, y in zip(a, b) if x > 0)


def _mix(weight, a, b):
    return [weight * x + (1 - weight) * y for x, y in zip(a, b)]


# Textbook formulas on probabilities (P = teacher, Q = student), one row at a time; beta and alpha
# are the jsd and skew parameters.
TEXTBOOK = {
    "forward_kl": lambda p, q, beta, alpha: _kl(p, q),
    "reverse_kl": lambda p, q, beta, alpha: _kl(q, p),
    "jsd": lambda p, q, beta, alpha: beta * _kl(p, _mix(beta, p, q)) + (1 - beta) * _kl(q, _mix(beta, p, q)),
    "tvd": lambda p, q, beta, alpha: 0.5 * sum(abs(x - y) for x, y in zip(p, q)),
    "skew_forward_kl": lambda p, q, beta, alpha: _kl(p, _mix(alpha, p, q)),
    "skew_reverse_kl": lambda p, q, beta, alpha: _kl(q, _mix(alpha, q, p)),
    "jeffreys": lambda p, q, beta, alpha: sum((x - y) * math.log(x / y) for x, y in zip(p, q)),
    "adaptive_kl": lambda p, q, beta, alpha: _akl(p, q),
}


def _akl(p, q, mu=0.5):
    """AKL from its definition: the head is the teacher's top tokens until their mass reaches mu."""
    order = sorted(range(len(p)), key=lambda i: -p[i])
    head, mass = set(), 0.0
    for i in order:
        if mass >= mu:
            break
        head.add(i)
        mass += p[i]
    g_head = sum(abs(p[i] - q[i]) for i in head)
    g_tail = sum(abs(p[i] - q[i]) for i in range(len(p)) if i not in head)
    if g_head + g_tail == 0:
        return 0.0
    return (g_head * _kl(p, q) + g_tail * _kl(q, p)) / (g_head + g_tail)


def test_each_loss_name_has_one_function_a_reference_and_schema_support():
    """One list of names (``KD_LOSSES``): the math, the fused paths, the schema and these tests agree with it."""
    assert list(DIVERGENCES) == list(KD_LOSSES)
    assert set(TEXTBOOK) == set(KD_LOSSES), "give each divergence its textbook formula in TEXTBOOK"
    assert set(FUSED_ONLINE) <= set(DIVERGENCES) and set(FUSED_CACHED) <= set(DIVERGENCES)
    # A divergence function in losses.py (it takes the two log-probabilities) must be a recipe name.
    defined = {name for name, fn in inspect.getmembers(losses, inspect.isfunction)
               if fn.__module__ == losses.__name__ and list(inspect.signature(fn).parameters)[:2] == ["s_logp", "t_logp"]}
    assert defined == set(KD_LOSSES)
    for name, (fn, param) in DIVERGENCES.items():
        assert fn.__name__ == name
        assert param is None or param in inspect.signature(fn).parameters
        DistillConfig(loss=name).check()
    with pytest.raises(FieldError, match="must be one of " + ", ".join(KD_LOSSES) + "$"):
        DistillConfig(loss="kl").check()


def test_the_schema_reads_the_names_without_torch():
    code = ("import sys; from slimforge.distill.config import DistillConfig; DistillConfig(loss='jeffreys').check(); "
            "print('torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=cli_env(), cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_divergences_match_textbook_formulas(name):
    s, t = _dists()
    got = divergence(name, F.log_softmax(s, -1), F.log_softmax(t, -1), beta=0.3, alpha=0.2)
    p, q = F.softmax(t, -1), F.softmax(s, -1)
    want = torch.tensor([TEXTBOOK[name](p[i].tolist(), q[i].tolist(), 0.3, 0.2) for i in range(len(s))])
    torch.testing.assert_close(got, want)
    assert (got >= -1e-12).all()
    same = divergence(name, F.log_softmax(s, -1), F.log_softmax(s, -1), beta=0.3, alpha=0.2)
    torch.testing.assert_close(same, torch.zeros_like(same))


def test_adaptive_kl_is_forward_kl_where_the_head_is_off_and_reverse_kl_where_the_tail_is():
    t = torch.tensor([[0.3, 0.3, 0.2, 0.2]]).log()  # head: the first two tokens (0.6 >= 0.5 after them)
    head_off = torch.tensor([[0.4, 0.2, 0.2, 0.2]]).log()
    tail_off = torch.tensor([[0.3, 0.3, 0.1, 0.3]]).log()
    torch.testing.assert_close(divergence("adaptive_kl", head_off, t), divergence("forward_kl", head_off, t))
    torch.testing.assert_close(divergence("adaptive_kl", tail_off, t), divergence("reverse_kl", tail_off, t))
    # Off on both: between the two, with the gap shares as weights, which the gradient treats as constants.
    s, t = _dists()
    logits = s.clone().requires_grad_(True)
    sl, tl = F.log_softmax(logits, -1), F.log_softmax(t, -1)
    p, q = tl.exp(), sl.detach().exp()
    order = p.argsort(-1, descending=True)
    head = (p.gather(-1, order).cumsum(-1) - p.gather(-1, order)) < 0.5
    gap = (p - q).abs().gather(-1, order)
    w = ((gap * head).sum(-1) / gap.sum(-1))
    assert ((w > 0.05) & (w < 0.95)).any()
    divergence("adaptive_kl", sl, tl).sum().backward()
    got = logits.grad.clone()
    logits.grad = None
    sl = F.log_softmax(logits, -1)
    (w * divergence("forward_kl", sl, tl) + (1 - w) * divergence("reverse_kl", sl, tl)).sum().backward()
    torch.testing.assert_close(got, logits.grad)


def test_divergence_special_cases():
    s, t = _dists()
    sl, tl = F.log_softmax(s, -1), F.log_softmax(t, -1)
    torch.testing.assert_close(divergence("jsd", sl, tl, beta=0.5), divergence("jsd", tl, sl, beta=0.5))
    torch.testing.assert_close(divergence("skew_forward_kl", sl, tl, alpha=0.0), divergence("forward_kl", sl, tl))
    torch.testing.assert_close(divergence("skew_reverse_kl", sl, tl, alpha=0.0), divergence("reverse_kl", sl, tl))
    assert (divergence("tvd", sl, tl) <= 1).all()
    torch.testing.assert_close(divergence("jeffreys", sl, tl), divergence("jeffreys", tl, sl))
    torch.testing.assert_close(divergence("jeffreys", sl, tl),
                               divergence("forward_kl", sl, tl) + divergence("reverse_kl", sl, tl))


@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
def test_temperature_scales_by_t_squared(temperature):
    s, t = _dists()
    got = kd_loss(s, t, loss="forward_kl", temperature=temperature)
    p, q = F.softmax(t / temperature, -1), F.softmax(s / temperature, -1)
    want = (p * (p.log() - q.log())).sum(-1).mean() * temperature**2
    torch.testing.assert_close(got, want)


def test_t_squared_keeps_high_temperature_gradients_comparable():
    """Hinton's correction: d(T^2 KL)/ds = T (q - p) tends to a T-independent limit as T grows.

    Without the T^2 factor the gradient would shrink like 1/T^2.
    """
    s, t = _dists(n=50, v=11)
    norms = []
    for temperature in (4.0, 16.0, 64.0):
        s_req = s.clone().requires_grad_(True)
        kd_loss(s_req, t, temperature=temperature).backward()
        norms.append(s_req.grad.norm().item())
    assert max(norms) / min(norms) < 1.2
    assert norms[0] > 1e-3


def test_masked_tokens_change_neither_value_nor_gradient():
    s, t = _dists(n=6)
    mask = torch.tensor([1, 0, 1, 1, 0, 1.0])
    s_req = s.clone().requires_grad_(True)
    loss = kd_loss(s_req, t, mask, loss="jsd")
    loss.backward()
    kept = mask.bool()
    torch.testing.assert_close(loss, kd_loss(s[kept], t[kept], loss="jsd"))
    assert torch.all(s_req.grad[~kept] == 0) and torch.any(s_req.grad[kept] != 0)


def test_ce_mixing():
    s, t = _dists()
    targets = torch.tensor([0, 3, 6, 1, 2])
    got = mixed_loss(s, t, targets, ce_weight=0.25, loss="reverse_kl", temperature=2.0)
    want = 0.75 * kd_loss(s, t, loss="reverse_kl", temperature=2.0) + 0.25 * F.cross_entropy(s, targets)
    torch.testing.assert_close(got, want)


def test_bucket_logprobs_are_a_distribution_and_exact_at_full_k():
    s, t = _dists(n=4, v=9)
    ids, t_buckets = teacher_buckets(t, k=3, temperature=2.0)
    s_buckets = topk_bucket_logprobs(s, ids, temperature=2.0)
    torch.testing.assert_close(torch.logsumexp(s_buckets, -1), torch.zeros(4))
    torch.testing.assert_close(torch.logsumexp(t_buckets, -1), torch.zeros(4))
    # With every id kept, the tail is empty and the bucket KL is the full KL.
    ids_all, t_all = teacher_buckets(t, k=9)
    s_all = topk_bucket_logprobs(s, ids_all)
    assert torch.all(torch.isinf(t_all[:, -1])) and torch.all(torch.isinf(s_all[:, -1]))
    full = divergence("forward_kl", F.log_softmax(s, -1), F.log_softmax(t, -1))
    torch.testing.assert_close(divergence("forward_kl", s_all, t_all), full)


def _problem(n=37, d=6, v=23, seed=1, bias=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g)
    head = torch.nn.Linear(d, v, bias=bias)
    t_head = torch.nn.Linear(d + 2, v, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(v, d, generator=g))
        if bias:
            head.bias.copy_(torch.randn(v, generator=g))
        t_head.weight.copy_(torch.randn(v, d + 2, generator=g))
    t_hidden = torch.randn(n, d + 2, generator=g)
    targets = torch.randint(0, v, (n,), generator=g)
    mask = (torch.rand(n, generator=g) > 0.3).double()
    return hidden, head, t_hidden, t_head, targets, mask


def _grads(hidden, head, loss_fn):
    hidden = hidden.clone().requires_grad_(True)
    head.zero_grad()
    loss = loss_fn(hidden)
    loss.backward()
    return loss.detach(), hidden.grad.clone(), head.weight.grad.clone(), None if head.bias is None else head.bias.grad.clone()


@pytest.mark.parametrize("name", sorted(DIVERGENCES))
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_chunked_online_matches_naive_values_and_grads(name, temperature):
    hidden, head, t_hidden, t_head, targets, mask = _problem()
    spec = LossSpec(loss=name, temperature=temperature, beta=0.3, alpha=0.2, ce_weight=0.3)
    t_logp = F.log_softmax(t_head(t_hidden).detach() / temperature, -1)

    def naive(h):
        return naive_loss(spec, head(h), t_logp, targets, mask)

    def chunked(h):
        fn = online_chunk_loss(spec, t_hidden, t_head, targets, mask, scale=1 / mask.sum().item())
        return chunked_head_loss(h, head, fn, chunk_size=8)

    ref, got = _grads(hidden, head, naive), _grads(hidden, head, chunked)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_chunked_cached_matches_naive_values_and_grads(name):
    hidden, head, t_hidden, t_head, targets, mask = _problem(bias=False)
    spec = LossSpec(loss=name, temperature=1.5, beta=0.6, alpha=0.3, ce_weight=0.1)
    ids, buckets = teacher_buckets(t_head(t_hidden).detach(), k=5, temperature=1.5)

    def naive(h):
        return naive_loss(spec, head(h), buckets, targets, mask, topk_ids=ids)

    def chunked(h):
        fn = cached_chunk_loss(spec, ids, buckets, targets, mask, scale=1 / mask.sum().item())
        return chunked_head_loss(h, head, fn, chunk_size=10)

    for a, b in zip(_grads(hidden, head, chunked), _grads(hidden, head, naive)):
        if a is not None:
            torch.testing.assert_close(a, b)


def test_chunked_cross_entropy_alone_matches_the_reference_values_and_grads():
    """Sequence-level KD's objective (ce_weight 1): masked next-token CE, no teacher term."""
    hidden, head, _, _, targets, mask = _problem()

    def reference(h):
        return (F.cross_entropy(head(h), targets, reduction="none") * mask).sum() / mask.sum()

    def chunked(h):
        return chunked_head_loss(h, head, ce_chunk_loss(targets, mask, scale=1 / mask.sum().item()), chunk_size=8)

    for a, b in zip(_grads(hidden, head, chunked), _grads(hidden, head, reference)):
        torch.testing.assert_close(a, b)


def test_chunked_with_softcap_and_upstream_scale():
    hidden, head, t_hidden, t_head, targets, mask = _problem()

    class Cfg:
        final_logit_softcapping = 5.0

    cap = softcap_transform(Cfg())
    assert softcap_transform(object()) is None
    spec = LossSpec(loss="forward_kl")
    t_logp = F.log_softmax(cap(t_head(t_hidden).detach()), -1)

    def naive(h):
        return 3.0 * naive_loss(spec, cap(head(h)), t_logp, targets, mask)

    def chunked(h):
        fn = online_chunk_loss(spec, t_hidden, t_head, targets, mask, scale=1 / mask.sum().item(), teacher_transform=cap)
        return 3.0 * chunked_head_loss(h, head, fn, chunk_size=4, transform=cap)

    for a, b in zip(_grads(hidden, head, chunked), _grads(hidden, head, naive)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("loss,fused", sorted(FUSED_ONLINE.items()))
@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("ce_weight", [0.0, 0.3, 1.0])
def test_fused_kl_matches_autograd_reference(loss, fused, temperature, ce_weight):
    """Losses with a closed-form gradient take that path; values and grads equal the naive reference."""
    hidden, head, t_hidden, t_head, targets, mask = _problem(seed=3)
    spec = LossSpec(loss=loss, temperature=temperature, ce_weight=ce_weight)
    t_logp = F.log_softmax(t_head(t_hidden).detach() / temperature, -1)
    fn = online_chunk_loss(spec, t_hidden, t_head, targets, mask, scale=1 / mask.sum().item())
    assert type(fn) is fused
    calls = []
    original = fused.value_and_grad

    def spy(self, z, rows):
        calls.append(rows)
        return original(self, z, rows)

    fused.value_and_grad = spy
    try:
        got = _grads(hidden, head, lambda h: chunked_head_loss(h, head, fn, chunk_size=8))
    finally:
        fused.value_and_grad = original
    assert len(calls) == 5  # 37 rows in chunks of 8: the closed form ran on every chunk
    ref = _grads(hidden, head, lambda h: naive_loss(spec, head(h), t_logp, targets, mask))
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b)


def test_fused_forward_kl_with_masked_teacher_logits_stays_finite():
    """A teacher logit of -inf (p = 0, log p = -inf) adds nothing, as 0 log 0 = 0 in the reference."""
    hidden, head, t_hidden, t_head, targets, mask = _problem(seed=4, bias=False)
    with torch.no_grad():
        t_head.weight[5] = 0.0
    t_head.bias = torch.nn.Parameter(torch.zeros(t_head.out_features))
    with torch.no_grad():
        t_head.bias[5] = float("-inf")
    spec = LossSpec(loss="forward_kl", temperature=2.0)
    t_logp = F.log_softmax(t_head(t_hidden).detach() / 2.0, -1)
    assert torch.isinf(t_logp[:, 5]).all()
    fn = online_chunk_loss(spec, t_hidden, t_head, targets, mask, scale=1 / mask.sum().item())
    got = _grads(hidden, head, lambda h: chunked_head_loss(h, head, fn, chunk_size=16))
    ref = _grads(hidden, head, lambda h: naive_loss(spec, head(h), t_logp, targets, mask))
    for a, b in zip(got, ref):
        if a is not None:
            assert torch.isfinite(a).all()
            torch.testing.assert_close(a, b)


def test_fused_forward_kl_in_float32_and_second_backward_refused():
    hidden, head, t_hidden, t_head, targets, mask = _problem(seed=5)
    hidden, head, t_hidden, t_head, mask = (x.float() for x in (hidden, head, t_hidden, t_head, mask))
    spec = LossSpec(loss="forward_kl", ce_weight=0.1)
    t_logp = F.log_softmax(t_head(t_hidden).detach(), -1)
    fn = online_chunk_loss(spec, t_hidden, t_head, targets, mask, scale=1 / mask.sum().item())
    got = _grads(hidden, head, lambda h: chunked_head_loss(h, head, fn, chunk_size=8))
    ref = _grads(hidden, head, lambda h: naive_loss(spec, head(h), t_logp, targets, mask))
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    h = hidden.clone().requires_grad_(True)
    loss = chunked_head_loss(h, head, fn, chunk_size=8)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward pass"):
        loss.backward()


@pytest.mark.parametrize("loss,fused", sorted(FUSED_CACHED.items()))
@pytest.mark.parametrize("temperature", [1.0, 1.5])
@pytest.mark.parametrize("ce_weight", [0.0, 0.2])
@pytest.mark.parametrize("k", [1, 5, 23])
def test_fused_cached_loss_matches_autograd_reference(loss, fused, temperature, ce_weight, k):
    """The cached path's closed forms, including k = vocab (empty tail) and a stored fp16 cache."""
    hidden, head, t_hidden, t_head, targets, mask = _problem(seed=6, bias=False)
    spec = LossSpec(loss=loss, temperature=temperature, ce_weight=ce_weight)
    ids, buckets = teacher_buckets(t_head(t_hidden).detach(), k=k, temperature=temperature)
    buckets = buckets.half().double()  # the cache stores fp16: bucket masses no longer sum to exactly 1
    fn = cached_chunk_loss(spec, ids, buckets, targets, mask, scale=1 / mask.sum().item())
    assert type(fn) is fused
    got = _grads(hidden, head, lambda h: chunked_head_loss(h, head, fn, chunk_size=10))
    ref = _grads(hidden, head, lambda h: naive_loss(spec, head(h), buckets, targets, mask, topk_ids=ids))
    for a, b in zip(got, ref):
        if a is not None:
            assert torch.isfinite(a).all()
            torch.testing.assert_close(a, b)
