"""Generation tasks over user jsonl: text completion, summarization, translation.

Prompts are generated in left-padded batches, always greedily (whatever a
model's generation config says, so teacher and students decode alike), capped
at ``max_new_tokens``, cut at the first stop string, and scored against the
references by ROUGE-L F1 (Google's ``rouge-score``) and chrF (``sacrebleu``),
each averaged over items. A student's outputs are also scored against the
teacher's own outputs: how much of the teacher's behaviour it kept.
"""

from __future__ import annotations

from typing import Any

import torch

from slimforge.errors import DataError
from slimforge.eval.config import GenerationTaskConfig
from slimforge.eval.stats import ItemScores


def render_prompt(row: dict[str, Any], cfg: GenerationTaskConfig, tokenizer: Any) -> str:
    """The text the model continues: the prompt field or the template, optionally chat-wrapped."""
    try:
        text = cfg.template.format(**row) if cfg.template else str(row[cfg.prompt_field])
    except KeyError as err:
        raise DataError(f"generation template names field {err.args[0]!r}, which a row lacks") from None
    if cfg.chat:
        if not getattr(tokenizer, "chat_template", None):
            raise DataError("generation task has chat=true but the model's tokenizer has no chat template")
        return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
    return text


def cut_at_stop(text: str, stop: list[str]) -> str:
    """``text`` up to the first occurrence of any stop string."""
    cut = len(text)
    for s in stop:
        if s and (pos := text.find(s)) != -1:
            cut = min(cut, pos)
    return text[:cut]


@torch.no_grad()
def generate_greedy(model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int, batch_size: int,
                    add_special_tokens: bool = True) -> list[str]:
    """Greedy continuations of ``prompts``, in batches with left padding; only the new text is returned."""
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    outputs: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            enc = tokenizer(prompts[start: start + batch_size], return_tensors="pt", padding=True,
                            add_special_tokens=add_special_tokens).to(model.device)
            new = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                 temperature=None, top_p=None, top_k=None,
                                 pad_token_id=tokenizer.pad_token_id)[:, enc["input_ids"].shape[1]:]
            outputs.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = side
    return outputs


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


def score_outputs(predictions: list[str], references: list[str], prefix: str = "") -> dict[str, ItemScores]:
    """ROUGE-L and chrF per item, keyed ``<prefix>rougeL`` and ``<prefix>chrf``."""
    return {f"{prefix}rougeL": ItemScores(rouge_l(predictions, references)),
            f"{prefix}chrf": ItemScores(chrf(predictions, references))}


def generation_task(model: Any, tokenizer: Any, cfg: GenerationTaskConfig, ctx: Any) -> dict[str, Any]:
    """Registered as ``generation``: reference scores, and agreement with the teacher's outputs."""
    rows = cfg.read_examples()
    prompts = [render_prompt(row, cfg, tokenizer) for row in rows]
    raw = generate_greedy(model, tokenizer, prompts, cfg.max_new_tokens, ctx.batch_size,
                          add_special_tokens=not cfg.chat)
    outputs = [cut_at_stop(text, cfg.stop).strip() for text in raw]
    references = [str(row[cfg.reference_field]) for row in rows]
    per_item = score_outputs(outputs, references)
    result: dict[str, Any] = {m: sum(s.values) / len(s.values) for m, s in per_item.items()}
    teacher = ctx.teacher_result() if hasattr(ctx, "teacher_result") else None
    if teacher is not None and len(teacher.get("outputs", [])) == len(outputs):
        agreement = score_outputs(outputs, teacher["outputs"], prefix="teacher_")
        result["fidelity"] = {m: sum(s.values) / len(s.values) for m, s in agreement.items()}
        result["fidelity"]["teacher_exact_match"] = sum(a == b for a, b in zip(outputs, teacher["outputs"])) / len(outputs)
        result["fidelity_per_item"] = {m: s.values for m, s in agreement.items()}
    result.update({
        "items": len(rows),
        "per_item": {m: s.to_json() for m, s in per_item.items()},
        "item_ids": [f"example/{i}" for i in range(len(rows))],
        "higher_is_better": {"rougeL": True, "chrf": True},
        "metric": "rougeL",
        "outputs": outputs,
    })
    return result
