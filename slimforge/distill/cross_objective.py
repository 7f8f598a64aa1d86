"""Distillation across tokenizers, wired: the teacher reads each student block in its own tokens, and the
loss compares the two next-token distributions where both tokenizations end a token at the same character.

The math is in :mod:`slimforge.distill.cross_vocab`; this module is what the trainer calls:

- :class:`TeacherReader` turns a batch of student blocks into the teacher's targets. Per block, the
  block's text (its tokens' bytes, :func:`~slimforge.distill.cross_vocab.teacher_view`) is tokenized by
  the teacher's tokenizer, the teacher runs on its own ids (the batch's blocks padded on the right to the
  longest: the causal mask keeps each block's rows its own), and at every aligned pair of positions the
  teacher's top-k ids and its k + 1 bucket log-probabilities (the k kept, then the tail) are written at
  the *student's* position. Positions with no counterpart hold log-probabilities of -inf (a real row
  always has a finite largest bucket), so the rows have the plain teacher cache's shape
  ([L - 1, k] and [L - 1, k + 1] per block) and its file format. The log-probabilities are rounded to
  fp16, as the cache stores them, so the live teacher and its cache train the same.
- :class:`CrossTokenizerObjective` is the loss of a batch: ``ce_weight`` times the student's next-token
  cross-entropy on all its positions plus ``weight`` times the cross-tokenizer loss (ULD or hybrid): the
  mean over each block's aligned positions, averaged over the blocks (:func:`per_block_mean`), so a batch's
  loss does not depend on how its blocks are split into micro-batches or DDP ranks (blocks differ in how
  many positions align, so one mean over a micro-batch's aligned rows would weigh them by the split),
  and the held-out metrics (per token and per character, so students with other tokenizers compare).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
import torch.nn.functional as F

from slimforge.distill.cross_vocab import (
    SPECIAL_MARK,
    VocabMatch,
    _columns,
    _free_ids,
    teacher_view,
    token_bytes,
    uld,
    vocab_matches,
)
from slimforge.distill.objective import flatten_batch, teacher_buckets

log = logging.getLogger(__name__)


class TeacherReader:
    """Reads student blocks as the teacher does, and computes the teacher's rows at the aligned positions."""

    def __init__(self, student_tokenizer: Any, teacher_tokenizer: Any, top_k: int) -> None:
        self.student_bytes = token_bytes(student_tokenizer)
        self.teacher_tokenizer = teacher_tokenizer
        self.top_k = top_k
        # What a cache entry of these rows adds to its key: never taken for a plain entry, nor for another student's.
        self.cache_extra = cross_cache_extra(student_tokenizer)

    @torch.no_grad()
    def rows(self, teacher: Any, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's top-k ids [B, L - 1, k] (int64) and bucket log-probabilities [B, L - 1, k + 1]
        (fp32 holding fp16 values; -inf at unaligned positions) for student blocks ``ids`` [B, L]."""
        batch, length = ids.shape
        k = self.top_k
        device = ids.device
        out_ids = torch.zeros(batch, length - 1, k, dtype=torch.long, device=device)
        out_logp = torch.full((batch, length - 1, k + 1), -torch.inf, device=device)
        views = [teacher_view(block, self.student_bytes, self.teacher_tokenizer) for block in ids.tolist()]
        kept = [b for b, view in enumerate(views) if view.student_positions]
        if not kept:
            return out_ids, out_logp
        # One forward for the batch, each block's teacher ids padded on the right: under the causal mask a
        # position never sees the padding after it, so the rows read are the block's own.
        width = max(len(views[b].teacher_ids) for b in kept)
        pad = self.teacher_tokenizer.pad_token_id or 0
        t_ids = torch.tensor([views[b].teacher_ids + [pad] * (width - len(views[b].teacher_ids)) for b in kept],
                             dtype=torch.long, device=teacher.device)
        logits = teacher(input_ids=t_ids, use_cache=False).logits
        for row, b in enumerate(kept):
            view = views[b]
            top_ids, top_logp = teacher_buckets(logits[row, view.teacher_positions].float(), k)
            s_pos = torch.tensor(view.student_positions, device=device)
            out_ids[b, s_pos] = top_ids.to(device)
            out_logp[b, s_pos] = top_logp.to(device)
        return out_ids, out_logp.half().float()

    def char_counts(self, vocab_size: int) -> torch.Tensor:
        """Characters each student token adds to the text (its bytes that start a UTF-8 character;
        0 for special tokens), [vocab_size] float."""
        counts = torch.zeros(vocab_size)
        for index, raw in self.student_bytes.items():
            if index < vocab_size and not raw.startswith(SPECIAL_MARK):
                counts[index] = sum(1 for byte in raw if (byte & 0xC0) != 0x80)
        return counts


def hybrid_topk(s_logp: torch.Tensor, top_ids: torch.Tensor, top_logp: torch.Tensor, match: VocabMatch,
                uld_weight: float, top_k: int | None) -> torch.Tensor:
    """:func:`~slimforge.distill.cross_vocab.hybrid` against a teacher known by its top-k alone, per row.

    The teacher is its k kept probabilities and 0 elsewhere (its tail mass is not spread over ids it
    did not keep): the same value as ``hybrid`` on that dense row, without forming it (tested).

    Args:
        s_logp: [N, Vs] student log-probabilities.
        top_ids, top_logp: [N, k] the teacher's kept ids and their log-probabilities.
    """
    s = s_logp.float()
    t_lp = top_logp.float()
    to_match = torch.full((max(match.teacher_size, int(top_ids.max()) + 1 if top_ids.numel() else 1),), -1,
                          dtype=torch.long, device=s.device)
    if len(match.teacher):
        to_match[match.teacher.to(s.device)] = torch.arange(len(match.teacher), device=s.device)
    col = to_match[top_ids]
    matched = col >= 0
    total = torch.zeros(s.shape[:-1], device=s.device)
    if len(match.student):
        s_cond = torch.log_softmax(_columns(s, match.student), dim=-1)
        t_mass = torch.logsumexp(torch.where(matched, t_lp, -torch.inf), dim=-1, keepdim=True)
        t_cond = torch.where(matched, t_lp - t_mass, torch.zeros_like(t_lp))
        s_at = s_cond.gather(-1, col.clamp_min(0))
        # m * KL(P_M || Q_M) = sum over matched kept ids of p_j (log p_j / m - log q_cond_j)
        total = total + torch.where(matched, t_lp.exp() * (t_cond - s_at), torch.zeros_like(t_lp)).sum(-1)
    if uld_weight:
        s_free = _free_ids(match.student_size, s.shape[-1], match.student)
        t_free = torch.where(matched, -torch.inf, t_lp)
        total = total + uld_weight * uld(_columns(s, s_free), t_free, top_k)
    return total


class CrossTokenizerObjective:
    """The loss of one batch of student blocks against a teacher of another tokenizer (module docstring).

    A plain class, like :class:`~slimforge.distill.wiring.KDObjective`, whose interface it shares.
    """

    def __init__(self, cfg: Any, student_tokenizer: Any, teacher_tokenizer: Any, teacher: Any = None,
                 cache: Any = None, top_k: int | None = None) -> None:
        if teacher is None and cache is None:
            raise ValueError("a live teacher or a teacher cache is required")
        self.cfg = cfg
        self.spec = cfg.cross_tokenizer
        self.teacher = teacher
        self.cache = cache
        self.top_k = int(cache.top_k) if cache is not None else top_k or self.spec.top_k
        self.reader = TeacherReader(student_tokenizer, teacher_tokenizer, self.top_k)
        self.match = vocab_matches(student_tokenizer, teacher_tokenizer) if self.spec.loss == "hybrid" else None
        self.layer_map: list[int] = []
        self._chars: torch.Tensor | None = None

    def hidden_projections(self, student: Any, kept_layers: list[int] | None) -> None:
        return None  # no hidden-state term across tokenizers (the config refuses hidden_weight)

    def teacher_targets(self, split: str, blocks: list[int], ids: torch.Tensor) -> dict[str, Any]:
        """The teacher's rows at the student's positions, from its cache or the live teacher."""
        if self.cache is not None:
            top_ids, top_logp = self.cache.lookup(split, blocks, ids.device)
        else:
            top_ids, top_logp = self.reader.rows(self.teacher, ids)
        return {"top_ids": top_ids.reshape(-1, top_ids.shape[-1]), "top_logp": top_logp.reshape(-1, top_logp.shape[-1])}

    def rows_loss(self, s_logp: torch.Tensor, top_ids: torch.Tensor, top_logp: torch.Tensor) -> torch.Tensor:
        """The cross-tokenizer loss per aligned row: student log-probabilities [N, Vs] against the teacher's buckets."""
        kept = top_logp[:, :-1]
        if self.spec.loss == "uld":
            return uld(s_logp, kept, self.top_k)
        return hybrid_topk(s_logp, top_ids, kept, self.match, self.spec.uld_weight, self.top_k)

    def __call__(self, student: Any, projections: Any, input_ids: torch.Tensor, loss_mask: torch.Tensor,
                 attention_mask: torch.Tensor | None, targets_from_teacher: dict[str, Any]
                 ) -> tuple[torch.Tensor, dict[str, float]]:
        from contextlib import nullcontext

        from slimforge import moe

        targets, mask = flatten_batch(input_ids, loss_mask, attention_mask)
        # An MoE student keeps its router's load-balancing term, as in the same-tokenizer objective.
        aux_coef = moe.router_aux_coef(student.config)
        with moe.capture_router_logits(student) if aux_coef else nullcontext(None) as router_logits:
            logits = student(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1]
        logits = logits.reshape(-1, logits.shape[-1]).float()
        counted = mask.sum().clamp_min(1)
        ce = (F.cross_entropy(logits, targets, reduction="none") * mask).sum() / counted
        top_ids, top_logp = targets_from_teacher["top_ids"], targets_from_teacher["top_logp"]
        rows = (torch.isfinite(top_logp[:, 0]) & (mask > 0)).nonzero().squeeze(-1)
        if len(rows):
            s_logp = F.log_softmax(logits[rows], dim=-1)
            cross = per_block_mean(self.rows_loss(s_logp, top_ids[rows], top_logp[rows]), rows,
                                   input_ids.shape[1] - 1, input_ids.shape[0])
        else:
            cross = logits.sum() * 0.0
        loss = self.spec.ce_weight * ce + self.spec.weight * cross
        stats = {"ce": ce.item(), "cross": cross.item(), "aligned": len(rows) / float(counted)}
        if router_logits is not None and router_logits.logits:
            aux = moe.load_balancing_loss(student, router_logits.logits, attention_mask)
            stats["router_aux"] = aux.item()
            loss = loss + aux_coef * aux
        return loss, stats

    @torch.no_grad()
    def heldout_metrics(self, student: Any, heldout: Any, blocks: list[int], batch_size: int,
                        device: torch.device) -> dict[str, float]:
        """Held-out student CE and perplexity per token and per character, the cross-tokenizer loss at the
        aligned positions (``eval_cross``) and the fraction of positions aligned."""
        from slimforge.distill.metrics import heldout_batches

        ce_sum = cross_sum = count = aligned = chars = 0.0
        for batch, ids, logits, targets in heldout_batches(student, heldout, blocks, batch_size, device):
            ce_sum += F.cross_entropy(logits, targets, reduction="sum").item()
            chars += float(self._char_counts(logits.shape[-1]).to(device)[targets].sum())
            t = self.teacher_targets("heldout", batch, ids)
            rows = torch.isfinite(t["top_logp"][:, 0]).nonzero().squeeze(-1)
            if len(rows):
                s_logp = F.log_softmax(logits[rows], dim=-1)
                cross_sum += self.rows_loss(s_logp, t["top_ids"][rows], t["top_logp"][rows]).sum().item()
            aligned += len(rows)
            count += targets.numel()
        per_char = ce_sum / max(chars, 1.0)
        return {"eval_ce": ce_sum / count, "eval_ppl": math.exp(ce_sum / count),
                "eval_cross": cross_sum / max(aligned, 1.0), "eval_aligned": aligned / count,
                "eval_ce_per_char": per_char, "eval_ppl_per_char": math.exp(per_char)}

    def _char_counts(self, width: int) -> torch.Tensor:
        if self._chars is None or len(self._chars) != width:
            self._chars = self.reader.char_counts(width)
        return self._chars


def per_block_mean(values: torch.Tensor, rows: torch.Tensor, positions: int, blocks: int) -> torch.Tensor:
    """The mean over ``blocks`` blocks of each block's mean of ``values`` (a block with no row counts 0).

    Args:
        values: [R] a loss per aligned row; rows: [R] their indices in the flattened [blocks * positions].
    """
    block = torch.div(rows, positions, rounding_mode="floor")
    sums = torch.zeros(blocks, dtype=values.dtype, device=values.device).index_add(0, block, values)
    counts = torch.bincount(block, minlength=blocks).to(values.dtype).clamp_min(1)
    return (sums / counts).sum() / blocks


def shares_one_tokenizer(teacher_tokenizer: Any, student_tokenizer: Any) -> bool:
    """Teacher and student read text into the same ids (the plain loss applies)."""
    from slimforge.models import tokenizer_mismatch

    return tokenizer_mismatch(teacher_tokenizer, student_tokenizer) is None


def distils_across_tokenizers(cfg: Any, teacher_tokenizer: Any, student_tokenizer: Any) -> bool:
    """Whether this stage distils across tokenizers: asked for, and the tokenizers really differ.

    Asked for with one shared tokenizer, it warns (one line) and the plain loss trains instead.
    """
    if not cfg.cross_tokenizer.enabled:
        return False
    if shares_one_tokenizer(teacher_tokenizer, student_tokenizer):
        log.warning("cross_tokenizer.loss=%s asks for distillation across tokenizers, but the teacher and the "
                    "student share one tokenizer: training with the plain %s loss instead",
                    cfg.cross_tokenizer.loss, cfg.loss)
        return False
    return True


def cross_cache_extra(student_tokenizer: Any) -> list[Any]:
    """What a cross-tokenizer cache entry's key adds to a plain one's: the marker and the student's tokenizer."""
    from slimforge.models import tokenizer_fingerprint

    return ["cross_tokenizer", tokenizer_fingerprint(student_tokenizer)]

