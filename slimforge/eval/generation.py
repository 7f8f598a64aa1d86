"""Generation tasks: text completion, summarization, translation, open-ended generation.

Prompts are decoded greedily (whatever a model's generation config says, so teacher and
students decode alike) in left-padded batches with the KV cache, sorted by length so that a
batch pads little; a progress bar shows the tokens per second. Each output is capped at
``max_new_tokens`` and cut at the first stop string, then scored per item:

- against the references, by ROUGE-L F1 (Google's ``rouge-score``) and chrF (``sacrebleu``);
- by the teacher (``teacher_scored``): its perplexity of the output given the prompt, the
  output's end included (the end-of-sequence token or the stop string that ended it), so an
  output that stops at once is not free; for the teacher itself that is its perplexity of its
  own greedy outputs, the baseline a student's is retained against;
- for a student, against the teacher's own outputs (ROUGE-L, chrF, identical outputs): how
  much of the teacher's behaviour it kept.

Per-item scores feed the report's paired bootstrap like every other task's.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from slimforge.errors import DataError
from slimforge.eval.config import TEACHER_PPL, GenerationTaskConfig
from slimforge.eval.stats import ItemScores, aggregate
from slimforge.progress import progress_bar
from slimforge.sampling import eos_ids

log = logging.getLogger(__name__)


def render_prompt(row: dict[str, Any], cfg: GenerationTaskConfig, tokenizer: Any) -> str:
    """The text the model continues: the prompt field or the template, optionally chat-wrapped."""
    text = cfg.template.format(**row) if cfg.template else str(row[cfg.prompt_field])
    if cfg.chat:
        if not getattr(tokenizer, "chat_template", None):
            raise DataError("generation task has chat=true but the model's tokenizer has no chat template; "
                            "set chat: false")
        return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
    return text


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, str | None]:
    """``text`` up to the first stop string after its leading whitespace, and that string (None when none).

    Stops are looked for only once the output has begun: a completion that opens with a blank
    line, then writes its sentence, keeps the sentence.
    """
    begin = len(text) - len(text.lstrip())
    cut, found = len(text), None
    for s in stop:
        if s and (pos := text.find(s, begin)) != -1 and pos < cut:
            cut, found = pos, s
    return text[:cut], found


@dataclass
class Continuation:
    """One greedy output.

    Attributes:
        text: the new text, cut at the first stop string (special tokens left out, not stripped).
        tokens: new tokens generated, up to and including the end-of-sequence token.
        end: ``eos`` (the model ended it), ``stop`` (cut at a stop string) or ``length`` (the cap).
        stop: the stop string that ended it, for ``end == "stop"``.
    """

    text: str
    tokens: int
    end: str
    stop: str | None = None


def _continuation(new_ids: list[int], eos: set[int], pad_id: int | None, tokenizer: Any,
                  stop: Sequence[str]) -> Continuation:
    """One row of ``generate``'s new tokens as a :class:`Continuation`: up to its first end-of-sequence."""
    eos_at = next((pos for pos, token in enumerate(new_ids) if token in eos), len(new_ids))
    text, found = cut_at_stop(tokenizer.decode(new_ids[:eos_at], skip_special_tokens=True), stop)
    if found is not None:  # generate pads a row once a stop string ended it
        used = next((pos for pos, token in enumerate(new_ids[:eos_at]) if token == pad_id), eos_at)
        return Continuation(text, used, "stop", found)
    ended = eos_at < len(new_ids)
    return Continuation(text, eos_at + int(ended), "eos" if ended else "length")


class StopAtText:
    """A ``generate`` stopping criterion: a row is done once its new text holds a stop string.

    transformers' own ``stop_strings`` builds a table over the whole vocabulary on every call
    (~18 s for SmolLM2's 49k tokens on 2 CPU cores, per batch); decoding each row's few new
    tokens at each step costs microseconds.
    """

    def __init__(self, tokenizer: Any, prompt_length: int, stop: Sequence[str]) -> None:
        self.tokenizer, self.prompt_length, self.stop = tokenizer, prompt_length, stop

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_length:], skip_special_tokens=True)
        return torch.tensor([cut_at_stop(text, self.stop)[1] is not None for text in texts], device=input_ids.device)


def length_order(lengths: Sequence[int]) -> list[int]:
    """Indices by decreasing length: neighbours in a batch pad little, and the largest batch runs first."""
    return sorted(range(len(lengths)), key=lambda i: -lengths[i])


@torch.no_grad()
def generate_greedy(model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int, batch_size: int,
                    add_special_tokens: bool = True, stop: Sequence[str] = (),
                    progress: bool = True) -> list[Continuation]:
    """Greedy continuations of ``prompts`` in the prompts' order.

    Batches of ``batch_size`` prompts of similar length, left-padded, decoded with the KV cache;
    a batch stops when every row has ended (its end-of-sequence token or a stop string).

    Args:
        add_special_tokens: let the tokenizer add its special tokens (off for chat-rendered
            prompts, which hold them already).
        stop: strings that end an output; it is cut before the first.
    """
    from transformers import StoppingCriteriaList

    encoded = [tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"] for p in prompts]
    eos = eos_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
    order = length_order([len(ids) for ids in encoded])
    outputs: list[Continuation | None] = [None] * len(prompts)
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    bar = progress_bar(desc="generate", total=len(prompts), unit="prompt", leave=False, enabled=progress)
    new_tokens, start = 0, time.perf_counter()
    try:
        for first in range(0, len(order), batch_size):
            rows = order[first: first + batch_size]
            batch = tokenizer.pad({"input_ids": [encoded[i] for i in rows]}, return_tensors="pt").to(model.device)
            criteria = StoppingCriteriaList([StopAtText(tokenizer, batch["input_ids"].shape[1], stop)] if stop else [])
            out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                 temperature=None, top_p=None, top_k=None, use_cache=True,
                                 eos_token_id=eos or None, pad_token_id=pad_id, stopping_criteria=criteria)
            for row, ids in zip(rows, out[:, batch["input_ids"].shape[1]:].tolist()):
                outputs[row] = _continuation(ids, set(eos), pad_id, tokenizer, stop)
                new_tokens += outputs[row].tokens
            bar.update(len(rows))
            bar.set_postfix_str(f"{new_tokens / (time.perf_counter() - start):.1f} tok/s")
    finally:
        tokenizer.padding_side = side
        bar.close()
    seconds = time.perf_counter() - start
    log.info("generated %d tokens for %d prompts in %.1f s (%.1f tok/s)", new_tokens, len(prompts), seconds,
             new_tokens / max(seconds, 1e-9))
    return [o for o in outputs if o is not None]


@torch.no_grad()
def continuation_nll(model: Any, contexts: list[list[int]], continuations: list[list[int]], batch_size: int,
                     pad_id: int, progress: bool = True) -> list[tuple[float, int]]:
    """Summed negative log-likelihood of each continuation given its context, and its length.

    Sequences are left-padded into batches of similar length (position ids follow the
    attention mask, so padding changes no value) and only the last positions' logits are
    computed: those that predict the continuations.

    Args:
        contexts: token ids of each context (at least one token each).
        continuations: token ids to score after each context; an empty one scores (0.0, 0).

    Returns:
        ``(nll, tokens)`` per item, in fp32 arithmetic, in the input order.
    """
    out: list[tuple[float, int]] = [(0.0, 0)] * len(contexts)
    order = length_order([len(c) + len(t) for c, t in zip(contexts, continuations)])
    batches = range(0, len(order), batch_size)
    device = next(model.parameters()).device
    for first in progress_bar(batches, desc="teacher scoring", total=len(batches), unit="batch", leave=False,
                              enabled=progress):
        rows = [i for i in order[first: first + batch_size] if continuations[i]]
        if not rows:
            continue
        seqs = [contexts[i] + continuations[i] for i in rows]
        length, keep = max(map(len, seqs)), max(len(continuations[i]) for i in rows)
        ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for r, seq in enumerate(seqs):
            ids[r, length - len(seq):] = torch.tensor(seq)
            mask[r, length - len(seq):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        # Logits of the last keep + 1 positions: position p predicts token p + 1.
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                       logits_to_keep=keep + 1).logits[:, :-1].float()
        logp = F.log_softmax(logits, dim=-1)
        for r, i in enumerate(rows):
            n = len(continuations[i])
            target = torch.tensor(continuations[i], device=logp.device)
            out[i] = (-float(logp[r, keep - n:].gather(-1, target[:, None]).sum()), n)
    return out


def teacher_perplexity_scores(scorer: Any, scorer_tokenizer: Any, rows: list[dict[str, Any]],
                              cfg: GenerationTaskConfig, outputs: list[Continuation],
                              batch_size: int) -> ItemScores:
    """The scorer's per-item perplexity of ``outputs`` given their prompts, rendered with its own tokenizer.

    Each output is scored with its end: the scorer's end-of-sequence token after an output the
    model ended, the stop string after one cut there, nothing after one stopped by the cap.
    Values are mean NLL per token, weighted by tokens: the aggregate is corpus perplexity.
    """
    eos = eos_ids(scorer, scorer_tokenizer)
    contexts = [scorer_tokenizer(render_prompt(row, cfg, scorer_tokenizer), add_special_tokens=not cfg.chat)
                ["input_ids"] for row in rows]
    continuations = []
    for out in outputs:
        text = out.text + (out.stop or "") if out.end == "stop" else out.text
        ids = scorer_tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
        continuations.append(ids + eos[:1] if out.end == "eos" else ids)
    pad = scorer_tokenizer.pad_token_id if scorer_tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
    scored = continuation_nll(scorer, contexts, continuations, batch_size, pad)
    return ItemScores([nll / n if n else 0.0 for nll, n in scored], [float(n) for _, n in scored], "exp")


def rouge_l(predictions: list[str], references: list[str]) -> list[float]:
    """ROUGE-L F1 of each prediction against its reference (rouge-score, no stemming)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return [scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references)]


def chrf(predictions: list[str], references: list[str]) -> list[float]:
    """Sentence-level chrF (0-100, sacrebleu defaults) of each prediction against its reference."""
    from sacrebleu.metrics import CHRF

    metric = CHRF()
    return [metric.sentence_score(pred, [ref]).score for pred, ref in zip(predictions, references)]


# The scorer of each name in config.REFERENCE_METRICS (a test keeps the two in step).
REFERENCE_SCORERS: dict[str, Callable[[list[str], list[str]], list[float]]] = {"rougeL": rouge_l, "chrf": chrf}


def score_outputs(predictions: list[str], references: list[str], metrics: Sequence[str] = tuple(REFERENCE_SCORERS),
                  prefix: str = "") -> dict[str, ItemScores]:
    """Each of ``metrics`` per item, keyed ``<prefix><metric>``."""
    return {f"{prefix}{m}": ItemScores(REFERENCE_SCORERS[m](predictions, references)) for m in metrics}


def headline(scores: ItemScores) -> float:
    """The metric rebuilt from its per-item scores (a mean, or a corpus perplexity)."""
    import numpy as np

    weights = None if scores.weights is None else np.asarray(scores.weights, dtype=np.float64)
    return float(aggregate(np.asarray(scores.values, dtype=np.float64), weights, scores.transform))


def teacher_for_scoring(model: Any, tokenizer: Any, ctx: Any) -> tuple[Any, Any] | None:
    """Who scores the outputs: the shared teacher for a student, the model itself for the teacher.

    None for a student without a teacher pair (its tokenizer differs from the teacher's).
    """
    from slimforge.eval.tables import TEACHER

    pair = ctx.teacher() if hasattr(ctx, "teacher") else None
    if pair is not None:
        return pair
    return (model, tokenizer) if getattr(ctx, "label", "") == TEACHER else None


def agreement_with_teacher(outputs: list[str], item_ids: list[str], ctx: Any) -> dict[str, Any]:
    """A student's outputs against the teacher's on the same items: means and per-item scores."""
    teacher = ctx.teacher_result() if hasattr(ctx, "teacher_result") else None
    if teacher is None or teacher.get("item_ids") != item_ids or "outputs" not in teacher:
        return {}
    per_item = score_outputs(outputs, teacher["outputs"], prefix="teacher_")
    per_item["teacher_exact_match"] = ItemScores([float(a == b) for a, b in zip(outputs, teacher["outputs"])])
    return {"fidelity": {m: headline(s) for m, s in per_item.items()},
            "fidelity_per_item": {m: s.values for m, s in per_item.items()}}


def baseline_chance(cfg: GenerationTaskConfig, rows: list[dict[str, Any]], references: list[str]) -> dict[str, Any]:
    """A shipped set's trivial output scored on the gating reference metric: the task's chance level.

    Empty for a file of your own, or when the task gates on the teacher's perplexity.
    """
    from slimforge.eval.gen_data import BASELINES, GENERATION_SETS

    spec = GENERATION_SETS.get(cfg.asset or "")
    if spec is None or cfg.metric not in REFERENCE_SCORERS or not references:
        return {}
    make, basis = BASELINES[spec.baseline]
    scores = REFERENCE_SCORERS[cfg.metric]([make(row) for row in rows], references)
    return {"chance": sum(scores) / len(scores), "chance_basis": basis, "chance_metrics": [cfg.metric]}


def generation_task(model: Any, tokenizer: Any, cfg: GenerationTaskConfig, ctx: Any) -> dict[str, Any]:
    """Registered as ``generation``: reference scores, the teacher's perplexity, agreement with the teacher."""
    examples = cfg.read_examples(ctx.seed)
    rows = [row for _, row in examples]
    item_ids = [f"example/{index}" for index, _ in examples]
    start = time.perf_counter()
    generated = generate_greedy(model, tokenizer, [render_prompt(row, cfg, tokenizer) for row in rows],
                                cfg.max_new_tokens, ctx.batch_size, add_special_tokens=not cfg.chat, stop=cfg.stop)
    seconds = time.perf_counter() - start
    outputs = [g.text.strip() for g in generated]
    references = [str(row[cfg.reference_field]) for row in rows] if cfg.metrics else []
    per_item = score_outputs(outputs, references, cfg.metrics)
    result: dict[str, Any] = baseline_chance(cfg, rows, references)
    if cfg.teacher_scored:
        scorer = teacher_for_scoring(model, tokenizer, ctx)
        if scorer is None:
            result["teacher_scored_skipped"] = "no teacher to score with: this model's tokenizer differs from the teacher's"
        else:
            per_item[TEACHER_PPL] = teacher_perplexity_scores(scorer[0], scorer[1], rows, cfg, generated, ctx.batch_size)
    result.update({m: headline(s) for m, s in per_item.items()})
    result.update(agreement_with_teacher(outputs, item_ids, ctx))
    new_tokens = sum(g.tokens for g in generated)
    result.update({
        "items": len(rows),
        "per_item": {m: s.to_json() for m, s in per_item.items()},
        "item_ids": item_ids,
        "higher_is_better": {m: m != TEACHER_PPL for m in per_item},
        "metric": cfg.metric if cfg.metric in per_item else next(iter(per_item), None),
        "outputs": outputs,
        "decode": {"new_tokens": new_tokens, "seconds": round(seconds, 3),
                   "tokens_per_s": round(new_tokens / max(seconds, 1e-9), 2),
                   "ends": {end: sum(g.end == end for g in generated) for end in ("eos", "stop", "length")}},
    })
    return result
