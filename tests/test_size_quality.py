"""The size-quality sweep: its points (recipes/size/) as planned on the real teacher's shape, and the curve
the sweep report draws from its jobs' reports (fake reports, shaped by the real report builder).

The shipped recipe running end to end at tiny scale is tests/test_recipes.py's job.
"""

from __future__ import annotations

import functools
import re

import pytest
from omegaconf import OmegaConf
from transformers import LlamaConfig

from slimforge.eval.curve import SweepJob, curve_axis, curve_note, curve_table, sweep_curve
from slimforge.eval.report import build_report, sweep_report, write_sweep_report
from slimforge.pipeline import prepare
from slimforge.prune import width_targets
from slimforge.recipes import compose_run, expand_sweep, recipes_dir
from slimforge.stage import TeacherInfo

RECIPE = "size_quality"
TOLERANCE = 0.03  # a point's planned parameters within 3% of the share its name states


def smollm2_135m() -> LlamaConfig:
    """The embedded teacher's shape (SmolLM2-135M-Instruct), config only."""
    return LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                       num_attention_heads=9, num_key_value_heads=3, head_dim=64, tie_word_embeddings=True)


def parameters(config) -> int:
    return width_targets.width_param_count(config, width_targets.full_targets(config))


def planned(recipe, config):
    """The config of what the recipe's pipeline makes from a teacher of ``config``, stage by stage."""
    for name in recipe.pipeline:
        stage = recipe.stages[name]
        if hasattr(stage, "planned_config"):
            config = stage.planned_config(TeacherInfo(config, None))
        else:  # healing and quantization keep their input's shape
            assert stage.kind in ("distill", "quantize"), name
    return config


@functools.cache
def points() -> dict[str, object]:
    """Point name -> its validated recipe, for every job of the shipped sweep (composed once; read only)."""
    jobs = expand_sweep(RECIPE, [])
    assert all(len(job) == 1 and job[0].startswith("size=") for job in jobs), jobs
    return {job[0].split("=", 1)[1]: prepare(RECIPE, job) for job in jobs}


# --- the recipe and its points -------------------------------------------------------------------


def test_the_sweep_runs_every_point_and_one_runs_alone():
    names = list(points())
    assert names == ["p90", "p75", "p57", "p40", "teacher_nf4", "teacher_gptq"]
    assert {p.stem for p in (recipes_dir() / "size").glob("*.yaml")} == set(names)  # no point left out
    assert compose_run(RECIPE, [])[1] is True
    cfg, multirun = compose_run(RECIPE, ["hydra.mode=RUN", "size=p75"])
    assert multirun is False and list(cfg.pipeline) == ["depth", "width", "heal", "nf4"]


def test_students_prune_heal_and_quantize_and_references_only_quantize():
    for name, recipe in points().items():
        kinds = [(recipe.stages[s].kind, recipe.stages[s].method) for s in recipe.pipeline]
        final = recipe.pipeline[-1]
        assert recipe.config.eval.models == ["teacher", final], name  # the teacher and the point's final model
        assert recipe.config.description, name  # what the point is, in the sweep's table
        if name.startswith("p"):
            assert kinds[0][0] == "prune" and kinds[-2:] == [("distill", "kd"), ("quantize", "bnb_nf4")], name
        else:
            method = {"teacher_nf4": "bnb_nf4", "teacher_gptq": "gptq"}[name]
            assert kinds == [("quantize", method)], name


@pytest.mark.parametrize("name", ["p90", "p75", "p57", "p40", "teacher_nf4", "teacher_gptq"])
def test_each_point_plans_its_stated_share_of_the_teacher(name):
    """``pNN`` keeps NN% of SmolLM2-135M's 134.5M parameters (within 3%); a reference keeps them all."""
    teacher = smollm2_135m()
    assert parameters(teacher) == 134_515_008
    share = int(name[1:]) / 100 if re.fullmatch(r"p\d+", name) else 1.0
    kept = parameters(planned(points()[name], teacher)) / parameters(teacher)
    assert kept == pytest.approx(share, rel=TOLERANCE), f"{name} plans {kept:.3f} of the teacher"


def test_points_grow_in_order_of_their_share():
    teacher = smollm2_135m()
    sizes = [parameters(planned(recipe, teacher)) for name, recipe in points().items() if name.startswith("p")]
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == len(sizes)


def test_every_student_heals_alike_and_like_the_default_student():
    """Same distillation settings and data for every point, those of the default recipe's heal stage;
    p90 is the default recipe's student, shape for shape."""
    default = prepare("default", [])
    students = {name: recipe for name, recipe in points().items() if name.startswith("p")}
    for name, recipe in students.items():
        assert recipe.stages["heal"] == default.stages["heal"], f"{name} heals unlike the default recipe's student"
        assert OmegaConf.to_container(recipe.raw.data) == OmegaConf.to_container(default.raw.data), name
    teacher = smollm2_135m()
    mine, theirs = planned(students["p90"], teacher), planned(default, teacher)
    assert [getattr(mine, k) for k in ("num_hidden_layers", "hidden_size", "intermediate_size")] == \
        [getattr(theirs, k) for k in ("num_hidden_layers", "hidden_size", "intermediate_size")] == [26, 576, 1536]


def test_healing_data_is_a_command_line_choice():
    recipe = prepare(RECIPE, ["size=p90", "data=text", "data.path=/corpus"])
    assert recipe.config.data.path == "/corpus" and recipe.pipeline == ["depth", "heal", "nf4"]


# --- the curve, from fake reports shaped by build_report --------------------------------------


TEACHER_PARAMS, TEACHER_BYTES = 134_515_008, 269_030_016


def ppl_task(value: float, domain: str, corpus: str, kl: float = 0.0, top1: float = 1.0) -> dict:
    return {"type": "perplexity", "metric": "perplexity", "perplexity": value, "higher_is_better": {"perplexity": False},
            "blocks": 8, "fidelity": {"kl_mean": kl, "top1_agreement": top1}, "domain": domain, "corpus": corpus,
            "split": "heldout"}


def bench(acc: float) -> dict:
    return {"type": "lm_eval", "metric": "acc", "acc": acc, "higher_is_better": {"acc": True}, "items": 40}


def model(params: int, disk: int, ppl_in: float, ppl_out: float | None, acc: float, kl: float = 0.0,
          top1: float = 1.0) -> dict:
    tasks = {"perplexity": ppl_task(ppl_in, "in-domain", "shakespeare"), "arc_easy": bench(acc)}
    if ppl_out is not None:
        tasks["wikipedia"] = ppl_task(ppl_out, "out-of-domain", "wikipedia", kl, top1)
    return {"path": "/x", "kind": "hf", "num_parameters": params, "disk_bytes": disk, "memory_bytes": disk,
            "tasks": tasks}


def job_report(final: str, student: dict, ood: bool = True) -> dict:
    teacher = model(TEACHER_PARAMS, TEACHER_BYTES, 10.0, 20.0 if ood else None, 0.6)
    if not ood:
        student["tasks"].pop("wikipedia", None)
    return build_report(RECIPE, {"teacher": teacher, final: student})


def size_jobs(ood: bool = True) -> list[SweepJob]:
    """Two students (p90, p40) and the two references, as write_sweep hands them over."""
    stages = {"teacher_nf4": [("nf4", "quantize", "bnb_nf4")], "teacher_gptq": [("gptq", "quantize", "gptq")]}
    student = [("depth", "prune", "depth"), ("heal", "distill", "kd"), ("nf4", "quantize", "bnb_nf4")]
    shapes = {"p90": (120_000_000, 70_000_000, 11.0, 25.0, 0.55), "p40": (54_000_000, 35_000_000, 16.0, 50.0, 0.45),
              "teacher_nf4": (TEACHER_PARAMS, 90_000_000, 10.5, 21.0, 0.58),
              "teacher_gptq": (TEACHER_PARAMS, 95_000_000, 10.2, 20.5, 0.59)}
    jobs = []
    for i, (name, (params, disk, ppl_in, ppl_out, acc)) in enumerate(shapes.items()):
        pipeline = stages.get(name, student)
        student_model = model(params, disk, ppl_in, ppl_out, acc, kl=0.1 * (i + 1), top1=0.9 - 0.1 * i)
        report = job_report(pipeline[-1][0], student_model, ood)
        jobs.append(SweepJob(f"job0{i}", report, ["data=text", f"size={name}"], f"point {name}", pipeline))
    return jobs


def test_curve_places_students_references_and_the_teacher():
    curve = sweep_report(size_jobs())["curve"]
    assert curve["y"]["key"] == "wikipedia.perplexity" and curve["y"]["domain"] == "out-of-domain"
    assert "wikipedia" in curve["y"]["label"] and "out-of-domain" in curve["y"]["short"]
    by_label = {p["label"]: p for p in curve["points"]}
    assert list(by_label) == ["teacher", "p90", "p40", "teacher NF4", "teacher GPTQ"]
    assert [by_label[k]["reference"] for k in by_label] == [False, False, False, True, True]
    teacher = by_label["teacher"]
    assert (teacher["num_parameters"], teacher["disk_bytes"], teacher["y"]) == (TEACHER_PARAMS, TEACHER_BYTES, 1.0)
    assert by_label["p40"]["y"] == pytest.approx(20.0 / 50.0)  # teacher ppl / student ppl, out of domain
    assert by_label["teacher GPTQ"]["y"] == pytest.approx(20.0 / 20.5)
    assert by_label["p90"]["model"] == "job00/nf4" and by_label["teacher GPTQ"]["model"] == "job03/gptq"
    assert by_label["p40"]["what"] == "point p40" and by_label["p40"]["overrides"] == ["size=p40"]
    assert by_label["p40"]["benchmarks"] == {"arc_easy": pytest.approx(0.45 / 0.6)}
    assert by_label["p40"]["out-of-domain"]["kl_mean"] == pytest.approx(0.2)
    assert by_label["p40"]["in-domain"]["retained"] == pytest.approx(10.0 / 16.0)
    assert not curve["one_size"] and curve["swept"] is None


def test_curve_falls_back_to_in_domain_perplexity_then_mean_retained():
    curve = sweep_report(size_jobs(ood=False))["curve"]
    assert curve["y"]["key"] == "perplexity.perplexity" and curve["y"]["domain"] == "in-domain"
    assert "no out-of-domain perplexity measured" in curve["y"]["label"] and "in-domain" in curve_note(curve)
    assert [p["y"] for p in curve["points"][1:3]] == [pytest.approx(10.0 / 11.0), pytest.approx(10.0 / 16.0)]
    assert all(p["out-of-domain"]["perplexity"] is None for p in curve["points"])
    header, rows = curve_table(curve)
    assert rows[0][header.index("wikipedia ppl (out-of-domain)")] == "–"

    report = sweep_report(size_jobs())
    for section in ("retained", "fidelity"):  # benchmarks only: quality is the mean retained
        for ratios in report[section].values():
            for key in [k for k in ratios if k.startswith(("perplexity", "wikipedia"))]:
                del ratios[key]
    axis = curve_axis(report)
    assert axis["key"] == "mean_retained" and "mean retained" in axis["label"]


def test_a_task_labelled_out_of_domain_is_the_y_axis_whatever_its_name():
    jobs = size_jobs()
    for job in jobs:
        for rep_task in (job.report["tasks"], *[m["tasks"] for m in job.report["models"].values()]):
            rep_task["news"] = rep_task.pop("wikipedia")
        for section in ("retained", "retained_ci"):
            for ratios in job.report[section].values():
                if "wikipedia.perplexity" in ratios:
                    ratios["news.perplexity"] = ratios.pop("wikipedia.perplexity")
    curve = sweep_report(jobs)["curve"]
    assert curve["y"]["key"] == "news.perplexity" and curve["tasks"]["out-of-domain"] == "news"


def test_curve_table_lists_every_point_largest_first():
    curve = sweep_report(size_jobs())["curve"]
    header, rows = curve_table(curve)
    assert header[:5] == ["job", "point", "what it is", "parameters", "on disk"]
    for column in ("perplexity ppl (in-domain)", "wikipedia ppl (out-of-domain)", "KL / token", "top-1 agreement",
                   "arc_easy retained"):
        assert column in header
    assert [row[1] for row in rows] == ["teacher", "teacher GPTQ", "teacher NF4", "p90", "p40"]
    p40 = rows[-1]
    assert p40[3] == "54.0M" and p40[header.index("wikipedia ppl (out-of-domain)")] == "50.00"
    assert p40[header.index("arc_easy retained")] == "0.750"


def test_one_size_sweep_is_drawn_against_the_swept_value():
    """Unstructured sparsity keeps every student's size: the curve turns to quality against the sparsity."""
    jobs = []
    for i, level in enumerate((0.3, 0.5, 0.7)):
        report = job_report("prune", model(TEACHER_PARAMS, TEACHER_BYTES, 10.0 + 5 * i, 20.0 + 10 * i, 0.5), ood=True)
        jobs.append(SweepJob(f"job0{i}", report, [f"stages.prune.sparsity={level}"], "wanda", [("prune", "prune", "wanda")]))
    curve = sweep_report(jobs)["curve"]
    assert curve["one_size"] and curve["swept"] == "stages.prune.sparsity"
    assert [p.get("swept") for p in curve["points"]] == [None, 0.3, 0.5, 0.7]
    assert [p["what"] for p in curve["points"][1:]] == [f"stages.prune.sparsity={v}" for v in (0.3, 0.5, 0.7)]
    assert "x: stages.prune.sparsity, since every student has the same size" in curve_note(curve)


def test_curve_plot_marks_references_apart(monkeypatch):
    """Two panels (parameters, bytes on disk); the teacher a star, each reference its own labelled diamond."""
    from slimforge.eval import html

    figures = []
    monkeypatch.setattr(html, "_png", lambda fig: figures.append(fig) or "png")
    assert html.pareto_plot(sweep_report(size_jobs())) == "png"
    fig = figures[0]
    axes = fig.axes
    assert [ax.get_xlabel() for ax in axes] == ["parameters (millions)", "bytes on disk of the final model (MiB)"]
    assert axes[0].get_ylabel() == "wikipedia ppl retained (out-of-domain)"
    for ax in axes:
        labels = ax.get_legend_handles_labels()[1]
        assert {"students", "teacher", "teacher NF4", "teacher GPTQ", "Pareto front"} <= set(labels)
        diamonds = [c for c in ax.collections if c.get_label().startswith("teacher ")]
        assert len(diamonds) == 2 and len({tuple(c.get_facecolor()[0]) for c in diamonds}) == 2
    assert "wikipedia" in fig._suptitle.get_text()


def test_sweep_report_files_hold_the_curve(tmp_path):
    write_sweep_report(tmp_path, size_jobs())
    import json

    report = json.loads((tmp_path / "report.json").read_text())
    assert [p["label"] for p in report["curve"]["points"]][-2:] == ["teacher NF4", "teacher GPTQ"]
    markdown = (tmp_path / "report.md").read_text()
    assert "## Size–quality curve" in markdown and "| job03 | teacher GPTQ | point teacher_gptq |" in markdown
    page = (tmp_path / "report.html").read_text()
    assert "<h2>Size–quality curve</h2>" in page and "wikipedia ppl (out-of-domain)" in page


def test_no_curve_without_an_evaluated_model():
    job = SweepJob("job00", {}, ["size=p90"], "", [("nf4", "quantize", "bnb_nf4")])
    assert sweep_report([job]) == {}
    teacher_only = build_report(RECIPE, {"teacher": model(TEACHER_PARAMS, TEACHER_BYTES, 10.0, 20.0, 0.6)})
    assert sweep_curve(teacher_only, [SweepJob("job00", teacher_only, [], "", [])]) is None


def test_quantization_metadata_is_not_counted_as_parameters():
    """A GPTQ reference sits at the teacher's parameters: the scales and shapes compressed-tensors keeps
    beside each weight after decompressing are not parameters of the model."""
    import torch

    from slimforge.eval.efficiency import logical_parameters

    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Linear(32, 8, bias=False))
    plain = logical_parameters(model)
    assert plain == 64 * 32 + 32 + 32 * 8
    for layer in model:
        layer.weight_scale = torch.nn.Parameter(torch.ones(layer.out_features, 1), requires_grad=False)
        layer.weight_shape = torch.nn.Parameter(torch.tensor([layer.out_features, layer.in_features]),
                                                requires_grad=False)
    assert sum(p.numel() for p in model.parameters()) > plain
    assert logical_parameters(model) == plain
