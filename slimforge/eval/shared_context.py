"""lm-eval's log-likelihood requests with each context read once.

A multiple-choice benchmark asks lm-eval for ``log P(answer | context)`` of every answer of a
question; lm-eval's ``HFLM`` runs each (context, answer) pair as its own sequence, so a
HellaSwag question with four endings reads its ~80-token context four times, and the context
is most of the tokens. :func:`shared_context_lm` returns an ``HFLM`` whose requests are grouped
by their context tokens: a batch of contexts runs once (left-padded, positions counted from
each one's first real token), the KV cache is gathered once per answer, and only the answers'
few tokens run a second time. Tokens are split exactly as ``HFLM`` splits them (its own
``_encode_pair``), so the values and the greedy flags are ``HFLM``'s; requests longer than the
model's context fall back to ``HFLM``'s own left-truncating path
(``tests/test_eval_shared_context.py`` checks both against plain ``HFLM``;
``bench/mc_scoring.py`` measures the speed-up).
"""

from __future__ import annotations

import copy
import functools
import inspect
from typing import Any

import torch

from slimforge.progress import progress_bar
from slimforge.sampling import left_pad


def _cache_keyword(model: Any) -> str:
    """The forward argument that takes a KV cache (``cache`` in newer transformers, else ``past_key_values``)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT wrappers take **kwargs
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _last_logits_only(model: Any) -> dict[str, int]:
    """``logits_to_keep=1`` where the model's forward takes it (it skips the lm_head elsewhere)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(base.forward).parameters else {}


def _target_logprob(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target]. (logit - logsumexp would save a tensor, but its fp32 sums
    drift from HFLM's by ~1e-3 nats on the real teacher; this matches to ~5e-5.)"""
    return logits.log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1)


@torch.no_grad()
def score_shared_contexts(model: Any, contexts: list[list[int]], answers: list[list[list[int]]],
                          pad: int) -> list[list[tuple[float, bool]]]:
    """``(log P(answer | context), answer is the greedy continuation)`` for every answer of each context.

    Args:
        model: a causal LM (in eval mode).
        contexts: one non-empty token list per context.
        answers: per context, its answers' token lists (non-empty; any number per context).
        pad: a token id for padding (never attended to).

    Returns:
        Per context, one ``(log-likelihood in nats, is_greedy)`` pair per answer.
    """
    device = model.device
    owner_list = [c for c, per in enumerate(answers) for _ in per]
    flat = [a for per in answers for a in per]
    ids, mask = (t.to(device) for t in left_pad(contexts, pad))
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    # Only the last context position's logits are needed: the lm_head skips the rest.
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **_last_logits_only(model))
    first = out.logits[:, -1].float()  # [contexts, V]: predicts each answer's first token
    key = _cache_keyword(model)
    cache = getattr(out, key)
    lengths = mask.sum(-1)
    scores: list[tuple[float, bool]] = [(0.0, False)] * len(flat)
    # The answers' pass in chunks of similar length, so that a short answer is not padded to the
    # longest one of the batch; each chunk reads its own rows of the contexts' cache.
    order = sorted(range(len(flat)), key=lambda i: len(flat[i]))
    rows = max(len(contexts), 1)
    for start in range(0, len(order), rows):
        chunk = order[start: start + rows]
        owner = torch.tensor([owner_list[i] for i in chunk], device=device)
        width = max(len(flat[i]) for i in chunk)
        cont = torch.full((len(chunk), width), pad, dtype=torch.long, device=device)
        cont_mask = torch.zeros_like(cont)
        for row, i in enumerate(chunk):
            cont[row, : len(flat[i])] = torch.tensor(flat[i])
            cont_mask[row, : len(flat[i])] = 1
        head = first[owner]
        total = _target_logprob(head, cont[:, 0])
        greedy = head.argmax(-1) == cont[:, 0]
        if width > 1:  # the answers' later tokens, read after the context from its cache
            rows_cache = copy.deepcopy(cache) if start + rows < len(order) else cache
            rows_cache.batch_select_indices(owner)
            rest_mask = torch.cat([mask[owner], cont_mask[:, :-1]], dim=1)
            rest_pos = lengths[owner][:, None] + torch.arange(width - 1, device=device)
            logits = model(input_ids=cont[:, :-1], attention_mask=rest_mask, position_ids=rest_pos,
                           use_cache=True, **{key: rows_cache}).logits.float()
            keep = cont_mask[:, 1:].bool()
            total = total + (_target_logprob(logits, cont[:, 1:]) * keep).sum(-1)
            greedy &= ((logits.argmax(-1) == cont[:, 1:]) | ~keep).all(-1)
        for i, value, flag in zip(chunk, total.tolist(), greedy.tolist()):
            scores[i] = (float(value), bool(flag))
    result: list[list[tuple[float, bool]]] = [[] for _ in contexts]
    for c, pair in zip(owner_list, scores):
        result[c].append(pair)
    return result


@functools.cache
def _shared_context_class() -> type:
    from lm_eval.models.huggingface import HFLM

    class SharedContextHFLM(HFLM):
        """``HFLM`` whose log-likelihood requests read each distinct context once (see the module)."""

        def _loglikelihood_tokens(self, requests: list[Any], disable_tqdm: bool = False,
                                  override_bs: int | None = None) -> list[tuple[float, bool]]:
            results: list[tuple[float, bool] | None] = [None] * len(requests)
            groups: dict[tuple[int, ...], list[int]] = {}
            plain: list[int] = []
            for i, (_, ctx, cont) in enumerate(requests):
                if not ctx or not cont or len(ctx) + len(cont) > self.max_length + 1 or self.backend != "causal":
                    plain.append(i)
                else:
                    groups.setdefault(tuple(ctx), []).append(i)
            # Sharing pays where the context tokens it saves outnumber the answers' own (ARC,
            # HellaSwag, MMLU); a question with one answer (LAMBADA) or short context and long
            # answers (PIQA) runs faster on HFLM's path, which pads less.
            for context in [c for c, members in groups.items()
                            if (len(members) - 1) * len(c) < sum(len(requests[i][2]) for i in members)]:
                plain += groups.pop(context)
            if plain:
                for i, value in zip(plain, super()._loglikelihood_tokens(
                        [requests[i] for i in plain], disable_tqdm=disable_tqdm, override_bs=override_bs)):
                    results[i] = value
            # Longest contexts first: a batch pads little, and a memory problem shows at once.
            order = sorted(groups, key=lambda c: -len(c))
            per_batch = max(1, int(override_bs or self.batch_size or 1))
            pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
            bar = progress_bar(desc="loglikelihood (shared contexts)", total=len(requests) - len(plain),
                               unit="request", leave=False, enabled=not disable_tqdm)
            try:
                for start in range(0, len(order), per_batch):
                    batch = order[start: start + per_batch]
                    scored = score_shared_contexts(self.model, [list(c) for c in batch],
                                                   [[requests[i][2] for i in groups[c]] for c in batch], pad)
                    for context, values in zip(batch, scored):
                        for i, value in zip(groups[context], values):
                            results[i] = value
                            self.cache_hook.add_partial("loglikelihood", requests[i][0], value)
                        bar.update(len(values))
            finally:
                bar.close()
            return results  # type: ignore[return-value]

    return SharedContextHFLM


def shared_context_lm(model: Any, tokenizer: Any, batch_size: int) -> Any:
    """An lm-eval ``HFLM`` over an in-memory model whose log-likelihoods share each context's pass.

    Args:
        model: the loaded causal LM.
        tokenizer: its tokenizer.
        batch_size: distinct contexts per forward pass (their answers' pass holds all their answers).
    """
    return _shared_context_class()(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
