"""What the plan knows of each stage's input (planned_config), and the checks that fall back to the stage.

The refusals at plan time are in the bad-input catalogue (tests/bad_inputs/quantize_prune.py);
here: a valid chain plans through, and where the plan cannot tell a width, the quantize stage
refuses it as it starts, before any calibration.
"""

from __future__ import annotations

import json

import pytest
from conftest import REPO

from slimforge import cli

TINY_COMPRESS = str(REPO / "tests" / "assets" / "recipes" / "tiny_compress.yaml")


def compress_args(teacher_dir, corpus_dir, run_dir, *extra):
    return ["run", TINY_COMPRESS, f"teacher.path={teacher_dir}", f"data.path={corpus_dir}", f"run_dir={run_dir}",
            *extra]


def test_the_plan_follows_widths_through_depth_width_and_distillation(teacher_dir, corpus_dir, tmp_path):
    from slimforge.pipeline import Run, prepare
    from slimforge.session import Session

    recipe = prepare(TINY_COMPRESS, [f"teacher.path={teacher_dir}", f"data.path={corpus_dir}",
                                     "+distill@stages.heal=kd", "pipeline=[depth,width,heal,gptq]",
                                     "stages.width.intermediate_size=48", "stages.gptq.group_size=-1"])
    session = Session.for_recipe(recipe)
    seen = {}
    for name in recipe.pipeline:  # record what each stage's check_input is shown
        cfg = recipe.stages[name]
        if hasattr(cfg, "check_input"):
            original = cfg.check_input

            def spy(parent, name=name, original=original):
                seen[name] = parent.config
                return original(parent)

            object.__setattr__(cfg, "check_input", spy)
    Run(recipe, tmp_path / "run", None).plan(session)
    assert (seen["width"].num_hidden_layers, seen["width"].intermediate_size) == (3, 64)
    assert (seen["gptq"].num_hidden_layers, seen["gptq"].intermediate_size, seen["gptq"].hidden_size) == (3, 48, 32)


def test_an_unknowable_width_is_refused_as_the_quantize_stage_starts_before_calibration(
        teacher_dir, corpus_dir, tmp_path, capsys, monkeypatch):
    from slimforge import data
    from slimforge.prune.config import WidthConfig

    monkeypatch.setattr(WidthConfig, "planned_config", lambda self, parent: None)  # as if the sizes were unknown
    calibrated = []
    real = data.calibration_samples

    def counting(bundle, *args, **kwargs):
        calibrated.append(args)
        return real(bundle, *args, **kwargs)

    monkeypatch.setattr(data, "calibration_samples", counting)
    run_dir = tmp_path / "run"
    code = cli.main(compress_args(teacher_dir, corpus_dir, run_dir, "pipeline=[width,gptq]",
                                  "stages.width.intermediate_size=48", "stages.gptq.group_size=32"))
    errors = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("slimforge: error:")]
    assert code == 2 and len(errors) == 1, errors
    assert "invalid value stages.gptq.group_size=32: must divide every linear input width, but its input width " \
           "has intermediate_size=48; pick a group size that divides them (none of 32, 64, 128 does) or -1 " \
           "(per channel)" in errors[0]
    assert len(calibrated) == 1  # the width stage's; GPTQ stopped before its own
    stages = json.loads((run_dir / "manifest.json").read_text())["stages"]
    assert (stages["width"]["status"], stages["gptq"]["status"]) == ("done", "failed")


@pytest.mark.parametrize("pipeline,overrides", [
    ("depth,width,wanda", ["stages.width.intermediate_size=48", "stages.wanda.n=2", "stages.wanda.m=16"]),
    ("width,rtn", ["stages.width.intermediate_size=32", "stages.rtn.group_size=32"]),
])
def test_settings_that_fit_the_planned_widths_pass_the_plan(teacher_dir, corpus_dir, tmp_path, pipeline, overrides):
    from slimforge.pipeline import Run, prepare
    from slimforge.session import Session

    recipe = prepare(TINY_COMPRESS, [f"teacher.path={teacher_dir}", f"data.path={corpus_dir}",
                                     f"pipeline=[{pipeline}]", *overrides])
    planned = Run(recipe, tmp_path / "run", None).plan(Session.for_recipe(recipe))
    assert [p.name for p in planned] == pipeline.split(",")
