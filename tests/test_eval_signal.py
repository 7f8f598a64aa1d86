"""What a report may conclude: chance levels, no-signal tasks, kept / lost / inconclusive verdicts,
detectable differences, gap closed by a healing stage, KL and top-1 intervals, and the gate's refusal.

Report inputs are built from per-item scores of models with a known behaviour (one that guesses,
one that is always right, one that loses a known share of items); the chance level itself is also
checked through the real lm-eval path on tiny random models.
"""

from __future__ import annotations

import json
import math
import random
import re

import numpy as np
import pytest
from conftest import build_model

from slimforge.config import GateConfig
from slimforge.eval.config import HarnessTaskConfig
from slimforge.eval.gate import EXIT_ERROR, EXIT_FAIL, check_gate, exit_code
from slimforge.eval.harness import ItemChance, chance_level, harness_task, item_chance
from slimforge.eval.html import html_report
from slimforge.eval.report import build_report, markdown_report, task_fidelity
from slimforge.eval.runner import ModelEvalContext
from slimforge.eval.stats import ItemScores, gap_closed, paired_bootstrap_gap
from slimforge.eval.tables import MARKS_LEGEND
from slimforge.eval.verdicts import INCONCLUSIVE, KEPT, LOST, NO_SIGNAL, SIGNAL, verdict

FOUR = 0.25


def mc_result(correct: list[float], chance: float = FOUR, metric: str = "acc") -> dict:
    """A multiple-choice task result as the harness writes it, from per-item 0/1 scores."""
    return {"type": "lm_eval", "metric": metric, metric: float(np.mean(correct)), "items": len(correct),
            "per_item": {metric: ItemScores([float(c) for c in correct]).to_json()},
            "item_ids": [f"mc/{i}" for i in range(len(correct))], "higher_is_better": {metric: True},
            "chance": chance, "chance_basis": "1 / 4 choices", "chance_metrics": [metric]}


def ppl_result(nll: list[float]) -> dict:
    """A perplexity task result from per-block mean NLLs (no chance level)."""
    return {"type": "perplexity", "metric": "perplexity", "perplexity": math.exp(float(np.mean(nll))),
            "blocks": len(nll), "per_item": {"perplexity": ItemScores(list(nll), None, "exp").to_json()},
            "item_ids": [f"block/{i}" for i in range(len(nll))], "higher_is_better": {"perplexity": False}}


def record(tasks: dict, fingerprint: str | None = None, parent: str | None = None, params: int = 100) -> dict:
    return {"path": "m", "num_parameters": params, "tasks": tasks,
            "lineage": {"fingerprint": fingerprint, "parent": parent}}


def guesses(n: int, seed: int, p: float = FOUR) -> list[float]:
    """A model that answers at random: right with probability 1 / choices."""
    rng = np.random.default_rng(seed)
    return (rng.random(n) < p).astype(float).tolist()


# --- chance level ---------------------------------------------------------------------------


def test_chance_is_one_over_choices_and_the_majority_answer_where_labels_are_unbalanced():
    yes_no = (" no", " yes")
    unbalanced = [ItemChance(0.5, 1, yes_no)] * 7 + [ItemChance(0.5, 0, yes_no)] * 3
    assert chance_level(unbalanced) == (0.7, "majority answer 'yes' (7 of 10 items)")
    balanced = [ItemChance(0.5, 1, yes_no)] * 5 + [ItemChance(0.5, 0, yes_no)] * 5
    assert chance_level(balanced) == (0.5, "1 / 2 choices")
    # Answer positions are not classes when every item has its own options (ARC, HellaSwag): 1 / choices.
    own = [ItemChance(0.25, 0, (f" a{i}", f" b{i}", f" c{i}", f" d{i}")) for i in range(10)]
    assert chance_level(own) == (0.25, "1 / 4 choices")
    mixed = [ItemChance(1 / 3, 0, (" a", " b", " c")), ItemChance(0.5, 0, (" x", " y"))]
    assert chance_level(mixed)[0] == pytest.approx((1 / 3 + 1 / 2) / 2)
    assert chance_level([ItemChance(0.0)] * 3)[0] == 0.0


def test_item_chance_reads_lm_evals_logged_samples():
    args = [("Q:", " red"), ("Q:", " green"), ("Q:", " blue")]
    assert item_chance("multiple_choice", {"arguments": args, "target": 2}) == ItemChance(1 / 3, 2, (" red", " green", " blue"))
    assert item_chance("multiple_choice", {"arguments": args, "target": "green"}).gold == 1
    two_right = item_chance("multiple_choice", {"arguments": args, "target": [0, 2]})
    assert two_right.chance == pytest.approx(2 / 3) and two_right.gold is None
    # acc_mutual_info doubles the requests (conditional, then unconditional): three choices, not six.
    doubled = {"arguments": args + [("", " red"), ("", " green"), ("", " blue")], "target": 0,
               "metrics": ["acc", "acc_mutual_info"]}
    assert item_chance("multiple_choice", doubled).chance == pytest.approx(1 / 3)
    assert item_chance("multiple_choice", {"arguments": args, "target": 7}) == ItemChance(1 / 3, None, (" red", " green", " blue"))
    assert item_chance("loglikelihood", {"arguments": [("a", " b")], "target": " b"}) == ItemChance(0.0)
    assert item_chance("generate_until", {"arguments": [("a", {})]}) is None


# --- no signal ------------------------------------------------------------------------------


@pytest.fixture()
def guessing_report():
    """A teacher and a student that both guess on a 4-choice task of 400 items, beside a
    perplexity task where the student keeps a known share."""
    teacher = record({"mc": mc_result(guesses(400, 1)), "ppl": ppl_result([2.0] * 50)})
    student = record({"mc": mc_result(guesses(400, 2)), "ppl": ppl_result([2.0 + math.log(1.25)] * 50)})
    return build_report("t", {"teacher": teacher, "s": student})


def test_a_guessing_teacher_is_no_signal_and_left_out_of_the_mean(guessing_report):
    report = guessing_report
    signal = report["signal"]["mc.acc"]
    assert signal["status"] == NO_SIGNAL and signal["chance"] == FOUR
    assert signal["teacher_ci"][0] <= FOUR <= signal["teacher_ci"][1]
    assert report["tasks"]["mc"]["signal"] == NO_SIGNAL and "signal" not in report["tasks"]["ppl"]
    assert report["verdicts"]["s"]["mc.acc"] == NO_SIGNAL
    # The mean holds the perplexity task alone: teacher ppl / student ppl = 1 / 1.25.
    assert report["retained"]["s"]["ppl.perplexity"] == pytest.approx(0.8)
    assert report["summary"]["s"]["mean_retained"] == pytest.approx(0.8)
    md = markdown_report(report)
    assert re.search(r"\| mc \| lm_eval \| acc \| 400 \|.*\| 0\.250 \| 0\.\d+ \[0\.\d+, 0\.\d+\] \| no signal \|", md)
    assert re.search(r"\| s \| [\d.]+ \[[\d.]+, [\d.]+\] no signal \|", md)
    assert "no signal" in html_report(report)


def test_the_gate_skips_a_no_signal_task_under_an_overall_threshold_and_refuses_one_named_for_it(guessing_report):
    report = guessing_report
    overall = check_gate(report, GateConfig(min_retained=0.7))
    assert overall["status"] == "pass" and overall["checked"] == 1  # the perplexity task only
    assert overall["skipped"] == [
        f"mc is no signal ({report['signal']['mc.acc']['note']}); not gated — raise eval.limit (--limit) or drop the task"]
    assert re.fullmatch(r"teacher acc 0\.\d\d, 95% CI \[0\.\d\d, 0\.\d\d\] includes chance 0\.25",
                        report["signal"]["mc.acc"]["note"])
    named = check_gate(report, GateConfig(min_retained=0.7, min_retained_tasks={"mc": 0.9}))
    assert named["status"] == "error" and not named["passed"] and named["skipped"] == []
    assert re.fullmatch(r"mc is no signal \(teacher acc 0\.\d\d, 95% CI \[0\.\d\d, 0\.\d\d\] includes chance 0\.25\); "
                        r"its threshold 0\.9 cannot be checked — raise eval\.limit \(--limit\) or drop the task",
                        named["refused"][0])
    assert exit_code({"gate": named}) == EXIT_ERROR
    # A miss elsewhere still shows; the refusal decides the exit status.
    both = check_gate(report, GateConfig(min_retained=0.9, min_retained_tasks={"mc": 0.9}))
    assert both["failures"] == ["s: ppl.perplexity retained 0.8000 < 0.9, 95% CI [0.800, 0.800]"]
    assert exit_code({"gate": both}) == EXIT_ERROR


def test_a_model_card_does_not_say_pass_when_the_gate_refused(guessing_report):
    from slimforge.cards import CardInput, results_section

    report = dict(guessing_report, gate=check_gate(guessing_report, GateConfig(min_retained_tasks={"mc": 0.9})))
    card = "\n".join(results_section(CardInput(meta={}, location="s", lineage=[], base={}, files={},
                                                 report=report, label="s")))
    assert f"CI gate: ERROR for this model — {report['gate']['refused'][0]}." in card


def test_a_perfect_teacher_has_signal_and_a_perfect_student_kept_it():
    perfect = [1.0] * 200
    report = build_report("t", {"teacher": record({"mc": mc_result(perfect)}), "s": record({"mc": mc_result(perfect)})})
    assert report["signal"]["mc.acc"]["status"] == SIGNAL
    assert report["signal"]["mc.acc"]["note"] == "teacher acc 1.00, 95% CI [1.00, 1.00] above chance 0.25"
    assert report["retained_ci"]["s"]["mc.acc"] == [1.0, 1.0]
    assert report["verdicts"]["s"]["mc.acc"] == KEPT
    assert report["summary"]["s"]["mean_retained"] == 1.0
    assert check_gate(report, GateConfig(min_retained_tasks={"mc": 0.95}))["status"] == "pass"


def test_a_teacher_below_chance_is_no_signal_too():
    report = build_report("t", {"teacher": record({"mc": mc_result([0.0] * 100)}), "s": record({"mc": mc_result([0.0] * 100)})})
    assert report["signal"]["mc.acc"]["status"] == NO_SIGNAL
    assert "lies below chance 0.25" in report["signal"]["mc.acc"]["note"]


# --- verdicts and detectable differences ----------------------------------------------------


def test_verdict_against_the_threshold():
    assert verdict([0.92, 1.01], 0.9) == KEPT
    assert verdict([0.9, 1.0], 0.9) == KEPT  # at the threshold counts as kept
    assert verdict([0.70, 0.85], 0.9) == LOST
    assert verdict([0.85, 0.95], 0.9) == INCONCLUSIVE
    assert verdict(None, 0.9) is None


def _losing_student(n: int, lost_every: int) -> tuple[list[float], list[float]]:
    """A teacher right on 80% of n items, and a student that loses one of every ``lost_every`` of those."""
    teacher = ([1.0] * 4 + [0.0]) * (n // 5)
    right = [i for i, v in enumerate(teacher) if v]
    student = list(teacher)
    for i in right[::lost_every]:
        student[i] = 0.0
    return teacher, student


def test_inconclusive_kept_and_lost_students_against_the_default_threshold():
    teacher, close = _losing_student(200, 10)       # retained 0.9: the interval spans 0.9
    _, far = _losing_student(200, 2)                # retained 0.5
    _, near = _losing_student(200, 1000)            # retained 0.99 (one item lost)
    records = {"teacher": record({"mc": mc_result(teacher)}), "close": record({"mc": mc_result(close)}),
               "far": record({"mc": mc_result(far)}), "near": record({"mc": mc_result(near)})}
    report = build_report("t", records)
    assert report["retained"]["close"]["mc.acc"] == pytest.approx(0.9)
    low, high = report["retained_ci"]["close"]["mc.acc"]
    assert low < 0.9 < high
    assert report["verdicts"] == {"close": {"mc.acc": INCONCLUSIVE}, "far": {"mc.acc": LOST}, "near": {"mc.acc": KEPT}}
    assert report["retention_thresholds"] == {"mc.acc": 0.9}
    md = markdown_report(report)
    assert "## Verdicts" in md and re.search(r"\| close \| mc\.acc \| 0\.900 \[[\d.]+, [\d.]+\] \| 0\.90 \| "
                                             r"inconclusive \| ±0\.\d+ \|", md)
    # The gate's own threshold for a task decides "kept" there, and its failure line says when it is not decided.
    gate = GateConfig(min_retained=0.5, min_retained_tasks={"mc": 0.92})
    gated = build_report("t", records, gate=gate)
    assert gated["retention_thresholds"] == {"mc.acc": 0.92}
    assert gated["verdicts"] == {"close": {"mc.acc": INCONCLUSIVE}, "far": {"mc.acc": LOST}, "near": {"mc.acc": KEPT}}
    result = check_gate(gated, gate)
    close_line = next(line for line in result["failures"] if line.startswith("close:"))
    assert close_line.endswith("(inconclusive: more items could decide)")
    assert not next(line for line in result["failures"] if line.startswith("far:")).endswith("decide)")
    assert exit_code({"gate": result}) == EXIT_FAIL


def test_the_detectable_difference_shrinks_as_one_over_root_items():
    detects = {}
    for n in (200, 800):
        teacher, student = _losing_student(n, 10)
        report = build_report("t", {"teacher": record({"mc": mc_result(teacher)}), "s": record({"mc": mc_result(student)})})
        detects[n] = report["detectable"]["s"]["mc.acc"]
        half_width = (report["retained_ci"]["s"]["mc.acc"][1] - report["retained_ci"]["s"]["mc.acc"][0]) / 2
        assert detects[n] == pytest.approx(half_width * 2.8 / 1.96, rel=0.2)  # 2.8 standard errors
    assert detects[200] / detects[800] == pytest.approx(2.0, rel=0.15)


# --- gap closed -----------------------------------------------------------------------------


def test_gap_closed_on_hand_computed_numbers():
    assert gap_closed(0.8, 0.5, 0.7) == pytest.approx(2 / 3)
    assert gap_closed(10.0, 20.0, 12.0) == pytest.approx(0.8)  # lower is better: the sign still works
    assert gap_closed(0.6, 0.6, 0.7) is None
    teacher = ItemScores([1.0] * 80 + [0.0] * 20)
    parent = ItemScores([1.0] * 50 + [0.0] * 50)
    child = ItemScores([1.0] * 70 + [0.0] * 30)
    intervals = paired_bootstrap_gap(teacher, parent, child, n_boot=500)
    assert intervals.gap[0] > 0 and intervals.closed[0] < 2 / 3 < intervals.closed[1] <= 1.0


def test_the_report_follows_the_lineage_to_each_stages_parent():
    teacher = [1.0] * 80 + [0.0] * 20
    pruned = [1.0] * 50 + [0.0] * 50
    healed = [1.0] * 70 + [0.0] * 30
    nll = {"teacher": [2.0] * 20, "depth": [3.0] * 20, "heal": [2.25] * 20}
    records = {
        "teacher": record({"mc": mc_result(teacher), "ppl": ppl_result(nll["teacher"])}, "T"),
        "depth": record({"mc": mc_result(pruned), "ppl": ppl_result(nll["depth"])}, "D", parent="T"),
        "heal": record({"mc": mc_result(healed), "ppl": ppl_result(nll["heal"])}, "H", parent="D"),
    }
    report = build_report("t", records)
    assert report["lineage"] == {"heal": "depth"}  # depth's parent is the teacher: no gap of its own
    gaps = report["gap_closed"]["heal"]
    assert gaps["parent"] == "depth"
    assert gaps["metrics"]["mc.acc"]["value"] == pytest.approx(2 / 3)
    ppl = [math.exp(v[0]) for v in nll.values()]
    assert gaps["metrics"]["ppl.perplexity"]["value"] == pytest.approx((ppl[2] - ppl[1]) / (ppl[0] - ppl[1]))
    md = markdown_report(report)
    assert re.search(r"\| heal \| depth \| mc\.acc \| 0\.667 \[[\d.]+, [\d.]+\] \|", md)


def test_gap_closed_is_undefined_when_the_parent_is_not_measurably_below_the_teacher():
    teacher = [1.0] * 80 + [0.0] * 20
    parent = [1.0] * 79 + [0.0] * 21
    child = [1.0] * 78 + [0.0] * 22
    records = {"teacher": record({"mc": mc_result(teacher)}, "T"), "depth": record({"mc": mc_result(parent)}, "D", "T"),
               "heal": record({"mc": mc_result(child)}, "H", "D")}
    gap = build_report("t", records)["gap_closed"]["heal"]["metrics"]["mc.acc"]
    assert gap["value"] is None and gap["ci"] is None
    assert re.fullmatch(r"depth is not measurably apart from the teacher \(teacher − depth \+0\.01, 95% CI "
                        r"\[[+-][\d.e-]+, [+-][\d.e-]+\] includes 0\): no gap to close", gap["reason"])


# --- KL and top-1 agreement ----------------------------------------------------------------


def test_kl_and_top1_agreement_get_intervals_over_blocks():
    kl = [0.1, 0.3, 0.2, 0.4, 0.25, 0.15]
    top1 = [0.8, 0.7, 0.9, 0.6, 0.75, 0.85]
    student = {"fidelity": {"kl_mean": float(np.mean(kl)), "top1_agreement": float(np.mean(top1))},
               "fidelity_per_item": {"kl": kl, "top1_agreement": top1}}
    fid = task_fidelity({"type": "perplexity"}, student, seed=0)
    low, high = fid["top1_agreement_ci"]
    assert min(top1) <= low < np.mean(top1) < high <= max(top1)
    assert fid["kl_mean_ci"][0] < np.mean(kl) < fid["kl_mean_ci"][1]


# --- through lm-eval, on tiny random models -------------------------------------------------

WORDS = ("apple", "river", "stone", "cloud", "tiger", "violin", "garden", "copper", "lantern", "meadow",
         "harbor", "pencil", "castle", "thunder", "velvet", "orchard")


@pytest.fixture(scope="module")
def signal_tasks(tmp_path_factory):
    """Two include-path tasks: 4-choice questions with random answers (160), and yes/no (30 yes, 10 no)."""
    root = tmp_path_factory.mktemp("signal-tasks")
    rng = random.Random(7)
    rows = [{"question": f"Which word comes {i}?", "choices": rng.sample(WORDS, 4), "answer": rng.randrange(4)}
            for i in range(160)]
    (root / "guess.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    yes_no = [{"question": f"Is {w} a word number {i}?", "answer": int(i % 4 != 0)}
              for i, w in enumerate(WORDS * 3)][:40]
    (root / "yesno.jsonl").write_text("".join(json.dumps(r) + "\n" for r in yes_no))
    cache = root / "hf-cache"
    for name, choice in (("guess", "{{choices}}"), ("yesno", "['no', 'yes']")):
        (root / f"{name}.yaml").write_text(f"""
task: {name}
dataset_path: json
dataset_kwargs: {{data_files: {{test: {root / f'{name}.jsonl'}}}, cache_dir: {cache}}}
output_type: multiple_choice
test_split: test
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: answer
doc_to_choice: "{choice}"
metric_list: [{{metric: acc, aggregation: mean, higher_is_better: true}}]
""")
    return root


def _run(model, tokenizer, task, root):
    return harness_task(model, tokenizer, HarnessTaskConfig(task=task),
                        ModelEvalContext(None, 8, 1234, include_path=(str(root),)))


def test_chance_is_recorded_through_lm_eval_and_a_random_model_is_no_signal(tokenizer, signal_tasks):
    teacher, student = build_model("llama", tokenizer), build_model("llama", tokenizer, layers=2, seed=1)
    guess = _run(teacher, tokenizer, "guess", signal_tasks)
    assert (guess["chance"], guess["chance_basis"], guess["chance_metrics"]) == (0.25, "1 / 4 choices", ["acc"])
    yes_no = _run(teacher, tokenizer, "yesno", signal_tasks)
    assert (yes_no["chance"], yes_no["chance_basis"]) == (0.75, "majority answer 'yes' (30 of 40 items)")
    report = build_report("t", {"teacher": record({"guess": guess}), "s": record({"guess": _run(student, tokenizer, "guess", signal_tasks)})})
    assert report["signal"]["guess.acc"]["status"] == NO_SIGNAL
    assert report["summary"]["s"]["mean_retained"] is None  # nothing left to average


def test_slimforge_eval_exits_2_with_one_line_when_a_threshold_names_a_no_signal_task(teacher_dir, signal_tasks,
                                                                                       tmp_path, capsys):
    from slimforge import cli

    code = cli.main(["eval", "--teacher", str(teacher_dir), "--students", str(teacher_dir), "--labels", "copy",
                     "--tasks", "guess", "--include-path", str(signal_tasks), "--min-retained", "guess=0.9",
                     "--out", str(tmp_path / "ev"), "--device", "cpu", "--no-cache"])
    out = capsys.readouterr().out
    assert code == EXIT_ERROR
    lines = [line for line in out.splitlines() if line.startswith("gate: guess is no signal")]
    assert len(lines) == 1 and lines[0].endswith("its threshold 0.9 cannot be checked — raise eval.limit (--limit) "
                                                 "or drop the task")
    assert "(1.000 n/s)" in out and MARKS_LEGEND in out  # the summary table marks the verdict too
    saved = json.loads((tmp_path / "ev" / "report.json").read_text())
    assert saved["gate"]["status"] == "error" and saved["tasks"]["guess"]["signal"] == NO_SIGNAL
