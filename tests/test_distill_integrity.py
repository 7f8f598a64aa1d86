"""Integrity of distillation runs: which checkpoints a run may resume, the shared teacher cache,
data with nothing to learn, oversized students, and the checks made before any stage runs."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import REPO, build_model, cli_env
from transformers import AutoModelForCausalLM

from slimforge import cli
from slimforge.arch import keep_layers
from slimforge.config import DataConfig
from slimforge.data import build_data
from slimforge.distill import teacher_cache as tc
from slimforge.distill.checkpoints import setup_changes
from slimforge.distill.config import DistillConfig, LoraSpec, OnPolicySpec
from slimforge.distill.stages import check_student, warn_if_larger_than_teacher
from slimforge.distill.trainer import DistillTrainer, loss_token_count, require_loss_tokens
from slimforge.distill.wiring import KDObjective
from slimforge.errors import ConfigError, DataError, SlimforgeError

TINY_DISTILL = str(REPO / "tests" / "assets" / "recipes" / "tiny_distill.yaml")


@pytest.fixture()
def slimforge_log():
    """Records of the ``slimforge`` logger (which the CLI keeps from propagating to pytest's capture)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(level=logging.INFO)
    handler.emit = records.append
    logger = logging.getLogger("slimforge")
    previous = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield records
    logger.removeHandler(handler)
    logger.setLevel(previous)


def _messages(records, level=logging.WARNING):
    return [r.getMessage() for r in records if r.levelno >= level]


@pytest.fixture(scope="module")
def bundle(corpus_dir, tokenizer, tmp_path_factory):
    return build_data(DataConfig(path=str(corpus_dir), block_size=32, heldout_fraction=0.2), tokenizer,
                      cache_dir=tmp_path_factory.mktemp("data"))


# --- which checkpoints a run resumes ------------------------------------------------------------


def _train(teacher_dir, bundle, work, **overrides):
    """A 6-step run of a 2-layer student that checkpoints at steps 2 and 4; returns (result, trainer)."""
    cfg = DistillConfig(**{"steps": 6, "batch_size": 4, "lr": 3e-3, "warmup_steps": 0, "eval_every": 100,
                           "eval_blocks": 4, "checkpoint_every": 2, "precision": "fp32", **overrides})
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    student = AutoModelForCausalLM.from_pretrained(teacher_dir)
    keep_layers(student, [0, 3])
    torch.manual_seed(0)
    trainer = DistillTrainer(cfg, student, bundle, work, None, seed=0, device=torch.device("cpu"), teacher=teacher)
    return trainer.train(), trainer


def _weights(result):
    return {k: v.detach().clone() for k, v in result.model.state_dict().items()}


def _same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def _checkpoints(work):
    return sorted(p.name for p in (work / "checkpoints").iterdir())


def test_a_changed_lr_discards_the_checkpoints_and_matches_a_fresh_run(teacher_dir, bundle, tmp_path,
                                                                        slimforge_log):
    work = tmp_path / "work"
    old, _ = _train(teacher_dir, bundle, work)
    # A finished 6-step run leaves what a run killed after step 5 leaves: checkpoints at 2 and 4.
    assert _checkpoints(work) == ["step-000002", "step-000004"]
    changed, _ = _train(teacher_dir, bundle, work, lr=1e-3)
    fresh, _ = _train(teacher_dir, bundle, tmp_path / "fresh", lr=1e-3)
    assert _same(_weights(changed), _weights(fresh))
    assert changed.losses == fresh.losses
    assert not _same(_weights(changed), _weights(old))
    warnings = _messages(slimforge_log)
    assert any("made under a different setup (lr 0.003 -> 0.001)" in m and "training from scratch" in m
               for m in warnings), warnings
    assert not any("resuming distillation" in m for m in _messages(slimforge_log, logging.INFO))
    assert (work / "checkpoints.stale" / "step-000004").is_dir()  # moved aside, not lost


@pytest.mark.parametrize(("override", "resumes"), [
    ({"steps": 8}, False),            # the LR schedule depends on steps
    ({"eval_blocks": 2}, False),      # the history would mix two evaluation sets
    ({"checkpoint_every": 3, "keep_checkpoints": 3, "log_every": 2}, True),  # how often it writes, not where it goes
])
def test_which_config_changes_invalidate_checkpoints(teacher_dir, bundle, tmp_path, slimforge_log, override, resumes):
    work = tmp_path / "work"
    _train(teacher_dir, bundle, work)
    _train(teacher_dir, bundle, work, **override)
    info = _messages(slimforge_log, logging.INFO)
    assert any("resuming distillation from" in m and "step-000004" in m for m in info) == resumes, info
    assert any("made under a different setup" in m for m in info) == (not resumes), info


def _truncate(path):
    os.truncate(path, path.stat().st_size // 2)


DAMAGE = {
    "truncated weights": lambda ckpt: _truncate(ckpt / "model.safetensors"),
    "truncated optimizer": lambda ckpt: _truncate(ckpt / "optimizer.bin"),
    "truncated RNG state": lambda ckpt: _truncate(next(ckpt.glob("random_states_*.pkl"))),
    "garbled trainer state": lambda ckpt: (ckpt / "trainer_state.json").write_text('{"step": 4, "hist'),
    "missing scheduler": lambda ckpt: (ckpt / "custom_checkpoint_0.pkl").unlink(),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(teacher_dir, bundle, tmp_path, slimforge_log,
                                                                  damage):
    work = tmp_path / "work"
    straight, _ = _train(teacher_dir, bundle, work)
    DAMAGE[damage](work / "checkpoints" / "step-000004")
    resumed, _ = _train(teacher_dir, bundle, work)
    info = _messages(slimforge_log, logging.INFO)
    assert any("step-000004 cannot be loaded" in m and "trying the one before" in m for m in info), info
    assert any("resuming distillation from" in m and "step-000002" in m for m in info), info
    assert resumed.losses == straight.losses
    assert _same(_weights(resumed), _weights(straight))


def test_no_loadable_checkpoint_means_training_from_scratch(teacher_dir, bundle, tmp_path, slimforge_log):
    work = tmp_path / "work"
    straight, _ = _train(teacher_dir, bundle, work)
    for ckpt in (work / "checkpoints").iterdir():
        _truncate(ckpt / "model.safetensors")
    again, trainer = _train(teacher_dir, bundle, work)
    assert trainer.resume_point() is None
    assert any("no distillation checkpoint" in m and "training from scratch" in m for m in _messages(slimforge_log))
    assert _same(_weights(again), _weights(straight))


def test_setup_changes_name_what_differs():
    old = {"config": {"lr": 0.003, "steps": 6, "lora": {"r": 8}}, "student": "a", "data": "d"}
    new = {"config": {"lr": 0.001, "steps": 6, "lora": {"r": 16}}, "student": "b", "data": "d"}
    assert setup_changes(old, new) == ["lora", "lr 0.003 -> 0.001", "student"]
    assert setup_changes({}, new) == ["made by an earlier slimforge that recorded no setup"]


def _distill_run(teacher_dir, corpus_dir, run_dir, *extra):
    return ["run", TINY_DISTILL, f"teacher.path={teacher_dir}", f"data.path={corpus_dir}", f"run_dir={run_dir}",
            "~eval.tasks.perplexity", *extra]


def test_a_new_student_shape_with_overwrite_trains_afresh(teacher_dir, corpus_dir, tmp_path, monkeypatch,
                                                          slimforge_log):
    calls = {"n": 0}
    real = KDObjective.__call__

    def poisoned(self, *args, **kwargs):
        loss, stats = real(self, *args, **kwargs)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] == 3 else loss), stats

    run_dir = tmp_path / "run"
    common = ("stages.heal.steps=4", "stages.heal.checkpoint_every=2")
    monkeypatch.setattr(KDObjective, "__call__", poisoned)
    assert cli.main(_distill_run(teacher_dir, corpus_dir, run_dir, "stages.student.num_layers=2", *common)) == 2
    assert (run_dir / "work" / "heal" / "checkpoints" / "step-000002").is_dir()  # of a 2-layer student
    monkeypatch.undo()
    code = cli.main(_distill_run(teacher_dir, corpus_dir, run_dir, "stages.student.num_layers=3", "overwrite=true",
                                 *common))
    assert code == 0
    assert any("made under a different setup" in m and "student" in m for m in _messages(slimforge_log))
    healed = AutoModelForCausalLM.from_pretrained(run_dir / "stages" / "heal")
    assert healed.config.num_hidden_layers == 3


# --- data with nothing to learn, oversized students, late checks made early ---------------------


def _chat_without_answers(path):
    rows = [{"messages": [{"role": "system", "content": "Be brief."},
                          {"role": "user", "content": f"Question {i} about the sonnets and the kings?"}]}
            for i in range(60)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_chat_data_without_assistant_turns_is_refused(tokenizer, tmp_path, chat_file):
    empty = build_data(DataConfig(path=str(_chat_without_answers(tmp_path / "q.jsonl")), block_size=32,
                                  heldout_fraction=0.2), tokenizer, cache_dir=tmp_path / "d1")
    assert loss_token_count(empty.train) == 0
    with pytest.raises(DataError, match="none of the .* training blocks has a token the loss counts"):
        require_loss_tokens(DistillConfig(), empty)
    require_loss_tokens(DistillConfig(on_policy=OnPolicySpec(fraction=1.0)), empty)  # generated batches mask themselves
    answered = build_data(DataConfig(path=str(chat_file), block_size=32, heldout_fraction=0.2), tokenizer,
                          cache_dir=tmp_path / "d2")
    masks = np.asarray(answered.train.with_format("numpy")["loss_mask"])
    assert loss_token_count(answered.train) == int(masks.sum()) > 0
    require_loss_tokens(DistillConfig(), answered)


def test_a_student_larger_than_its_teacher_gets_one_warning(tokenizer, slimforge_log):
    teacher = build_model("llama", tokenizer, layers=2)
    larger = build_model("llama", tokenizer, layers=3)
    warn_if_larger_than_teacher(larger, teacher.config)
    warn_if_larger_than_teacher(teacher, teacher.config)
    warn_if_larger_than_teacher(build_model("llama", tokenizer, layers=1), teacher.config)
    warnings = _messages(slimforge_log)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert warnings == [f"the student has more parameters than its teacher ({count(larger):,} vs {count(teacher):,}): "
                        "distillation will not make it smaller; give the student stage smaller sizes"]


def test_the_loaded_student_is_checked_before_training(tokenizer):
    """What planning cannot see (a student whose config is unknown until it loads) fails on load, in one line."""
    student, teacher = build_model("llama", tokenizer, layers=2), build_model("llama", tokenizer, layers=4)
    bad_lora = DistillConfig(lora=LoraSpec(enabled=True, target_modules=["q_proj", "qkv_proj"]))
    with pytest.raises(ConfigError, match=r"stages\.heal\.lora\.target_modules=\['q_proj', 'qkv_proj'\]: "
                                          r"'qkv_proj' names no linear or embedding layer of the student \(llama\); "
                                          r"valid names: down_proj, embed_tokens, gate_proj, k_proj, lm_head"):
        check_student(bad_lora, student, teacher.config, None, "stages.heal")
    long_map = DistillConfig(hidden_weight=1.0, layer_map=[0, 1, 3])
    with pytest.raises(ConfigError, match=r"stages\.heal\.layer_map=\[0, 1, 3\]: .* the student has 2 layers, "
                                          r"the map lists 3"):
        check_student(long_map, student, teacher.config, None, "stages.heal")
    check_student(DistillConfig(hidden_weight=1.0, layer_map=[1, 3], lora=LoraSpec(enabled=True)), student,
                  teacher.config, None, "stages.heal")


# --- the shared teacher cache -------------------------------------------------------------------

CHILD = r"""
import json, os, signal, sys, time
from pathlib import Path
import datasets, numpy as np
from transformers import AutoModelForCausalLM
from slimforge.distill import teacher_cache as tc

teacher_dir, dest, ready, go, out, mode = sys.argv[1:7]
forwards = []
real = tc.teacher_buckets

def counted(*args, **kwargs):
    forwards.append(1)
    if mode == "die" and len(forwards) == 2:
        os.kill(os.getpid(), signal.SIGKILL)  # holding the entry's lock, halfway through
    time.sleep(0.2)  # hold the entry long enough for a second process to arrive
    return real(*args, **kwargs)

tc.teacher_buckets = counted
ids = np.random.default_rng(0).integers(3, 300, size=(10, 16)).tolist()
train, heldout = datasets.Dataset.from_dict({"input_ids": ids[:8]}), datasets.Dataset.from_dict({"input_ids": ids[8:]})
teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
Path(ready).touch()
while not Path(go).exists():
    time.sleep(0.01)
cache = tc.build_teacher_cache(teacher, train, heldout, list(range(8)), [0, 1], 8, 1.0, dest,
                               tc.cache_key("t", "d", 8, 1.0), "cpu", batch_size=2)
Path(out).write_text(json.dumps({"forwards": len(forwards), "rows": cache.meta["num_rows"]}))
"""


def _toy_splits():
    import datasets

    ids = np.random.default_rng(0).integers(3, 300, size=(10, 16)).tolist()
    return datasets.Dataset.from_dict({"input_ids": ids[:8]}), datasets.Dataset.from_dict({"input_ids": ids[8:]})


def _children(tmp_path, teacher_dir, dest, modes):
    """Start one cache-building process per mode, release them together, wait; returns (procs, outs)."""
    go = tmp_path / "go"
    procs, outs, readies = [], [], []
    for i, mode in enumerate(modes):
        ready, out = tmp_path / f"ready{i}", tmp_path / f"out{i}.json"
        procs.append(subprocess.Popen([sys.executable, "-c", CHILD, str(teacher_dir), str(dest), str(ready), str(go),
                                       str(out), mode], env=cli_env(), cwd=REPO, stderr=subprocess.PIPE, text=True))
        outs.append(out)
        readies.append(ready)
    deadline = time.monotonic() + 300
    while not all(r.exists() for r in readies) and time.monotonic() < deadline:
        assert all(p.poll() is None for p in procs), [p.stderr.read()[-2000:] for p in procs if p.poll() is not None]
        time.sleep(0.05)
    go.touch()
    for proc in procs:
        proc.wait(timeout=300)
    return procs, outs


def _assert_equal_caches(a, b):
    for split, blocks in (("train", list(range(8))), ("heldout", [0, 1])):
        for x, y in zip(a.lookup(split, blocks), b.lookup(split, blocks)):
            assert torch.equal(x, y)


def test_two_processes_building_one_entry_share_it(teacher_dir, tmp_path):
    dest = tmp_path / "entry"
    procs, outs = _children(tmp_path, teacher_dir, dest, ["build", "build"])
    assert [p.returncode for p in procs] == [0, 0], [p.stderr.read()[-3000:] for p in procs]
    results = [json.loads(o.read_text()) for o in outs]
    assert sorted(r["forwards"] for r in results) == [0, 5]  # one built all 5 batches; the other waited
    assert [r["rows"] for r in results] == [10, 10]
    train, heldout = _toy_splits()
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    fresh = tc.build_teacher_cache(teacher, train, heldout, list(range(8)), [0, 1], 8, 1.0, tmp_path / "fresh",
                                   tc.cache_key("t", "d", 8, 1.0), "cpu", batch_size=2)
    _assert_equal_caches(tc.open_teacher_cache(dest), fresh)


def test_a_killed_builder_leaves_no_lock_and_its_rows_are_resumed(teacher_dir, tmp_path, monkeypatch):
    dest = tmp_path / "entry"
    procs, _ = _children(tmp_path, teacher_dir, dest, ["die"])
    assert procs[0].returncode == -9
    forwards = []
    real = tc.teacher_buckets
    monkeypatch.setattr(tc, "teacher_buckets", lambda *a, **k: forwards.append(1) or real(*a, **k))
    train, heldout = _toy_splits()
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    key = tc.cache_key("t", "d", 8, 1.0)
    resumed = tc.build_teacher_cache(teacher, train, heldout, list(range(8)), [0, 1], 8, 1.0, dest, key, "cpu",
                                     batch_size=2)
    assert len(forwards) == 4  # the first batch was written before the kill
    monkeypatch.setattr(tc, "teacher_buckets", real)
    fresh = tc.build_teacher_cache(teacher, train, heldout, list(range(8)), [0, 1], 8, 1.0, tmp_path / "fresh", key,
                                   "cpu", batch_size=2)
    _assert_equal_caches(resumed, fresh)


def test_an_entry_serves_shorter_runs_and_grows_for_longer_ones(teacher_dir, tmp_path):
    train, heldout = _toy_splits()
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    key = tc.cache_key("t", "d", 8, 1.0)
    loads = []

    def load():
        loads.append(1)
        return teacher

    def ensure(dest, train_blocks, heldout_blocks):
        return tc.ensure_cached(load, train, heldout, train_blocks, heldout_blocks, 8, 1.0, dest, key, "cpu",
                                batch_size=3)

    short = ensure(tmp_path / "entry", [5, 1, 2], [0])
    first_rows = (np.array(short.ids), np.array(short.logp))
    assert (len(loads), short.meta["num_rows"]) == (1, 4)
    subset = ensure(tmp_path / "entry", [2, 5], [0])  # a shorter run: every block is there already
    assert (len(loads), subset.meta["num_rows"]) == (1, 4)
    grown = ensure(tmp_path / "entry", list(range(8)), [0, 1])  # a longer one adds only what is new
    assert (len(loads), grown.meta["num_rows"]) == (2, 10)
    np.testing.assert_array_equal(np.asarray(grown.ids[:4]), first_rows[0])
    np.testing.assert_array_equal(np.asarray(grown.logp[:4]), first_rows[1])
    _assert_equal_caches(grown, ensure(tmp_path / "fresh", list(range(8)), [0, 1]))


def test_bytes_per_token_follow_the_id_width():
    assert tc.ids_dtype_for(65_536) == "uint16" and tc.ids_dtype_for(65_537) == "int32"
    assert tc.bytes_per_token("uint16", 32) == 130
    assert tc.bytes_per_token("int32", 32) == 194


def test_a_refused_cache_build_is_a_one_line_error(tmp_path):
    with pytest.raises(SlimforgeError, match="holds no committed slimforge teacher cache"):
        tc.open_teacher_cache(tmp_path)
