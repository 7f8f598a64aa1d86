"""The report: every metric of every model, what each student retained, and how faithfully.

``report.json`` holds, per model, the headline metrics of each task, size and
speed; per student, the retained share of each teacher metric (student /
teacher, or teacher / student when lower is better) with a paired bootstrap
confidence interval, the smallest difference its items can detect and its verdict
(kept, lost, inconclusive), the fidelity metrics (KL and top-1 agreement with their
intervals, answer flips, choice agreement, agreement with the teacher's generations),
the gap each stage closed on its parent, and the gate's verdict. Per task: its chance
level and whether the teacher stands above it (no-signal tasks are left out of every
aggregate; :mod:`slimforge.eval.verdicts`). ``report.md`` and the self-contained
``report.html`` show the same.
A sweep's report (:func:`sweep_report`) holds every job's students and the
sweep's size-quality curve (:mod:`slimforge.eval.curve`).
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slimforge.eval.bias import NOTE as BIAS_NOTE
from slimforge.eval.bias import bias_report, bias_table
from slimforge.eval.curve import SweepJob, curve_note, curve_table, sweep_curve
from slimforge.eval.html import html_report
from slimforge.eval.stats import (
    ItemScores,
    bootstrap_mean_ci,
    detectable_difference,
    percentile_interval,
    ratio,
    ratio_replicates,
)
from slimforge.eval.tables import (
    DOMAIN_NOTE,
    GAP_NOTE,
    SIGNAL_NOTE,
    SPECULATIVE_NOTE,
    TEACHER,
    VERDICT_NOTE,
    domain_table,
    efficiency_table,
    fidelity_rows,
    gap_table,
    gate_lines,
    markdown_table,
    models_table,
    retained_table,
    scores_table,
    speculative_table,
    tasks_table,
    verdicts_table,
)
from slimforge.eval.verdicts import (
    gap_closed_section,
    is_no_signal,
    student_parents,
    student_verdicts,
    task_signals,
)
from slimforge.fsutil import atomic_write_json, atomic_write_text

if TYPE_CHECKING:  # pragma: no cover
    from slimforge.config import GateConfig

# Numbers a task reports that are counts or bookkeeping, not quality.
NOT_HEADLINE = {"tokens", "blocks", "items", "documents", "seconds", "nll", "chance"}
EFFICIENCY = "efficiency"
N_BOOT = 1000
# A sweep report's per-student sections, each copied from its job's report under ``<job>/<label>``.
SWEEP_SECTIONS = ("retained", "retained_ci", "detectable", "verdicts", "gap_closed", "fidelity", "efficiency", "summary")


def scalar_metrics(task_result: dict[str, Any]) -> dict[str, float]:
    """The headline numbers of a task result (per-item lists, counts and bookkeeping left out)."""
    return {k: float(v) for k, v in task_result.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and k not in NOT_HEADLINE}


def _is_binary(scores: ItemScores) -> bool:
    return scores.weights is None and all(v in (0.0, 1.0) for v in scores.values)


def _paired(teacher: dict[str, Any], student: dict[str, Any]) -> bool:
    return bool(teacher.get("item_ids")) and teacher.get("item_ids") == student.get("item_ids")


@dataclass
class Retention:
    """One task's retained ratios (metric -> ratio), their 95% paired bootstrap intervals and the
    smallest difference in retention the items detect (95% confidence, 80% power)."""

    ratios: dict[str, float | None] = field(default_factory=dict)
    intervals: dict[str, list[float]] = field(default_factory=dict)
    detectable: dict[str, float] = field(default_factory=dict)


def retention(teacher: dict[str, Any], student: dict[str, Any], seed: int) -> Retention:
    """Retained ratio, its bootstrap interval and detectable difference, of every metric the teacher reports for one task."""
    out = Retention()
    t_metrics, s_metrics = scalar_metrics(teacher), scalar_metrics(student)
    for metric, higher in teacher.get("higher_is_better", {}).items():
        if metric not in t_metrics or metric not in s_metrics:
            continue
        out.ratios[metric] = ratio(t_metrics[metric], s_metrics[metric], higher)
        t_items, s_items = teacher.get("per_item", {}).get(metric), student.get("per_item", {}).get(metric)
        if t_items and s_items and _paired(teacher, student):
            replicates = ratio_replicates(ItemScores.from_json(t_items), ItemScores.from_json(s_items), higher,
                                          n_boot=N_BOOT, seed=seed)
            if replicates is not None:
                out.intervals[metric] = list(percentile_interval(replicates))
                out.detectable[metric] = detectable_difference(replicates)
    return out


def task_fidelity(teacher: dict[str, Any], student: dict[str, Any], seed: int) -> dict[str, Any]:
    """Fidelity of one task: the task's own (KL, generation agreement) plus flips and choice agreement."""
    from slimforge.eval.fidelity import answer_flips, choice_agreement

    out: dict[str, Any] = dict(student.get("fidelity", {}))
    # Per block: a token's neighbours are not independent, the blocks are. Per output for generation.
    for per_block, key in (("kl", "kl_mean_ci"), ("top1_agreement", "top1_agreement_ci"),
                           *((m, f"{m}_ci") for m in ("teacher_rougeL", "teacher_chrf", "teacher_exact_match"))):
        items = student.get("fidelity_per_item", {}).get(per_block)
        ci = bootstrap_mean_ci(items, n_boot=N_BOOT, seed=seed) if items else None
        if ci is not None:
            out[key] = list(ci)
    metric = teacher.get("metric")
    t_items = teacher.get("per_item", {}).get(metric)
    s_items = student.get("per_item", {}).get(metric)
    if teacher.get("type") == "lm_eval" and t_items and s_items and _paired(teacher, student):
        t_scores, s_scores = ItemScores.from_json(t_items), ItemScores.from_json(s_items)
        if _is_binary(t_scores) and _is_binary(s_scores):
            out["flips"] = {"metric": metric, **answer_flips(t_scores.values, s_scores.values)}
    if teacher.get("choices") and student.get("choices") and _paired(teacher, student):
        out["choice_agreement"] = choice_agreement(teacher["choices"], student["choices"])
    return out


def _efficiency(record: dict[str, Any]) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for result in record["tasks"].values():
        if result.get("type") == EFFICIENCY:
            merged.update({k: v for k, v in result.items() if k not in ("type", "seconds", "higher_is_better")})
    return merged


def _model_entry(record: dict[str, Any]) -> dict[str, Any]:
    tasks = {name: scalar_metrics(res) for name, res in record["tasks"].items()
             if res.get("type") != EFFICIENCY and "skipped" not in res}
    skipped = {name: res["skipped"] for name, res in record["tasks"].items() if "skipped" in res}
    entry = {"path": record["path"], "kind": record.get("kind"), "content_fingerprint": record.get("content_fingerprint"),
             "num_parameters": record["num_parameters"], "disk_bytes": record.get("disk_bytes"),
             "memory_bytes": record.get("memory_bytes"), "tasks": tasks, "efficiency": _efficiency(record)}
    if skipped:
        entry["skipped"] = skipped
    if record.get("active_parameters") is not None:  # mixture of experts: parameters one token uses
        entry["active_parameters"] = record["active_parameters"]
    return entry


def size_of(model: dict[str, Any]) -> float:
    """The size used for quality-vs-size plots: bytes on disk, else in memory, else parameters."""
    return float(model.get("disk_bytes") or model.get("memory_bytes") or model["num_parameters"])


def efficiency_ratios(teacher: dict[str, Any], student: dict[str, Any]) -> dict[str, float]:
    """Student against teacher: speedups (>1 is faster) and size/memory fractions (<1 is smaller)."""
    out = {}
    for key in ("prefill_tokens_per_s", "decode_tokens_per_s"):
        if teacher.get(key) and student.get(key):
            out[key.replace("_tokens_per_s", "_speedup")] = student[key] / teacher[key]
    if teacher.get("latency_s") and student.get("latency_s"):
        out["latency_speedup"] = teacher["latency_s"] / student["latency_s"]
    for key in ("disk_bytes", "memory_bytes", "peak_memory_bytes"):
        if teacher.get(key) and student.get(key):
            out[key.replace("_bytes", "_fraction")] = student[key] / teacher[key]
    return out


def task_summary(result: dict[str, Any]) -> dict[str, Any]:
    """What a task was: its type, gating metric, how many items, with how many shots; for a task
    that read text, which (``corpus``, ``split``) and whether in-domain or out-of-domain (``domain``)."""
    items = result.get("items", result.get("blocks", result.get("documents")))
    shots = result.get("num_fewshot")
    summary = {"type": result.get("type"), "metric": result.get("metric"), "items": items,
               "num_fewshot": max(shots.values()) if isinstance(shots, dict) and shots else shots}
    summary.update({key: result[key] for key in ("corpus", "split", "domain", "drafting") if key in result})
    return summary


def _signal_summary(report: dict[str, Any]) -> None:
    """Each task's chance level and whether the teacher's gating metric stands above it, in ``tasks``."""
    for task, metric in report["primary"].items():
        signal = report["signal"].get(f"{task}.{metric}")
        if signal is not None:
            report["tasks"][task].update({"chance": signal["chance"], "chance_basis": signal["chance_basis"],
                                          "signal": signal["status"]})


def retention_thresholds(report: dict[str, Any], gate: GateConfig | None, default: float) -> dict[str, float]:
    """What "kept" means for each retained ``task.metric``: the gate's threshold for it, else ``default``."""
    from slimforge.eval.gate import threshold_for

    out = {}
    for task, metrics in report["higher_is_better"].items():
        for metric in metrics:
            found = threshold_for(gate, task, metric)
            out[f"{task}.{metric}"] = default if found is None else found
    return out


def mean_retained(report: dict[str, Any], ratios: dict[str, Any]) -> float | None:
    """The mean retained share over the tasks' gating metrics, no-signal tasks left out."""
    keys = [f"{t}.{m}" for t, m in report["primary"].items()]
    valid = [ratios[k] for k in keys if ratios.get(k) is not None and not is_no_signal(report, k)]
    return sum(valid) / len(valid) if valid else None


def build_report(title: str, records: dict[str, dict[str, Any]], settings: Any = None,
                 warnings: list[str] | None = None, gate: GateConfig | None = None) -> dict[str, Any]:
    """The report from each model's eval record (the teacher's under ``teacher``).

    Args:
        settings: the :class:`~slimforge.eval.config.EvalSettings` every model had.
        gate: its thresholds set what "kept" means per task (else ``settings.retention_threshold``).
    """
    from slimforge.config import RETENTION_THRESHOLD

    seed = getattr(settings, "seed", 0)
    default_threshold = getattr(settings, "retention_threshold", RETENTION_THRESHOLD)
    models = {label: _model_entry(rec) for label, rec in records.items()}
    report: dict[str, Any] = {
        "title": title, "recipe": title,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "settings": {} if settings is None else {
            "device": settings.device.type, "dtype": str(settings.dtype).replace("torch.", ""),
            "batch_size": settings.batch_size, "seed": settings.seed, "limit": settings.limit,
            "num_fewshot": settings.num_fewshot, "retention_threshold": default_threshold},
        "teacher": TEACHER, "models": models, "primary": {}, "higher_is_better": {},
        "tasks": {}, "signal": {}, "retained": {}, "retained_ci": {}, "detectable": {}, "verdicts": {},
        "retention_thresholds": {}, "lineage": {}, "gap_closed": {}, "fidelity": {}, "efficiency": {},
        "summary": {}, "warnings": list(warnings or []),
    }
    teacher = records.get(TEACHER)
    if teacher is None:
        return report
    for task, res in teacher["tasks"].items():
        if res.get("type") != EFFICIENCY and res.get("metric"):
            report["primary"][task] = res["metric"]
            report["higher_is_better"][task] = res.get("higher_is_better", {})
        report["tasks"][task] = task_summary(res)
    report["signal"] = task_signals({t: r for t, r in teacher["tasks"].items() if "skipped" not in r}, N_BOOT, seed)
    _signal_summary(report)
    report["retention_thresholds"] = thresholds = retention_thresholds(report, gate, default_threshold)
    for label, record in records.items():
        if label == TEACHER:
            continue
        kept = Retention()
        fidelity: dict[str, Any] = {}
        for task, t_res in teacher["tasks"].items():
            s_res = record["tasks"].get(task)
            if s_res is None or t_res.get("type") == EFFICIENCY or "skipped" in s_res:
                continue
            found = retention(t_res, s_res, seed)
            kept.ratios.update({f"{task}.{m}": v for m, v in found.ratios.items()})
            kept.intervals.update({f"{task}.{m}": v for m, v in found.intervals.items()})
            kept.detectable.update({f"{task}.{m}": v for m, v in found.detectable.items()})
            fid = task_fidelity(t_res, s_res, seed)
            if fid:
                fidelity[task] = fid
        ratios: dict[str, Any] = {**kept.ratios, "size": models[label]["num_parameters"] / models[TEACHER]["num_parameters"]}
        report["retained"][label] = ratios
        report["retained_ci"][label] = kept.intervals
        report["detectable"][label] = kept.detectable
        report["verdicts"][label] = student_verdicts(report, kept.intervals, thresholds)
        report["fidelity"][label] = fidelity
        report["efficiency"][label] = efficiency_ratios(models[TEACHER]["efficiency"], models[label]["efficiency"])
        report["summary"][label] = {
            "mean_retained": mean_retained(report, ratios),
            "size": size_of(models[label]), "size_fraction": size_of(models[label]) / size_of(models[TEACHER]),
        }
    report["summary"][TEACHER] = {"mean_retained": 1.0, "size": size_of(models[TEACHER]), "size_fraction": 1.0}
    report["lineage"] = student_parents(records, TEACHER)
    report["gap_closed"] = gap_closed_section(report, records, report["lineage"], TEACHER, N_BOOT, seed)
    report["bias"] = bias_report(records, TEACHER, seed)  # bias tasks: every model's scores, each student's shift
    return report


# --- markdown ----------------------------------------------------------------------------


def markdown_report(report: dict[str, Any]) -> str:
    s = report.get("settings", {})
    lines = [f"# slimforge report: {report['title']}", ""]
    if s:
        lines += [f"Settings (identical for every model): device {s['device']}, dtype {s['dtype']}, "
                  f"batch size {s['batch_size']}, seed {s['seed']}, item limit {s['limit'] or 'none'}, "
                  f"few-shot {s['num_fewshot'] if s['num_fewshot'] is not None else 'task default'}.", ""]
    if report.get("curve"):
        header, rows = curve_table(report["curve"])
        lines += ["## Size–quality curve", "", curve_note(report["curve"]), "",
                  *markdown_table(header, rows, align="lll" + "r" * (len(header) - 3)), ""]
    lines += ["## Models", "", *markdown_table(*models_table(report)), ""]
    if report.get("tasks"):
        lines += ["## Tasks", "", SIGNAL_NOTE, "", *markdown_table(*tasks_table(report)), ""]
    lines += ["## Scores", "", *markdown_table(*scores_table(report)), ""]
    if report["retained"]:
        lines += ["## Retained", "",
                  "retained = student / teacher (teacher / student where lower is better); 1.0 = nothing lost. "
                  "Brackets: 95% paired bootstrap interval over items; then the verdict.", "",
                  *markdown_table(*retained_table(report)), ""]
        header, rows = verdicts_table(report)
        if rows:
            lines += ["## Verdicts", "", VERDICT_NOTE, "", *markdown_table(header, rows, align="llrrlr"), ""]
    header, rows = gap_table(report)
    if rows:
        lines += ["## Gap closed by each stage", "", GAP_NOTE, "", *markdown_table(header, rows, align="lllrl"), ""]
    header, rows = domain_table(report)
    if rows:
        lines += ["## In-domain and out-of-domain", "", DOMAIN_NOTE, "", *markdown_table(header, rows), ""]
    tables = fidelity_rows(report)
    if any(rows for _, rows in tables.values()):
        lines += ["## Fidelity to the teacher", ""]
        for header, rows in tables.values():
            if rows:
                lines += [*markdown_table(header, rows), ""]
    header, rows = efficiency_table(report)
    if rows:
        info = next((m["efficiency"].get("info", {}) for m in report["models"].values() if m["efficiency"]), {})
        lines += ["## Efficiency", "", f"On {info.get('device', 'this device')}: batch 1, {info.get('prompt_tokens')} "
                  f"prompt tokens, {info.get('new_tokens')} new tokens, median of {info.get('repeats')} runs; peak "
                  f"memory = {info.get('peak_memory_method')}.", "", *markdown_table(header, rows), ""]
    header, rows = speculative_table(report)
    if rows:
        lines += ["### Speculative decoding" if any(x.startswith("## Efficiency") for x in lines)
                  else "## Efficiency: speculative decoding", "", SPECULATIVE_NOTE, "", *markdown_table(header, rows), ""]
    header, rows = bias_table(report)
    if rows:
        lines += ["## Bias", "", BIAS_NOTE, "", *markdown_table(header, rows, align="lllr" + "r" * 7), ""]
    lines += ["## Gate", "", *gate_lines(report), ""]
    if report.get("warnings"):
        lines += ["## Warnings", "", *[f"- {w}" for w in report["warnings"]], ""]
    return "\n".join(lines)


def write_report(out_dir: Path, report: dict[str, Any]) -> None:
    """``report.json``, ``report.md`` and ``report.html`` in ``out_dir``."""
    atomic_write_json(out_dir / "report.json", report)
    atomic_write_text(out_dir / "report.md", markdown_report(report))
    atomic_write_text(out_dir / "report.html", html_report(report))


# --- a sweep: every student of every job in one report -----------------------------------


def sweep_report(jobs: list[SweepJob]) -> dict[str, Any]:
    """One report over a sweep's jobs: the teacher once, each student as ``<job>/<label>``, and the curve.

    Each student keeps the retention and fidelity measured against its own
    job's teacher; a job whose teacher has other content is named in the warnings.
    ``curve`` places each job's final model by size against one quality number
    (:func:`slimforge.eval.curve.sweep_curve`).
    """
    evaluated = [job for job in jobs if job.report.get("models")]
    if not evaluated:
        return {}
    base = evaluated[0].report
    teacher_fp = base["models"][TEACHER].get("content_fingerprint")
    out: dict[str, Any] = {
        "title": f"sweep of {base['title']}", "recipe": base.get("recipe"), "created": base.get("created"),
        "settings": base.get("settings", {}), "teacher": TEACHER, "models": {TEACHER: base["models"][TEACHER]},
        "primary": dict(base["primary"]), "higher_is_better": dict(base["higher_is_better"]),
        "tasks": dict(base.get("tasks", {})), "signal": dict(base.get("signal", {})),
        "retention_thresholds": dict(base.get("retention_thresholds", {})), "lineage": {},
        **{section: {} for section in SWEEP_SECTIONS},
        "summary": {TEACHER: base["summary"].get(TEACHER, {})}, "warnings": [], "jobs": [job.name for job in evaluated],
    }
    failures, skipped, refused, statuses = [], [], [], []
    for job in evaluated:
        name, rep = job.name, job.report
        if rep["models"][TEACHER].get("content_fingerprint") != teacher_fp:
            out["warnings"].append(f"job {name} has another teacher; its students are compared with their own")
        for label, model in rep["models"].items():
            if label == TEACHER:
                continue
            key = f"{name}/{label}"
            out["models"][key] = model
            for section in SWEEP_SECTIONS:
                out[section][key] = rep.get(section, {}).get(label, {})
            if label in rep.get("lineage", {}):
                out["lineage"][key] = f"{name}/{rep['lineage'][label]}"
        out["warnings"] += [f"job {name}: {w}" for w in rep.get("warnings", [])]
        gate = rep.get("gate") or {}
        statuses.append(gate.get("status", "none"))
        failures += [f"{name}/{line}" for line in gate.get("failures", [])]
        skipped += [f"{name}: {line}" for line in gate.get("skipped", [])]
        refused += [f"{name}: {line}" for line in gate.get("refused", [])]
    status = next((s for s in ("error", "fail", "pass") if s in statuses), "none")
    out["gate"] = {"status": status, "passed": status in ("pass", "none"), "failures": failures,
                   "skipped": skipped, "refused": refused,
                   "checked": sum((job.report.get("gate") or {}).get("checked", 0) for job in evaluated),
                   "thresholds": (base.get("gate") or {}).get("thresholds", {})}
    curve = sweep_curve(out, evaluated)
    if curve is not None:
        out["curve"] = curve
    return out


def write_sweep_report(sweep_dir: Path, jobs: list[SweepJob]) -> None:
    """``report.{json,md,html}`` in the sweep folder, when its jobs evaluated anything."""
    report = sweep_report(jobs)
    if report:
        write_report(Path(sweep_dir), report)
