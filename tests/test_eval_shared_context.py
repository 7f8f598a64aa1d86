"""The shared-context scorer against lm-eval's own HFLM: same log-likelihoods, same greedy flags."""

from __future__ import annotations

import random

import pytest
import torch

from tests.conftest import build_model

ARCHS = ["llama", "qwen2", "gemma"]  # plain, sliding-window attention, tied embeddings with head_dim


class _Request:
    """The part of lm-eval's Instance that loglikelihood reads."""

    def __init__(self, context: str, continuation: str) -> None:
        self.args = (context, continuation)


def _requests(seed: int) -> list[_Request]:
    """Questions with 1-4 answers of 1-5 words, some contexts ending in a space."""
    rng = random.Random(seed)
    words = ["the", "a", "king", "queen", "sword", "crown", "night", "day", "speak", "love", "war", "peace", "of", "to", "and", "my", "thy"]
    out: list[_Request] = []
    for q in range(14):
        context = " ".join(rng.choice(words) for _ in range(rng.randint(2, 20)))
        if q % 3 == 0:
            context += " "  # HFLM moves trailing spaces into the answer; so must the scorer
        answers = [" " + " ".join(rng.choice(words) for _ in range(rng.randint(1, 5))) for _ in range(rng.randint(1, 4))]
        out.extend(_Request(context.rstrip() if q % 3 else context, a) for a in answers)
    rng.shuffle(out)
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_values_and_greedy_flags_match_hflm(arch, tokenizer):
    from lm_eval.models.huggingface import HFLM

    from slimforge.eval.shared_context import shared_context_lm

    model = build_model(arch, tokenizer)
    requests = _requests(seed=ARCHS.index(arch))
    reference = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=3).loglikelihood(requests, disable_tqdm=True)
    shared = shared_context_lm(model, tokenizer, batch_size=3).loglikelihood(requests, disable_tqdm=True)
    assert len(shared) == len(reference)
    got = torch.tensor([v for v, _ in shared], dtype=torch.float64)
    want = torch.tensor([v for v, _ in reference], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    assert [g for _, g in shared] == [g for _, g in reference]


def test_greedy_answers_are_flagged_greedy_as_hflm_flags_them(tokenizer):
    """At token level: an answer made of the model's own greedy tokens is greedy; one token off is not."""
    from lm_eval.models.huggingface import HFLM

    from slimforge.eval.shared_context import shared_context_lm

    model = build_model("llama", tokenizer)
    requests = []
    for text in ["the king spoke", "a crown of night and day", "my love"]:
        ctx = tokenizer(text)["input_ids"]
        greedy = model.generate(torch.tensor([ctx]), max_new_tokens=3, do_sample=False,
                                pad_token_id=0)[0, len(ctx):].tolist()
        other = greedy[:-1] + [(greedy[-1] + 1) % len(tokenizer)]
        requests += [((text, ""), ctx, greedy), ((text, ""), ctx, other), ((text, ""), ctx, greedy[:1])]
    want = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=2)._loglikelihood_tokens(requests, disable_tqdm=True)
    got = shared_context_lm(model, tokenizer, batch_size=2)._loglikelihood_tokens(requests, disable_tqdm=True)
    assert [g for _, g in want] == [True, False, True] * 3
    assert [g for _, g in got] == [g for _, g in want]
    torch.testing.assert_close(torch.tensor([v for v, _ in got]), torch.tensor([v for v, _ in want]),
                               rtol=1e-5, atol=1e-4)


def test_batch_size_does_not_change_the_values(tokenizer):
    from slimforge.eval.shared_context import shared_context_lm

    model = build_model("llama", tokenizer)
    requests = _requests(seed=7)
    one = shared_context_lm(model, tokenizer, batch_size=1).loglikelihood(requests, disable_tqdm=True)
    many = shared_context_lm(model, tokenizer, batch_size=16).loglikelihood(requests, disable_tqdm=True)
    torch.testing.assert_close(torch.tensor([v for v, _ in many]), torch.tensor([v for v, _ in one]),
                               rtol=1e-5, atol=1e-4)


def test_requests_past_the_context_window_take_hflms_truncating_path(tokenizer):
    from lm_eval.models.huggingface import HFLM

    from slimforge.eval.shared_context import shared_context_lm

    model = build_model("llama", tokenizer)
    long_context = " ".join(["the king and the queen"] * 120)  # past max_position_embeddings (256)
    requests = [_Request(long_context, " of war"), _Request(long_context, " my love"), _Request("the king", " and")]
    shared_lm = shared_context_lm(model, tokenizer, batch_size=2)
    assert len(tokenizer(long_context)["input_ids"]) > shared_lm.max_length
    reference = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=2).loglikelihood(requests, disable_tqdm=True)
    shared = shared_lm.loglikelihood(requests, disable_tqdm=True)
    torch.testing.assert_close(torch.tensor([v for v, _ in shared]), torch.tensor([v for v, _ in reference]),
                               rtol=1e-5, atol=1e-4)


def test_scorer_reads_each_context_once(tokenizer, monkeypatch):
    """The point of it: a question's context runs once, not once per answer."""
    from slimforge.eval import shared_context

    model = build_model("llama", tokenizer)
    seen: list[tuple[int, int]] = []
    forward = model.forward

    def counting(*args, **kwargs):
        seen.append(tuple(kwargs["input_ids"].shape))
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", counting)
    ctx = tokenizer("the king spoke of war and peace")["input_ids"]
    answers = [tokenizer(" and love")["input_ids"], tokenizer(" of night")["input_ids"], tokenizer(" a crown")["input_ids"]]
    out = shared_context.score_shared_contexts(model, [ctx], [answers], pad=0)
    assert len(out[0]) == 3
    # The context's tokens run once; after that only the answers' own tokens (less their last) run.
    assert seen[0] == (1, len(ctx))
    assert sum(rows * width for rows, width in seen[1:]) == sum(len(a) - 1 for a in answers)


def test_hflm_path_takes_what_sharing_would_not_speed_up(tokenizer, monkeypatch):
    """One answer per context (LAMBADA) or answers longer than what sharing saves (PIQA) go to HFLM."""
    from slimforge.eval import shared_context

    model = build_model("llama", tokenizer)
    calls: list[int] = []
    real = shared_context.score_shared_contexts
    monkeypatch.setattr(shared_context, "score_shared_contexts",
                        lambda m, contexts, answers, pad: calls.append(len(contexts)) or real(m, contexts, answers, pad))
    lm = shared_context.shared_context_lm(model, tokenizer, batch_size=4)
    long_ctx = tokenizer("the king spoke of war and peace and night and day to the queen")["input_ids"]
    short_ctx = tokenizer("a crown")["input_ids"]
    word, long_answer = tokenizer(" love")["input_ids"], tokenizer(" of war and peace and love and night")["input_ids"]
    requests = [(("", ""), long_ctx, word), (("", ""), long_ctx, word[::-1] or word),   # shared: saves a context
                (("", ""), short_ctx, long_answer), (("", ""), short_ctx, long_answer[::-1]),  # PIQA-like: plain
                (("", ""), long_ctx[:-1], word)]                                         # one answer: plain
    lm._loglikelihood_tokens(requests, disable_tqdm=True)
    assert calls == [1]
