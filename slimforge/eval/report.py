"""report.json and report.md: every metric of every model, and what each student retained."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from slimforge.fsutil import atomic_write_json, atomic_write_text

# Metrics whose retention is teacher / student rather than student / teacher.
LOWER_IS_BETTER = {"perplexity", "word_perplexity", "byte_perplexity", "kl", "bits_per_byte"}
HIGHER_IS_BETTER = {"accuracy", "acc", "acc_norm", "top1_agreement"}
HEADLINE = LOWER_IS_BETTER | HIGHER_IS_BETTER


def scalar_metrics(task_result: dict[str, Any]) -> dict[str, float]:
    """The headline numbers of a task result (per-item lists and counts left out)."""
    return {k: float(v) for k, v in task_result.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and k not in ("tokens", "blocks")}


def retained(metric: str, teacher: float, student: float) -> float | None:
    """Student's share of the teacher's quality: 1.0 = no loss; > 1 = better than the teacher."""
    if metric in LOWER_IS_BETTER:
        return teacher / student if student else None
    return student / teacher if teacher else None


def build_report(recipe: str, results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    models = {
        label: {"num_parameters": rec["num_parameters"], "path": rec["path"],
                "tasks": {task: scalar_metrics(res) for task, res in rec["tasks"].items()}}
        for label, rec in results.items()
    }
    report: dict[str, Any] = {"recipe": recipe, "models": models, "retained": {}}
    teacher = models.get("teacher")
    if teacher is None:
        return report
    for label, model in models.items():
        if label == "teacher":
            continue
        ratios = {}
        for task, metrics in model["tasks"].items():
            for metric, value in metrics.items():
                base = teacher["tasks"].get(task, {}).get(metric)
                if base is not None and metric in HEADLINE:
                    ratios[f"{task}.{metric}"] = retained(metric, base, value)
        ratios["size"] = model["num_parameters"] / teacher["num_parameters"]
        report["retained"][label] = ratios
    return report


def markdown_report(report: dict[str, Any]) -> str:
    headline = sorted({f"{t}.{m}" for model in report["models"].values()
                       for t, ms in model["tasks"].items() for m in ms if m in HEADLINE})
    lines = [f"# slimforge report: {report['recipe']}", "",
             "| model | parameters | " + " | ".join(headline) + " | retained |",
             "|---|---:|" + "---:|" * len(headline) + "---|"]
    for label, model in report["models"].items():
        values = []
        for key in headline:
            task, metric = key.split(".", 1)
            value = model["tasks"].get(task, {}).get(metric)
            values.append(f"{value:.3f}" if value is not None else "")
        ratios = report["retained"].get(label, {})
        kept = ", ".join(f"{k} {v:.3f}" for k, v in ratios.items() if k != "size" and v is not None)
        lines.append(f"| {label} | {model['num_parameters'] / 1e6:.1f}M | " + " | ".join(values) + f" | {kept} |")
    lines.append("")
    lines.append("retained = student / teacher (teacher / student for perplexity): 1.0 means nothing was lost.")
    return "\n".join(lines) + "\n"


def write_report(run_dir: Path, report: dict[str, Any]) -> None:
    atomic_write_json(run_dir / "report.json", report)
    atomic_write_text(run_dir / "report.md", markdown_report(report))
