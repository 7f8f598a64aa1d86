"""Every stage that works for more than a moment drives the one progress bar, with a total (so an ETA).

The bars are recorded, not read off the console: ``slimforge.progress.progress_bar`` builds
``tqdm.auto.tqdm`` at call time, so a recording subclass sees each bar's label, total, unit
and how far it got.
"""

from __future__ import annotations

import json

import pytest
import torch
import tqdm.auto
from conftest import REPO, build_model

from slimforge import cli
from slimforge.progress import LOG_INTERVAL_S, progress_bar, progress_enabled

TINY_COMPRESS = str(REPO / "tests" / "assets" / "recipes" / "tiny_compress.yaml")


@pytest.fixture
def bars(monkeypatch) -> dict[str, list[dict]]:
    """desc -> one record per bar made: its total, unit, and the count it reached when closed."""
    made: dict[str, list[dict]] = {}

    class Recording(tqdm.auto.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.record = {"total": kwargs.get("total"), "unit": kwargs.get("unit"), "n": None}
            made.setdefault(kwargs.get("desc"), []).append(self.record)

        def close(self):
            self.record["n"] = self.n
            super().close()

    monkeypatch.delenv("SLIMFORGE_PROGRESS", raising=False)
    monkeypatch.setattr(tqdm.auto, "tqdm", Recording)
    return made


def compress(teacher_dir, corpus_dir, run_dir, pipeline: str) -> None:
    args = ["run", TINY_COMPRESS, f"teacher.path={teacher_dir}", f"data.path={corpus_dir}", f"run_dir={run_dir}",
            f"pipeline=[{pipeline}]"]
    assert cli.main(args) == 0
    stages = json.loads((run_dir / "manifest.json").read_text())["stages"]
    assert {rec["status"] for rec in stages.values()} == {"done"}


def test_calibrated_prune_stages_and_gptq_tick_once_per_layer(bars, teacher_dir, corpus_dir, tmp_path):
    # The 4-layer teacher loses one layer to depth pruning; every later stage sees 3.
    compress(teacher_dir, corpus_dir, tmp_path / "run", "depth,width,magnitude,wanda,sparsegpt,gptq")
    expected = {"depth: block influence": 4, "width: importance": 3, "magnitude": 3, "wanda": 3, "sparsegpt": 3,
                "gptq": 3}
    for desc, layers in expected.items():
        assert bars.get(desc) == [{"total": layers, "unit": "layer", "n": layers}], (desc, bars)


def test_rtn_ticks_once_per_linear_and_gguf_once_per_tensor(bars, teacher_dir, corpus_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    compress(teacher_dir, corpus_dir, tmp_path / "rtn", "rtn")
    compress(teacher_dir, corpus_dir, tmp_path / "gguf", "gguf")
    model = AutoModelForCausalLM.from_pretrained(teacher_dir)
    linears = sum(isinstance(m, torch.nn.Linear) for layer in model.model.layers for m in layer.modules())
    assert linears == 4 * 7  # q, k, v, o, gate, up, down in each of the 4 blocks
    assert bars["rtn"] == [{"total": linears, "unit": "linear", "n": linears}]
    tensors = len(model.state_dict())  # untied embeddings: lm_head is a tensor of the file too
    assert bars["gguf export"] == [{"total": tensors, "unit": "tensor", "n": tensors}]


def test_angular_depth_scores_tick_once_per_layer(bars, tokenizer):
    from slimforge.prune.depth import depth_scores

    model = build_model("llama", tokenizer, layers=5)
    ids = torch.randint(0, len(tokenizer), (4, 16))
    scores = depth_scores(model, ids, "angular", span=2, batch_size=2)
    assert len(scores) == 4  # span starts 0..3
    assert bars["depth: angular distance"] == [{"total": 5, "unit": "layer", "n": 5}]


def test_bars_are_off_when_asked_and_on_other_ranks_but_still_iterate(monkeypatch):
    monkeypatch.delenv("SLIMFORGE_PROGRESS", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    assert progress_enabled()
    shown = progress_bar(range(3), desc="t", total=3)
    assert not shown.disable and list(shown) == [0, 1, 2]
    assert progress_bar(range(3), desc="t", total=3, enabled=False).disable  # the caller's own switch
    monkeypatch.setenv("SLIMFORGE_PROGRESS", "0")
    hidden = progress_bar(range(3), desc="t", total=3)
    assert hidden.disable and list(hidden) == [0, 1, 2]
    monkeypatch.setenv("SLIMFORGE_PROGRESS", "1")
    monkeypatch.setenv("RANK", "1")  # a second process of accelerate launch: rank 0 shows the bar
    assert not progress_enabled()


def test_a_bar_into_a_log_file_redraws_rarely(monkeypatch, tmp_path):
    monkeypatch.delenv("SLIMFORGE_PROGRESS", raising=False)
    with open(tmp_path / "log", "w") as log:
        monkeypatch.setattr("sys.stderr", log)
        bar = progress_bar(range(3), desc="t", total=3)
        assert bar.mininterval == LOG_INTERVAL_S
        list(bar)
    assert "t: 100%" in (tmp_path / "log").read_text()  # the finished bar is still written once


def test_distillation_ticks_once_per_step_and_its_teacher_cache_once_per_block(bars, teacher_dir, corpus_dir, tmp_path):
    recipe = str(REPO / "tests" / "assets" / "recipes" / "tiny_distill.yaml")
    args = ["run", recipe, f"teacher.path={teacher_dir}", f"data.path={corpus_dir}", "stages.student.num_layers=2",
            f"run_dir={tmp_path / 'run'}", "stages.heal.steps=3", "stages.heal.teacher_cache=true",
            "stages.heal.top_k=16", "~eval.tasks.perplexity"]
    assert cli.main(args) == 0
    assert bars["distill"] == [{"total": 3, "unit": "step", "n": 3}]
    [cache] = bars["teacher cache"]
    assert cache["unit"] == "block" and cache["total"] >= 3 * 4 and cache["n"] == cache["total"]
