"""What a distillation run reports: held-out metrics, TensorBoard scalars and the log line per evaluation."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from slimforge.distill.losses import divergence, topk_bucket_logprobs

log = logging.getLogger(__name__)


@torch.no_grad()
def heldout_metrics(student: Any, heldout: Any, blocks: list[int], batch_size: int, device: torch.device,
                    teacher: Any = None, cache: Any = None) -> dict[str, float]:
    """Held-out forward KL(teacher || student) at T = 1, student CE and perplexity, top-1 agreement.

    Args:
        student: the model to measure (put back in its training mode afterwards).
        heldout: the packed held-out split; ``blocks`` the indices of it to read.
        batch_size: blocks per forward pass.
        device: where the blocks go.
        teacher, cache: the live teacher, or its top-k cache (one of them). A cache built at a
            temperature other than 1 gives no KL (``eval_kl`` is left out).
    """
    from slimforge.data import blocks_tensor

    was_training = student.training
    student.eval()
    kl_sum = ce_sum = agree = count = 0.0
    for start in range(0, len(blocks), batch_size):
        batch = blocks[start: start + batch_size]
        ids = blocks_tensor(heldout.select(batch)).to(device)
        logits = student(input_ids=ids, use_cache=False).logits[:, :-1].float()
        logits = logits.reshape(-1, logits.shape[-1])
        targets = ids[:, 1:].reshape(-1)
        ce_sum += F.cross_entropy(logits, targets, reduction="sum").item()
        if cache is not None:
            top_ids, top_logp = cache.lookup("heldout", batch, device)
            top_ids = top_ids.reshape(-1, top_ids.shape[-1])
            s_logp = topk_bucket_logprobs(logits, top_ids) if cache.meta["temperature"] == 1.0 else None
            t_logp = top_logp.reshape(-1, top_logp.shape[-1]).float()
            if s_logp is not None:
                kl_sum += divergence("forward_kl", s_logp, t_logp).sum().item()
            teacher_top1 = top_ids[:, 0]
        else:
            t_logits = teacher(input_ids=ids, use_cache=False).logits[:, :-1].float()
            t_logits = t_logits.reshape(-1, t_logits.shape[-1])
            kl_sum += divergence("forward_kl", F.log_softmax(logits, -1), F.log_softmax(t_logits, -1)).sum().item()
            teacher_top1 = t_logits.argmax(-1)
        agree += (logits.argmax(-1) == teacher_top1).sum().item()
        count += targets.numel()
    student.train(was_training)
    out = {"eval_ce": ce_sum / count, "eval_ppl": math.exp(ce_sum / count), "eval_top1": agree / count}
    if cache is None or cache.meta["temperature"] == 1.0:
        out["eval_kl"] = kl_sum / count
    return out


class RunLog:
    """Where a run reports: TensorBoard scalars (main rank, when given a folder) and one log line per evaluation.

    Args:
        log_dir: the TensorBoard folder; None writes no scalars.
        enabled: False on ranks other than the main one.
        log_every: training scalars every this many steps (evaluations are always written).
    """

    def __init__(self, log_dir: Path | None, enabled: bool, log_every: int) -> None:
        self.writer = None
        if log_dir is not None and enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(log_dir))
        self.log_every = log_every

    def step(self, step: int, loss: float, lr: float, tokens_per_s: float, stats: dict[str, float]) -> None:
        """The training scalars of one optimizer step."""
        if self.writer is None or step % self.log_every:
            return
        self.writer.add_scalar("train/loss", loss, step)
        self.writer.add_scalar("train/lr", lr, step)
        self.writer.add_scalar("train/tokens_per_s", tokens_per_s, step)
        for key, value in stats.items():
            self.writer.add_scalar(f"train/{key}", value, step)

    def evaluation(self, record: dict[str, Any]) -> None:
        """A history record (step, tokens, train loss, ``eval_*`` metrics): its scalars and a log line."""
        if self.writer is not None:
            for key, value in record.items():
                if key.startswith("eval_"):
                    self.writer.add_scalar(f"eval/{key[5:]}", value, record["step"])
        log.info("step %d: %s", record["step"], json.dumps({k: round(v, 4) if isinstance(v, float) else v
                                                            for k, v in record.items()}))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
