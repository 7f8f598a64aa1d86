"""Pure functions of the eval package, against simple references: fidelity, statistics, Pareto, gate, scores."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from slimforge.config import GateConfig
from slimforge.errors import ConfigError
from slimforge.eval.fidelity import (
    answer_flips,
    choice_agreement,
    kl_summary,
    token_kl,
    top1_agreement,
)
from slimforge.eval.gate import check_gate, exit_code, parse_min_retained
from slimforge.eval.generation import chrf, cut_at_stop, rouge_l
from slimforge.eval.harness import subset_indices
from slimforge.eval.html import pareto_front
from slimforge.eval.stats import (
    ItemScores,
    aggregate,
    bootstrap_mean_ci,
    paired_bootstrap_ratio,
    ratio,
)

# --- fidelity ------------------------------------------------------------------------------


def test_token_kl_matches_torch_distributions():
    torch.manual_seed(0)
    t, s = torch.randn(3, 5, 11), torch.randn(3, 5, 11)
    expected = torch.distributions.kl_divergence(
        torch.distributions.Categorical(logits=t.double()), torch.distributions.Categorical(logits=s.double()))
    torch.testing.assert_close(token_kl(t, s).double(), expected, rtol=1e-5, atol=1e-6)
    assert torch.all(token_kl(t, t) < 1e-6)  # KL(p || p) = 0
    # Not symmetric: the direction is teacher || student.
    assert not torch.allclose(token_kl(t, s), token_kl(s, t))


def test_top1_agreement_and_kl_summary():
    t = torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 0.0]])
    s = torch.tensor([[0.0, 1.0, 2.0], [1.0, 0.5, 0.0]])
    assert top1_agreement(t, s).tolist() == [False, True]
    values = torch.arange(101, dtype=torch.float32)
    summary = kl_summary(values)
    assert summary["kl_mean"] == pytest.approx(50.0)
    assert summary["kl_p50"] == pytest.approx(np.percentile(values.numpy(), 50))
    assert summary["kl_p90"] == pytest.approx(np.percentile(values.numpy(), 90))
    assert summary["kl_p99"] == pytest.approx(np.percentile(values.numpy(), 99))
    assert summary["kl_max"] == 100.0


def test_answer_flips_count_each_direction():
    teacher = [1, 1, 0, 0, 1, 0]
    student = [1, 0, 1, 0, 0, 0]
    flips = answer_flips(teacher, student)
    assert (flips["lost"], flips["gained"], flips["net"], flips["items"]) == (2, 1, -1, 6)
    assert flips["flip_rate"] == pytest.approx(0.5)
    assert choice_agreement([0, 1, 2, 3], [0, 1, 3, 3]) == 0.75
    with pytest.raises(ValueError):
        answer_flips([1], [1, 0])


# --- statistics ----------------------------------------------------------------------------


def test_aggregate_mean_weighted_and_exp():
    values, weights = np.array([1.0, 3.0]), np.array([1.0, 3.0])
    assert aggregate(values, None, "mean") == 2.0
    assert aggregate(values, weights, "mean") == pytest.approx(2.5)
    assert aggregate(values, weights, "exp") == pytest.approx(math.exp(2.5))
    assert aggregate(np.stack([values, values]), None, "mean").tolist() == [2.0, 2.0]


def test_ratio_direction():
    assert ratio(0.5, 0.4, higher_is_better=True) == pytest.approx(0.8)
    assert ratio(10.0, 12.5, higher_is_better=False) == pytest.approx(0.8)
    assert ratio(0.0, 0.3, higher_is_better=True) is None


def test_paired_bootstrap_interval():
    rng = np.random.default_rng(0)
    teacher = ItemScores(rng.integers(0, 2, 400).astype(float).tolist())
    student = ItemScores([v if rng.random() > 0.1 else 0.0 for v in teacher.values])
    point = ratio(np.mean(teacher.values), np.mean(student.values), True)
    low, high = paired_bootstrap_ratio(teacher, student, True, n_boot=500, seed=1)
    assert low < point < high <= 1.0  # the student only lost items: never above the teacher
    assert paired_bootstrap_ratio(teacher, student, True, n_boot=500, seed=1) == (low, high)
    assert paired_bootstrap_ratio(teacher, teacher, True, n_boot=200) == (1.0, 1.0)
    # Pairing matters: the paired interval is narrower than resampling the two independently.
    independent = []
    for b in range(500):
        r = np.random.default_rng(b)
        t = np.asarray(teacher.values)[r.integers(0, 400, 400)].mean()
        s = np.asarray(student.values)[r.integers(0, 400, 400)].mean()
        independent.append(s / t)
    assert high - low < np.quantile(independent, 0.975) - np.quantile(independent, 0.025)
    assert paired_bootstrap_ratio(teacher, ItemScores([1.0]), True) is None


def test_paired_bootstrap_perplexity_is_teacher_over_student():
    teacher = ItemScores([2.0, 2.2, 1.8, 2.1], None, "exp")
    student = ItemScores([2.5, 2.6, 2.4, 2.7], None, "exp")
    low, high = paired_bootstrap_ratio(teacher, student, False, n_boot=300)
    point = math.exp(np.mean(teacher.values)) / math.exp(np.mean(student.values))
    assert low <= point <= high < 1.0


def test_bootstrap_mean_ci_contains_mean():
    low, high = bootstrap_mean_ci([0.1, 0.2, 0.3, 0.4, 0.5], n_boot=300)
    assert low <= 0.3 <= high
    assert bootstrap_mean_ci([]) is None


def test_subset_indices_are_fixed_random_and_sorted():
    first = subset_indices(1000, 20, seed=1234, task_name="hellaswag")
    assert first == subset_indices(1000, 20, seed=1234, task_name="hellaswag")
    assert first == sorted(first) and len(set(first)) == 20
    assert first != list(range(20))  # not lm-eval's "first N"
    assert first != subset_indices(1000, 20, seed=1, task_name="hellaswag")
    assert first != subset_indices(1000, 20, seed=1234, task_name="piqa")
    assert subset_indices(10, 20, seed=0, task_name="x") is None
    assert subset_indices(10, None, seed=0, task_name="x") is None


# --- Pareto front --------------------------------------------------------------------------


def test_pareto_front():
    points = [("teacher", 100.0, 1.0), ("a", 50.0, 0.9), ("b", 60.0, 0.85), ("c", 20.0, 0.7), ("d", 20.0, 0.6)]
    assert pareto_front(points) == ["c", "a", "teacher"]  # b: a is smaller and better; d: c is as small and better


# --- generation scores ---------------------------------------------------------------------


def test_rouge_l_and_chrf_against_hand_values():
    assert rouge_l(["the cat sat"], ["the cat sat"]) == [1.0]
    # LCS("the cat sat on the mat", "the cat lay on a mat") = the cat on mat = 4; P = 4/6, R = 4/6.
    assert rouge_l(["the cat sat on the mat"], ["the cat lay on a mat"])[0] == pytest.approx(4 / 6)
    assert rouge_l(["xyz"], ["abc"]) == [0.0]
    assert chrf(["bonjour le monde"], ["bonjour le monde"])[0] == pytest.approx(100.0)
    close, far = chrf(["bonjour le monde", "bonjour"], ["bonjour la monde", "bonjour la monde"])
    assert 0 < far < close < 100
    assert cut_at_stop("a line\nmore", ["\n"]) == ("a line", "\n")
    assert cut_at_stop("no stop here", ["\n", "###"]) == ("no stop here", None)


# --- gate ----------------------------------------------------------------------------------


def fake_report(**retained):
    return {
        "primary": {"arc_easy": "acc_norm", "perplexity": "perplexity"},
        "retained": {"s": {"arc_easy.acc_norm": retained.get("arc", 0.97), "arc_easy.acc": 0.8,
                           "perplexity.perplexity": retained.get("ppl", 0.9)}},
        "retained_ci": {"s": {"arc_easy.acc_norm": [0.9, 1.02]}},
        "fidelity": {"s": {"perplexity": {"kl_mean": 0.12, "top1_agreement": 0.85}}},
    }


def test_gate_verdicts():
    report = fake_report()
    assert check_gate(report, None)["status"] == "none"
    passed = check_gate(report, GateConfig(min_retained=0.85, max_kl=0.2, min_top1_agreement=0.8))
    assert passed["status"] == "pass" and passed["checked"] == 4 and passed["failures"] == []
    failed = check_gate(report, GateConfig(min_retained=0.95, max_kl=0.1))
    assert failed["status"] == "fail"
    assert failed["failures"] == ["s: perplexity.perplexity retained 0.9000 < 0.95",
                                  "s: perplexity.kl_mean 0.1200 > 0.1"]
    # A per-task threshold wins over the overall one; a per-metric one checks a non-gating metric too.
    per_task = check_gate(report, GateConfig(min_retained=0.95, min_retained_tasks={"perplexity": 0.85,
                                                                                     "arc_easy.acc": 0.9}))
    assert per_task["failures"] == ["s: arc_easy.acc retained 0.8000 < 0.9"]
    report["retained"]["s"]["arc_easy.acc_norm"] = None
    missing = check_gate(report, GateConfig(min_retained=0.5))
    assert missing["failures"] == ["s: arc_easy.acc_norm retained not measured (threshold 0.5)"]
    assert exit_code({"gate": missing}) == 1 and exit_code({"gate": passed}) == 0


def test_gate_fails_on_unmeasured_fidelity_and_without_students():
    report = fake_report()
    report["fidelity"]["s"] = {}
    assert check_gate(report, GateConfig(max_kl=1.0))["failures"] == ["s: kl_mean not measured (threshold 1)"]
    report["retained"] = {}
    with pytest.raises(ConfigError, match="no student"):
        check_gate(report, GateConfig(min_retained=0.9))


def test_parse_min_retained():
    assert parse_min_retained(["0.95", "arc_easy=0.9", "mmlu.acc=0.8"]) == (0.95, {"arc_easy": 0.9, "mmlu.acc": 0.8})
    assert parse_min_retained([]) == (None, {})
    with pytest.raises(ConfigError, match="not a number"):
        parse_min_retained(["arc_easy=high"])
    with pytest.raises(ConfigError, match="two overall values"):
        parse_min_retained(["0.9", "0.8"])


@pytest.mark.parametrize("kwargs, message", [
    ({"min_retained": 0.0}, r"min_retained=0\.0 is invalid: must be in \(0, 2\]"),
    ({"min_retained": 2.5}, r"min_retained=2\.5"),
    ({"min_retained": float("nan")}, r"min_retained=nan"),
    ({"min_retained_tasks": {"arc_easy": -1.0}}, r"min_retained_tasks\.arc_easy=-1\.0"),
    ({"max_kl": -0.1}, r"max_kl=-0\.1 is invalid: must be in \[0, 100\]"),
    ({"min_top1_agreement": 1.5}, r"min_top1_agreement=1\.5 is invalid: must be in \[0, 1\]"),
])
def test_gate_thresholds_out_of_range(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        GateConfig(**kwargs).check()


# --- content fingerprints ------------------------------------------------------------------


def test_content_fingerprint_follows_bytes_not_names_or_times(tmp_path):
    import os
    import shutil

    from slimforge.eval.fingerprint import content_fingerprint, model_kind

    model = tmp_path / "m"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"weights-1")
    (model / "config.json").write_text("{}")
    (model / "slimforge.json").write_text('{"created": "today"}')
    first = content_fingerprint(str(model))
    shutil.copytree(model, tmp_path / "copy")
    (tmp_path / "copy" / "slimforge.json").write_text('{"created": "tomorrow"}')  # provenance is not content
    (tmp_path / "copy" / "tensorboard").mkdir()  # nor are training logs (distillation writes event files)
    (tmp_path / "copy" / "tensorboard" / "events.out.tfevents.1").write_bytes(b"timestamped")
    assert content_fingerprint(str(tmp_path / "copy")) == first
    (tmp_path / "copy" / "extra.safetensors").write_bytes(b"more")  # a weight file anywhere else is
    assert content_fingerprint(str(tmp_path / "copy")) != first
    (model / "model.safetensors").write_bytes(b"weights-2")  # same size, new bytes
    os.utime(model / "model.safetensors", ns=(1, 1))
    assert content_fingerprint(str(model)) != first
    assert content_fingerprint("org/some-model") != content_fingerprint("org/some-model", revision="v2")
    assert model_kind(str(model)) == "hf" and model_kind("org/some-model") == "hub"
    assert model_kind(str(tmp_path / "x.gguf")) == "gguf"
