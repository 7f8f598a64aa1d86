"""Token perplexity over fixed-length blocks, with fidelity to the teacher.

Token perplexity follows the GPTQ / Wanda convention: each block is scored
independently, every token after the first predicted from the tokens before it
in the same block; perplexity is exp of the mean NLL over all predicted tokens.
For a student, the same batches also go through the teacher, and the fidelity
metrics (per-token KL(teacher || student), top-1 agreement) come from those
very forward passes.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from slimforge.eval.config import PerplexityTaskConfig
from slimforge.eval.fidelity import kl_summary, token_kl, top1_agreement
from slimforge.eval.stats import ItemScores
from slimforge.progress import progress_bar


def _next_token_nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """[B, L-1] NLL of each next token, in fp32."""
    return F.cross_entropy(logits[:, :-1].float().transpose(1, 2), ids[:, 1:], reduction="none")


@torch.no_grad()
def block_nll(model: Any, blocks: torch.Tensor, batch_size: int, device: torch.device | str,
              progress: bool = True) -> torch.Tensor:
    """Summed next-token NLL of each block, in fp32.

    Args:
        model: a causal LM.
        blocks: int64 [n, L] token ids.
        batch_size: blocks per forward pass.
        device: where to run.

    Returns:
        float64 [n]: the NLL summed over the L - 1 predicted tokens of each block.
    """
    out = torch.empty(len(blocks), dtype=torch.float64)
    batches = range(0, len(blocks), batch_size)
    for start in progress_bar(batches, desc="perplexity", total=len(batches), unit="batch", leave=False, enabled=progress):
        ids = blocks[start: start + batch_size].to(device)
        out[start: start + len(ids)] = _next_token_nll(model(input_ids=ids).logits, ids).sum(dim=1).double().cpu()
    return out


@torch.no_grad()
def paired_block_scores(student: Any, teacher: Any, blocks: torch.Tensor, batch_size: int,
                        device: torch.device | str, progress: bool = True) -> dict[str, torch.Tensor]:
    """Student NLL and fidelity to the teacher from one pass of both models over each batch.

    Returns:
        ``nll`` float64 [n] summed per block (student), ``teacher_nll`` likewise,
        ``kl`` float32 [n, L-1] per-token KL(teacher || student) and ``top1``
        bool [n, L-1] per-token top-1 agreement.
    """
    n, length = blocks.shape
    out = {"nll": torch.empty(n, dtype=torch.float64), "teacher_nll": torch.empty(n, dtype=torch.float64),
           "kl": torch.empty(n, length - 1), "top1": torch.empty(n, length - 1, dtype=torch.bool)}
    batches = range(0, n, batch_size)
    for start in progress_bar(batches, desc="perplexity+fidelity", total=len(batches), unit="batch", leave=False,
                              enabled=progress):
        ids = blocks[start: start + batch_size].to(device)
        s_logits = student(input_ids=ids).logits
        t_logits = teacher(input_ids=ids).logits
        stop = start + len(ids)
        out["nll"][start:stop] = _next_token_nll(s_logits, ids).sum(dim=1).double().cpu()
        out["teacher_nll"][start:stop] = _next_token_nll(t_logits, ids).sum(dim=1).double().cpu()
        for row in range(len(ids)):  # one sequence at a time bounds the [L, V] fp32 temporaries
            t_row, s_row = t_logits[row, :-1], s_logits[row, :-1]
            out["kl"][start + row] = token_kl(t_row, s_row).cpu()
            out["top1"][start + row] = top1_agreement(t_row, s_row).cpu()
    return out


def perplexity_from_nll(nll_sum: float, tokens: int) -> float:
    return math.exp(nll_sum / tokens)


def data_split(ctx: Any, name: str) -> Any:
    """The ``heldout`` or ``train`` blocks of the session's data."""
    bundle = ctx.data()
    return bundle.heldout if name == "heldout" else bundle.train


def perplexity_task(model: Any, tokenizer: Any, cfg: PerplexityTaskConfig, ctx: Any) -> dict[str, Any]:
    """Perplexity on the first ``cfg.max_blocks`` blocks, with fidelity to the teacher for a student."""
    from slimforge.data import blocks_tensor

    blocks = blocks_tensor(data_split(ctx, cfg.split), cfg.max_blocks)
    predicted = blocks.shape[1] - 1
    tokens = blocks.shape[0] * predicted
    teacher = ctx.teacher() if cfg.fidelity else None
    result: dict[str, Any] = {}
    if teacher is not None and teacher[0].config.vocab_size != model.config.vocab_size:
        result["fidelity_skipped"] = (f"output vocabularies differ ({teacher[0].config.vocab_size} vs "
                                      f"{model.config.vocab_size} logits)")
        teacher = None
    if teacher is None:
        per_block = block_nll(model, blocks, ctx.batch_size, ctx.device)
    else:
        scores = paired_block_scores(model, teacher[0], blocks, ctx.batch_size, ctx.device)
        per_block = scores["nll"]
        result["fidelity"] = {
            **kl_summary(scores["kl"]),
            "top1_agreement": float(scores["top1"].float().mean()),
            "teacher_perplexity": perplexity_from_nll(float(scores["teacher_nll"].sum()), tokens),
            "tokens": tokens,
        }
        result["fidelity_per_item"] = {
            "kl": scores["kl"].double().mean(dim=1).tolist(),
            "top1_agreement": scores["top1"].double().mean(dim=1).tolist(),
        }
    total = float(per_block.sum())
    result.update({
        "perplexity": perplexity_from_nll(total, tokens),
        "nll": total / tokens,
        "tokens": tokens,
        "blocks": int(blocks.shape[0]),
        "per_item": {"perplexity": ItemScores((per_block / predicted).tolist(), None, "exp").to_json()},
        "item_ids": [f"block/{i}" for i in range(blocks.shape[0])],
        "higher_is_better": {"perplexity": False},
        "metric": "perplexity",
    })
    return result
