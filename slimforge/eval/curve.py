"""A sweep's size-quality curve: each job's final model placed by its size against one quality number.

The sweep report (:func:`slimforge.eval.report.sweep_report`) gains a ``curve`` section built
here from the jobs' own reports: one point per job (the last stage of its pipeline that was
evaluated) and one for the teacher, each with its parameters, its bytes on disk and the y
value, plus every number the curve's table shows. A job that only quantizes the teacher (no
student, prune or distill stage) is a *reference*, the model a user would pick instead of a
student (``teacher NF4``, ``teacher GPTQ``), drawn apart from the students.

The y value is the retained perplexity (teacher ppl / student ppl) on out-of-domain text (a
perplexity task the report labels ``out-of-domain``, the shipped presets' ``wikipedia``), else on
the in-domain held-out blocks (``perplexity``); without either, the mean retained over every
task's gating metric. When every student has one size (unstructured sparsity stores its zeros
densely), the curve is drawn against the one numeric value the sweep varies instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from slimforge.eval.tables import TEACHER, fmt, fmt_bytes

IN_DOMAIN, OUT_OF_DOMAIN = "in-domain", "out-of-domain"
# The shipped eval presets' task of each domain, for a report whose tasks carry no domain label.
DOMAIN_TASKS = {OUT_OF_DOMAIN: "wikipedia", IN_DOMAIN: "perplexity"}
CURVE_METRIC = "perplexity"
MEAN_RETAINED = "mean_retained"
# Stage kinds that make a student; a job with none of them only quantizes the teacher.
STUDENT_KINDS = ("student", "prune", "distill")


@dataclass(frozen=True)
class SweepJob:
    """One job of a sweep, as the sweep report sees it.

    Attributes:
        name: the job's folder name (``job00``).
        report: the job's own report (``report.json``'s content; empty when it evaluated nothing).
        overrides: the overrides that made this job (``size=p90``).
        description: the job's recipe description (a sweep over a config group's points sets it per point).
        stages: ``(stage, kind, method)`` in pipeline order.
    """

    name: str
    report: dict[str, Any]
    overrides: list[str] = field(default_factory=list)
    description: str = ""
    stages: list[tuple[str, str, str]] = field(default_factory=list)

    @property
    def is_reference(self) -> bool:
        """Whether the job only quantizes the teacher (no student, prune or distill stage)."""
        return bool(self.stages) and not any(kind in STUDENT_KINDS for _, kind, _ in self.stages)

    def final_label(self) -> str | None:
        """The last pipeline stage the job evaluated (the model it made), else its last evaluated student."""
        evaluated = [label for label in self.report.get("models", {}) if label != TEACHER]
        in_pipeline = [stage for stage, _, _ in self.stages if stage in evaluated]
        return (in_pipeline or evaluated or [None])[-1]

    def reference_label(self) -> str:
        """``teacher NF4``, ``teacher GPTQ``: the teacher and its last quantization method."""
        method = [m for _, kind, m in self.stages if kind == "quantize"][-1]
        return f"{TEACHER} {method.removeprefix('bnb_').upper()}"


def text_task(report: dict[str, Any], domain: str) -> str:
    """The report's first perplexity task labelled ``domain``, else the shipped presets' task of that
    domain (:data:`DOMAIN_TASKS`) unless the report labels it otherwise."""
    tasks = report.get("tasks", {})
    for name, info in tasks.items():
        if info.get("domain") == domain and info.get("metric") == CURVE_METRIC:
            return name
    default = DOMAIN_TASKS[domain]
    return default if (tasks.get(default) or {}).get("domain") in (None, domain) else ""


def curve_axis(report: dict[str, Any]) -> dict[str, Any]:
    """What the curve's y axis shows: ``task``, ``metric``, ``key`` (into ``retained``), ``domain``, ``label``, ``short``.

    The out-of-domain perplexity task where any student has a retained value for it, else the
    in-domain one, else the mean retained over the gating metrics.
    """
    for domain in (OUT_OF_DOMAIN, IN_DOMAIN):
        task = text_task(report, domain)
        key = f"{task}.{CURVE_METRIC}"
        if task and any(key in ratios for ratios in report.get("retained", {}).values()):
            fallback = "" if domain == OUT_OF_DOMAIN else " (no out-of-domain perplexity measured)"
            return {"task": task, "metric": CURVE_METRIC, "key": key, "domain": domain,
                    "label": f"perplexity retained on {task} ({domain}): teacher ppl / student ppl{fallback}",
                    "short": f"{task} ppl retained ({domain})"}
    return {"task": None, "metric": MEAN_RETAINED, "key": MEAN_RETAINED, "domain": None,
            "label": "mean retained over every task's gating metric (no perplexity task measured)",
            "short": "mean retained over tasks"}


def _y_value(report: dict[str, Any], key: str, model: str) -> float | None:
    if model == TEACHER:
        return 1.0
    if key == MEAN_RETAINED:
        return report.get("summary", {}).get(model, {}).get(MEAN_RETAINED)
    return report.get("retained", {}).get(model, {}).get(key)


def _task_numbers(report: dict[str, Any], model: str, task: str) -> dict[str, float | None]:
    """A perplexity task's numbers for one model: perplexity, retained, KL and top-1 agreement."""
    perplexity = report["models"][model]["tasks"].get(task, {}).get(CURVE_METRIC) if task else None
    if perplexity is None:
        return dict.fromkeys(("perplexity", "retained", "kl_mean", "top1_agreement"))
    is_teacher = model == TEACHER
    fidelity = report.get("fidelity", {}).get(model, {}).get(task, {})
    return {"perplexity": perplexity,
            "retained": 1.0 if is_teacher else report.get("retained", {}).get(model, {}).get(f"{task}.{CURVE_METRIC}"),
            "kl_mean": 0.0 if is_teacher else fidelity.get("kl_mean"),
            "top1_agreement": 1.0 if is_teacher else fidelity.get("top1_agreement")}


def benchmark_tasks(report: dict[str, Any]) -> list[str]:
    """The benchmark (lm-eval) tasks of a report, in its order."""
    return [task for task, info in report.get("tasks", {}).items() if info.get("type") == "lm_eval"]


def _point(report: dict[str, Any], model: str, axis: dict[str, Any], **what: Any) -> dict[str, Any]:
    entry = report["models"][model]
    retained = report.get("retained", {}).get(model, {})
    benchmarks = {task: 1.0 if model == TEACHER else retained.get(f"{task}.{report['primary'].get(task)}")
                  for task in benchmark_tasks(report)}
    return {"model": model, **what, "num_parameters": entry.get("num_parameters"),
            "disk_bytes": entry.get("disk_bytes"), "y": _y_value(report, axis["key"], model),
            **{domain: _task_numbers(report, model, text_task(report, domain)) for domain in (IN_DOMAIN, OUT_OF_DOMAIN)},
            "benchmarks": benchmarks}


def varying_overrides(jobs: list[SweepJob]) -> list[list[str]]:
    """Each job's overrides that not every job shares (``size=p90``): what makes the job a point of the sweep."""
    shared = set.intersection(*(set(job.overrides) for job in jobs)) if len(jobs) > 1 else set()
    return [[o for o in job.overrides if o not in shared] for job in jobs]


def _override_key(override: str) -> str:
    return override.partition("=")[0].lstrip("+~")


def swept_key(varying: list[list[str]]) -> str | None:
    """The one override key the jobs vary, when every job gives it a number; else None."""
    keys = {_override_key(o) for job in varying for o in job}
    if len(keys) != 1 or not all(len(job) == 1 for job in varying):
        return None
    try:
        [float(job[0].partition("=")[2]) for job in varying]
    except ValueError:
        return None
    return keys.pop()


def sweep_curve(report: dict[str, Any], jobs: list[SweepJob]) -> dict[str, Any] | None:
    """The ``curve`` section of a sweep report (see the module docstring), or None when no job evaluated a model.

    Args:
        report: the sweep report so far: the teacher once, each job's students as ``<job>/<label>``.
        jobs: every job whose report went into it, in order.
    """
    if TEACHER not in report.get("models", {}):
        return None
    axis = curve_axis(report)
    distinct = len({job.description for job in jobs}) > 1  # a sweep over a group's points describes each
    points = [_point(report, TEACHER, axis, job=None, label=TEACHER, what="the teacher", reference=False,
                     overrides=[])]
    for job, varying in zip(jobs, varying_overrides(jobs)):
        final = job.final_label()
        if final is None or f"{job.name}/{final}" not in report["models"]:
            continue
        values = ",".join(o.partition("=")[2] for o in varying)
        label = job.reference_label() if job.is_reference else values or job.name
        what = job.description if distinct and job.description else " ".join(varying) or job.name
        points.append(_point(report, f"{job.name}/{final}", axis, job=job.name, label=label, what=what,
                             reference=job.is_reference, overrides=varying))
    if len(points) < 2:
        return None
    students = [p for p in points if p["job"] is not None and not p["reference"]]
    one_size = len(students) > 1 and len({p["num_parameters"] for p in students}) == 1
    swept = swept_key([p["overrides"] for p in points[1:]]) if one_size else None
    for point in points:
        if swept is not None:
            point["swept"] = float(point["overrides"][0].partition("=")[2]) if point["overrides"] else None
    return {"y": axis, "x": ["num_parameters", "disk_bytes"], "one_size": one_size, "swept": swept,
            "tasks": {domain: text_task(report, domain) or None for domain in (IN_DOMAIN, OUT_OF_DOMAIN)},
            "points": points}


def curve_table(curve: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Every point of the curve, largest first: what it is, its size, in- and out-of-domain numbers, benchmarks."""
    points = sorted(curve["points"], key=lambda p: (-(p["num_parameters"] or 0), -(p["disk_bytes"] or 0), p["job"] or ""))
    benchmarks = list(dict.fromkeys(task for p in points for task in p["benchmarks"]))
    tasks = curve["tasks"]
    header = ["job", "point", "what it is", "parameters", "on disk",
              f"{tasks[IN_DOMAIN] or '–'} ppl ({IN_DOMAIN})", "retained",
              f"{tasks[OUT_OF_DOMAIN] or '–'} ppl ({OUT_OF_DOMAIN})", "retained", "KL / token", "top-1 agreement",
              *[f"{task} retained" for task in benchmarks]]
    rows = []
    for p in points:
        ind, ood = p[IN_DOMAIN], p[OUT_OF_DOMAIN]
        params = "–" if p["num_parameters"] is None else f"{p['num_parameters'] / 1e6:.1f}M"
        rows.append([p["job"] or "–", p["label"], p["what"], params, fmt_bytes(p["disk_bytes"]),
                     fmt(ind["perplexity"], 2), fmt(ind["retained"]), fmt(ood["perplexity"], 2), fmt(ood["retained"]),
                     fmt(ood["kl_mean"]), fmt(ood["top1_agreement"]), *[fmt(p["benchmarks"].get(t)) for t in benchmarks]])
    return header, rows


def curve_note(curve: dict[str, Any]) -> str:
    """One sentence under the curve's heading: what its axes are (and why, for a one-size sweep)."""
    note = f"y: {curve['y']['label']}."
    if curve["swept"]:
        return note + (f" x: {curve['swept']}, since every student has the same size (zeros stored densely do "
                       "not shrink the files); the teacher is the dotted line at 1.")
    note += " x: parameters, and bytes on disk of each job's final model."
    if curve["one_size"]:
        note += " Every student has the same size: read quality from the table."
    return note
