"""What a report may conclude from its numbers: signal above chance, kept / lost / inconclusive, gap closed.

Pure functions over task results (``eval/<model>.json``'s ``tasks``) and report sections:

- **no signal**: a task whose teacher scores, within its 95% bootstrap interval, at or
  below the chance level (what guessing scores: 1 / choices, or the majority answer's share
  where labels are unbalanced; recorded by :mod:`slimforge.eval.harness`). Retention there
  divides noise by noise: the report leaves it out of every aggregate and the gate does not
  gate on it.
- **verdicts**: a student *kept* a metric when its retention interval lies entirely at or
  above the threshold (the gate's for that task, else ``eval.retention_threshold``), *lost*
  it when entirely below, and the comparison is *inconclusive* when the interval spans it.
- **gap closed** by a stage whose parent is itself a student: (child - parent) / (teacher -
  parent), the share of what the parent lost that the stage won back, with a paired
  bootstrap interval; undefined when the parent is not measurably apart from the teacher.
"""

from __future__ import annotations

from typing import Any

from slimforge.eval.stats import ItemScores, bootstrap_mean_ci, gap_closed, paired_bootstrap_gap

KEPT, LOST, INCONCLUSIVE, NO_SIGNAL, SIGNAL = "kept", "lost", "inconclusive", "no signal", "signal"


def metric_signal(result: dict[str, Any], metric: str, n_boot: int, seed: int) -> dict[str, Any] | None:
    """Whether the teacher's ``metric`` on a task stands above the task's chance level.

    Args:
        result: the teacher's task result (with ``chance``, ``chance_metrics`` and ``per_item``).
        metric: a metric of that task.

    Returns:
        ``status`` (``signal`` or ``no signal``), ``chance``, ``chance_basis``, ``teacher`` (the
        value), ``teacher_ci`` (its 95% bootstrap interval over items) and ``note`` (one
        clause saying so); None when the metric has no chance level or no per-item scores.
    """
    if result.get("chance") is None or metric not in result.get("chance_metrics", []):
        return None
    items = result.get("per_item", {}).get(metric)
    ci = bootstrap_mean_ci(ItemScores.from_json(items).values, n_boot=n_boot, seed=seed) if items else None
    if ci is None or metric not in result:
        return None
    chance, value = float(result["chance"]), float(result[metric])
    if ci[0] > chance:
        status, relation = SIGNAL, "above"
    else:
        status, relation = NO_SIGNAL, "includes" if ci[1] >= chance else "lies below"
    note = f"teacher {metric} {value:.2f}, 95% CI [{ci[0]:.2f}, {ci[1]:.2f}] {relation} chance {chance:.2f}"
    return {"status": status, "chance": chance, "chance_basis": result.get("chance_basis"), "teacher": value,
            "teacher_ci": [ci[0], ci[1]], "note": note}


def task_signals(teacher_tasks: dict[str, dict[str, Any]], n_boot: int, seed: int) -> dict[str, dict[str, Any]]:
    """:func:`metric_signal` of every metric that has a chance level, keyed ``task.metric``."""
    out = {}
    for task, result in teacher_tasks.items():
        for metric in result.get("chance_metrics", []):
            signal = metric_signal(result, metric, n_boot, seed)
            if signal is not None:
                out[f"{task}.{metric}"] = signal
    return out


def is_no_signal(report: dict[str, Any], key: str) -> bool:
    """Whether ``task.metric`` is a no-signal comparison in this report."""
    return (report.get("signal", {}).get(key) or {}).get("status") == NO_SIGNAL


def verdict(interval: list[float] | tuple[float, float] | None, threshold: float) -> str | None:
    """``kept`` (interval at or above ``threshold``), ``lost`` (below), ``inconclusive`` (spans it);
    None without an interval."""
    if interval is None:
        return None
    low, high = interval
    if low >= threshold:
        return KEPT
    if high < threshold:
        return LOST
    return INCONCLUSIVE


def student_verdicts(report: dict[str, Any], intervals: dict[str, list[float]],
                     thresholds: dict[str, float]) -> dict[str, str]:
    """The verdict of every retained ratio with an interval (``no signal`` where the teacher is at chance)."""
    out = {}
    for key, interval in intervals.items():
        if is_no_signal(report, key):
            out[key] = NO_SIGNAL
        else:
            found = verdict(interval, thresholds[key])
            if found is not None:
                out[key] = found
    return out


# --- lineage and gap closed -----------------------------------------------------------------


def student_parents(records: dict[str, dict[str, Any]], teacher_label: str) -> dict[str, str]:
    """Each evaluated model whose parent stage was also evaluated as a student: label -> parent label.

    The link is the stage fingerprints each record's ``lineage`` carries (from the
    artifacts' ``slimforge.json``): the child's ``parent`` is the parent's ``fingerprint``.
    """
    by_fingerprint = {rec["lineage"]["fingerprint"]: label for label, rec in records.items()
                      if label != teacher_label and (rec.get("lineage") or {}).get("fingerprint")}
    out = {}
    for label, rec in records.items():
        parent = by_fingerprint.get((rec.get("lineage") or {}).get("parent") or "")
        if label != teacher_label and parent is not None and parent != label:
            out[label] = parent
    return out


def metric_gap(teacher: dict[str, Any], parent: dict[str, Any], child: dict[str, Any], metric: str,
               parent_label: str, n_boot: int, seed: int) -> dict[str, Any] | None:
    """Gap closed on one metric: ``value`` and ``ci`` (None when undefined) and ``reason`` when undefined.

    With items that pair up across the three models, the gap is undefined when the
    teacher-parent difference's 95% interval holds 0 (the parent is not measurably
    apart from the teacher); without them, only when the two score exactly the same.
    """
    values = [res.get(metric) for res in (teacher, parent, child)]
    if any(not isinstance(v, int | float) for v in values):
        return None
    t_value, p_value, c_value = (float(v) for v in values)
    scores = [res.get("per_item", {}).get(metric) for res in (teacher, parent, child)]
    ids = [res.get("item_ids") for res in (teacher, parent, child)]
    paired = all(scores) and ids[0] and ids[0] == ids[1] == ids[2]
    intervals = paired_bootstrap_gap(*(ItemScores.from_json(s) for s in scores), n_boot=n_boot,
                                     seed=seed) if paired else None
    point = gap_closed(t_value, p_value, c_value)
    if intervals is not None and intervals.closed is None:
        low, high = intervals.gap
        return {"value": None, "ci": None,
                "reason": f"{parent_label} is not measurably apart from the teacher (teacher − {parent_label} "
                          f"{t_value - p_value:+.4g}, 95% CI [{low:+.4g}, {high:+.4g}] includes 0): no gap to close"}
    if point is None:
        return {"value": None, "ci": None, "reason": f"{parent_label} scores exactly as the teacher: no gap to close"}
    ci = None if intervals is None or intervals.closed is None else list(intervals.closed)
    return {"value": point, "ci": ci, "reason": None}


def gap_closed_section(report: dict[str, Any], records: dict[str, dict[str, Any]], parents: dict[str, str],
                       teacher_label: str, n_boot: int, seed: int) -> dict[str, dict[str, Any]]:
    """Per model with a student parent (``parents``, :func:`student_parents`): ``parent`` and, per
    gating ``task.metric``, :func:`metric_gap` (no-signal tasks get a reason instead of a number)."""
    out: dict[str, dict[str, Any]] = {}
    teacher = records[teacher_label]["tasks"]
    for label, parent in parents.items():
        metrics: dict[str, Any] = {}
        for task, metric in report["primary"].items():
            key = f"{task}.{metric}"
            results = [teacher.get(task), records[parent]["tasks"].get(task), records[label]["tasks"].get(task)]
            if any(res is None or "skipped" in res for res in results):
                continue
            if is_no_signal(report, key):
                metrics[key] = {"value": None, "ci": None, "reason": "no signal: the teacher is at chance"}
                continue
            gap = metric_gap(*results, metric, parent, n_boot, seed)  # type: ignore[misc]
            if gap is not None:
                metrics[key] = gap
        out[label] = {"parent": parent, "metrics": metrics}
    return out
