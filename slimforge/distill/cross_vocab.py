"""Distillation across tokenizers, as pure functions: losses that need no shared vocabulary, the
exact matches two vocabularies do share, and the positions where two tokenizations line up.

**Universal logit distillation** (ULD; Boizard et al., 2024). Two next-token distributions over
different vocabularies have no common categories, but each is a set of probabilities. ULD sorts
both in decreasing order, pads the shorter with zeros, and takes the L1 distance between them:
``sum_i |sort(p_s)_i - sort(p_t)_i|``, which is the 1-Wasserstein distance between the two
distributions when any mismatch of tokens costs the same. It asks the student to be as sure,
and as spread, as the teacher, not to put mass on the same strings. It is 0 when one
distribution is a relabelling of the other, and at most 2. ``top_k`` keeps each side's ``k``
largest probabilities only (the tail of a 50k vocabulary carries little and costs a sort).

**Hybrid.** Where the two vocabularies hold the very same string (:func:`vocab_matches`), a
token-by-token comparison is possible and says more than ULD. The hybrid loss takes
the KL between the two distributions conditioned on the matched tokens, weighted by the
teacher's mass on them, plus ULD over the probabilities of the unmatched tokens alone, weighted
by ``uld_weight``. With identical vocabularies it is exactly the
forward KL; with nothing in common it is ``uld_weight`` times ULD (both tested).

**Alignment by characters.** Teacher and student cut one text into different tokens, so their
positions do not correspond. Both predict "what follows this prefix of the text" at a position
only where both tokenizations end a token at the same character: :func:`aligned_positions`
pairs those positions from the tokens' character end offsets (what a fast tokenizer returns as
``offset_mapping``). Positions inside a token of the other side have no counterpart and are not
distilled (their next-token cross-entropy still trains).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


def _sorted_probs(logp: torch.Tensor, length: int, top_k: int | None) -> torch.Tensor:
    """``exp(logp)`` per row, largest first, cut to ``top_k`` or padded with zeros to ``length``."""
    probs = logp.float().exp()
    if top_k is not None and top_k < probs.shape[-1]:
        return probs.topk(top_k, dim=-1).values
    probs = probs.sort(dim=-1, descending=True).values
    return F.pad(probs, (0, length - probs.shape[-1]))


def uld(s_logp: torch.Tensor, t_logp: torch.Tensor, top_k: int | None = None) -> torch.Tensor:
    """Universal logit distillation loss per row: L1 between the sorted probability vectors.

    Args:
        s_logp: [N, Vs] student log-probabilities.
        t_logp: [N, Vt] teacher log-probabilities (Vt may differ from Vs).
        top_k: compare each side's ``top_k`` largest probabilities only; None: all.

    Returns:
        [N] fp32, in [0, 2].
    """
    if s_logp.shape[:-1] != t_logp.shape[:-1]:
        raise ValueError(f"ULD needs one teacher row per student row, got {tuple(t_logp.shape[:-1])} "
                         f"and {tuple(s_logp.shape[:-1])}")
    length = max(s_logp.shape[-1], t_logp.shape[-1])
    k = None if top_k is None else min(top_k, length)
    s = _sorted_probs(s_logp, length, k)
    t = _sorted_probs(t_logp, length, k)
    width = max(s.shape[-1], t.shape[-1])
    s, t = F.pad(s, (0, width - s.shape[-1])), F.pad(t, (0, width - t.shape[-1]))
    return (s - t).abs().sum(-1)


@dataclass(frozen=True)
class VocabMatch:
    """Token ids of the student and the teacher that stand for the very same bytes, pairwise."""

    student: torch.Tensor  # [M] long
    teacher: torch.Tensor  # [M] long
    student_size: int
    teacher_size: int

    @property
    def identical(self) -> bool:
        """Both vocabularies are the same strings under the same ids."""
        return (self.student_size == self.teacher_size == len(self.student)
                and bool((self.student == self.teacher).all()))


SPECIAL_MARK = b"\xff"


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, character -> byte (the inverse of its ``bytes_to_unicode``)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def _is_byte_level(tokenizer: Any) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None)
    return decoder is not None and "ByteLevel" in repr(decoder)


def token_bytes(tokenizer: Any) -> dict[int, bytes]:
    """Each token's id -> the bytes it stands for, out of context.

    A special token maps to its own text behind a marker byte (0xFF, which no UTF-8 text holds), so it
    matches only the same special token of the other vocabulary.

    Byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM) spells bytes in its own alphabet; SentencePiece
    style vocabularies (Llama 2, Mistral, Gemma) write a space as ``▁`` and raw bytes as ``<0xNN>``.
    """
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    vocab = tokenizer.get_vocab()
    out: dict[int, bytes] = {index: SPECIAL_MARK + piece.encode("utf-8") for piece, index in vocab.items()
                             if index in special}
    if _is_byte_level(tokenizer):
        table = _byte_decoder()
        for piece, index in vocab.items():
            if index in special or any(c not in table for c in piece):
                continue
            out[index] = bytes(table[c] for c in piece)
        return out
    for piece, index in vocab.items():
        if index in special:
            continue
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            try:
                out[index] = bytes([int(piece[3:5], 16)])
                continue
            except ValueError:
                pass
        out[index] = piece.replace("▁", " ").encode("utf-8")
    return out


def vocab_matches(student_tokenizer: Any, teacher_tokenizer: Any) -> VocabMatch:
    """The pairs of tokens, one from each vocabulary, that stand for the same bytes (specials: the same text).

    Sizes are the models' id ranges as the tokenizers know them (``len(tokenizer)``); a model whose
    embedding is padded beyond that has extra ids that match nothing.
    """
    s_bytes, t_bytes = token_bytes(student_tokenizer), token_bytes(teacher_tokenizer)
    by_bytes: dict[bytes, int] = {}
    for index in sorted(t_bytes):
        by_bytes.setdefault(t_bytes[index], index)
    pairs = sorted((s, by_bytes[b]) for s, b in s_bytes.items() if b in by_bytes)
    student = torch.tensor([p[0] for p in pairs], dtype=torch.long)
    teacher = torch.tensor([p[1] for p in pairs], dtype=torch.long)
    return VocabMatch(student, teacher, len(student_tokenizer), len(teacher_tokenizer))


def _columns(logp: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``logp``'s columns ``ids``; one column of probability 0 when there are none (nothing to compare)."""
    if len(ids) == 0:
        return logp.new_full((*logp.shape[:-1], 1), -torch.inf)
    return logp.index_select(-1, ids.to(logp.device))


def _free_ids(size: int, width: int, matched: torch.Tensor) -> torch.Tensor:
    """Ids in ``range(width)`` not in ``matched``: the unmatched tokens, and any padding of the embedding past ``size``."""
    free = torch.ones(max(size, width), dtype=torch.bool)
    free[matched] = False
    return free[:width].nonzero().squeeze(-1)


def hybrid(s_logp: torch.Tensor, t_logp: torch.Tensor, match: VocabMatch, uld_weight: float = 1.0,
           top_k: int | None = None) -> torch.Tensor:
    """Token-by-token KL over the exactly matched tokens and ULD over the unmatched ones, per row.

    The matched term is ``m * KL(P_M || Q_M)``: both distributions conditioned on the matched
    tokens (renormalised over them), weighted by the teacher's mass ``m`` on them. The unmatched
    term is :func:`uld` over each side's probabilities of its unmatched tokens, as they are. With
    identical vocabularies ``m = 1`` and nothing is unmatched: the forward KL exactly.

    Args:
        s_logp: [N, Vs] student log-probabilities (Vs may exceed ``match.student_size``: padding).
        t_logp: [N, Vt] teacher log-probabilities.
        match: from :func:`vocab_matches`.
        uld_weight: weight of the ULD term.
        top_k: passed to the ULD term.

    Returns:
        [N] fp32.
    """
    s, t = s_logp.float(), t_logp.float()
    total = torch.zeros(s.shape[:-1], device=s.device)
    if len(match.student):
        s_m, t_m = _columns(s, match.student), _columns(t, match.teacher)
        t_mass = torch.logsumexp(t_m, dim=-1)
        t_cond = t_m - t_mass.unsqueeze(-1)
        s_cond = torch.log_softmax(s_m, dim=-1)
        kl = (t_cond.exp() * (t_cond - s_cond)).sum(-1)
        total = total + t_mass.exp() * kl
    if uld_weight:
        s_free = _free_ids(match.student_size, s.shape[-1], match.student)
        t_free = _free_ids(match.teacher_size, t.shape[-1], match.teacher)
        if len(s_free) or len(t_free):
            total = total + uld_weight * uld(_columns(s, s_free), _columns(t, t_free), top_k)
    return total


def aligned_positions(student_ends: Sequence[int], teacher_ends: Sequence[int]) -> tuple[list[int], list[int]]:
    """Pairs of positions, one per tokenization, whose tokens end at the same character.

    Position ``i`` predicts the token after token ``i``, so the two sides' predictions there are of
    the same text's continuation. The last token of either side has nothing after it within the
    sequence and is left out.

    Args:
        student_ends, teacher_ends: each token's character end offset, non-decreasing; -1 marks a token
            that ends at no boundary (it pairs with nothing).

    Returns:
        ``(student positions, teacher positions)``, equally long, increasing.
    """
    s_out, t_out = [], []
    i = j = 0
    last_s, last_t = len(student_ends) - 1, len(teacher_ends) - 1
    while i < last_s and j < last_t:
        a, b = student_ends[i], teacher_ends[j]
        if a == b:
            # Several tokens can end at one character (empty spans): pair the last of each.
            while i + 1 < last_s and student_ends[i + 1] == a:
                i += 1
            while j + 1 < last_t and teacher_ends[j + 1] == b:
                j += 1
            s_out.append(i)
            t_out.append(j)
            i += 1
            j += 1
        elif a < b:
            i += 1
        else:
            j += 1
    return s_out, t_out


@dataclass(frozen=True)
class TeacherView:
    """One student block as the teacher reads it: its text in the teacher's tokens, and the pairs of
    positions (student, teacher) that predict the continuation of the same prefix."""

    teacher_ids: list[int]
    student_positions: list[int]
    teacher_positions: list[int]


def _byte_ends(pieces: Sequence[bytes]) -> list[int]:
    ends, total = [], 0
    for piece in pieces:
        total += len(piece)
        ends.append(total)
    return ends


def teacher_view(student_ids: Sequence[int], student_bytes: dict[int, bytes], teacher_tokenizer: Any) -> TeacherView:
    """Re-tokenize a student block for the teacher, aligned by bytes of text (module docstring).

    The block's text is its tokens' bytes laid end to end (:func:`token_bytes`; exact, with no
    re-encoding by the student's tokenizer, whose merges at a block's cut edges could differ). A
    block cut inside a multi-byte character loses that character's bytes at its edges; special
    tokens are left out of the text and align with nothing.

    Args:
        student_ids: one block of the student's token ids.
        student_bytes: :func:`token_bytes` of the student's tokenizer.
        teacher_tokenizer: a fast tokenizer (it must return offsets).
    """
    pieces = [b"" if student_bytes.get(i, SPECIAL_MARK).startswith(SPECIAL_MARK) else student_bytes[i]
              for i in student_ids]
    raw = b"".join(pieces)
    front = 0  # continuation bytes of a character cut at the block's start
    while front < len(raw) and (raw[front] & 0xC0) == 0x80:
        front += 1
    text = raw[front:].decode("utf-8", errors="ignore")  # and the incomplete character cut at its end
    encoded_text = text.encode("utf-8")
    if raw[front:front + len(encoded_text)] != encoded_text:  # invalid bytes inside: no alignment to trust
        return TeacherView([], [], [])
    # Byte offset (in the block) of every character's end, to map the teacher's character offsets back.
    char_end = [front + end for end in _byte_ends([c.encode("utf-8") for c in text])]
    encoded = teacher_tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    spans = encoded["offset_mapping"]
    # A token whose span the next one overlaps (Metaspace's own leading "▁" claims the first character,
    # which the next token covers too) ends at no boundary of the text: it aligns with nothing (-1).
    t_ends = [-1 if k + 1 < len(spans) and spans[k + 1][0] < end else (char_end[end - 1] if end > 0 else front)
              for k, (_, end) in enumerate(spans)]
    s_pos, t_pos = aligned_positions(_byte_ends(pieces), t_ends)
    return TeacherView(list(encoded["input_ids"]), s_pos, t_pos)
