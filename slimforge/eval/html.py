"""``report.html``: one self-contained page (inline CSS, plots as base64 PNGs; no network).

Two plots: the retained share of each task's gating metric per student, with
its bootstrap interval, and quality (mean retained) against size across every
student of a run or a sweep, with the Pareto front (no other model is both
smaller and better).
"""

from __future__ import annotations

import base64
import html
import io
from typing import Any

from slimforge.eval.tables import (
    TEACHER,
    efficiency_table,
    fidelity_rows,
    fmt,
    gate_lines,
    models_table,
    retained_table,
    scores_table,
    tasks_table,
)

CSS = """
body { font-family: system-ui, -apple-system, Segoe UI, Roboto, sans-serif; margin: 2rem auto; max-width: 1100px;
       color: #1f2328; padding: 0 1rem; }
h1 { font-size: 1.6rem; } h2 { font-size: 1.2rem; margin-top: 2rem; border-bottom: 1px solid #d0d7de; }
table { border-collapse: collapse; margin: 0.5rem 0 1rem; font-size: 0.9rem; }
th, td { border: 1px solid #d0d7de; padding: 0.25rem 0.6rem; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f6f8fa; }
.pass { color: #1a7f37; font-weight: bold; } .fail { color: #cf222e; font-weight: bold; }
figure { margin: 1rem 0; } figcaption { font-size: 0.85rem; color: #57606a; }
img { max-width: 100%; height: auto; border: 1px solid #d0d7de; }
.note { color: #57606a; font-size: 0.9rem; }
.wide { overflow-x: auto; }
"""


def pareto_front(points: list[tuple[str, float, float]]) -> list[str]:
    """Labels of the points no other point beats: smaller-or-equal size and higher-or-equal quality, one strictly.

    Args:
        points: (label, size, quality) triples.

    Returns:
        The front's labels, by increasing size.
    """
    front = []
    for label, size, quality in points:
        dominated = any(s <= size and q >= quality and (s < size or q > quality) for _, s, q in points)
        if not dominated:
            front.append((size, label))
    return [label for _, label in sorted(front)]


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def retention_plot(report: dict[str, Any], threshold: float | None = None) -> str | None:
    """Grouped bars: retained share of each task's gating metric, per student, with 95% intervals."""
    from matplotlib.figure import Figure

    keys = [f"{t}.{m}" for t, m in report["primary"].items()]
    students = list(report["retained"])
    if not keys or not students:
        return None
    fig = Figure(figsize=(max(6.0, 1.1 * len(keys) * max(1, len(students)) ** 0.5 + 2), 3.8))
    ax = fig.add_subplot()
    width = 0.8 / len(students)
    for i, label in enumerate(students):
        values = [report["retained"][label].get(k) for k in keys]
        xs = [j + (i - (len(students) - 1) / 2) * width for j in range(len(keys))]
        heights = [v if v is not None else 0.0 for v in values]
        cis = [report["retained_ci"].get(label, {}).get(k) for k in keys]
        low = [h - ci[0] if ci else 0.0 for h, ci in zip(heights, cis)]
        high = [ci[1] - h if ci else 0.0 for h, ci in zip(heights, cis)]
        ax.bar(xs, heights, width=width, label=label, yerr=[low, high], capsize=3)
    ax.axhline(1.0, color="black", linewidth=0.8)
    if threshold is not None:
        ax.axhline(threshold, color="#cf222e", linestyle="--", linewidth=1, label=f"gate {threshold:g}")
    ax.set_xticks(range(len(keys)), [k.replace(".", "\n") for k in keys], fontsize=8)
    ax.set_ylabel("retained (student / teacher)")
    ax.set_title("Retention per task")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _png(fig)


def pareto_plot(report: dict[str, Any]) -> str | None:
    """Mean retained against size for the teacher and every student, Pareto front highlighted."""
    from matplotlib.figure import Figure

    points = [(label, s["size"] / 2**20, s["mean_retained"]) for label, s in report["summary"].items()
              if s.get("mean_retained") is not None]
    if len(points) < 2:
        return None
    front = pareto_front(points)
    fig = Figure(figsize=(6.5, 4.2))
    ax = fig.add_subplot()
    for label, size, quality in points:
        on_front = label in front
        ax.scatter([size], [quality], s=60 if on_front else 30, color="#0969da" if on_front else "#8c959f",
                   marker="*" if label == TEACHER else "o", zorder=3)
        ax.annotate(label, (size, quality), textcoords="offset points", xytext=(5, 4), fontsize=8)
    by_label = {label: (size, quality) for label, size, quality in points}
    xs, ys = zip(*(by_label[label] for label in front))
    ax.step(xs, ys, where="post", color="#0969da", linewidth=1, label="Pareto front")
    ax.set_xlabel("size (MiB of weights)")
    ax.set_ylabel("mean retained over tasks")
    ax.set_title("Quality against size")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<div class='wide'><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>"


def _figure(png: str | None, alt: str, caption: str) -> str:
    if png is None:
        return f'<p class="note">{html.escape(caption)}: not enough models to plot.</p>'
    return (f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{png}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def html_report(report: dict[str, Any]) -> str:
    """The whole page as a string."""
    title = html.escape(f"slimforge report: {report['title']}")
    s = report.get("settings", {})
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{title}</title>",
             f"<style>{CSS}</style></head><body><h1>{title}</h1>"]
    if s:
        parts.append(f"<p class='note'>Identical settings for every model: device {html.escape(str(s['device']))}, "
                     f"dtype {html.escape(str(s['dtype']))}, batch size {s['batch_size']}, seed {s['seed']}, "
                     f"item limit {s['limit'] or 'none'}, few-shot "
                     f"{s['num_fewshot'] if s['num_fewshot'] is not None else 'task default'}.</p>")
    gate = report.get("gate") or {}
    threshold = (gate.get("thresholds") or {}).get("min_retained")
    parts.append("<h2>Plots</h2>")
    parts.append(_figure(retention_plot(report, threshold), "retention per task",
                         "Retained share of each task's gating metric; bars: 95% paired bootstrap intervals."))
    parts.append(_figure(pareto_plot(report), "quality against size",
                         "Mean retained against size; blue: the Pareto front (nothing smaller is better)."))
    parts += ["<h2>Models</h2>", _html_table(*models_table(report))]
    if report.get("tasks"):
        parts += ["<h2>Tasks</h2>", _html_table(*tasks_table(report))]
    parts += ["<h2>Scores</h2>", _html_table(*scores_table(report))]
    if report["retained"]:
        parts += ["<h2>Retained</h2>", "<p class='note'>student / teacher (teacher / student where lower is "
                  "better); brackets: 95% paired bootstrap interval.</p>", _html_table(*retained_table(report))]
    tables = [t for t in fidelity_rows(report).values() if t[1]]
    if tables:
        parts.append("<h2>Fidelity to the teacher</h2>")
        parts += [_html_table(*t) for t in tables]
    header, rows = efficiency_table(report)
    if rows:
        parts += ["<h2>Efficiency</h2>", _html_table(header, rows)]
    status = gate.get("status", "none")
    parts.append("<h2>Gate</h2>")
    css = {"pass": "pass", "fail": "fail"}.get(status, "note")
    lines = gate_lines(report)
    parts.append(f"<p class='{css}'>{html.escape(lines[0].replace('**', ''))}</p>")
    if len(lines) > 1:
        parts.append("<ul>" + "".join(f"<li>{html.escape(line[2:])}</li>" for line in lines[1:]) + "</ul>")
    if report.get("warnings"):
        parts.append("<h2>Warnings</h2><ul>" + "".join(f"<li>{html.escape(w)}</li>" for w in report["warnings"]) + "</ul>")
    parts.append(f"<p class='note'>Created {html.escape(str(report.get('created', '')))}; "
                 f"every number is in report.json. Mean retained: "
                 + ", ".join(f"{html.escape(k)} {fmt(v.get('mean_retained'))}" for k, v in report["summary"].items())
                 + "</p></body></html>")
    return "".join(parts)
