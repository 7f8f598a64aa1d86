"""Recipes compose and validate; every bad value fails with one line naming the key."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from slimforge.errors import ConfigError
from slimforge.pipeline import prepare
from slimforge.recipes import compose_recipe, expand_sweep, recipes_dir
from slimforge.registry import registry

STUDENT = str(Path(__file__).resolve().parent / "assets" / "recipes" / "student.yaml")  # the runner's test recipe


# Every shipped recipe composing and validating (with its declared `# Requires:` inputs) is
# tests/test_recipes.py's job.


STAGE_GROUPS = ("student", "prune", "distill", "quantize")
TINY = str(Path(__file__).parent / "assets" / "recipes" / "tiny.yaml")


def test_every_config_group_option_composes():
    """Each preset composes; a stage preset composes into its method's complete, typed schema."""
    groups = [p for p in recipes_dir().iterdir() if p.is_dir() and p.name != "tasks"]
    assert {g.name for g in groups} >= {"teacher", "data", "student", "eval", "distill"}
    for group in groups:
        for option in group.glob("*.yaml"):
            if group.name == "student":
                cfg = compose_recipe(TINY, [f"student@stages.student={option.stem}"])
                node = cfg.stages.student
            elif group.name in STAGE_GROUPS:
                cfg = compose_recipe(STUDENT, [f"+{group.name}@stages.extra={option.stem}"])
                node = cfg.stages.extra
            else:
                cfg = compose_recipe(STUDENT, [f"{group.name}={option.stem}"])
                continue
            assert node.kind == group.name, option
            schema = registry(group.name).get(node.method).load_schema()
            assert set(node.keys()) == {f.name for f in dataclasses.fields(schema)}, option


def test_overrides_reach_typed_config():
    recipe = prepare(STUDENT, ["stages.student.num_layers=12", "data.block_size=128", "seed=7"])
    assert recipe.stages["student"].num_layers == 12
    assert recipe.config.data.block_size == 128
    assert recipe.config.seed == 7


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("data.heldout_fraction=1.5", r"data\.heldout_fraction=1\.5: must be in \(0, 1\)"),
        ("data.heldout_fraction=0", r"data\.heldout_fraction=0\.0: must be in \(0, 1\)"),
        ("data.block_size=1", r"data\.block_size=1: must be >= 2"),
        ("stages.student.num_layers=0", r"stages\.student\.num_layers=0: must be >= 1"),
        ("stages.student.keep_ratio=1.5", r"give exactly one of num_layers, keep_ratio or drop"),
        ("eval.batch_size=0", r"eval\.batch_size=0: must be >= 1"),
        ("eval.tasks.perplexity.max_blocks=0", r"eval\.tasks\.perplexity\.max_blocks=0: must be >= 1"),
        ("device=tpu", r"device='tpu': must be one of auto, cpu, cuda, mps"),
        ("data.format=xml", r"data\.format='xml': must be one of auto, text, chat"),
    ],
)
def test_invalid_values_fail_validation(override, expected):
    with pytest.raises(ConfigError, match=expected) as info:
        prepare(STUDENT, [override])
    assert "\n" not in str(info.value)


def test_wrong_type_and_unknown_key_fail_at_composition():
    with pytest.raises(ConfigError, match="could not be converted to Integer"):
        prepare(STUDENT, ["data.block_size=big"])
    with pytest.raises(ConfigError, match="Key 'blocksize' not in 'DataConfig'"):
        prepare(STUDENT, ["data.blocksize=64"])


def test_unknown_recipe_lists_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown recipe 'defualt'\. Did you mean 'default'\? Valid recipes: .*default"):
        prepare("defualt", [])


def test_unknown_method_lists_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown student method 'drop_layer'\. Did you mean 'drop_layers'.*checkpoint, drop_layers"):
        prepare(STUDENT, ["stages.student.method=drop_layer"])
    with pytest.raises(ConfigError, match=r"unknown stage kind 'prun'"):
        prepare(STUDENT, ["stages.student.kind=prun"])
    with pytest.raises(ConfigError, match=r"unknown eval method 'perplexty'.*perplexity"):
        prepare(STUDENT, ["eval.tasks.perplexity.type=perplexty"])


def test_unknown_group_option_lists_choices():
    with pytest.raises(ConfigError, match=r"Could not find 'data/nope'.*shakespeare"):
        prepare(STUDENT, ["data=nope"])


def test_pipeline_must_name_defined_stages():
    with pytest.raises(ConfigError, match=r"pipeline names stage\(s\) \['heal'\]"):
        prepare(STUDENT, ["pipeline=[student,heal]"])


def test_missing_mandatory_value():
    with pytest.raises(ConfigError, match=r"data\.path"):
        prepare(STUDENT, ["data=text"])


def test_user_recipe_file_can_use_shipped_groups(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(
        "# my recipe\n"
        "defaults:\n  - slimforge_recipe\n  - teacher: smollm2_135m\n  - data: shakespeare\n"
        "  - student@stages.student: drop_layers\n  - eval: perplexity\n  - _self_\n"
        "name: mine\npipeline: [student]\nstages:\n  student:\n    keep_ratio: 0.5\n"
    )
    recipe = prepare(str(path), [])
    assert recipe.config.name == "mine"
    assert recipe.stages["student"].keep_ratio == 0.5


def test_sweep_expansion_is_hydras():
    jobs = expand_sweep(STUDENT, ["stages.student.num_layers=2,3", "seed=0,1"])
    assert len(jobs) == 4
    assert ["stages.student.num_layers=2", "seed=0"] in jobs
