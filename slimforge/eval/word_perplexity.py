"""Word and byte perplexity: lm-eval's rolling log-likelihood (the wikitext convention) on held-out text.

The documents are the first held-out blocks decoded back to text, so models with
different tokenizers are compared on the same characters. The task type's whole
knowledge is here and in its schema (:class:`~slimforge.eval.config.WordPerplexityTaskConfig`);
one line in ``slimforge/eval/__init__.py`` registers it.
"""

from __future__ import annotations

from typing import Any

from slimforge.eval.config import WordPerplexityTaskConfig
from slimforge.eval.perplexity import data_split


def heldout_documents(ctx: Any, split: str, max_documents: int | None) -> list[str]:
    """The first held-out blocks as text, decoded with the tokenizer that packed them."""
    from slimforge.data import blocks_tensor

    blocks = blocks_tensor(data_split(ctx, split), max_documents)
    tokenizer = ctx.session.teacher_tokenizer()
    return [tokenizer.decode(row, skip_special_tokens=True) for row in blocks.tolist()]


def word_perplexity_task(model: Any, tokenizer: Any, cfg: WordPerplexityTaskConfig, ctx: Any) -> dict[str, Any]:
    """lm-eval's word_perplexity, byte_perplexity and bits_per_byte on held-out text."""
    import datasets

    from slimforge.eval.harness import _task_manager, harness_result, load_tasks, run_loaded

    docs = heldout_documents(ctx, cfg.split, cfg.max_documents)

    def held_out(**_: Any) -> datasets.DatasetDict:
        return datasets.DatasetDict({"test": datasets.Dataset.from_dict({"text": docs})})

    spec = {
        "task": "slimforge_heldout_text", "custom_dataset": held_out, "dataset_path": "slimforge/heldout",
        "output_type": "loglikelihood_rolling", "test_split": "test", "doc_to_text": "", "doc_to_target": "{{text}}",
        "metric_list": [{"metric": m} for m in ("word_perplexity", "byte_perplexity", "bits_per_byte")],
    }
    loaded = load_tasks(_task_manager((), False), [spec], 0, ctx.seed)
    out = run_loaded(model, tokenizer, loaded, ctx.batch_size, None, ctx.seed)
    result = harness_result("slimforge_heldout_text", loaded, out)
    result["item_ids"] = [f"document/{i}" for i in range(len(docs))]
    result["documents"] = len(docs)
    result["metric"] = "word_perplexity"
    return result
