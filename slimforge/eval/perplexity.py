"""Token-level perplexity over fixed-length blocks (the GPTQ / Wanda convention).

Each block is scored independently: every token after the first is predicted
from the tokens before it in the same block; perplexity is exp of the mean
negative log-likelihood over all predicted tokens.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from slimforge.eval.config import PerplexityTaskConfig
from slimforge.stage import EvalContext


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
    for start in tqdm(batches, desc="perplexity", leave=False, disable=not progress):
        ids = blocks[start: start + batch_size].to(device)
        logits = model(input_ids=ids).logits[:, :-1].float()
        nll = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
        out[start: start + len(ids)] = nll.sum(dim=1).double().cpu()
    return out


def perplexity_from_nll(nll_sum: float, tokens: int) -> float:
    return math.exp(nll_sum / tokens)


def perplexity_task(model: Any, tokenizer: Any, cfg: PerplexityTaskConfig, ctx: EvalContext) -> dict[str, Any]:
    """Perplexity of ``model`` on the first ``cfg.max_blocks`` blocks of the chosen split."""
    from slimforge.data import blocks_tensor

    bundle = ctx.data()
    split = bundle.heldout if cfg.split == "heldout" else bundle.train
    blocks = blocks_tensor(split, cfg.max_blocks)
    per_block = block_nll(model, blocks, ctx.batch_size, ctx.device)
    tokens = blocks.shape[0] * (blocks.shape[1] - 1)
    total = float(per_block.sum())
    return {
        "perplexity": perplexity_from_nll(total, tokens),
        "nll": total / tokens,
        "tokens": tokens,
        "blocks": int(blocks.shape[0]),
        "per_item": {"nll": [round(float(x) / (blocks.shape[1] - 1), 6) for x in per_block]},
    }
