"""The recipe reference, generated from the code: ``python -m slimforge.docs`` writes ``docs/recipes.md``.

It walks the shipped recipes (their header comments and composed pipelines), the config
groups' presets, and every registered schema (the recipe's top-level sections, each
stage method, each eval task type: fields, types, defaults and docstrings), so the
reference cannot drift from what validation accepts. ``tests/test_recipes.py`` checks
that the committed file equals this output; ``--check`` does the same from the shell.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import sys
from pathlib import Path
from typing import Any

from slimforge.errors import ConfigError

REFERENCE = Path("docs") / "recipes.md"
PRESET_GROUPS = ("teacher", "data", "student", "prune", "distill", "quantize", "eval", "size")
STAGE_KIND_TITLES = {"student": "Student initialisation (`kind: student`)", "prune": "Pruning (`kind: prune`)",
                     "distill": "Distillation (`kind: distill`)", "quantize": "Quantization (`kind: quantize`)"}


# --- reading recipes ---------------------------------------------------------------------


def header_lines(path: Path) -> list[str]:
    """The comment block a recipe file starts with, without the ``#`` marks."""
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        text = line[1:]
        lines.append(text[1:] if text.startswith(" ") else text)
    return lines


def header_markdown(lines: list[str]) -> str:
    """Header text as Markdown: prose as paragraphs, indented lines (command lines) as code blocks."""
    out: list[str] = []
    code = False
    for line in lines:
        indented = line.startswith("  ")
        if indented != code:
            out.append("```bash" if indented else "```")
            code = indented
        if indented:
            out.append(line.strip())
        elif not line.strip():
            out.append("")
        elif line.startswith("Requires: "):
            out += ["", f"Requires: `{line.split(': ', 1)[1]}`"]
        elif line.startswith(("Cost", "Knobs", "Calibration")) and out and out[-1]:
            out += ["", line.replace("<", "&lt;")]  # the standard header parts each start a paragraph
        else:
            out.append(line.replace("<", "&lt;"))
    if code:
        out.append("```")
    return "\n".join(out).strip()


def describe_recipe(name: str) -> dict[str, Any]:
    """What the reference shows of one shipped recipe: its composed pipeline, inputs and sweep."""
    from omegaconf import OmegaConf

    from slimforge.recipes import compose_recipe, recipes_dir

    cfg = compose_recipe(name, [], with_hydra=True)
    stages = [(stage, cfg.stages[stage].kind, cfg.stages[stage].method) for stage in cfg.pipeline]
    teacher = cfg.teacher.path or f"asset `{cfg.teacher.asset}`"
    data = cfg.data.path or (f"asset `{cfg.data.asset}`" if cfg.data.asset else f"`{cfg.data.format}`")
    params = cfg.hydra.sweeper.get("params")
    sweep = OmegaConf.to_container(params) if params else {}
    multirun = str(cfg.hydra.get("mode")).rsplit(".", 1)[-1] == "MULTIRUN"
    return {"name": name, "header": header_lines(recipes_dir() / f"{name}.yaml"), "stages": stages,
            "teacher": teacher, "data": data, "tasks": list(cfg.eval.tasks), "models": list(cfg.eval.models),
            "sweep": sweep if multirun else {}}


def preset_summaries(group: str) -> dict[str, str]:
    """Preset name -> its first comment line, for one config group folder."""
    from slimforge.recipes import recipe_summary, recipes_dir

    folder = recipes_dir() / group
    return {path.stem: recipe_summary(path) for path in sorted(folder.glob("*.yaml"))}


# --- reading schemas ---------------------------------------------------------------------


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return "???"


def format_value(value: Any) -> str:
    """A default as it would be written in YAML."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value if value else "''"
    if isinstance(value, list | dict):
        return json.dumps(value).replace('"', "")
    return repr(value)


# Values that make a schema's defaults valid where they leave a required choice open, so that
# each field's own range check can be probed (a one-of-these choice is enough).
BASELINE_FIXES = {"path": "x", "task": "x", "num_layers": 1, "remove_ratio": 0.25, "param_ratio": 0.5, "ratio": 0.5}
PROBES = {"str": ["\x00"], "int": [-(10**9), 10**9], "float": [-1.0, 10.0**9], "list[str]": [["\x00"]]}


def _valid_baseline(schema: type) -> Any:
    """An instance of ``schema`` that passes its own check, or None."""
    from slimforge.config import FieldError

    obj = schema()
    for _ in range(len(BASELINE_FIXES) + 1):
        try:
            obj.check()
            return obj
        except FieldError as err:
            if err.field not in BASELINE_FIXES or getattr(obj, err.field) == BASELINE_FIXES[err.field]:
                return None
            setattr(obj, err.field, BASELINE_FIXES[err.field])
    return None


def field_requirements(schema: type) -> dict[str, str]:
    """Field -> what its check allows, found by giving it out-of-range values one at a time."""
    from slimforge.config import FieldError

    base = _valid_baseline(schema)
    if base is None or not hasattr(base, "check"):
        return {}
    out: dict[str, str] = {}
    for f in dataclasses.fields(schema):
        found: list[str] = []
        for value in PROBES.get(str(f.type).replace(" | None", ""), []):
            probe = dataclasses.replace(base, **{f.name: value})
            try:
                probe.check()
            except FieldError as err:
                if err.field == f.name and err.requirement not in found:
                    found.append(err.requirement)
            except (TypeError, ValueError):
                continue
        if found:
            out[f.name] = "; ".join(found)
    return out


def schema_fields(schema: type, prefix: str = "", skip: tuple[str, ...] = ()) -> list[tuple[str, str, str, str]]:
    """(dotted name, type, default, allowed values) of a dataclass's fields; nested dataclasses are flattened."""
    rows = []
    allowed = field_requirements(schema)
    for f in dataclasses.fields(schema):
        if f.name in skip:
            continue
        default = _default(f)
        if dataclasses.is_dataclass(default):
            rows += schema_fields(type(default), f"{prefix}{f.name}.")
            continue
        rows.append((prefix + f.name, str(f.type), format_value(default), allowed.get(f.name, "")))
    return rows


def _cell(text: str) -> str:
    return "`" + text.replace("|", "\\|") + "`"


def _text(text: str) -> str:
    """Prose for Markdown: pipes escaped (tables), ``<`` escaped (it would open an HTML tag)."""
    return text.replace("|", "\\|").replace("<", "&lt;")


def schema_section(title: str, schema: type, skip: tuple[str, ...] = (), summary: str = "") -> str:
    """One schema: its docstring and a table of its fields."""
    doc = inspect.getdoc(schema) or ""
    rows = schema_fields(schema, skip=skip)
    parts = [f"### {title}", ""]
    if summary:
        parts += [f"*{_text(summary.rstrip('.'))}.* Schema: `{schema.__name__}`.", ""]
    if doc:
        parts += [doc, ""]
    if rows:
        parts += ["| field | type | default | allowed |", "|---|---|---|---|"]
        parts += [f"| {_cell(name)} | {_cell(kind)} | {_cell(default)} | {_text(allowed)} |"
                  for name, kind, default, allowed in rows]
        parts.append("")
    return "\n".join(parts)


# --- the document ------------------------------------------------------------------------


def _recipes_part() -> list[str]:
    from slimforge.recipes import list_recipes

    recipes = [describe_recipe(name) for name in list_recipes()]
    out = ["## Shipped recipes", "",
           "Run one with `slimforge run <recipe> [key=value ...]`; `slimforge run <recipe> --dry-run` validates it "
           "and prints its plan, `--print-config` the composed config. Each recipe's header (below) says what it "
           "does, what it follows, what it costs and which knobs are worth sweeping.", "",
           "| recipe | pipeline (stage: kind/method) | summary |", "|---|---|---|"]
    for rec in recipes:
        pipeline = " → ".join(f"{stage}: {kind}/{method}" for stage, kind, method in rec["stages"])
        summary = rec["header"][0] if rec["header"] else ""
        out.append(f"| [`{rec['name']}`](#{rec['name']}) | {pipeline} | {_text(summary)} |")
    out.append("")
    for rec in recipes:
        out += [f"### {rec['name']}", "", header_markdown(rec["header"]), ""]
        out.append(f"- **teacher**: {rec['teacher']}; **data**: {rec['data']}")
        stages = ", ".join(f"`{stage}` ({kind}/{method})" for stage, kind, method in rec["stages"])
        out.append(f"- **pipeline**: {stages}")
        if rec["tasks"]:
            out.append(f"- **eval**: {', '.join(f'`{t}`' for t in rec['tasks'])} on {', '.join(rec['models'])}")
        if rec["sweep"]:
            grid = "; ".join(f"`{key}` over {value}" for key, value in rec["sweep"].items())
            out.append(f"- **sweep** (runs by default, one job per value): {grid}")
        out.append("")
    return out


def _groups_part() -> list[str]:
    out = ["## Config groups", "",
           "Reusable presets in `recipes/<group>/`, chosen in a recipe's defaults list (`- teacher: local`, "
           "`- prune@stages.<name>: wanda`) or on the command line (`data=text`, `+quantize@stages.q=gptq`).", "",
           "| group | preset | what it is |", "|---|---|---|"]
    for group in PRESET_GROUPS:
        for preset, summary in preset_summaries(group).items():
            out.append(f"| `{group}` | `{preset}` | {_text(summary)} |")
    return out + [""]


def _top_level_part() -> list[str]:
    from slimforge.config import DataConfig, EvalConfig, RecipeConfig, TeacherConfig

    out = ["## The recipe's sections", "",
           "Every recipe starts from `slimforge_recipe`; these typed sections reject unknown keys and "
           "wrong types while composing, and range checks run before any model loads.", ""]
    out.append(schema_section("Top level", RecipeConfig, skip=("teacher", "data", "eval", "stages")))
    out.append(schema_section("`teacher`", TeacherConfig))
    out.append(schema_section("`data`", DataConfig))
    out.append(schema_section("`eval`", EvalConfig, skip=("tasks",)))
    return out


def _registry_part() -> list[str]:
    from slimforge.config import STAGE_KINDS
    from slimforge.registry import registry

    out = ["## Stage methods", "",
           "A stage under `stages.<name>` names a `kind` and a `method`; its fields are the method's schema. "
           "Presets in `recipes/<kind>/` start from these defaults.", ""]
    for kind in STAGE_KINDS:
        out += [f"### {STAGE_KIND_TITLES[kind]}", ""]
        reg = registry(kind)
        for name in reg.names():
            entry = reg.get(name)
            out.append(schema_section(f"`{kind}/{name}`", entry.load_schema(), ("kind", "method"), entry.summary)
                       .replace("### ", "#### ", 1))
    out += ["## Eval task types", "",
            "Each entry under `eval.tasks.<name>` has a `type` from this list and that type's fields.", ""]
    reg = registry("eval")
    for name in reg.names():
        entry = reg.get(name)
        out.append(schema_section(f"`{name}`", entry.load_schema(), ("type",), entry.summary))
    return out


def render_recipe_reference() -> str:
    """The whole of ``docs/recipes.md``."""
    parts = ["# Recipe reference", "",
             "<!-- Generated by `python -m slimforge.docs` from the config schemas and the shipped recipes; "
             "do not edit by hand. -->", "",
             "Contents: [shipped recipes](#shipped-recipes) · [config groups](#config-groups) · "
             "[the recipe's sections](#the-recipes-sections) · [stage methods](#stage-methods) · "
             "[eval task types](#eval-task-types). Concepts: [concepts.md](concepts.md).", ""]
    parts += _recipes_part() + _groups_part() + _top_level_part() + _registry_part()
    return "\n".join(parts).rstrip() + "\n"


def _repo_root() -> Path:
    root = Path(__file__).resolve().parent.parent
    if not (root / "docs").is_dir() or not (root / "recipes").is_dir():
        raise ConfigError("the recipe reference is generated in a source checkout (docs/ and recipes/ beside slimforge/)")
    return root


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m slimforge.docs", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/recipes.md is not up to date")
    parser.add_argument("--out", type=Path, help="where to write (default: docs/recipes.md of this checkout)")
    ns = parser.parse_args(argv)
    try:
        target = ns.out or _repo_root() / REFERENCE
        text = render_recipe_reference()
    except ConfigError as err:
        print(f"slimforge.docs: error: {err}", file=sys.stderr)
        return 2
    if ns.check:
        current = target.read_text(encoding="utf-8") if target.is_file() else ""
        if current != text:
            print(f"{target} is stale: run `python -m slimforge.docs`", file=sys.stderr)
            return 1
        return 0
    target.write_text(text, encoding="utf-8")
    print(target)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
