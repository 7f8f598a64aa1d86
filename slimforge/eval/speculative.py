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

**Draft trees** (SpecInfer, Miao et al. 2024; EAGLE-2's dynamic trees are the same idea). A round's
proposals need not be one chain: :class:`DraftTree` holds the draft's chain, its runner-up tokens for
the first position (``width``) and a branch from a **context lookup** (``lookup``: what followed the
latest earlier occurrence of the context's last n-gram, Saxena's prompt lookup, which costs no model).
The teacher reads every node in one pass, each under a mask that shows it the cache and its own
ancestors only, at its depth's position, so each node's scores are the ones the teacher would give
that path read alone; the verdict walks down from the root taking whichever child is the teacher's
own token, and the teacher's cache keeps that path's rows. The output is still the teacher's greedy
output. On a CPU, where each verified position costs (the teacher's cost jumps from 3 to 4 positions
on the 2-core machine measured), one extra node in the right place is worth more than many; on a GPU
a wider tree is nearly free.

**A position budget** (the hardware-aware tree size of Sequoia, Chen et al. 2024, reduced to one
number). :func:`pass_costs` times the teacher's pass over 1..8 positions and :func:`position_budget`
takes the knee: the most positions whose pass costs within 15% of the 2-position one (3 on that
CPU, none on a GPU, where positions are nearly free). A round's lookup branch is cut to fit it,
except right after a round that took the branch to its end: then the output is repeating itself and
the branch's tail is likely to be taken, so it may run past the budget.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from slimforge.eval.draft_tree import (
    LOOKUP_STREAK_MAX,
    LOOKUP_STREAK_STEP,
    ContextLookup,
    DraftTree,
    check_tree_attention,
    position_budget,
    tree_positions,
)

__all__ = ["LOOKUP_STREAK_MAX", "LOOKUP_STREAK_STEP", "ContextLookup", "DraftHead", "DraftTree", "SpecStats", "check_tree_attention",
           "expected_tokens_per_round", "greedy_decode", "pass_costs", "position_budget", "predicted_speedup",
           "speculative_decode",
           "speculative_task", "token_counts", "tree_positions"]


@dataclass
class SpecStats:
    """What a speculative decode did: rounds, drafted and accepted tokens, and where the time went."""

    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    rejections: int = 0  # rounds the teacher cut short: its token was none of the proposals where the path stopped
    candidates: int = 0  # tree nodes proposed: the chain, the first position's runner-ups and the lookup's branch
    runner_up_accepts: int = 0  # rounds whose first accepted token was a runner-up, not the draft's greedy choice
    lookup_accepts: int = 0  # rounds whose accepted path took the context lookup's branch
    lookup_tokens: int = 0  # accepted tokens that only the context lookup had proposed
    emitted: int = 0
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0
    accepted_per_round: list[int] = field(default_factory=list)
    positions_per_round: list[int] = field(default_factory=list)  # the tree's nodes, node 0 included

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


@functools.cache
def _cache_argument_of(cls: type) -> str:
    import inspect

    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


def _cache_argument(model: Any) -> str:
    """The name a model's forward takes its KV cache by: ``cache`` (transformers >= 5.24) or ``past_key_values``."""
    return _cache_argument_of(type(model))


def _step(model: Any, ids: torch.Tensor, cache: Any) -> torch.Tensor:
    """Logits [len(ids), vocab] of ``ids`` [1, n] appended to ``cache`` (which grows by n)."""
    return model(input_ids=ids, use_cache=True, **{_cache_argument(model): cache}).logits[0]


def _feed(model: Any, ids: torch.Tensor, cache: Any) -> None:
    """Append ``ids`` [1, n] to ``cache`` without the output projection (its logits would be thrown away)."""
    decoder = model.get_decoder()
    decoder(input_ids=ids, use_cache=True, **{_cache_argument(decoder): cache})


def _draft_top(model: Any, ids: torch.Tensor, cache: Any, head: DraftHead | None, width: int = 1) -> list[int]:
    """The draft's ``width`` likeliest next tokens, best first, after ``ids`` [1, n] appended to ``cache``.

    Over ``head``'s tokens if given. ``width = 1`` is the argmax (the draft's own greedy token).
    """
    if head is None:
        logits = _step(model, ids, cache)[-1]
        return [int(logits.argmax())] if width == 1 else logits.topk(width).indices.tolist()
    decoder = model.get_decoder()
    hidden = decoder(input_ids=ids, use_cache=True, **{_cache_argument(decoder): cache}).last_hidden_state[0, -1]
    scores = head.weight @ hidden
    if width == 1:
        return [int(head.token_ids[int(scores.argmax())])]
    return head.token_ids[scores.topk(min(width, scores.numel())).indices].tolist()


def _draft_step(model: Any, ids: torch.Tensor, cache: Any, head: DraftHead | None) -> int:
    """The draft's greedy next token after ``ids`` [1, n] appended to ``cache``, over ``head``'s tokens if given."""
    return _draft_top(model, ids, cache, head)[0]


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


def _verify_tree(teacher: Any, tree: DraftTree, cache: Any) -> tuple[list[int], int]:
    """The teacher's verdict on ``tree``: ``(accepted path as node indices, its own next token)``.

    One decoder pass over all the nodes; the output projection at node 0 and its children together,
    then one node at a time down the accepted path (a rejected node's descendants are never scored:
    the projection is a fifth of a small model's compute per position). A plain chain runs with the
    model's own causal mask; any other tree passes its ancestor mask and each node's depth as its
    position.
    """
    decoder = teacher.get_decoder()
    ids = torch.tensor([tree.tokens], device=teacher.device)
    extra: dict[str, Any] = {}
    if not tree.is_chain:
        past = cache.get_seq_length()
        weight = teacher.get_output_embeddings().weight
        extra = {"attention_mask": tree.attention_mask(past, weight.dtype, weight.device),
                 "position_ids": torch.tensor([[past + d for d in tree.depths()]], device=weight.device)}
    hidden = decoder(input_ids=ids, use_cache=True, **extra, **{_cache_argument(decoder): cache}).last_hidden_state[0]
    head = teacher.get_output_embeddings()
    # Node 0 and its children in one projection: the head's weights are read once for the verdict on the
    # first position and the one after it, which every accepted round needs.
    first = [0, *tree.children(0).values()]
    choices = dict(zip(first, head(hidden[first]).argmax(-1).tolist(), strict=True))
    path: list[int] = []
    node = 0
    while True:
        choice = choices[node] if node in choices else int(head(hidden[node:node + 1]).argmax())
        child = tree.children(node).get(choice)
        if child is None:
            return path, choice
        path.append(child)
        node = child


def _drop(cache: Any, tokens: int) -> None:
    """Remove the last ``tokens`` positions from ``cache`` (transformers 5 takes a negative count)."""
    if tokens > 0:
        cache.crop(-tokens)


def _keep_path(cache: Any, nodes: int, path: list[int]) -> None:
    """Cut ``cache``, which ends with a tree's ``nodes`` positions, to its node 0 and the accepted ``path``.

    A path down the chain (nodes 1, 2, ..., a) is a crop; any other path gathers its rows.
    """
    if path == list(range(1, len(path) + 1)):
        _drop(cache, nodes - 1 - len(path))
        return
    base = cache.get_seq_length() - nodes
    keep = torch.tensor([*range(base + 1), *(base + n for n in path)])
    for layer in cache.layers:
        index = keep.to(layer.keys.device)
        layer.keys = layer.keys.index_select(-2, index)
        layer.values = layer.values.index_select(-2, index)


@torch.no_grad()
def pass_costs(teacher: Any, prompt: torch.Tensor, max_positions: int = 8, repeats: int = 3) -> list[float]:
    """The teacher's decoder pass over 1..``max_positions`` new positions after ``prompt`` [1, n], in seconds.

    Each the median of ``repeats`` timed passes after one untimed one, on a cache holding the prompt,
    cut back after every pass. What :func:`position_budget` reads to size a round's tree.
    """
    from transformers import DynamicCache

    cache = DynamicCache()
    _feed(teacher, prompt, cache)
    tokens = prompt[:, -1:].expand(1, max_positions).contiguous()
    costs = []
    for n in range(1, max_positions + 1):
        times = []
        for _ in range(repeats + 1):
            start = time.perf_counter()
            _feed(teacher, tokens[:, :n], cache)
            times.append(time.perf_counter() - start)
            _drop(cache, n)
        costs.append(sorted(times[1:])[len(times[1:]) // 2])
    return costs


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
                       eos_token_id: int | None = None, draft_head: DraftHead | None = None, width: int = 1,
                       lookup: int = 0, budget: int | None = None) -> tuple[list[int], SpecStats]:
    """The teacher's greedy continuation of ``prompt`` [1, n], drafted ``k`` tokens at a time (module docstring).

    ``draft_head`` restricts the draft's proposals to a subset of the vocabulary (module docstring).
    ``width > 1`` also proposes the draft's ``width - 1`` runner-up tokens for the first position, as
    siblings in a :class:`DraftTree` that the teacher verifies in the same pass. ``lookup = n > 0``
    adds a branch from a :class:`ContextLookup` over n-grams of up to n tokens: its continuation
    follows the tree while they agree and branches off where they part. It reaches one token past
    the draft's chain, plus :data:`LOOKUP_STREAK_STEP` for each round in a row whose accepted path ended
    at the end of the lookup's branch (up to :data:`LOOKUP_STREAK_MAX`), so it runs ahead where the output repeats
    itself and costs one position otherwise (module docstring).

    ``budget`` caps a round's tree at that many positions (node 0 included) by cutting the lookup's
    branch short, except in a round that follows a lookup streak, where the output is repeating itself
    and the branch's tail is likely to be taken. Pick it where the teacher's pass gets expensive
    (:func:`pass_costs`, :func:`position_budget`); ``None``: no cap. The draft's own chain and
    runner-ups are never cut.

    Returns:
        ``(tokens, stats)``: at most ``max_new_tokens`` tokens, stopping after ``eos_token_id``.
    """
    from transformers import DynamicCache

    if k < 1:
        raise ValueError(f"k, the tokens drafted per round, must be >= 1, got {k}")
    if width < 1:
        raise ValueError(f"width, the draft's candidates for the first drafted position, must be >= 1, got {width}")
    if lookup < 0:
        raise ValueError(f"lookup, the longest n-gram a context lookup matches, must be >= 0 (0: off), got {lookup}")
    if budget is not None and budget < 2:
        raise ValueError(f"budget, the most positions a round's verification may hold, must be >= 2 or None, got {budget}")
    if width > 1 or lookup:
        check_tree_attention(teacher.config, tree_positions(prompt.shape[1], max_new_tokens, k, width, lookup))
    device = prompt.device
    stats = SpecStats()
    t_cache, d_cache = DynamicCache(), DynamicCache()
    # The teacher's cache holds the prompt but its last token, which every round feeds first. The
    # draft's holds all but its `pending` tokens, which its next step reads in one pass: the last
    # token, after the accepted drafts it has not seen yet.
    if prompt.shape[1] > 1:
        _feed(teacher, prompt[:, :-1], t_cache)
        _feed(draft, prompt[:, :-1], d_cache)
    context = ContextLookup(prompt[0].tolist(), lookup) if lookup else None
    streak = 0
    last = int(prompt[0, -1])
    pending = [last]
    out: list[int] = []
    while len(out) < max_new_tokens:
        room = max_new_tokens - len(out)
        depth = min(k, room - 1) if room > 1 else 0
        start = time.perf_counter()
        chain: list[int] = []
        siblings: list[int] = []
        fed = 0  # chain tokens the draft's cache holds
        if depth:
            first = _draft_top(draft, torch.tensor([pending], device=device), d_cache, draft_head, width)
            chain, siblings, pending = first[:1], first[1:], []
            while len(chain) < depth and chain[-1] != eos_token_id:
                chain += _draft_top(draft, torch.tensor([chain[-1:]], device=device), d_cache, draft_head)
                fed += 1
        tree = DraftTree(last, chain, siblings)
        looked: list[int] = []
        if context is not None and depth:
            # One token past the draft's chain, and two more for each round in a row the lookup's branch
            # was taken to its end (the output is repeating itself).
            proposal = context.propose(min(depth + 1 + min(LOOKUP_STREAK_STEP * streak, LOOKUP_STREAK_MAX), room - 1))
            if eos_token_id in proposal:
                proposal = proposal[:proposal.index(eos_token_id) + 1]
            looked = tree.attach(proposal)
            over = min(len(tree.tokens) - budget, len(looked)) if budget and not streak else 0
            if over > 0:  # the positions past the budget come off the lookup's branch, from its end
                tree.cut(over)
                looked = looked[:-over]
        middle = time.perf_counter()
        path, choice = _verify_tree(teacher, tree, t_cache)
        # The teacher's cache keeps node 0 (the old last token) and the accepted path.
        _keep_path(t_cache, len(tree.tokens), path)
        tokens = tree.tokens
        emitted = [*(tokens[n] for n in path), choice]
        stats.verify_seconds += time.perf_counter() - middle
        start_after = time.perf_counter()
        stats.rounds += 1
        stats.drafted += max(tree.depths())
        stats.candidates += len(tokens) - 1
        stats.accepted += len(path)
        # A rejection: the teacher's token was none of the proposals where the accepted path stopped.
        stats.rejections += bool(tree.children(path[-1] if path else 0))
        stats.accepted_per_round.append(len(path))
        stats.positions_per_round.append(len(tokens))
        stats.runner_up_accepts += bool(path) and len(chain) < path[0] <= len(chain) + len(siblings)
        taken = sum(node in looked for node in path)
        stats.lookup_accepts += taken > 0
        stats.lookup_tokens += taken
        streak = streak + 1 if looked and path and path[-1] == looked[-1] else 0
        # The draft's cache keeps the chain tokens on the accepted path; the rest become pending.
        on_chain = 0
        while on_chain < len(path) and path[on_chain] == on_chain + 1:
            on_chain += 1
        kept = min(on_chain, fed)
        _drop(d_cache, fed - kept)
        pending = [*pending, *emitted[kept:]]
        if context is not None:
            context.extend(emitted)
        stats.draft_seconds += (middle - start) + (time.perf_counter() - start_after)
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
                "drafting": {"k": cfg.k, "width": cfg.width, "lookup": cfg.lookup},  # how the task's drafts run (the report's table)
                "info": {"prompts": len(prompts), "prompt_tokens": cfg.prompt_tokens, "new_tokens": cfg.new_tokens},
                "higher_is_better": {"greedy_tokens_per_s": True}}
    teacher = pair[0]
    head = _frequent_head(model, cfg.draft_vocab, ctx, eos) if cfg.draft_vocab else None
    greedy_decode(teacher, prompts[0], 2, eos)  # warm-ups
    budget, costs = _budget(teacher, prompts[0], cfg) if cfg.lookup else (None, None)
    speculative_decode(teacher, model, prompts[0], 2, cfg.k, eos, head, cfg.width, cfg.lookup, budget)
    covered = 0
    alone_s = spec_s = draft_alone_s = 0.0
    identical, alone_tokens, spec_tokens = 0, 0, 0
    total = SpecStats()
    for prompt in prompts:
        reference, seconds = greedy_decode(teacher, prompt, cfg.new_tokens, eos)
        alone_s, alone_tokens = alone_s + seconds, alone_tokens + len(reference)
        start = time.perf_counter()
        tokens, stats = speculative_decode(teacher, model, prompt, cfg.new_tokens, cfg.k, eos, head, cfg.width,
                                           cfg.lookup, budget)
        spec_s += time.perf_counter() - start
        spec_tokens += len(tokens)
        identical += tokens == reference
        if head is not None:
            covered += int(torch.isin(torch.tensor(reference, device=head.token_ids.device), head.token_ids).sum())
        drafted, seconds = greedy_decode(model, prompt, cfg.new_tokens, eos, head)
        draft_alone_s += seconds / max(len(drafted), 1)
        for name in ("rounds", "drafted", "accepted", "rejections", "emitted", "draft_seconds", "verify_seconds",
                     "candidates", "runner_up_accepts", "lookup_accepts"):
            setattr(total, name, getattr(total, name) + getattr(stats, name))
        total.positions_per_round += stats.positions_per_round
    teacher_step = alone_s / max(alone_tokens, 1)
    draft_cost = draft_alone_s / len(prompts) / teacher_step
    verify_cost = total.verify_seconds / max(total.rounds, 1) / teacher_step
    extra = {} if head is None else {"draft_vocab_coverage": covered / max(alone_tokens, 1)}
    if budget:
        extra["position_budget"] = budget
    return {
        **extra,
        "acceptance_rate": total.acceptance_rate,
        "position_acceptance": total.position_acceptance,
        "tokens_per_round": total.tokens_per_round,
        "positions_per_round": sum(total.positions_per_round) / max(total.rounds, 1),  # what a verify pass read
        "speedup": (spec_tokens / spec_s) / (alone_tokens / alone_s),
        "teacher_tokens_per_s": alone_tokens / alone_s,
        "speculative_tokens_per_s": spec_tokens / spec_s,
        "predicted_speedup": predicted_speedup(total.position_acceptance, cfg.k, draft_cost, verify_cost),
        "identical_outputs": identical / len(prompts),
        "runner_up_share": total.runner_up_accepts / max(total.rounds, 1),
        "lookup_share": total.lookup_accepts / max(total.rounds, 1),
        "info": {"k": cfg.k, "width": cfg.width, "lookup": cfg.lookup, "budget": budget,
                 "pass_costs": costs,  # the teacher's pass over 1, 2, ... positions, in one-position passes
                 "runner_up_accepts": total.runner_up_accepts,
                 "lookup_accepts": total.lookup_accepts,
                 "candidates_per_round": total.candidates / max(total.rounds, 1), "prompts": len(prompts), "prompt_tokens": cfg.prompt_tokens,
                 "new_tokens": cfg.new_tokens, "draft_cost": draft_cost, "verify_cost": verify_cost,
                 "draft_vocab": None if head is None else int(head.token_ids.numel()),
                 "dtype": str(next(teacher.parameters()).dtype).removeprefix("torch.")},
        "higher_is_better": {"acceptance_rate": True, "position_acceptance": True, "tokens_per_round": True, "speedup": True,
                             "teacher_tokens_per_s": True, "speculative_tokens_per_s": True,
                             "predicted_speedup": True, "identical_outputs": True,
                             **({"draft_vocab_coverage": True} if head is not None else {})},
    }


def _budget(teacher: Any, prompt: torch.Tensor, cfg: Any) -> tuple[int | None, list[float] | None]:
    """The task's position budget and, where it was measured (``budget: auto``), the teacher's pass costs
    over 1..8 positions relative to one position."""
    budget = cfg.position_budget()
    if budget != "auto":
        return budget, None
    costs = pass_costs(teacher, prompt)
    return position_budget(costs), [round(c / costs[0], 3) for c in costs]


def _frequent_head(model: Any, size: int, ctx: Any, eos: int | None) -> DraftHead:
    """A :class:`DraftHead` over the ``size`` tokens most frequent in the run's training split."""
    from slimforge.data import blocks_tensor
    from slimforge.eval.perplexity import data_split

    vocab = model.get_output_embeddings().weight.shape[0]
    counts = token_counts(blocks_tensor(data_split(ctx, "train")), vocab)
    return DraftHead.frequent(model, counts, min(size, vocab), (eos,))
