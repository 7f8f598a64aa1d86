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
# Groups of one recipe's points (`# @package _global_`: each sets the pipeline): group -> its recipe.
RECIPE_GROUPS = {"size": "size_quality"}
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
            elif group.name in RECIPE_GROUPS:  # a recipe's own points: they compose into that recipe
                cfg = compose_recipe(RECIPE_GROUPS[group.name], [f"{group.name}={option.stem}"])
                assert cfg.pipeline and set(cfg.pipeline) <= set(cfg.stages), option
                continue
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


def test_wrong_type_fails_at_composition():
    with pytest.raises(ConfigError, match="could not be converted to Integer"):
        prepare(STUDENT, ["data.block_size=big"])


@pytest.mark.parametrize("plus", ["", "+"])
@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("data.blocksize", r"^unknown key data\.blocksize: DataConfig has no 'blocksize'; did you mean data\.block_size\?$"),
        ("teacher.foo", r"^unknown key teacher\.foo: TeacherConfig has no 'foo'; the keys there are: path, asset, "),
        ("foo", r"^unknown key foo: RecipeConfig has no 'foo'; the keys there are: name, "),
        ("stages.student.num_layerz", r"^unknown key stages\.student\.num_layerz: DropLayersConfig has no "
                                      r"'num_layerz'; did you mean stages\.student\.num_layers\?$"),
        ("eval.tasks.perplexity.max_blockz", r"^unknown key eval\.tasks\.perplexity\.max_blockz: "
                                             r"PerplexityTaskConfig has no 'max_blockz'; did you mean "),
        ("eval.gate.max_kll", r"^unknown key eval\.gate\.max_kll: GateConfig has no 'max_kll'; did you mean "
                              r"eval\.gate\.max_kl\?$"),
    ],
)
def test_a_key_no_schema_has_is_refused_with_or_without_plus(plus, key, expected):
    """``+key=value`` used to compose, pass validation and be ignored; it now fails like a misspelling."""
    with pytest.raises(ConfigError, match=expected) as info:
        prepare(STUDENT, [f"{plus}{key}=5"])
    assert "+" not in str(info.value)  # adding the key with + would not help: no schema has it


def test_a_key_no_schema_has_in_a_recipe_file_fails_the_same_way(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("defaults:\n  - slimforge_recipe\n  - data: shakespeare\n  - _self_\nname: mine\n"
                    "data:\n  blocksize: 64\n")
    with pytest.raises(ConfigError, match=r"^unknown key data\.blocksize: DataConfig has no 'blocksize'; "
                                          r"did you mean data\.block_size\?$"):
        prepare(str(path), [])
    path.write_text("defaults:\n  - slimforge_recipe\n  - _self_\nname: mine\npipeline: [s]\n"
                    "stages:\n  s: {kind: student, method: drop_layers, num_layerz: 2}\n")
    with pytest.raises(ConfigError, match=r"^unknown key stages\.s\.num_layerz: DropLayersConfig has no "
                                          r"'num_layerz'; did you mean stages\.s\.num_layers\?$"):
        prepare(str(path), ["teacher.path=some/model", "data.path=notes"])


def test_new_entries_of_a_mapping_still_take_plus():
    """``stages`` and ``eval.tasks`` map names to entries: a new name needs +, and says so."""
    with pytest.raises(ConfigError, match=r"^eval\.tasks has no entry 'ppl2' \(to add a new entry there, start "
                                          r"the override with \+\)$"):
        prepare(STUDENT, ["eval.tasks.ppl2={type: perplexity}"])
    with pytest.raises(ConfigError, match=r"^eval\.tasks has no entry 'perplexty'; did you mean eval\.tasks\.perplexity\?"):
        prepare(STUDENT, ["eval.tasks.perplexty.max_blocks=3"])
    recipe = prepare(STUDENT, ["+eval.tasks.ppl2={type: perplexity, max_blocks: 3}", "+eval.gate.min_retained_tasks.ppl2=0.5"])
    assert recipe.tasks["ppl2"].max_blocks == 3 and recipe.config.eval.gate.min_retained_tasks == {"ppl2": 0.5}


def test_keys_given_to_a_misspelled_stage_are_refused():
    """``+stages.studnet.num_layers=2`` made a stray entry that no stage read."""
    with pytest.raises(ConfigError, match=r"^stages\.studnet is not a stage \(it has no kind and method\); "
                                          r"did you mean stages\.student\?$"):
        prepare(STUDENT, ["+stages.studnet.num_layers=2"])
    with pytest.raises(ConfigError, match=r"^eval\.tasks\.extra needs 'type'$"):
        prepare(STUDENT, ["+eval.tasks.extra.max_blocks=2"])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("pipeline: [student\ndata:\n  block_size: 32\n",
         r"mine\.yaml is not valid YAML: line 3, column 5: expected ',' or '\]', but got ':' \(while parsing a flow "
         r"sequence that starts on line 2\); fix the syntax there$"),
        ("data:\n  block_size: 32\n   x: 1\n", r"mine\.yaml is not valid YAML: line 4, column 5: mapping values"),
        ("\tdata: 1\n", r"mine\.yaml is not valid YAML: line 2, column 1: found character '\\t'"),
    ],
)
def test_a_yaml_syntax_error_names_the_file_and_line(tmp_path, text, expected):
    path = tmp_path / "mine.yaml"
    path.write_text("name: mine\n" + text)
    with pytest.raises(ConfigError, match=expected) as info:
        prepare(str(path), [])
    assert str(tmp_path) in str(info.value) and "\n" not in str(info.value)


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


def test_an_include_path_that_runs_code_needs_eval_allow_code(tmp_path):
    """Caught by validation (so by --dry-run), before anything loads; the shipped default is off."""
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "mine.yaml").write_text("task: mine\nprocess_docs: !function utils.prepare\n")
    args = [f"eval.include_path=[{tasks}]", "+eval.tasks.mine={type: lm_eval, task: mine}"]
    with pytest.raises(ConfigError, match=rf"^{tasks / 'mine.yaml'} runs Python \(!function utils\.prepare\); .*"
                                          r"eval\.allow_code=true"):
        prepare(STUDENT, args)
    assert prepare(STUDENT, [*args, "eval.allow_code=true"]).config.eval.allow_code is True
    assert prepare(STUDENT, [f"eval.include_path=[{tasks}]"]).config.eval.allow_code is False  # no lm-eval task
