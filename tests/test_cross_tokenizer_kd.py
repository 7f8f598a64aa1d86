"""Distillation across tokenizers, wired (slimforge/distill/cross_objective.py): a tiny teacher with the
test tokenizer, a student with a domain BPE of its own trained here on the corpus; alignment on the real
tokenizations, learning, teacher-cache parity, the stage, the student stage's own tokenizer."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, build_model, corpus_text
from transformers import AutoModelForCausalLM, AutoTokenizer

from slimforge import cli
from slimforge.config import DataConfig
from slimforge.data import blocks_tensor, build_data
from slimforge.distill.config import DistillConfig
from slimforge.distill.cross_objective import CrossTokenizerObjective, TeacherReader, hybrid_topk
from slimforge.distill.cross_vocab import hybrid, teacher_view, token_bytes, vocab_matches
from slimforge.distill.objective import teacher_buckets
from slimforge.distill.teacher_cache import cache_key, ensure_cached
from slimforge.distill.trainer import DistillTrainer

TINY_DISTILL = str(REPO / "tests" / "assets" / "recipes" / "tiny_distill.yaml")


def domain_tokenizer(vocab_size: int = 700):
    """A byte-level BPE of its own, trained on the corpus with the tokenizers library: other merges, other
    ids and another end-of-text token than the teacher's 384-token BPE. Its merges may cross words (no
    pre-tokenizing regex), so its tokens end where the teacher's do at some characters only."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([corpus_text()], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>")


@pytest.fixture(scope="module")
def student_tok():
    return domain_tokenizer()


@pytest.fixture(scope="module")
def student_bundle(corpus_dir, student_tok, tmp_path_factory):
    return build_data(DataConfig(path=str(corpus_dir), block_size=32, heldout_fraction=0.2), student_tok,
                      cache_dir=tmp_path_factory.mktemp("xtok-data"))


def student_model(student_tok, seed: int = 0):
    return build_model("llama", student_tok, layers=2, seed=seed).train()


def xtok_cfg(**overrides) -> DistillConfig:
    values = {"steps": 5, "batch_size": 4, "lr": 3e-3, "warmup_steps": 0, "eval_every": 100, "eval_blocks": 4,
              "checkpoint_every": 100, "precision": "fp32", "cross_tokenizer": {"loss": "uld", "top_k": 16}}
    values.update(overrides)
    from slimforge.distill.config import CrossTokenizerSpec

    values["cross_tokenizer"] = CrossTokenizerSpec(**values["cross_tokenizer"])
    return DistillConfig(**values)


def train_across(cfg, student_tok, teacher_tok, bundle, work, teacher=None, cache=None):
    student = student_model(student_tok)
    objective = CrossTokenizerObjective(cfg, student_tok, teacher_tok, teacher=teacher, cache=cache)
    trainer = DistillTrainer(cfg, student, bundle, work, None, seed=0, device=torch.device("cpu"),
                             teacher=teacher, cache=cache, objective=objective)
    before = trainer.evaluate(student)
    return before, trainer.train()


# --- the two tokenizers -------------------------------------------------------------------------


def test_the_two_tokenizers_really_differ(tokenizer, student_tok):
    match = vocab_matches(student_tok, tokenizer)
    assert len(student_tok) == 700 and len(tokenizer) == 384
    assert 0 < len(match.student) < len(tokenizer) and not match.identical
    text = "To be, or not to be: that is the question."
    assert student_tok(text)["input_ids"] != tokenizer(text)["input_ids"]


# --- alignment on real tokenizations --------------------------------------------------------------


def test_teacher_rows_sit_at_the_student_positions_that_end_at_the_same_character(sharp_teacher, tokenizer,
                                                                                    student_tok, student_bundle):
    """Each finite row is the teacher's prediction after exactly the text the student has read at that
    position; the other positions hold -inf (no counterpart)."""
    teacher = AutoModelForCausalLM.from_pretrained(sharp_teacher).eval()
    reader = TeacherReader(student_tok, tokenizer, top_k=8)
    ids = blocks_tensor(student_bundle.train, 6)
    top_ids, top_logp = reader.rows(teacher, ids)
    assert top_ids.shape == (6, 31, 8) and top_logp.shape == (6, 31, 9)
    s_bytes, t_bytes = token_bytes(student_tok), token_bytes(tokenizer)
    checked = 0
    for b, block in enumerate(ids.tolist()):
        view = teacher_view(block, s_bytes, tokenizer)
        finite = torch.isfinite(top_logp[b, :, 0]).nonzero().squeeze(-1).tolist()
        assert finite == view.student_positions and 8 <= len(finite) < 31  # most positions, not all
        logits = teacher(input_ids=torch.tensor([view.teacher_ids])).logits[0]
        pieces = [b"" if s_bytes[t].startswith(b"\xff") else s_bytes[t] for t in block]  # specials: no text
        front = next(n for n, byte in enumerate(b"".join(pieces) + b"a") if (byte & 0xC0) != 0x80)  # a cut character
        for i, j in zip(view.student_positions, view.teacher_positions):
            student_prefix = b"".join(pieces[: i + 1])[front:]
            assert b"".join(t_bytes[t] for t in view.teacher_ids[: j + 1]) == student_prefix
            want_ids, want_logp = teacher_buckets(logits[j: j + 1].float(), 8)
            assert top_ids[b, i].tolist() == want_ids[0].tolist()
            torch.testing.assert_close(top_logp[b, i], want_logp[0].half().float())
            checked += 1
        assert torch.isinf(top_logp[b, [p for p in range(31) if p not in finite]]).all()
    assert checked > 60


def test_hybrid_on_the_teachers_top_k_is_hybrid_on_its_dense_row(tokenizer, student_tok):
    """The compact hybrid equals cross_vocab.hybrid on the dense teacher row that is 0 beyond the top-k,
    in value and gradient."""
    match = vocab_matches(student_tok, tokenizer)
    g = torch.Generator().manual_seed(0)
    s_logits = (torch.randn(5, len(student_tok), generator=g) * 3).requires_grad_(True)
    t_logits = torch.randn(5, len(tokenizer), generator=g) * 3
    # Make the teacher's top-k hold matched and unmatched ids alike.
    t_logits[:, match.teacher[:6]] += 8.0
    top_ids, buckets = teacher_buckets(t_logits, 16)
    dense = torch.full((5, len(tokenizer)), -1e4).scatter(-1, top_ids, buckets[:, :-1])
    for uld_weight, top_k in ((1.0, 16), (0.5, 16), (0.0, None)):
        got = hybrid_topk(F.log_softmax(s_logits, -1), top_ids, buckets[:, :-1], match, uld_weight, top_k)
        (g_got,) = torch.autograd.grad(got.sum(), s_logits)
        want = hybrid(F.log_softmax(s_logits, -1), dense, match, uld_weight, top_k)
        (g_want,) = torch.autograd.grad(want.sum(), s_logits)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(g_got, g_want, rtol=1e-5, atol=1e-6)
        assert got.min() > 0


# --- training ------------------------------------------------------------------------------------


# ULD asks the student to be as sure as the teacher: quick to learn. Hybrid also asks which of the shared
# tokens, of a random (sharpened) teacher whose choices the text does not bear out, so it is taught by the
# teacher alone (ce_weight 0) and falls more slowly (measured: 0.60x and 0.88x in 30 steps).
@pytest.mark.parametrize(("loss", "ce_weight", "ratio"), [("uld", 1.0, 0.7), ("hybrid", 0.0, 0.95)])
def test_training_lowers_the_heldout_cross_tokenizer_loss(sharp_teacher, tokenizer, student_tok, student_bundle,
                                                          tmp_path, loss, ce_weight, ratio):
    teacher = AutoModelForCausalLM.from_pretrained(sharp_teacher).eval()
    cfg = xtok_cfg(steps=30, eval_every=30, cross_tokenizer={"loss": loss, "top_k": 16, "ce_weight": ce_weight})
    before, result = train_across(cfg, student_tok, tokenizer, student_bundle, tmp_path / "w", teacher=teacher)
    after = result.history[-1]
    assert after["eval_cross"] < ratio * before["eval_cross"], (before, after)
    if ce_weight:
        assert after["eval_ce_per_char"] < before["eval_ce_per_char"]
    assert 0.3 < after["eval_aligned"] < 1.0
    assert np.isclose(after["eval_ppl_per_char"], np.exp(after["eval_ce_per_char"]))
    assert result.losses[-1] < result.losses[0]


def test_a_zero_weight_trains_on_cross_entropy_alone(sharp_teacher, tokenizer, student_tok, student_bundle, tmp_path):
    """The cross-tokenizer term is what moves the student towards the teacher: without it, the held-out
    cross-tokenizer loss falls less than with it (same steps, same data)."""
    teacher = AutoModelForCausalLM.from_pretrained(sharp_teacher).eval()
    with_kd = train_across(xtok_cfg(steps=20, eval_every=20), student_tok, tokenizer, student_bundle,
                           tmp_path / "kd", teacher=teacher)[1].history[-1]
    ce_only = train_across(xtok_cfg(steps=20, eval_every=20, cross_tokenizer={"loss": "uld", "top_k": 16,
                                                                              "weight": 0.0}),
                           student_tok, tokenizer, student_bundle, tmp_path / "ce", teacher=teacher)[1].history[-1]
    assert with_kd["eval_cross"] < ce_only["eval_cross"]


@pytest.mark.parametrize("loss", ["uld", "hybrid"])
def test_the_teacher_cache_trains_identically_to_the_live_teacher(sharp_teacher, tokenizer, student_tok,
                                                                  student_bundle, tmp_path, loss):
    from slimforge.distill.stages import cache_plan

    teacher = AutoModelForCausalLM.from_pretrained(sharp_teacher).eval()
    cfg = xtok_cfg(steps=6, eval_every=3, cross_tokenizer={"loss": loss, "top_k": 16})
    reader = TeacherReader(student_tok, tokenizer, 16)
    train, heldout = cache_plan(cfg, student_bundle, 0)
    key = cache_key("teacher", student_bundle.fingerprint, 16, 1.0, reader.cache_extra)
    cache = ensure_cached(lambda: teacher, student_bundle.train, student_bundle.heldout, train, heldout, 16, 1.0,
                          tmp_path / "cache", key, "cpu", batch_size=3, rows=reader.rows)
    assert cache.ids.shape == (len(train) + len(heldout), 31, 16)
    live_before, live = train_across(cfg, student_tok, tokenizer, student_bundle, tmp_path / "a", teacher=teacher)
    cached_before, cached = train_across(cfg, student_tok, tokenizer, student_bundle, tmp_path / "b", cache=cache)
    assert live_before == cached_before
    assert live.losses == cached.losses and live.history == cached.history
    for a, b in zip(live.model.parameters(), cached.model.parameters()):
        assert torch.equal(a, b)


def test_a_cross_tokenizer_cache_is_keyed_apart(tokenizer, student_tok):
    """Never reused for a plain cache of the same teacher and data, nor for another student's tokenization;
    a plain key is what it always was."""
    from slimforge.distill.cross_objective import cross_cache_extra
    from slimforge.fsutil import stable_hash

    plain = cache_key("t", "d", 16, 1.0)
    assert plain == stable_hash([2, "t", "d", 16, 1.0])
    mine = cache_key("t", "d", 16, 1.0, cross_cache_extra(student_tok))
    other = cache_key("t", "d", 16, 1.0, cross_cache_extra(domain_tokenizer(500)))
    assert len({plain, mine, other}) == 3


# --- the stages, end to end ---------------------------------------------------------------------------


def xtok_run(teacher, corpus_dir, run_dir, *extra):
    return ["run", TINY_DISTILL, f"teacher.path={teacher}", f"data.path={corpus_dir}", f"run_dir={run_dir}",
            "student@stages.student=from_config", "stages.student.num_hidden_layers=2", "stages.student.tokenizer=domain_bpe",
            "stages.student.vocab_size=520", "stages.heal.cross_tokenizer.loss=uld",
            "stages.heal.cross_tokenizer.top_k=16", "~eval.tasks.perplexity", *extra]


@pytest.mark.parametrize("teacher_cache", [False, True])
def test_a_student_with_its_own_tokenizer_is_distilled_from_the_teacher(sharp_teacher, tokenizer, corpus_dir,
                                                                        tmp_path, teacher_cache):
    run_dir = tmp_path / "run"
    assert cli.main(xtok_run(sharp_teacher, corpus_dir, run_dir, "stages.heal.steps=12", "stages.heal.eval_every=12",
                             f"stages.heal.teacher_cache={str(teacher_cache).lower()}")) == 0
    student_dir, heal_dir = run_dir / "stages" / "student", run_dir / "stages" / "heal"
    own = AutoTokenizer.from_pretrained(heal_dir)
    assert len(own) <= 520 and own.get_vocab() != tokenizer.get_vocab()
    assert own.get_vocab() == AutoTokenizer.from_pretrained(student_dir).get_vocab()
    assert own.eos_token == tokenizer.eos_token  # the teacher's special tokens, its own ids
    model = AutoModelForCausalLM.from_pretrained(heal_dir)
    assert model.config.vocab_size == len(own)
    meta = json.loads((heal_dir / "slimforge.json").read_text())
    assert meta["distill"]["cross_tokenizer"] == {"loss": "uld", "student_vocab": len(own), "teacher_vocab": 384}
    assert (meta["distill"]["teacher_cache"] is not None) == teacher_cache
    before, after = meta["distill"]["before"], meta["distill"]["history"][-1]
    assert after["eval_cross"] < before["eval_cross"] and after["eval_ce_per_char"] < before["eval_ce_per_char"]
    student_meta = json.loads((student_dir / "slimforge.json").read_text())
    assert student_meta["tokenizer"]["kind"] == "domain_bpe"
    text = "Now is the winter of our discontent"
    assert own.decode(own(text)["input_ids"]) == text


def test_one_shared_tokenizer_warns_and_trains_the_plain_loss(sharp_teacher, corpus_dir, tmp_path, caplog):
    common = ["run", TINY_DISTILL, f"teacher.path={sharp_teacher}", f"data.path={corpus_dir}",
              "stages.student.num_layers=2", "stages.heal.steps=3", "~eval.tasks.perplexity"]
    with caplog.at_level(logging.WARNING):
        assert cli.main([*common, f"run_dir={tmp_path / 'x'}", "stages.heal.cross_tokenizer.loss=hybrid"]) == 0
    warned = [r.getMessage() for r in caplog.records if "cross_tokenizer" in r.getMessage()]
    assert len(warned) == 1 and "share one tokenizer" in warned[0] and "\n" not in warned[0]
    assert cli.main([*common, f"run_dir={tmp_path / 'plain'}"]) == 0

    def meta(run):
        return json.loads((tmp_path / run / "stages" / "heal" / "slimforge.json").read_text())["distill"]

    assert meta("x")["losses"] == meta("plain")["losses"] and "cross_tokenizer" not in meta("x")
    assert "eval_kl" in meta("x")["history"][-1]


def test_the_domain_tokenizer_is_trained_on_training_text_only(tokenizer, corpus_dir, tmp_path):
    from slimforge.distill.students import train_domain_tokenizer, training_texts

    bundle = build_data(DataConfig(path=str(corpus_dir), block_size=32, heldout_fraction=0.2), tokenizer,
                        cache_dir=tmp_path / "data")
    texts = training_texts(bundle, tokenizer)
    assert len(texts) == len(bundle.train)
    held = {tokenizer.decode(row, skip_special_tokens=True) for row in blocks_tensor(bundle.heldout).tolist()}
    assert not held & set(texts)
    own = train_domain_tokenizer(texts, 450, tokenizer)
    assert 300 < len(own) <= 450
    assert {own.eos_token, own.bos_token, own.pad_token} == {tokenizer.eos_token, tokenizer.bos_token,
                                                             tokenizer.pad_token}
    assert own.chat_template == tokenizer.chat_template
    again = train_domain_tokenizer(texts, 450, tokenizer)
    assert again.get_vocab() == own.get_vocab()
    sample = texts[0] + " é ∑"
    assert own.decode(own(sample, add_special_tokens=False)["input_ids"]) == sample


def test_a_student_tokenizer_that_cannot_spell_its_text_is_refused(student_tok):
    """Alignment reads the text from the tokens' bytes: a WordPiece tokenizer (## pieces, no spaces) cannot
    give it back, so the stage refuses it before training; the domain BPE passes."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from slimforge.distill.stages import check_student_vocabulary
    from slimforge.errors import ConfigError

    wp = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    wp.pre_tokenizer = pre_tokenizers.Whitespace()
    wp.train_from_iterator([corpus_text()], trainers.WordPieceTrainer(vocab_size=500, special_tokens=["[UNK]"]))
    wordpiece = PreTrainedTokenizerFast(tokenizer_object=wp, unk_token="[UNK]")
    config = build_model("llama", student_tok, layers=1).config
    check_student_vocabulary(student_tok, config)
    with pytest.raises(ConfigError, match="do not spell its text back byte for byte"):
        check_student_vocabulary(wordpiece, config)
    config.vocab_size = 100
    with pytest.raises(ConfigError, match=r"logits \(100\) do not cover its tokenizer's 700 tokens"):
        check_student_vocabulary(student_tok, config)


def test_a_pretrained_student_of_another_family_is_distilled_across_tokenizers(sharp_teacher, tokenizer, corpus_dir,
                                                                               student_tok, tmp_path, capsys):
    """A checkpoint with a tokenizer of its own (a Qwen3 with the domain BPE, the teacher a Llama with the test
    BPE) is refused without ``own_tokenizer``; with it, the heal stage distills it across tokenizers."""
    folder = tmp_path / "foreign-student"
    build_model("qwen3", student_tok, layers=2, seed=4).save_pretrained(folder)
    student_tok.save_pretrained(folder)
    common = ["run", TINY_DISTILL, f"teacher.path={sharp_teacher}", f"data.path={corpus_dir}",
              "student@stages.student=checkpoint", f"stages.student.path={folder}",
              "stages.heal.cross_tokenizer.loss=hybrid", "stages.heal.cross_tokenizer.top_k=16",
              "stages.heal.steps=10", "stages.heal.eval_every=10", "~eval.tasks.perplexity"]
    assert cli.main([*common, f"run_dir={tmp_path / 'refused'}"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("slimforge: error:")]
    assert len(err) == 1 and "set own_tokenizer: true" in err[0]
    assert not (tmp_path / "refused" / "stages").exists()
    run_dir = tmp_path / "run"
    assert cli.main([*common, f"run_dir={run_dir}", "stages.student.own_tokenizer=true"]) == 0
    heal_dir = run_dir / "stages" / "heal"
    assert AutoTokenizer.from_pretrained(heal_dir).get_vocab() == student_tok.get_vocab()
    meta = json.loads((heal_dir / "slimforge.json").read_text())["distill"]
    assert meta["cross_tokenizer"]["loss"] == "hybrid" and meta["cross_tokenizer"]["student_vocab"] == len(student_tok)
    before, after = meta["before"], meta["history"][-1]
    assert after["eval_cross"] < before["eval_cross"]


def test_two_cpu_processes_distill_across_tokenizers_like_one(sharp_teacher, corpus_dir, tmp_path):
    """DDP over gloo: 2 ranks x 2 blocks of student tokens reach the weights of 1 process x 4 blocks, with the
    teacher re-reading each rank's blocks at the aligned positions."""
    import os
    import shutil
    import subprocess
    import sys

    from conftest import cli_env

    launcher = shutil.which("accelerate", path=os.path.dirname(sys.executable))
    assert launcher, "accelerate's launcher is installed with the package"
    common = [a for a in xtok_run(sharp_teacher, corpus_dir, tmp_path / "ddp", "stages.heal.steps=3",
                                  "stages.heal.eval_every=3", "stages.heal.precision=fp32", "dtype=float32",
                                  "stages.heal.cross_tokenizer.loss=hybrid") if a != "stages.heal.cross_tokenizer.loss=uld"]
    proc = subprocess.run([launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "slimforge", *common[:1],
                           *common[1:], "stages.heal.batch_size=2"],
                          capture_output=True, text=True, env=cli_env(), cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "ddp" / "manifest.json").read_text())["stages"]["heal"]["metrics"]
    assert metrics["world_size"] == 2 and metrics["ranks_agree"] is True
    single = [a.replace(str(tmp_path / "ddp"), str(tmp_path / "single")) for a in common]
    assert cli.main([*single, "stages.heal.batch_size=4"]) == 0
    meta = json.loads((tmp_path / "ddp" / "stages" / "heal" / "slimforge.json").read_text())["distill"]
    assert meta["cross_tokenizer"]["loss"] == "hybrid"
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "ddp" / "stages" / "heal")
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "single" / "stages" / "heal")
    start = AutoModelForCausalLM.from_pretrained(tmp_path / "single" / "stages" / "student")
    moved = max(float((y - s).abs().max()) for y, s in zip(b.parameters(), start.parameters()))
    assert moved > 1e-3  # training moved the weights, so agreeing below is not agreeing on nothing
    for (name, x), (_, y) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5, msg=name)


def test_the_cross_loss_of_a_batch_does_not_depend_on_how_its_blocks_are_split():
    """Reference: each block's mean over its rows, then the mean over blocks; split into halves it is unchanged."""
    from slimforge.distill.cross_objective import per_block_mean

    torch.manual_seed(0)
    positions, blocks = 7, 4
    rows = torch.tensor(sorted(torch.randperm(blocks * positions)[:11].tolist()))
    values = torch.rand(len(rows), requires_grad=True)
    got = per_block_mean(values, rows, positions, blocks)
    ref = sum(values[rows // positions == b].mean() if (rows // positions == b).any() else 0.0
              for b in range(blocks)) / blocks
    torch.testing.assert_close(got, ref)
    first = rows < 2 * positions
    halves = (per_block_mean(values[first], rows[first], positions, 2)
              + per_block_mean(values[~first], rows[~first] - 2 * positions, positions, 2)) / 2
    torch.testing.assert_close(halves, got)
    (g1,) = torch.autograd.grad(got, values)
    (g2,) = torch.autograd.grad(ref, values)
    torch.testing.assert_close(g1, g2)


def test_an_moe_student_across_tokenizers_keeps_its_router_loss(tokenizer, student_tok):
    """Loss = the plain cross-tokenizer loss + coef x the family's own aux loss (what ``aux_loss`` holds)."""
    from conftest import build_moe_model

    student = build_moe_model("qwen3_moe", student_tok, layers=2).train()
    student.config.router_aux_loss_coef = 0.5
    objective = CrossTokenizerObjective(xtok_cfg(cross_tokenizer={"loss": "hybrid", "top_k": 4}), student_tok,
                                        tokenizer, teacher=build_model("llama", tokenizer, layers=1))
    torch.manual_seed(0)
    ids = torch.randint(3, len(student_tok), (2, 10))
    rows = 2 * 9
    top_ids = torch.randint(0, len(tokenizer), (rows, 4))
    top_logp = torch.log_softmax(torch.randn(rows, 5), dim=-1)
    top_logp[::3] = float("-inf")  # some positions have no teacher counterpart
    targets = {"top_ids": top_ids, "top_logp": top_logp}
    loss, stats = objective(student, None, ids, torch.ones_like(ids), None, targets)
    reference = student(input_ids=ids, output_router_logits=True).aux_loss.detach()
    assert stats["router_aux"] == pytest.approx(float(reference), rel=1e-5) and float(reference) > 0
    student.config.router_aux_loss_coef = 0.0
    plain, plain_stats = objective(student, None, ids, torch.ones_like(ids), None, targets)
    assert "router_aux" not in plain_stats
    assert float(loss) == pytest.approx(float(plain) + 0.5 * float(reference), rel=1e-5)
