"""The report's tables, as a header and rows of strings: what ``report.md`` and ``report.html`` both show.

They read only the report's data (``report.json``'s content), so :mod:`slimforge.eval.report`
and :mod:`slimforge.eval.html` both render from here and neither imports the other back.
"""

from __future__ import annotations

import math
from typing import Any

# The label of the teacher in every record and report.
TEACHER = "teacher"


def fmt(value: Any, digits: int = 3) -> str:
    """A compact number: fixed decimals for ordinary values, scientific for tiny or huge ones."""
    if value is None:
        return "–"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if value != 0 and (abs(value) < 10 ** -digits or abs(value) >= 1e6) and math.isfinite(value):
        return f"{value:.{digits - 1}e}"
    return f"{value:.{digits}f}"


def fmt_ci(value: Any, interval: list[float] | None, digits: int = 3) -> str:
    """``0.430 [0.400, 0.460]``: a value and its interval, the bracket left out when there is none."""
    return fmt(value, digits) + (f" [{fmt(interval[0], digits)}, {fmt(interval[1], digits)}]" if interval else "")


def fmt_bytes(value: Any) -> str:
    return "–" if not value else f"{value / 2**20:.1f} MiB"


def markdown_table(header: list[str], rows: list[list[str]], align: str | None = None) -> list[str]:
    align = align or "l" + "r" * (len(header) - 1)
    marks = ["---:" if a == "r" else "---" for a in align]
    return ["| " + " | ".join(header) + " |", "|" + "|".join(marks) + "|",
            *["| " + " | ".join(row) + " |" for row in rows]]


def models_table(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    rows = [[label, str(m.get("kind") or ""), str(m["path"]), str(m.get("content_fingerprint") or "")]
            for label, m in report["models"].items()]
    return ["model", "kind", "path", "content hash"], rows


SIGNAL_NOTE = ("Chance: what guessing scores on the gating metric (1 / choices, or the most frequent answer's "
               "share where labels are unbalanced). A task whose teacher's 95% interval reaches chance is **no "
               "signal**: its retention divides noise by noise, so it is left out of the mean and not gated.")


def tasks_table(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    rows = []
    for name, t in report["tasks"].items():
        signal = report.get("signal", {}).get(f"{name}.{t.get('metric')}") or {}
        rows.append([name, str(t.get("type")), str(t.get("metric") or "–"), str(t.get("items") or "–"),
                     "–" if t.get("num_fewshot") is None else str(t["num_fewshot"]), corpus_words(t) or "–",
                     fmt(signal.get("chance")), fmt_ci(signal.get("teacher"), signal.get("teacher_ci")) if signal else "–",
                     signal.get("status", "–")])
    return ["task", "type", "gating metric", "items", "few-shot", "text", "chance", "teacher [95% CI]", "signal"], rows


DOMAIN_NOTE = ("In-domain: the run's own data, the text the students were healed on. Out-of-domain: a corpus "
               "of the task's own that they never saw. Retained = teacher / student (lower is better); KL(teacher "
               "‖ student) per token and top-1 agreement with the teacher, on that text.")
# How a task's split reads in a heading.
SPLIT_WORDS = {"heldout": "held-out", "train": "training"}


def corpus_words(task: dict[str, Any]) -> str | None:
    """Which text a task read, e.g. ``in-domain: shakespeare held-out``; None when it read none."""
    if not task.get("domain"):
        return None
    split = SPLIT_WORDS.get(task.get("split") or "", task.get("split") or "")
    return f"{task['domain']}: {task.get('corpus')}" + (f" {split}" if split else "")


def domain_heading(task: dict[str, Any]) -> str | None:
    """A text task's gating metric as a heading, e.g. ``out-of-domain ppl (wikipedia held-out)``."""
    words = corpus_words(task)
    if words is None:
        return None
    domain, _, corpus = words.partition(": ")
    metric = "ppl" if task.get("metric") == "perplexity" else str(task.get("metric"))
    return f"{domain} {metric} ({corpus})"


def column_heading(report: dict[str, Any], key: str) -> str:
    """``task.metric``, with the text it was measured on for a text task (in-domain or out-of-domain)."""
    words = corpus_words(report.get("tasks", {}).get(key.split(".", 1)[0], {}))
    return f"{key} ({words})" if words else key


def domain_tasks(report: dict[str, Any]) -> list[str]:
    """The tasks that read text, the in-domain ones first."""
    labelled = [name for name, task in report.get("tasks", {}).items() if task.get("domain")]
    return sorted(labelled, key=lambda name: report["tasks"][name]["domain"] != "in-domain")


def fmt_parameters(model: dict[str, Any]) -> str:
    """``12.3M``, or ``12.3M (4.1M active)`` for a mixture-of-experts model."""
    text = f"{model['num_parameters'] / 1e6:.1f}M"
    active = model.get("active_parameters")
    return f"{text} ({active / 1e6:.1f}M active)" if active is not None else text


def scores_table(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    keys = [f"{t}.{m}" for t, metrics in report["higher_is_better"].items() for m in metrics]
    header = ["model", "kind", "parameters", "size", *[column_heading(report, k) for k in keys]]
    rows = []
    for label, model in report["models"].items():
        values = [fmt(model["tasks"].get(k.split(".", 1)[0], {}).get(k.split(".", 1)[1])) for k in keys]
        rows.append([label, str(model.get("kind") or ""), fmt_parameters(model),
                     fmt_bytes(model.get("disk_bytes")), *values])
    return header, rows


def retained_table(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Retained [95% CI] of each task's gating metric per student, tagged with its verdict."""
    keys = [f"{t}.{m}" for t, m in report["primary"].items()]
    header = ["student", *[column_heading(report, k) for k in keys], "mean (tasks with signal)", "size fraction"]
    rows = []
    for label, ratios in report["retained"].items():
        cells = []
        for key in keys:
            cell = fmt_ci(ratios.get(key), report["retained_ci"].get(label, {}).get(key))
            tag = report.get("verdicts", {}).get(label, {}).get(key)
            cells.append(f"{cell} {tag}" if tag else cell)
        summary = report["summary"].get(label, {})
        rows.append([label, *cells, fmt(summary.get("mean_retained")), fmt(summary.get("size_fraction"))])
    return header, rows


# Short marks for a verdict where space is tight (the printed summary), and what they mean.
VERDICT_MARKS = {"kept": "", "lost": "!", "inconclusive": "?", "no signal": " n/s"}
MARKS_LEGEND = "!: lost, ?: inconclusive (the interval spans the threshold), n/s: no signal (the teacher is at chance)"


VERDICT_NOTE = ("kept: the 95% interval of retained lies at or above the threshold; lost: entirely below; "
                "inconclusive: it spans the threshold (more items could decide); no signal: the teacher is at "
                "chance. Detects: the smallest change in retained these items reveal (95% confidence, 80% power: "
                "2.8 bootstrap standard errors); it shrinks as 1 / sqrt(items).")


def verdicts_table(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """One row per student and gating metric: retained [CI], the threshold that defines "kept",
    the verdict and the detectable difference."""
    rows = []
    for label, ratios in report["retained"].items():
        for task, metric in report["primary"].items():
            key = f"{task}.{metric}"
            if ratios.get(key) is None:
                continue
            detects = report.get("detectable", {}).get(label, {}).get(key)
            rows.append([label, key, fmt_ci(ratios[key], report["retained_ci"].get(label, {}).get(key)),
                         fmt(report.get("retention_thresholds", {}).get(key), 2),
                         report.get("verdicts", {}).get(label, {}).get(key, "–"),
                         "–" if detects is None else f"±{fmt(detects)}"])
    return ["student", "metric", "retained [95% CI]", "kept if ≥", "verdict", "detects"], rows


GAP_NOTE = ("Gap closed = (stage − its parent) / (teacher − its parent) on each gating metric: the share of what "
            "the parent lost that the stage won back (1 = back at the teacher, 0 = no better than the parent, "
            "< 0 = worse). Brackets: 95% paired bootstrap interval; undefined where the parent is not measurably "
            "apart from the teacher.")


def gap_table(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """One row per stage whose parent is a student, and gating metric: gap closed [CI] or why not."""
    rows = []
    for label, entry in report.get("gap_closed", {}).items():
        for key, gap in entry.get("metrics", {}).items():
            rows.append([label, entry["parent"], key, fmt_ci(gap["value"], gap["ci"]), gap.get("reason") or ""])
    return ["stage", "parent", "metric", "gap closed [95% CI]", "note"], rows


def fidelity_rows(report: dict[str, Any]) -> dict[str, tuple[list[str], list[list[str]]]]:
    """Three tables: token-level (KL, top-1; one row per student and text task), multiple choice
    (flips), generation (agreement)."""
    token, choice, gen = [], [], []
    for label, tasks in report["fidelity"].items():
        for task, fid in tasks.items():
            if "kl_mean" in fid:
                ci = fid.get("kl_mean_ci")
                text = corpus_words(report.get("tasks", {}).get(task, {})) or "–"
                token.append([label, task, text, fmt_ci(fid["kl_mean"], ci, 4),
                              fmt(fid.get("kl_p50"), 4), fmt(fid.get("kl_p90"), 4), fmt(fid.get("kl_p99"), 4),
                              fmt(fid.get("kl_max"), 3), fmt_ci(fid.get("top1_agreement"), fid.get("top1_agreement_ci"))])
            if "flips" in fid or "choice_agreement" in fid:
                flips = fid.get("flips", {})
                choice.append([label, task, str(flips.get("items", "–")), str(flips.get("lost", "–")),
                               str(flips.get("gained", "–")), fmt(flips.get("flip_rate")), fmt(fid.get("choice_agreement"))])
            if "teacher_rougeL" in fid:
                gen.append([label, task, fmt_ci(fid["teacher_rougeL"], fid.get("teacher_rougeL_ci")),
                            fmt_ci(fid.get("teacher_chrf"), fid.get("teacher_chrf_ci"), 1),
                            fmt_ci(fid.get("teacher_exact_match"), fid.get("teacher_exact_match_ci"))])
    return {
        "token": (["student", "task", "text", "KL mean [95% CI]", "KL p50", "KL p90", "KL p99", "KL max",
                   "top-1 agreement [95% CI]"], token),
        "choice": (["student", "task", "items", "lost (right→wrong)", "gained (wrong→right)", "flip rate",
                    "same answer as teacher"], choice),
        "generation": (["student", "task", "ROUGE-L vs teacher [95% CI]", "chrF vs teacher [95% CI]",
                        "identical outputs [95% CI]"], gen),
    }


def domain_table(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Each text task (in-domain first, then out-of-domain) and every model: its gating metric,
    retained, and the student's KL and top-1 agreement with the teacher on that text."""
    header = ["measured on", "model", "value", "retained", "KL mean", "top-1 agreement"]
    rows = []
    for task in domain_tasks(report):
        summary = report["tasks"][task]
        metric = summary.get("metric")
        heading = f"{domain_heading(summary)} [{task}]"
        for label, model in report["models"].items():
            value = model["tasks"].get(task, {}).get(metric)
            if value is None:
                continue
            kept = 1.0 if label == TEACHER else report["retained"].get(label, {}).get(f"{task}.{metric}")
            fid = report["fidelity"].get(label, {}).get(task, {})
            rows.append([heading, label, fmt(value), fmt(kept), fmt(fid.get("kl_mean"), 4),
                         fmt(fid.get("top1_agreement"))])
    return header, rows


def efficiency_table(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    header = ["model", "parameters", "on disk", "in memory", "peak memory", "prefill tok/s", "decode tok/s",
              "latency (s)", "decode speedup"]
    rows = []
    for label, model in report["models"].items():
        eff = model["efficiency"]
        if not eff:
            continue
        speedup = report["efficiency"].get(label, {}).get("decode_speedup", 1.0 if label == TEACHER else None)
        rows.append([label, f"{model['num_parameters'] / 1e6:.1f}M", fmt_bytes(model.get("disk_bytes")),
                     fmt_bytes(model.get("memory_bytes")), fmt_bytes(eff.get("peak_memory_bytes")),
                     fmt(eff.get("prefill_tokens_per_s"), 1), fmt(eff.get("decode_tokens_per_s"), 1),
                     fmt(eff.get("latency_s"), 3), fmt(speedup, 2)])
    return header, rows


SPECULATIVE_NOTE = ("Each student as a draft for its teacher's greedy decoding (the output is the teacher's: "
                    "`identical` checks it per prompt). Speed-up = the teacher's tokens/s with the draft over "
                    "the teacher alone, measured in the same run; the cost model predicts it from the measured "
                    "draft and verification costs. A draft is worth using only above 1.00x. `drafts a round`: k "
                    "tokens in a chain, plus the draft's runner-ups for the first one, verified as a tree in the same "
                    "pass (a position counts as accepted when any of its candidates is the teacher's token); an n-gram "
                    "lookup adds one candidate a round from the context itself (what followed the latest earlier "
                    "occurrence of its last n tokens), so it lifts the undistilled draft as much as the distilled one; "
                    "`up to n positions` cuts that candidate's branch to fit the positions the teacher's pass reads at "
                    "nearly the cost of two (measured), except while the output repeats itself.")


def speculative_table(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Every model scored as a draft by a ``speculative`` task: acceptance, tokens a round, speed-up, verdict."""
    header = ["task", "draft", "drafts a round", "acceptance", "per position", "tokens / round", "teacher tok/s", "with draft tok/s", "speed-up",
              "cost model", "identical", "use it"]
    rows = []
    for task, summary in report.get("tasks", {}).items():
        if summary.get("type") != "speculative":
            continue
        for label, model in report["models"].items():
            r = model["tasks"].get(task, {})
            if "acceptance_rate" not in r:
                continue
            worth = r["speedup"] >= 1.0 and r.get("identical_outputs") == 1.0
            per_position = r.get("position_acceptance")
            drafting = summary.get("drafting") or {}
            width = int(drafting.get("width", 1))
            shape = f"k={drafting.get('k', '?')}" + (f", {width - 1} runner-up{'s' if width > 2 else ''}" if width > 1 else "")
            if drafting.get("lookup"):
                shape += f", {drafting['lookup']}-gram lookup"
                if r.get("position_budget"):  # measured in each draft's own run
                    shape += f", up to {int(r['position_budget'])} positions"
            rows.append([task, label, shape, f"{100 * r['acceptance_rate']:.1f}%",
                         "" if per_position is None else f"{100 * per_position:.1f}%", fmt(r["tokens_per_round"], 2),
                         fmt(r["teacher_tokens_per_s"], 1), fmt(r["speculative_tokens_per_s"], 1),
                         f"{r['speedup']:.2f}x", f"{r['predicted_speedup']:.2f}x", fmt(r.get("identical_outputs"), 2),
                         "yes" if worth else "no: slower than the teacher alone" if r["speedup"] < 1 else "no"])
    return header, rows


def gate_lines(report: dict[str, Any]) -> list[str]:
    gate = report.get("gate") or {}
    if not gate or gate.get("status") == "none":
        return ["No thresholds set."]
    lines = [f"**{gate['status'].upper()}**: {gate.get('checked', 0)} check(s)"]
    lines += [f"- {line}" for line in gate.get("failures", [])]
    lines += [f"- {line}" for line in gate.get("refused", []) + gate.get("skipped", [])]
    return lines
