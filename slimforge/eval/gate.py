"""The CI gate: does every student meet the thresholds? Exit 0 pass, 1 fail, 2 error.

Thresholds come from the recipe (``eval.gate``) or the command line
(``--min-retained 0.95``, ``--min-retained arc_easy=0.9``, ``--max-kl 0.1``,
``--min-top1 0.8``, ``--max-bias-shift 0.1``). A retained ratio is compared as measured (the report shows
its confidence interval beside it, and a failure whose interval reaches the
threshold says it is inconclusive). A metric that could not be measured for a
student fails: a gate must not pass by omission.

A task with no signal (the teacher at chance, :mod:`slimforge.eval.verdicts`) is never
gated: an overall ``min_retained`` skips it with a line saying so; a threshold set for
that very task cannot be honoured, and the gate answers ``error`` (exit 2) with that line,
as for any other check that cannot be made as asked.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from slimforge.errors import ConfigError
from slimforge.eval.verdicts import is_no_signal

if TYPE_CHECKING:  # pragma: no cover
    from slimforge.config import GateConfig

EXIT_PASS, EXIT_FAIL, EXIT_ERROR = 0, 1, 2
# What to do about a task with no signal: more items narrow the teacher's interval off chance.
NO_SIGNAL_ADVICE = "raise eval.limit (--limit) or drop the task"


def parse_min_retained(values: list[str]) -> tuple[float | None, dict[str, float]]:
    """``["0.95", "arc_easy=0.9", "arc_easy.acc=0.92"]`` -> (0.95, {"arc_easy": 0.9, "arc_easy.acc": 0.92}).

    Raises:
        ConfigError: a value that is not a number, or an overall value given twice.
    """
    overall: float | None = None
    per_task: dict[str, float] = {}
    for item in values:
        key, sep, raw = item.rpartition("=")
        try:
            number = float(raw)
        except ValueError:
            raise ConfigError(f"--min-retained {item!r} is not a number or TASK=NUMBER, e.g. 0.95 or arc_easy=0.9") from None
        if sep:
            per_task[key] = number
        elif overall is not None:
            raise ConfigError(f"--min-retained has two overall values ({overall:g} and {number:g}); give one")
        else:
            overall = number
    return overall, per_task


def threshold_for(gate: GateConfig | None, task: str, metric: str) -> float | None:
    """The retention threshold the gate sets for ``task.metric``: per metric, else per task, else overall."""
    if gate is None:
        return None
    for key in (f"{task}.{metric}", task):
        if key in gate.min_retained_tasks:
            return gate.min_retained_tasks[key]
    return gate.min_retained


def _explicit(gate: GateConfig, task: str, metric: str) -> bool:
    return f"{task}.{metric}" in gate.min_retained_tasks or task in gate.min_retained_tasks


def _is_set(gate: GateConfig | None) -> bool:
    return gate is not None and (gate.min_retained is not None or bool(gate.min_retained_tasks)
                                 or gate.max_kl is not None or gate.min_top1_agreement is not None
                                 or gate.max_bias_shift is not None)


def _retention_checks(report: dict[str, Any], gate: GateConfig) -> list[tuple[str, str, float]]:
    """(task, metric, threshold) for every retained ratio the gate constrains."""
    checks = []
    for task, metric in report["primary"].items():
        threshold = threshold_for(gate, task, metric)
        if threshold is not None:
            checks.append((task, metric, threshold))
    for key, threshold in gate.min_retained_tasks.items():
        task, _, metric = key.partition(".")
        if metric and metric != report["primary"].get(task):
            checks.append((task, metric, threshold))
    return checks


def _fidelity_values(report: dict[str, Any], label: str, field: str) -> list[tuple[str, float]]:
    return [(task, fid[field]) for task, fid in report["fidelity"].get(label, {}).items() if field in fid]


def no_signal_line(report: dict[str, Any], task: str, metric: str, threshold: float | None = None) -> str:
    """``piqa is no signal (teacher acc 0.55, 95% CI [0.47, 0.63] includes chance 0.50); not gated — ...``;
    with the task's own ``threshold``, the line says that threshold cannot be checked."""
    name = task if report["primary"].get(task) == metric else f"{task}.{metric}"
    note = report["signal"][f"{task}.{metric}"]["note"]
    what = "not gated" if threshold is None else f"its threshold {threshold:g} cannot be checked"
    return f"{name} is no signal ({note}); {what} — {NO_SIGNAL_ADVICE}"


def _signal_checks(report: dict[str, Any], gate: GateConfig) -> tuple[list[tuple[str, str, float]], list[str], list[str]]:
    """The retention checks to make, and the lines of those not made: skipped (an overall threshold
    meets a no-signal task) and refused (a threshold set for a no-signal task itself)."""
    checks, skipped, refused = [], [], []
    for task, metric, threshold in _retention_checks(report, gate):
        if not is_no_signal(report, f"{task}.{metric}"):
            checks.append((task, metric, threshold))
        elif _explicit(gate, task, metric):
            refused.append(no_signal_line(report, task, metric, threshold))
        else:
            skipped.append(no_signal_line(report, task, metric))
    return checks, skipped, refused


def _retention_failure(report: dict[str, Any], label: str, task: str, metric: str, threshold: float) -> str | None:
    """The failure line of one retained ratio against its threshold, or None when it passes."""
    key = f"{task}.{metric}"
    value = report["retained"][label].get(key)
    if value is None:
        return f"{label}: {key} retained not measured (threshold {threshold:g})"
    if value >= threshold:
        return None
    ci = report["retained_ci"].get(label, {}).get(key)
    interval = f", 95% CI [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""
    if ci and ci[1] >= threshold:  # the interval reaches the threshold: a miss, but not a decided one
        interval += " (inconclusive: more items could decide)"
    return f"{label}: {key} retained {value:.4f} < {threshold:g}{interval}"


def check_gate(report: dict[str, Any], gate: GateConfig | None) -> dict[str, Any]:
    """The gate's verdict on a report.

    Returns:
        ``status`` (``none``, ``pass``, ``fail``, or ``error`` when a threshold was set for a
        task with no signal), ``passed``, ``checked`` (how many comparisons), ``failures``
        (one line each), ``skipped`` and ``refused`` (one line per no-signal task the gate
        did not gate on: under an overall threshold, or under its own) and the ``thresholds``.
    """
    if not _is_set(gate):
        return {"status": "none", "passed": True, "checked": 0, "failures": [], "thresholds": {}}
    assert gate is not None
    failures: list[str] = []
    checked = 0
    students = list(report["retained"])
    if not students:
        raise ConfigError("the gate has thresholds but there is no student to check; name at least one")
    checks, skipped, refused = _signal_checks(report, gate)
    for label in students:
        for task, metric, threshold in checks:
            checked += 1
            line = _retention_failure(report, label, task, metric, threshold)
            if line is not None:
                failures.append(line)
        for field, bound, worse in (("kl_mean", gate.max_kl, "above"), ("top1_agreement", gate.min_top1_agreement, "below")):
            if bound is None:
                continue
            values = _fidelity_values(report, label, field)
            if not values:
                checked += 1
                failures.append(f"{label}: {field} not measured (threshold {bound:g})")
            for task, value in values:
                checked += 1
                if (value > bound) if worse == "above" else (value < bound):
                    sign = ">" if worse == "above" else "<"
                    failures.append(f"{label}: {task}.{field} {value:.4f} {sign} {bound:g}")
        if gate.max_bias_shift is not None:  # bias tasks: |student - teacher| of the overall bias scores
            from slimforge.eval.bias import bias_gate

            bias_checked, bias_failures = bias_gate(report, label, gate.max_bias_shift)
            checked += bias_checked
            failures += bias_failures
    status = "error" if refused else "fail" if failures else "pass"
    return {"status": status, "passed": status == "pass", "checked": checked, "failures": failures,
            "skipped": skipped, "refused": refused, "thresholds": asdict(gate)}


def exit_code(report: dict[str, Any]) -> int:
    """0 when the gate passed or had nothing to check, 1 when it failed, 2 when it refused a threshold."""
    status = report.get("gate", {}).get("status")
    return EXIT_ERROR if status == "error" else EXIT_FAIL if status == "fail" else EXIT_PASS
