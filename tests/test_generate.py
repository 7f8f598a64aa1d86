"""Teacher-generated data: prompts, seeded sampling, the cached entry (resume, growth, locking), dedup, plumbing."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import build_model, cli_env
from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from slimforge import cli
from slimforge.config import DataConfig, GenerateConfig
from slimforge.data import Source, TeacherHandle, blocks_tensor, build_data, data_fingerprint
from slimforge.errors import DataError
from slimforge.generate import deduplicate, ensure_generated, missing_batches, normalise
from slimforge.prompts import TEMPLATES, TOPICS, draw_prompts, general_prompts, read_prompt_file
from slimforge.sampling import generate_batch, pick_tokens, sample_generator

TINY_DISTILL = str(Path(__file__).parent / "assets" / "recipes" / "tiny_distill.yaml")
FAST = GenerateConfig(num_samples=12, max_new_tokens=12, batch_size=4, min_response_tokens=1)


@pytest.fixture(scope="module")
def teacher(tokenizer):
    return build_model("llama", tokenizer)


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    """A private slimforge cache: each test generates from scratch."""
    monkeypatch.setenv("SLIMFORGE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


class CountingTeacher:
    """Loads the teacher on demand, counting loads and generate calls; can fail after ``fail_after`` calls."""

    def __init__(self, model, fail_after: int | None = None) -> None:
        self.model, self.fail_after, self.loads, self.calls = model, fail_after, 0, 0
        self._generate = model.generate

    def __call__(self):
        self.loads += 1
        return self

    def generate(self, *args, **kwargs):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("killed")
        self.calls += 1
        return self._generate(*args, **kwargs)

    def __getattr__(self, name):  # everything else is the model's
        return getattr(self.model, name)


def _responses(corpus) -> list[tuple[int, str]]:
    return [(r["index"], r["response"]) for r in corpus.records]


# --- prompts ------------------------------------------------------------------------------------


def test_the_general_prompt_set_is_large_distinct_and_fixed():
    prompts = general_prompts()
    assert len(prompts) == len(TOPICS) * len(TEMPLATES) >= 1000
    assert len(set(prompts)) == len(prompts)
    assert all(p.strip() and "{" not in p for p in prompts)
    assert prompts == general_prompts()


def test_prompt_draws_are_seeded_prefix_stable_and_cycle_through_the_pool():
    pool = [f"p{i}" for i in range(10)]
    first = draw_prompts(pool, 0, 25, seed=3)
    assert first == draw_prompts(pool, 0, 25, seed=3)
    assert first[:7] == draw_prompts(pool, 0, 7, seed=3) and first[7:25] == draw_prompts(pool, 7, 25, seed=3)
    assert sorted(first[:10]) == sorted(pool) and sorted(first[10:20]) == sorted(pool)  # each pass sees every prompt
    assert first[:10] != first[10:20]  # ... in another order
    assert draw_prompts(pool, 0, 25, seed=4) != first


def test_prompt_files_txt_and_jsonl(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("First prompt\n\n  Second prompt  \n")
    assert read_prompt_file(txt) == ["First prompt", "Second prompt"]
    rows = [{"prompt": "Say hi."},
            {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a king."},
                          {"role": "assistant", "content": "Lear."}]}]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert read_prompt_file(jsonl) == ["Say hi.", rows[1]["messages"][:2]]  # the old answer is dropped
    jsonl.write_text('{"prompt": ""}\n')
    with pytest.raises(DataError, match=r"p\.jsonl:1: a prompt row needs"):
        read_prompt_file(jsonl)


# --- sampling -----------------------------------------------------------------------------------


def test_pick_tokens_is_inverse_cdf_and_never_picks_a_removed_token():
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5], [0.2, 0.0, 0.8, 0.0]])
    assert pick_tokens(probs, torch.tensor([0.0, 0.0])).flatten().tolist() == [1, 0]
    assert pick_tokens(probs, torch.tensor([0.49, 0.21])).flatten().tolist() == [1, 2]
    assert pick_tokens(probs, torch.tensor([0.51, 0.9999])).flatten().tolist() == [3, 2]
    draws = pick_tokens(probs[:1].expand(4000, 4), torch.rand(4000, generator=torch.Generator().manual_seed(0)))
    assert set(draws.flatten().tolist()) == {1, 3} and abs((draws == 1).float().mean().item() - 0.5) < 0.05


def _reference_sample(model, tokenizer, prompt: str, index: int, cfg: GenerateConfig) -> str:
    """The plainest sampler: the full sequence through the model at every step, no cache, no padding."""
    from slimforge.sampling import eos_ids, prompt_ids

    ids = torch.tensor([prompt_ids(prompt, tokenizer, chat=True)])
    gen, stop, new = sample_generator(cfg.seed, index), eos_ids(model, tokenizer), []
    warpers = [TemperatureLogitsWarper(cfg.temperature), *([TopKLogitsWarper(cfg.top_k)] if cfg.top_k else []),
               TopPLogitsWarper(cfg.top_p)]
    with torch.no_grad():
        for _ in range(cfg.max_new_tokens):
            scores = model(ids).logits[:, -1].float()
            for warper in warpers:
                scores = warper(ids, scores)
            token = pick_tokens(torch.softmax(scores, -1), torch.rand((), generator=gen).reshape(1))
            if token.item() in stop:
                break
            new.append(token.item())
            ids = torch.cat([ids, token], dim=1)
    return tokenizer.decode(new, skip_special_tokens=True)


@pytest.mark.parametrize("top_k", [0, 20])
def test_batched_cached_sampling_matches_a_plain_reference(teacher, tokenizer, top_k):
    cfg = replace(FAST, top_k=top_k, top_p=0.9, temperature=0.7)
    prompts = draw_prompts(general_prompts(), 0, 4, cfg.seed)
    batched = generate_batch(teacher, tokenizer, prompts, [0, 1, 2, 3], cfg, chat=True)
    assert [r["response"] for r in batched] == [_reference_sample(teacher, tokenizer, p, i, cfg)
                                                for i, p in enumerate(prompts)]


@pytest.mark.parametrize("do_sample", [True, False])
def test_a_sample_does_not_depend_on_the_batch_size(teacher, tokenizer, do_sample):
    cfg = replace(FAST, do_sample=do_sample)
    prompts = draw_prompts(general_prompts(), 0, 9, cfg.seed)  # prompts of different lengths: padding differs

    def run(batch_size: int) -> list[str]:
        out = []
        for start in range(0, 9, batch_size):
            stop = min(9, start + batch_size)
            out += [r["response"] for r in generate_batch(teacher, tokenizer, prompts[start:stop],
                                                          list(range(start, stop)), cfg, chat=True)]
        return out

    assert run(1) == run(4) == run(9)


# --- the cached entry -----------------------------------------------------------------------------


def test_generation_is_deterministic_for_a_seed_and_cached(teacher, tokenizer, cache, monkeypatch, tmp_path):
    loader = CountingTeacher(teacher)
    first = ensure_generated(FAST, tokenizer, "fp", loader)
    assert first.generated_now == 12 and loader.calls == 3 and len(first.records) == 12
    again = ensure_generated(replace(FAST, batch_size=5), tokenizer, "fp", loader)  # reused: nothing generated
    assert again.generated_now == 0 and loader.loads == 1 and _responses(again) == _responses(first)
    meta = json.loads((first.folder / "meta.json").read_text())
    assert meta["sampling"] == FAST.sampling() and meta["prompts"]["source"] == "general"
    summary = next(iter(meta["corpora"].values()))
    assert summary["samples"] == 12 and summary["generated_tokens"] > 0 and summary["tokens_per_s"] > 0
    monkeypatch.setenv("SLIMFORGE_CACHE", str(tmp_path / "elsewhere"))
    fresh = ensure_generated(replace(FAST, batch_size=5), tokenizer, "fp", CountingTeacher(teacher))
    assert _responses(fresh) == _responses(first)  # another cache, another batch size: the same corpus
    other = ensure_generated(replace(FAST, seed=1), tokenizer, "fp", CountingTeacher(teacher))
    assert other.folder != fresh.folder and _responses(other) != _responses(first)


def test_an_interrupted_generation_resumes_without_redoing_a_batch(teacher, tokenizer, cache, monkeypatch, tmp_path):
    killed = CountingTeacher(teacher, fail_after=2)
    with pytest.raises(KeyboardInterrupt):
        ensure_generated(FAST, tokenizer, "fp", killed)
    assert killed.calls == 2
    resumed = CountingTeacher(teacher)
    corpus = ensure_generated(FAST, tokenizer, "fp", resumed)
    assert resumed.calls == 1 and corpus.generated_now == 4  # only the batch in flight is redone
    monkeypatch.setenv("SLIMFORGE_CACHE", str(tmp_path / "clean"))
    assert _responses(corpus) == _responses(ensure_generated(FAST, tokenizer, "fp", CountingTeacher(teacher)))


def test_a_larger_corpus_appends_to_the_same_entry(teacher, tokenizer, cache):
    small = ensure_generated(replace(FAST, num_samples=6), tokenizer, "fp", CountingTeacher(teacher))
    larger = ensure_generated(FAST, tokenizer, "fp", CountingTeacher(teacher))
    assert larger.folder == small.folder and larger.generated_now == 6
    assert _responses(larger)[:6] == _responses(small)


def test_missing_batches_fill_the_gaps_in_runs_of_at_most_the_batch_size():
    assert missing_batches([], 10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert missing_batches([(0, 3), (5, 6)], 10, 4) == [(3, 5), (6, 10)]
    assert missing_batches([(0, 16)], 10, 4) == []


CONCURRENT = """
import logging, os, sys, time
sys.path.insert(0, {tests!r})
from conftest import build_model, build_tokenizer
from slimforge.config import GenerateConfig
from slimforge.generate import ensure_generated

logging.basicConfig(level=logging.INFO)
started, ready = {started!r}, {ready!r}
tok = build_tokenizer()
model = build_model("llama", tok)
plain = model.generate

def held_generate(*args, **kwargs):
    if not os.path.exists(started):  # first batch: the lock is held; wait until the other process comes for it
        open(started, "w").close()
        deadline = time.monotonic() + 120
        while not os.path.exists(ready) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.0)
    return plain(*args, **kwargs)

model.generate = held_generate
if sys.argv[1] == "second":
    open(ready, "w").close()
cfg = GenerateConfig(num_samples=8, max_new_tokens=8, batch_size=4, min_response_tokens=1)
corpus = ensure_generated(cfg, tok, "fp", lambda: model)
print("GENERATED", corpus.generated_now, len(corpus.records))
"""


def test_two_processes_one_generates_the_other_waits_and_reuses(tmp_path):
    started = tmp_path / "started"
    script = tmp_path / "gen.py"
    script.write_text(CONCURRENT.format(tests=str(Path(__file__).parent), started=str(started),
                                        ready=str(tmp_path / "ready")))
    env = {**cli_env(), "SLIMFORGE_CACHE": str(tmp_path / "cache"), "SLIMFORGE_PROGRESS": "0"}
    first = subprocess.Popen([sys.executable, str(script), "first"], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not started.exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    second = subprocess.run([sys.executable, str(script), "second"], env=env, capture_output=True, text=True,
                            timeout=300)
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0 and second.returncode == 0, err + second.stderr
    assert "GENERATED 8 8" in out and "GENERATED 0 8" in second.stdout
    assert "waiting for it to finish" in second.stderr


# --- deduplication ---------------------------------------------------------------------------------


def _record(index: int, response: str, tokens: int = 10) -> dict:
    return {"index": index, "prompt": "p", "response": response, "new_tokens": tokens, "finished": True}


def test_dedup_drops_repeats_ignoring_case_and_whitespace_and_near_empty_answers():
    records = [_record(0, "The sky is blue."), _record(1, "  the SKY is\nblue. "), _record(2, "   ", 3),
               _record(3, "Short.", 2), _record(4, "Another answer."), _record(5, "The sky is blue.")]
    kept, dropped = deduplicate(records, min_tokens=3)
    assert [r["index"] for r in kept] == [0, 4]
    assert dropped == {"duplicates": 2, "near_empty": 2}
    assert normalise("  A\tb\n C ") == "a b c"


def test_greedy_answers_to_one_repeated_prompt_are_deduplicated(teacher, tokenizer, cache, tmp_path):
    prompts = tmp_path / "one.txt"
    prompts.write_text("Tell me about the sea.\n")
    cfg = replace(FAST, prompts=str(prompts), num_samples=6, do_sample=False)
    corpus = ensure_generated(cfg, tokenizer, "fp", CountingTeacher(teacher))
    assert len(corpus.records) == 1 and corpus.summary["duplicates"] == 5 and corpus.summary["kept"] == 1


# --- the data source ----------------------------------------------------------------------------------


def _generated(**gen) -> DataConfig:
    return DataConfig(format="teacher_generated", block_size=32, heldout_fraction=0.2,
                      generate=replace(FAST, **gen))


def test_generated_text_packs_with_only_the_answers_in_the_loss(teacher, tokenizer, cache):
    handle = TeacherHandle("fp", CountingTeacher(teacher))
    chat = build_data(_generated(), tokenizer, teacher=handle)
    assert chat.stats["generation"]["kept"] == 12 and chat.stats["source"].startswith("teacher_generated:")
    mask = blocks_tensor(chat.train, column="loss_mask")
    assert 0 < mask.float().mean() < 1  # the rendered prompts are context, not targets
    plain = build_data(_generated(chat_template=False), tokenizer, teacher=handle)
    assert 0 < blocks_tensor(plain.train, column="loss_mask").float().mean() < 1
    answers = build_data(_generated(include_prompt=False), tokenizer, teacher=handle)
    assert blocks_tensor(answers.train, column="loss_mask").float().mean() == 1
    assert len({chat.fingerprint, plain.fingerprint, answers.fingerprint}) == 3


def test_cached_generated_data_never_loads_the_teacher(teacher, tokenizer, cache):
    build_data(_generated(), tokenizer, teacher=TeacherHandle("fp", CountingTeacher(teacher)))

    def refuse():
        raise AssertionError("the teacher was loaded although its text is cached")

    again = build_data(_generated(), tokenizer, teacher=TeacherHandle("fp", refuse))
    assert again.stats["generation"]["samples"] == 12
    # Only the packing changed: the generated entry is reused, not the teacher.
    repacked = build_data(replace(_generated(), block_size=16), tokenizer, teacher=TeacherHandle("fp", refuse))
    assert repacked.block_size == 16


def test_generated_data_needs_the_teacher(tokenizer, cache):
    with pytest.raises(DataError, match="needs the teacher"):
        build_data(_generated(), tokenizer)


def test_existing_formats_keep_their_data_fingerprints(tokenizer):
    """Fingerprints of the formats before generated data existed, pinned from that code: cached blocks stay valid."""
    source = Source("text", "loc", [], "abc123")
    pinned = {"ae286b77d07204f2": DataConfig(path="x"),
              "b82cec223b80e403": DataConfig(path="x", format="chat", block_size=64, seed=3),
              "c5eafc75ad93aa6b": DataConfig(asset="shakespeare", max_documents=5)}
    for expected, cfg in pinned.items():
        assert data_fingerprint(cfg, source, tokenizer) == expected
        cfg.generate = replace(cfg.generate, num_samples=7, temperature=0.3)  # read by generated data only
        assert data_fingerprint(cfg, source, tokenizer) == expected


# --- end to end ------------------------------------------------------------------------------------------


def test_a_distill_run_on_teacher_generated_data_records_how_it_was_made(teacher_dir, cache, tmp_path, capsys):
    run_dir = tmp_path / "run"
    code = cli.main(["run", TINY_DISTILL, f"teacher.path={teacher_dir}", "data=teacher_generated",
                     "data.block_size=32", "data.heldout_fraction=0.2", "data.generate.num_samples=16",
                     "data.generate.max_new_tokens=16", "data.generate.batch_size=8",
                     "data.generate.min_response_tokens=1", "stages.student.num_layers=2", "stages.heal.steps=2",
                     "dtype=float32", f"run_dir={run_dir}"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "generating 16 samples from the teacher" in err
    heal = run_dir / "stages" / "heal"
    meta = json.loads((heal / "slimforge.json").read_text())
    generation = meta["data"]["generation"]
    assert generation["sampling"] == {"max_new_tokens": 16, "do_sample": True, "temperature": 0.8, "top_p": 0.95,
                                      "top_k": 0, "seed": 0}
    assert generation["samples"] == 16 and generation["kept"] + generation["duplicates"] + generation["near_empty"] == 16
    assert meta["data"]["source"] == f"teacher_generated:{generation['key']}"
    assert (cache / "generated" / generation["key"] / "meta.json").is_file()
    card = (heal / "README.md").read_text()
    assert "teacher-generated text: 16 answers to prompts general (temperature 0.8, top-p 0.95, seed 0" in card
    assert f"corpus {generation['key']}" in card
    assert "num_samples: 16" in (heal / "recipe.yaml").read_text()
