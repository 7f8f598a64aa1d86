"""``report.html``: one self-contained page (inline CSS, plots as base64 PNGs; no network).

Two plots: the retained share of each task's gating metric per student, with
its bootstrap interval, and quality against size with the Pareto front (no other
model is both smaller and better): for a run, mean retained against size of every
student; for a sweep, its size-quality curve (:mod:`slimforge.eval.curve`), each
job's final model by parameters and by bytes on disk, the teacher's quantized
copies marked apart.
"""

from __future__ import annotations

import base64
import html
import io
from typing import Any

from slimforge.eval.bias import NOTE as BIAS_NOTE
from slimforge.eval.bias import bias_table
from slimforge.eval.curve import curve_note, curve_table
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
    fmt,
    gap_table,
    gate_lines,
    models_table,
    retained_table,
    scores_table,
    speculative_table,
    tasks_table,
    verdicts_table,
)
from slimforge.eval.verdicts import is_no_signal

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
        # A percentile interval of a ratio may miss its point estimate on noisy items: no negative bar.
        low = [max(0.0, h - ci[0]) if ci else 0.0 for h, ci in zip(heights, cis)]
        high = [max(0.0, ci[1] - h) if ci else 0.0 for h, ci in zip(heights, cis)]
        bars = ax.bar(xs, heights, width=width, label=label, yerr=[low, high], capsize=3)
        for bar, key in zip(bars, keys):
            if is_no_signal(report, key):  # drawn hollow: a ratio of noise, not a result
                bar.set_alpha(0.35)
                bar.set_hatch("//")
    ax.axhline(1.0, color="black", linewidth=0.8)
    if threshold is not None:
        ax.axhline(threshold, color="#cf222e", linestyle="--", linewidth=1, label=f"gate {threshold:g}")
    ticks = [k.replace(".", "\n") + ("\n(no signal)" if is_no_signal(report, k) else "") for k in keys]
    ax.set_xticks(range(len(keys)), ticks, fontsize=8)
    ax.set_ylabel("retained (student / teacher)")
    ax.set_title("Retention per task")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _png(fig)


def pareto_plot(report: dict[str, Any]) -> str | None:
    """Quality against size, Pareto front highlighted: a sweep's curve where it has one, else mean
    retained against size for the teacher and every student."""
    from matplotlib.figure import Figure

    if report.get("curve"):
        return curve_plot(report["curve"])
    points = [(label, s["size"] / 2**20, s["mean_retained"]) for label, s in report["summary"].items()
              if s.get("mean_retained") is not None]
    if len(points) < 2:
        return None
    fig = Figure(figsize=(6.5, 4.2))
    ax = fig.add_subplot()
    for label, size, quality in points:
        marker = "*" if label == TEACHER else "o"
        ax.scatter([size], [quality], s=30, color="#8c959f", marker=marker, zorder=3)
        ax.annotate(label, (size, quality), textcoords="offset points", xytext=(5, 4), fontsize=8)
    _draw_front(ax, points)
    ax.set_xlabel("size (MiB of weights)")
    ax.set_ylabel("mean retained over tasks with signal")
    ax.set_title("Quality against size")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def _draw_front(ax: Any, points: list[tuple[str, float, float]]) -> None:
    """The Pareto front of ``(label, size, quality)`` points: larger blue marks joined by a step line."""
    front = pareto_front(points)
    by_label = {label: (size, quality) for label, size, quality in points}
    xs, ys = zip(*(by_label[label] for label in front))
    ax.scatter(xs, ys, s=90, facecolors="none", edgecolors="#0969da", linewidths=1.2, zorder=4)
    ax.step(xs, ys, where="post", color="#0969da", linewidth=1, label="Pareto front")


# Panels of the curve: (point field, axis label, divisor).
CURVE_PANELS = (("num_parameters", "parameters (millions)", 1e6),
                ("disk_bytes", "bytes on disk of the final model (MiB)", 2**20))
REFERENCE_COLORS = ("#bf8700", "#8250df", "#cf222e", "#1a7f37")


def curve_plot(curve: dict[str, Any]) -> str | None:
    """A sweep's size-quality curve: y (the curve's metric) against parameters and against bytes on disk.

    Students are joined by a line in order of size; the teacher is a star at 1.0, and each
    reference point (the teacher quantized, no student stage) a labelled diamond of its own
    colour. When every student has one size, one panel shows y against the swept value instead,
    the teacher as a dotted line.
    """
    from matplotlib.figure import Figure

    points = [p for p in curve["points"] if p["y"] is not None]
    if len(points) < 2:
        return None
    swept = curve.get("swept")
    panels = (("swept", swept, 1.0),) if swept else CURVE_PANELS
    fig = Figure(figsize=(5.4 * len(panels) + 0.6, 4.4))
    axes = fig.subplots(1, len(panels), sharey=True, squeeze=False)[0]
    for ax, (field, xlabel, scale) in zip(axes, panels):
        _curve_panel(ax, [(p, p[field] / scale) for p in points if p.get(field) is not None], front=not swept)
        ax.set_xlabel(xlabel)
    axes[0].set_ylabel(curve["y"]["short"])
    fig.suptitle(f"Size–quality curve: {curve['y']['short']}", fontsize=10)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="upper center", bbox_to_anchor=(0.5, 0.0),
               ncol=6, fontsize=8, frameon=False)
    return _png(fig)


def _curve_panel(ax: Any, drawn: list[tuple[dict[str, Any], float]], front: bool) -> None:
    """One panel of the curve: ``(point, x)`` pairs, labels stacked where points share an x."""
    students = sorted((x, p["y"]) for p, x in drawn if p["job"] is not None and not p["reference"])
    if students:
        ax.plot(*zip(*students), color="#8c959f", marker="o", markersize=5, linewidth=1, label="students", zorder=3)
    references = [p for p, _ in drawn if p["reference"]]
    at_x: dict[float, int] = {}
    for p, x in drawn:
        if p["job"] is None:
            ax.scatter([x], [p["y"]], marker="*", s=140, color="#1f2328", label=TEACHER, zorder=5)
        elif p["reference"]:
            color = REFERENCE_COLORS[references.index(p) % len(REFERENCE_COLORS)]
            ax.scatter([x], [p["y"]], marker="D", s=45, color=color, label=p["label"], zorder=5)
        stacked = at_x[x] = at_x.get(x, -1) + 1
        ax.annotate(p["label"], (x, p["y"]), textcoords="offset points", xytext=(6, 4 - 11 * stacked), fontsize=8)
    if not front:
        ax.axhline(1.0, color="#1f2328", linewidth=0.8, linestyle=":", label=TEACHER)
    elif len(drawn) > 1:
        _draw_front(ax, [(p["model"], x, p["y"]) for p, x in drawn])
    ax.grid(alpha=0.3)


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<div class='wide'><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>"


def _note(text: str) -> str:
    """A note paragraph; the notes' markdown bold becomes <b>."""
    parts = html.escape(text).split("**")
    return "<p class='note'>" + "".join(f"<b>{p}</b>" if i % 2 else p for i, p in enumerate(parts)) + "</p>"


def _figure(png: str | None, alt: str, caption: str) -> str:
    if png is None:
        return f'<p class="note">{html.escape(caption)}: not enough models to plot.</p>'
    return (f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{png}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _size_quality_parts(report: dict[str, Any]) -> list[str]:
    """The quality-against-size figure; for a sweep with a curve, also its section: what the axes are, every point."""
    curve = report.get("curve")
    if curve is None:
        caption = "Mean retained (tasks with signal) against size; blue: the Pareto front (nothing smaller is better)."
    elif curve["swept"]:
        caption = f"Size–quality curve against {curve['swept']}; dotted: the teacher."
    else:
        caption = ("Size–quality curve. Star: the teacher; diamonds: the teacher quantized (no student stage); "
                   "circled: the Pareto front (nothing smaller is better).")
    parts = [_figure(pareto_plot(report), "quality against size", caption)]
    if curve:
        parts += ["<h2>Size–quality curve</h2>", f"<p class='note'>{html.escape(curve_note(curve))}</p>",
                  _html_table(*curve_table(curve))]
    return parts


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
    parts += _size_quality_parts(report)
    parts += ["<h2>Models</h2>", _html_table(*models_table(report))]
    if report.get("tasks"):
        parts += ["<h2>Tasks</h2>", _note(SIGNAL_NOTE), _html_table(*tasks_table(report))]
    parts += ["<h2>Scores</h2>", _html_table(*scores_table(report))]
    if report["retained"]:
        parts += ["<h2>Retained</h2>", "<p class='note'>student / teacher (teacher / student where lower is "
                  "better); brackets: 95% paired bootstrap interval; then the verdict.</p>",
                  _html_table(*retained_table(report))]
        header, rows = verdicts_table(report)
        if rows:
            parts += ["<h2>Verdicts</h2>", _note(VERDICT_NOTE), _html_table(header, rows)]
    header, rows = gap_table(report)
    if rows:
        parts += ["<h2>Gap closed by each stage</h2>", _note(GAP_NOTE), _html_table(header, rows)]
    header, rows = domain_table(report)
    if rows:
        parts += ["<h2>In-domain and out-of-domain</h2>", _note(DOMAIN_NOTE),
                  _html_table(header, rows)]
    tables = [t for t in fidelity_rows(report).values() if t[1]]
    if tables:
        parts.append("<h2>Fidelity to the teacher</h2>")
        parts += [_html_table(*t) for t in tables]
    header, rows = efficiency_table(report)
    if rows:
        parts += ["<h2>Efficiency</h2>", _html_table(header, rows)]
    header, rows = speculative_table(report)
    if rows:
        parts += ["<h2>Efficiency: speculative decoding</h2>", _note(SPECULATIVE_NOTE), _html_table(header, rows)]
    header, rows = bias_table(report)
    if rows:
        parts += ["<h2>Bias</h2>", f"<p class='note'>{html.escape(BIAS_NOTE)}</p>", _html_table(header, rows)]
    status = gate.get("status", "none")
    parts.append("<h2>Gate</h2>")
    css = {"pass": "pass", "fail": "fail", "error": "fail"}.get(status, "note")
    lines = gate_lines(report)
    parts.append(f"<p class='{css}'>{html.escape(lines[0].replace('**', ''))}</p>")
    if len(lines) > 1:
        parts.append("<ul>" + "".join(f"<li>{html.escape(line[2:])}</li>" for line in lines[1:]) + "</ul>")
    if report.get("warnings"):
        parts.append("<h2>Warnings</h2><ul>" + "".join(f"<li>{html.escape(w)}</li>" for w in report["warnings"]) + "</ul>")
    parts.append(f"<p class='note'>Created {html.escape(str(report.get('created', '')))}; "
                 f"every number is in report.json. Mean retained over tasks with signal: "
                 + ", ".join(f"{html.escape(k)} {fmt(v.get('mean_retained'))}" for k, v in report["summary"].items())
                 + "</p></body></html>")
    return "".join(parts)
