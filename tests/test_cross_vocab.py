"""Cross-tokenizer distillation's math (slimforge/distill/cross_vocab.py) against simple references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from slimforge.distill.cross_vocab import (
    VocabMatch,
    aligned_positions,
    hybrid,
    token_bytes,
    uld,
    vocab_matches,
)
from slimforge.distill.losses import forward_kl
from tests.conftest import build_tokenizer


def logps(rows: int, vocab: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.log_softmax(torch.randn(rows, vocab, generator=g) * scale, dim=-1)


def uld_reference(s_logp: torch.Tensor, t_logp: torch.Tensor, top_k: int | None = None) -> torch.Tensor:
    """One row at a time, in plain Python lists: sort each side, pad with zeros, sum |differences|."""
    out = []
    for s_row, t_row in zip(s_logp.exp().tolist(), t_logp.exp().tolist()):
        s_row, t_row = sorted(s_row, reverse=True), sorted(t_row, reverse=True)
        if top_k is not None:
            s_row, t_row = s_row[:top_k], t_row[:top_k]
        n = max(len(s_row), len(t_row))
        s_row, t_row = s_row + [0.0] * (n - len(s_row)), t_row + [0.0] * (n - len(t_row))
        out.append(sum(abs(a - b) for a, b in zip(s_row, t_row)))
    return torch.tensor(out)


# --- ULD --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("vs", "vt", "top_k"), [(7, 7, None), (5, 11, None), (13, 4, None), (9, 12, 3), (6, 6, 50)])
def test_uld_is_the_l1_distance_of_the_sorted_probabilities(vs, vt, top_k):
    s, t = logps(4, vs, 0), logps(4, vt, 1)
    torch.testing.assert_close(uld(s, t, top_k), uld_reference(s, t, top_k), rtol=1e-5, atol=1e-6)


def test_uld_gradient_matches_a_reference_built_from_explicit_sorting():
    """The gradient reaches each student logit through its rank: d|p_(i) - q_(i)| / dp_(i) = sign."""
    logits = torch.randn(3, 8, generator=torch.Generator().manual_seed(2), requires_grad=True)
    t = logps(3, 10, 3)
    uld(F.log_softmax(logits, -1), t).sum().backward()
    expected = torch.zeros(3, 8)
    p = torch.softmax(logits.detach(), -1)
    for r in range(3):
        order = p[r].argsort(descending=True)
        q = t[r].exp().sort(descending=True).values
        sign = torch.sign(p[r][order] - q[:8])
        d_p = torch.zeros(8)
        d_p[order] = sign
        # Through the softmax: dL/dz = p * (dL/dp - sum(p * dL/dp)).
        expected[r] = p[r] * (d_p - (p[r] * d_p).sum())
    torch.testing.assert_close(logits.grad, expected, rtol=1e-5, atol=1e-6)


def test_uld_ignores_which_token_is_which_and_is_bounded():
    s = logps(5, 9, 4)
    permuted = s[:, torch.randperm(9, generator=torch.Generator().manual_seed(0))]
    assert uld(s, permuted).abs().max() < 1e-6
    sure = torch.full((1, 9), -torch.inf)
    sure[0, 0] = 0.0
    flat = torch.full((1, 9), -torch.log(torch.tensor(9.0)))
    assert uld(sure, flat).item() == pytest.approx(2 * (1 - 1 / 9), rel=1e-5)
    assert float(uld(s, logps(5, 9, 8)).max()) <= 2.0


def test_uld_refuses_rows_that_do_not_pair():
    with pytest.raises(ValueError, match=r"one teacher row per student row, got \(3,\) and \(4,\)"):
        uld(logps(4, 5, 0), logps(3, 5, 1))


# --- hybrid ------------------------------------------------------------------------------------------


def identity_match(vocab: int) -> VocabMatch:
    ids = torch.arange(vocab)
    return VocabMatch(ids, ids, vocab, vocab)


def test_hybrid_with_one_vocabulary_is_the_forward_kl_in_value_and_gradient():
    logits = torch.randn(6, 12, generator=torch.Generator().manual_seed(5), requires_grad=True)
    t = logps(6, 12, 6)
    got = hybrid(F.log_softmax(logits, -1), t, identity_match(12))
    (grad,) = torch.autograd.grad(got.sum(), logits)
    want = forward_kl(F.log_softmax(logits, -1), t)
    (want_grad,) = torch.autograd.grad(want.sum(), logits)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, want_grad, rtol=1e-5, atol=1e-6)


def test_hybrid_with_nothing_shared_is_weighted_uld():
    s, t = logps(4, 7, 7), logps(4, 9, 8)
    none = VocabMatch(torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long), 7, 9)
    torch.testing.assert_close(hybrid(s, t, none, uld_weight=0.3), 0.3 * uld_reference(s, t), rtol=1e-5, atol=1e-6)


def test_hybrid_matched_and_unmatched_terms_by_hand():
    """Student ids 0..4, teacher ids 0..5; student 1 <-> teacher 4 and student 3 <-> teacher 0 match."""
    s, t = logps(3, 5, 9), logps(3, 6, 10)
    match = VocabMatch(torch.tensor([1, 3]), torch.tensor([4, 0]), 5, 6)
    p, q = t.exp(), s.exp()
    mass = p[:, [4, 0]].sum(-1)
    p_m, q_m = p[:, [4, 0]] / mass[:, None], q[:, [1, 3]] / q[:, [1, 3]].sum(-1, keepdim=True)
    kl = (p_m * (p_m / q_m).log()).sum(-1)
    free = uld_reference(s[:, [0, 2, 4]], t[:, [1, 2, 3, 5]])
    torch.testing.assert_close(hybrid(s, t, match, uld_weight=0.5), mass * kl + 0.5 * free, rtol=1e-5, atol=1e-6)


def test_hybrid_counts_an_embeddings_padding_as_unmatched():
    """A model whose embedding is padded past its tokenizer: the pad ids' mass goes to the ULD term."""
    s = logps(2, 8, 11)  # tokenizer size 6, two padded ids
    t = logps(2, 6, 12)
    match = VocabMatch(torch.arange(6), torch.arange(6), 6, 6)
    p, q = t.exp(), s.exp()
    q_m = q[:, :6] / q[:, :6].sum(-1, keepdim=True)
    kl = (p * (p / q_m).log()).sum(-1)
    free = uld_reference(s[:, 6:], torch.full((2, 1), -torch.inf))
    torch.testing.assert_close(hybrid(s, t, match), kl + free, rtol=1e-5, atol=1e-6)


# --- vocabularies ------------------------------------------------------------------------------------


def metaspace_tokenizer(vocab_size: int = 300):
    """A SentencePiece-style vocabulary (``▁`` for a space), trained on the test corpus like a domain team's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from tests.conftest import corpus_text

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator([corpus_text()], trainer=trainers.BpeTrainer(vocab_size=vocab_size,
                                                                        special_tokens=["<unk>", "<s>", "</s>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_token_bytes_reads_both_spellings_of_a_space():
    byte_level, spm = build_tokenizer(), metaspace_tokenizer()
    checked = 0
    for tok in (byte_level, spm):
        table = token_bytes(tok)
        assert set(table) == set(tok.get_vocab().values())
        prefix = tok.convert_tokens_to_ids(["a"])
        for index, raw in table.items():
            if index in tok.all_special_ids:
                assert raw == b"\xff" + tok.convert_ids_to_tokens(index).encode()
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:  # a lone byte of a longer character
                continue
            # After a prefix, so that no decoder drops a leading space: the token's text follows it.
            assert tok.decode(prefix + [index]) == "a" + text, (tok.convert_ids_to_tokens(index), text)
            checked += 1
    spm_table = token_bytes(spm)
    assert any(b.startswith(b" ") for b in spm_table.values())
    assert checked > 500


def test_two_different_tokenizers_match_only_what_they_share():
    a, b = build_tokenizer(384), metaspace_tokenizer(300)
    match = vocab_matches(a, b)
    a_bytes, b_bytes = token_bytes(a), token_bytes(b)
    assert 0 < len(match.student) < min(len(a), len(b)) and not match.identical
    for s_id, t_id in zip(match.student.tolist(), match.teacher.tolist()):
        assert a_bytes[s_id] == b_bytes[t_id]
    unmatched = set(range(len(a))) - set(match.student.tolist())
    assert all(a_bytes[i] not in set(b_bytes.values()) for i in unmatched)
    assert vocab_matches(a, a).identical


# --- alignment ---------------------------------------------------------------------------------------


def test_aligned_positions_pair_tokens_ending_at_one_character():
    # "the cat sat": student [the][ cat][ s][at], teacher [th][e c][at][ sat]
    s_ends, t_ends = [3, 7, 9, 11], [2, 5, 7, 11]
    assert aligned_positions(s_ends, t_ends) == ([1], [2])
    assert aligned_positions([1, 2, 3, 4], [1, 2, 3, 4]) == ([0, 1, 2], [0, 1, 2])
    assert aligned_positions([2, 2, 5, 9], [2, 5, 9]) == ([1, 2], [0, 1])  # an empty token: the last one counts


@pytest.mark.parametrize("text", ["To be, or not to be: that is the question.", "O Romeo, Romeo! wherefore art thou"])
def test_aligned_positions_on_two_real_tokenizations_predict_the_same_continuation(text):
    a, b = build_tokenizer(384), metaspace_tokenizer(300)
    ea = a(text, return_offsets_mapping=True, add_special_tokens=False)
    eb = b(text, return_offsets_mapping=True, add_special_tokens=False)
    s_pos, t_pos = aligned_positions([e for _, e in ea["offset_mapping"]], [e for _, e in eb["offset_mapping"]])
    assert s_pos and len(s_pos) == len(t_pos)
    for i, j in zip(s_pos, t_pos):
        # Both prefixes cover the same text, and both next tokens start right after it.
        assert ea["offset_mapping"][i][1] == eb["offset_mapping"][j][1]
        cut = ea["offset_mapping"][i][1]
        assert a.decode(ea["input_ids"][: i + 1]).rstrip() == text[:cut].rstrip()


def test_teacher_view_reads_a_student_block_as_the_teacher_would(corpus_dir):
    """A block of the byte-level student's tokens, cut anywhere in the corpus, seen by the Metaspace teacher:
    the aligned positions cover the same bytes of text on both sides, and the teacher's tokens spell that text."""
    from slimforge.distill.cross_vocab import teacher_view

    student, teacher = build_tokenizer(384), metaspace_tokenizer(300)
    text = "".join(p.read_text() for p in sorted(corpus_dir.glob("*.txt")))[:4000]
    ids = student(text, add_special_tokens=False)["input_ids"]
    table = token_bytes(student)
    checked = 0
    for start in range(0, len(ids) - 64, 97):
        block = ids[start:start + 64]
        view = teacher_view(block, table, teacher)
        assert view.student_positions and len(view.student_positions) == len(view.teacher_positions)
        t_bytes = [token_bytes(teacher)[t] for t in view.teacher_ids]
        # The teacher's tokens spell the block's text (Metaspace adds a leading space of its own).
        assert b"".join(t_bytes).lstrip(b" ") == b"".join(table[i] for i in block).lstrip(b" ")
        for i, j in zip(view.student_positions, view.teacher_positions):
            s_prefix = b"".join(table[t] for t in block[: i + 1])
            t_prefix = b"".join(t_bytes[: j + 1])
            # Metaspace marks the text's first character with a space of its own: compare without it.
            assert s_prefix.lstrip(b" ") == t_prefix.lstrip(b" "), (s_prefix[-20:], t_prefix[-20:])
            checked += 1
    assert checked > 200


def test_teacher_view_drops_characters_cut_at_a_blocks_edges():
    """A block that starts and ends inside multi-byte characters: only whole characters reach the teacher."""
    from slimforge.distill.cross_vocab import teacher_view

    teacher = metaspace_tokenizer(300)
    table = {0: "é".encode()[1:], 1: b" to", 2: b" be", 3: "é".encode()[:1]}
    view = teacher_view([0, 1, 2, 3], table, teacher)
    assert teacher.decode(view.teacher_ids).strip() == "to be"
