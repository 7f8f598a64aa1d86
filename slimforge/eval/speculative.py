"""Speculative decoding with a draft model: the teacher's greedy output, fewer teacher steps.

A draft proposes ``k`` tokens greedily, one at a time; the teacher scores all of them in one
forward pass over its KV cache and keeps the longest prefix it agrees with (its own argmax at
each place), then adds its own next token: the one after the first disagreement, or a bonus
token when all ``k`` were accepted. Each round therefore emits between 1 and ``k + 1`` tokens,
every one of them the teacher's own greedy choice, so the output is the teacher's greedy
output exactly, as long as the teacher's scores of a position do not depend on whether it
computes it alone or among the ``k + 1`` of a round. In float32 they agree to rounding (tested:
identical tokens); in bfloat16 a batched verification sums in another order, and a near-tie
between the two likeliest tokens (a logit gap below bfloat16's resolution, ~1e-2 relative) can
flip. Both caches are cut back to the accepted tokens after each round (``DynamicCache.crop``).

**Cost model** (Leviathan et al., 2023). With each drafted token accepted with probability ``a``
given the ones before it (measured as :attr:`SpecStats.position_acceptance`), a round of ``k`` drafts emits ``E = (1 - a^(k+1)) / (1 - a)`` tokens on
average and costs ``k`` draft steps plus one verification: ``k * c + v`` teacher steps, with
``c`` the draft step's cost and ``v`` the verification pass's, both relative to one teacher
decode step. The speed-up over the teacher alone is ``E / (k * c + v)``. On a CPU ``v`` exceeds
1 (``k + 1`` positions are more work than one, where a GPU step is bound by reading weights), so
the model takes the measured ``v``.

**A draft head over the frequent tokens** (FR-Spec, Zhao et al. 2025). A draft that shares the
teacher's vocabulary pays the full vocabulary projection at every step: for SmolLM2-135M's 49,152
tokens that is most of a 2-layer draft's cost. With ``draft_vocab`` set, the draft scores only the
``draft_vocab`` tokens most frequent in the run's training text (its hidden state times those rows
of its head), so it can only propose those. Verification is untouched, so the output is still the
teacher's; the acceptance can only fall where the teacher's choice lies outside the subset (the
report gives that share as ``draft_vocab_coverage``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class SpecStats:
    """What a speculative decode did: rounds, drafted and accepted tokens, and where the time went."""

    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    rejections: int = 0  # rounds whose drafts the teacher cut short (a drafted token it disagreed with)
    emitted: int = 0
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0
    accepted_per_round: list[int] = field(default_factory=list)

    @property
    def acceptance_rate(self) -> float:
        """Accepted drafted tokens over drafted tokens (the share of the draft's work kept)."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def position_acceptance(self) -> float:
        """The probability a drafted token is accepted given the ones before it were: the cost model's ``a``.

        Each round's drafts are trials up to the first rejection (later drafts are never judged), so
        the estimate is accepted / (accepted + rejections), Leviathan et al.'s alpha; it does not
        depend on ``k``, where :attr:`acceptance_rate` falls as ``k`` grows. With ``k = 1`` both agree.
        """
        judged = self.accepted + self.rejections
        return self.accepted / judged if judged else 0.0

    @property
    def tokens_per_round(self) -> float:
        return self.emitted / self.rounds if self.rounds else 0.0


def expected_tokens_per_round(acceptance: float, k: int) -> float:
    """``E = (1 - a^(k+1)) / (1 - a)``: the tokens a round of ``k`` drafts emits, each accepted with probability ``a``."""
    if not 0 <= acceptance <= 1:
        raise ValueError(f"an acceptance rate lies in [0, 1], got {acceptance}")
    if acceptance == 1:
        return float(k + 1)
    return (1 - acceptance ** (k + 1)) / (1 - acceptance)


def predicted_speedup(acceptance: float, k: int, draft_cost: float, verify_cost: float = 1.0) -> float:
    """The cost model's speed-up over the teacher alone: ``E / (k * draft_cost + verify_cost)``.

    Args:
        acceptance: probability that a drafted token is accepted.
        k: tokens drafted per round.
        draft_cost: one draft decode step, in teacher decode steps.
        verify_cost: one verification pass over ``k + 1`` positions, in teacher decode steps.
    """
    return expected_tokens_per_round(acceptance, k) / (k * draft_cost + verify_cost)


def _cache_argument(model: Any) -> str:
    """The name a model's forward takes its KV cache by: ``cache`` (transformers >= 5.24) or ``past_key_values``."""
    import inspect

    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


def _step(model: Any, ids: torch.Tensor, cache: Any) -> torch.Tensor:
    """Logits [len(ids), vocab] of ``ids`` [1, n] appended to ``cache`` (which grows by n)."""
    return model(input_ids=ids, use_cache=True, **{_cache_argument(model): cache}).logits[0]


def _feed(model: Any, ids: torch.Tensor, cache: Any) -> None:
    """Append ``ids`` [1, n] to ``cache`` without the output projection (its logits would be thrown away)."""
    decoder = model.get_decoder()
    decoder(input_ids=ids, use_cache=True, **{_cache_argument(decoder): cache})


def _draft_step(model: Any, ids: torch.Tensor, cache: Any, head: DraftHead | None) -> int:
    """The draft's greedy next token after ``ids`` [1, n] appended to ``cache``, over ``head``'s tokens if given."""
    if head is None:
        return int(_step(model, ids, cache)[-1].argmax())
    decoder = model.get_decoder()
    hidden = decoder(input_ids=ids, use_cache=True, **{_cache_argument(decoder): cache}).last_hidden_state[0, -1]
    return int(head.token_ids[int((head.weight @ hidden).argmax())])


@dataclass
class DraftHead:
    """The rows of a draft's output projection for a subset of the vocabulary, and their token ids."""

    weight: torch.Tensor  # [n, hidden]
    token_ids: torch.Tensor  # [n]

    @classmethod
    def frequent(cls, model: Any, counts: torch.Tensor, size: int, always: tuple[int, ...] = ()) -> DraftHead:
        """The ``size`` tokens with the highest ``counts`` (plus ``always``, e.g. EOS), as a head of ``model``."""
        head = model.get_output_embeddings()
        if getattr(head, "bias", None) is not None:
            raise ValueError("a draft head over frequent tokens needs an output projection without bias")
        jitter = torch.rand(counts.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        order = torch.argsort(counts.double() + jitter * 1e-3,
                              descending=True)  # ties broken at random, not by id
        keep = order[:size].tolist()
        keep += [t for t in always if t is not None and t not in keep]
        ids = torch.tensor(sorted(keep), dtype=torch.long, device=head.weight.device)
        return cls(head.weight.detach().index_select(0, ids).contiguous(), ids)


def token_counts(blocks: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """How often each token id occurs in ``blocks`` [n, length]."""
    return torch.bincount(blocks.reshape(-1).long(), minlength=vocab_size)[:vocab_size]


def _verify(teacher: Any, ids: torch.Tensor, drafted: list[int], cache: Any) -> tuple[int, int]:
    """The teacher's verdict on ``drafted``: ``(accepted, its own next token)`` after ``ids`` = [last, *drafted].

    One decoder pass over all the positions; the output projection only at the positions the verdict
    reads, one at a time up to the first disagreement (a rejected draft's later positions are never
    scored: the projection is a fifth of a small model's compute per position).
    """
    decoder = teacher.get_decoder()
    hidden = decoder(input_ids=ids, use_cache=True, **{_cache_argument(decoder): cache}).last_hidden_state[0]
    head = teacher.get_output_embeddings()
    accepted = 0
    while True:
        choice = int(head(hidden[accepted:accepted + 1]).argmax())
        if accepted == len(drafted) or drafted[accepted] != choice:
            return accepted, choice
        accepted += 1


def _drop(cache: Any, tokens: int) -> None:
    """Remove the last ``tokens`` positions from ``cache`` (transformers 5 takes a negative count)."""
    if tokens > 0:
        cache.crop(-tokens)


@torch.no_grad()
def greedy_decode(model: Any, prompt: torch.Tensor, max_new_tokens: int, eos_token_id: int | None = None,
                  head: DraftHead | None = None) -> tuple[list[int], float]:
    """The model's own greedy continuation of ``prompt`` [1, n] with its KV cache; ``(tokens, seconds)``.

    With ``head``, over that head's tokens only (how a draft with a :class:`DraftHead` decodes).
    """
    from transformers import DynamicCache

    start = time.perf_counter()
    cache = DynamicCache()
    if prompt.shape[1] > 1:
        _feed(model, prompt[:, :-1], cache)
    token = _draft_step(model, prompt[:, -1:], cache, head)
    out: list[int] = []
    while len(out) < max_new_tokens:
        out.append(token)
        if token == eos_token_id or len(out) == max_new_tokens:
            break
        token = _draft_step(model, torch.tensor([[token]], device=prompt.device), cache, head)
    return out, time.perf_counter() - start


@torch.no_grad()
def speculative_decode(teacher: Any, draft: Any, prompt: torch.Tensor, max_new_tokens: int, k: int = 4,
                       eos_token_id: int | None = None, draft_head: DraftHead | None = None
                       ) -> tuple[list[int], SpecStats]:
    """The teacher's greedy continuation of ``prompt`` [1, n], drafted ``k`` tokens at a time (module docstring).

    ``draft_head`` restricts the draft's proposals to a subset of the vocabulary (module docstring).

    Returns:
        ``(tokens, stats)``: at most ``max_new_tokens`` tokens, stopping after ``eos_token_id``.
    """
    from transformers import DynamicCache

    if k < 1:
        raise ValueError(f"k, the tokens drafted per round, must be >= 1, got {k}")
    device = prompt.device
    stats = SpecStats()
    t_cache, d_cache = DynamicCache(), DynamicCache()
    # Both caches hold the prompt but its last token, which every round feeds first.
    if prompt.shape[1] > 1:
        _feed(teacher, prompt[:, :-1], t_cache)
        _feed(draft, prompt[:, :-1], d_cache)
    last = int(prompt[0, -1])
    out: list[int] = []
    while len(out) < max_new_tokens:
        room = max_new_tokens - len(out)
        steps = min(k, room - 1) if room > 1 else 0
        start = time.perf_counter()
        drafted: list[int] = []
        token = last
        for _ in range(steps):
            token = _draft_step(draft, torch.tensor([[token]], device=device), d_cache, draft_head)
            drafted.append(token)
            if token == eos_token_id:
                break
        middle = time.perf_counter()
        accepted, choice = _verify(teacher, torch.tensor([[last, *drafted]], device=device), drafted, t_cache)
        emitted = [*drafted[:accepted], choice]
        stats.verify_seconds += time.perf_counter() - middle
        stats.draft_seconds += middle - start
        start = time.perf_counter()
        stats.rounds += 1
        stats.drafted += len(drafted)
        stats.accepted += accepted
        stats.rejections += accepted < len(drafted)
        stats.accepted_per_round.append(accepted)
        # Each cache must end just before the new last token: at last + drafted[:accepted].
        _drop(t_cache, len(drafted) - accepted)  # it holds last + drafted
        if accepted < len(drafted):
            _drop(d_cache, len(drafted) - 1 - accepted)  # it holds last + drafted[:-1]
        elif drafted:  # all accepted: the draft has not seen its own last token yet
            _feed(draft, torch.tensor([[drafted[-1]]], device=device), d_cache)
        else:  # nothing drafted (one token left to emit): the draft has not seen last
            _feed(draft, torch.tensor([[last]], device=device), d_cache)
        stats.draft_seconds += time.perf_counter() - start
        for token in emitted:
            out.append(token)
            if token == eos_token_id or len(out) == max_new_tokens:
                stats.emitted = len(out)
                return out, stats
        last = emitted[-1]
    stats.emitted = len(out)
    return out, stats


def _prompts(ctx: Any, cfg: Any) -> list[torch.Tensor]:
    from slimforge.data import blocks_tensor
    from slimforge.eval.perplexity import data_split

    blocks = blocks_tensor(data_split(ctx, "heldout"), cfg.prompts)
    if blocks.shape[1] < cfg.prompt_tokens:
        from slimforge.errors import ConfigError

        raise ConfigError(f"prompt_tokens={cfg.prompt_tokens} exceeds the data's blocks of {blocks.shape[1]} tokens; "
                         "lower prompt_tokens or raise data.block_size")
    return [blocks[i:i + 1, :cfg.prompt_tokens].to(ctx.device) for i in range(blocks.shape[0])]


def speculative_task(model: Any, tokenizer: Any, cfg: Any, ctx: Any) -> dict[str, Any]:
    """Registered as ``speculative``: this model drafting for the teacher (module docstring)."""
    eos = getattr(tokenizer, "eos_token_id", None)
    prompts = _prompts(ctx, cfg)
    pair = ctx.teacher()
    if pair is None:  # the teacher itself: its own greedy speed, the baseline every draft is held to
        greedy_decode(model, prompts[0], 2, eos)
        runs = [greedy_decode(model, p, cfg.new_tokens, eos) for p in prompts]
        tokens = sum(len(t) for t, _ in runs)
        return {"greedy_tokens_per_s": tokens / sum(s for _, s in runs),
                "info": {"prompts": len(prompts), "prompt_tokens": cfg.prompt_tokens, "new_tokens": cfg.new_tokens},
                "higher_is_better": {"greedy_tokens_per_s": True}}
    teacher = pair[0]
    head = _frequent_head(model, cfg.draft_vocab, ctx, eos) if cfg.draft_vocab else None
    greedy_decode(teacher, prompts[0], 2, eos)  # warm-ups
    speculative_decode(teacher, model, prompts[0], 2, cfg.k, eos, head)
    covered = 0
    alone_s = spec_s = draft_alone_s = 0.0
    identical, alone_tokens, spec_tokens = 0, 0, 0
    total = SpecStats()
    for prompt in prompts:
        reference, seconds = greedy_decode(teacher, prompt, cfg.new_tokens, eos)
        alone_s, alone_tokens = alone_s + seconds, alone_tokens + len(reference)
        start = time.perf_counter()
        tokens, stats = speculative_decode(teacher, model, prompt, cfg.new_tokens, cfg.k, eos, head)
        spec_s += time.perf_counter() - start
        spec_tokens += len(tokens)
        identical += tokens == reference
        if head is not None:
            covered += int(torch.isin(torch.tensor(reference, device=head.token_ids.device), head.token_ids).sum())
        drafted, seconds = greedy_decode(model, prompt, cfg.new_tokens, eos, head)
        draft_alone_s += seconds / max(len(drafted), 1)
        for name in ("rounds", "drafted", "accepted", "rejections", "emitted", "draft_seconds", "verify_seconds"):
            setattr(total, name, getattr(total, name) + getattr(stats, name))
    teacher_step = alone_s / max(alone_tokens, 1)
    draft_cost = draft_alone_s / len(prompts) / teacher_step
    verify_cost = total.verify_seconds / max(total.rounds, 1) / teacher_step
    extra = {} if head is None else {"draft_vocab_coverage": covered / max(alone_tokens, 1)}
    return {
        **extra,
        "acceptance_rate": total.acceptance_rate,
        "position_acceptance": total.position_acceptance,
        "tokens_per_round": total.tokens_per_round,
        "speedup": (spec_tokens / spec_s) / (alone_tokens / alone_s),
        "teacher_tokens_per_s": alone_tokens / alone_s,
        "speculative_tokens_per_s": spec_tokens / spec_s,
        "predicted_speedup": predicted_speedup(total.position_acceptance, cfg.k, draft_cost, verify_cost),
        "identical_outputs": identical / len(prompts),
        "info": {"k": cfg.k, "prompts": len(prompts), "prompt_tokens": cfg.prompt_tokens,
                 "new_tokens": cfg.new_tokens, "draft_cost": draft_cost, "verify_cost": verify_cost,
                 "draft_vocab": None if head is None else int(head.token_ids.numel()),
                 "dtype": str(next(teacher.parameters()).dtype).removeprefix("torch.")},
        "higher_is_better": {"acceptance_rate": True, "position_acceptance": True, "tokens_per_round": True, "speedup": True,
                             "teacher_tokens_per_s": True, "speculative_tokens_per_s": True,
                             "predicted_speedup": True, "identical_outputs": True,
                             **({"draft_vocab_coverage": True} if head is not None else {})},
    }


def _frequent_head(model: Any, size: int, ctx: Any, eos: int | None) -> DraftHead:
    """A :class:`DraftHead` over the ``size`` tokens most frequent in the run's training split."""
    from slimforge.data import blocks_tensor
    from slimforge.eval.perplexity import data_split

    vocab = model.get_output_embeddings().weight.shape[0]
    counts = token_counts(blocks_tensor(data_split(ctx, "train")), vocab)
    return DraftHead.frequent(model, counts, min(size, vocab), (eos,))
