"""The CI gate: does every student meet the thresholds? Exit 0 pass, 1 fail, 2 error.

Thresholds come from the recipe (``eval.gate``) or the command line
(``--min-retained 0.95``, ``--min-retained arc_easy=0.9``, ``--max-kl 0.1``,
``--min-top1 0.8``). A retained ratio is compared as measured (the report shows
its confidence interval beside it). A metric that could not be measured for a
student fails: a gate must not pass by omission.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from slimforge.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from slimforge.config import GateConfig

EXIT_PASS, EXIT_FAIL, EXIT_ERROR = 0, 1, 2


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


def _threshold(gate: GateConfig, task: str, metric: str) -> float | None:
    for key in (f"{task}.{metric}", task):
        if key in gate.min_retained_tasks:
            return gate.min_retained_tasks[key]
    return gate.min_retained


def _is_set(gate: GateConfig | None) -> bool:
    return gate is not None and (gate.min_retained is not None or bool(gate.min_retained_tasks)
                                 or gate.max_kl is not None or gate.min_top1_agreement is not None)


def _retention_checks(report: dict[str, Any], gate: GateConfig) -> list[tuple[str, str, float]]:
    """(task, metric, threshold) for every retained ratio the gate constrains."""
    checks = []
    for task, metric in report["primary"].items():
        threshold = _threshold(gate, task, metric)
        if threshold is not None:
            checks.append((task, metric, threshold))
    for key, threshold in gate.min_retained_tasks.items():
        task, _, metric = key.partition(".")
        if metric and metric != report["primary"].get(task):
            checks.append((task, metric, threshold))
    return checks


def _fidelity_values(report: dict[str, Any], label: str, field: str) -> list[tuple[str, float]]:
    return [(task, fid[field]) for task, fid in report["fidelity"].get(label, {}).items() if field in fid]


def check_gate(report: dict[str, Any], gate: GateConfig | None) -> dict[str, Any]:
    """The gate's verdict on a report.

    Returns:
        ``status`` (``none``, ``pass`` or ``fail``), ``passed``, ``checked`` (how
        many comparisons), ``failures`` (one line each) and the ``thresholds``.
    """
    if not _is_set(gate):
        return {"status": "none", "passed": True, "checked": 0, "failures": [], "thresholds": {}}
    assert gate is not None
    failures: list[str] = []
    checked = 0
    students = list(report["retained"])
    if not students:
        raise ConfigError("the gate has thresholds but there is no student to check; name at least one")
    for label in students:
        ratios = report["retained"][label]
        for task, metric, threshold in _retention_checks(report, gate):
            checked += 1
            value = ratios.get(f"{task}.{metric}")
            if value is None:
                failures.append(f"{label}: {task}.{metric} retained not measured (threshold {threshold:g})")
            elif value < threshold:
                ci = report["retained_ci"].get(label, {}).get(f"{task}.{metric}")
                interval = f", 95% CI [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""
                failures.append(f"{label}: {task}.{metric} retained {value:.4f} < {threshold:g}{interval}")
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
    return {"status": "fail" if failures else "pass", "passed": not failures, "checked": checked,
            "failures": failures, "thresholds": asdict(gate)}


def exit_code(report: dict[str, Any]) -> int:
    """0 when the gate passed or had nothing to check, 1 when it failed."""
    return EXIT_FAIL if report.get("gate", {}).get("status") == "fail" else EXIT_PASS
