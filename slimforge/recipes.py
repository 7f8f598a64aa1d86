"""Finding, listing and composing recipes with Hydra.

Hydra does what it is good at here: config groups, the defaults list,
command-line overrides and sweep expansion. slimforge keeps control of the rest
(run directories, errors, object construction), so it uses Hydra's compose API
rather than ``@hydra.main``: no working-directory changes, no ``outputs/``
folders, and one-line errors for every mistake.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from slimforge.errors import ConfigError

RECIPE_SUFFIX = ".yaml"
GROUPS = ("teacher", "data", "student", "prune", "distill", "quantize", "eval", "tasks")


def recipes_dir() -> Path:
    """The shipped recipes: inside the wheel, or at the root of a source checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "_recipes", here.parent / "recipes"):
        if candidate.is_dir():
            return candidate
    raise ConfigError("the shipped recipes are missing from this installation; reinstall slimforge")


def recipe_summary(path: Path) -> str:
    """The first comment line of a recipe file: its one-line description."""
    for line in path.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if stripped.startswith("#") and not stripped.startswith("# @package"):
            return stripped.lstrip("#").strip()
        if stripped and not stripped.startswith("#"):
            break
    return ""


def list_recipes() -> dict[str, str]:
    """Shipped recipe name -> one-line summary: the default recipe first, then by name."""
    paths = sorted(recipes_dir().glob(f"*{RECIPE_SUFFIX}"), key=lambda p: (p.stem != "default", p.stem))
    return {path.stem: recipe_summary(path) for path in paths if not path.stem.startswith("_")}


def locate_recipe(recipe: str) -> tuple[Path, str]:
    """(config folder, config name) for a shipped recipe name or a path to a YAML file."""
    as_path = Path(recipe).expanduser()
    if recipe.endswith((".yaml", ".yml")) or as_path.is_file():
        if not as_path.is_file():
            raise ConfigError(f"recipe file {recipe} does not exist")
        return as_path.resolve().parent, as_path.stem
    shipped = list_recipes()
    if recipe not in shipped:
        import difflib

        close = difflib.get_close_matches(recipe, list(shipped), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown recipe {recipe!r}.{hint} Valid recipes: {', '.join(shipped)} (or a path to a .yaml)")
    return recipes_dir(), recipe


def _hydra_message(err: BaseException) -> str:
    """Hydra's multi-line composition errors, folded into one informative line."""
    lines = []
    for line in str(err).splitlines():
        if line.strip().startswith(("Config search path", "provider=")):
            break
        if line.strip():
            lines.append(line.strip().rstrip(":") if line.strip().endswith(":") else line.strip())
    cause = err.__cause__
    if cause is not None and str(cause).strip():
        lines.append(str(cause).splitlines()[0].strip())
    return "; ".join(lines)


def compose_recipe(recipe: str, overrides: list[str], with_hydra: bool = False) -> Any:
    """Compose a recipe with its defaults list and the given overrides.

    Args:
        recipe: a shipped recipe name or a path to a recipe YAML; a user recipe
            can use the shipped config groups (``teacher: smollm2_135m`` ...).
        overrides: Hydra override strings (``key=value``, ``+key=value``, ``group=option``).
        with_hydra: keep the ``hydra`` node (it holds ``hydra.sweeper.params``).

    Raises:
        ConfigError: unknown recipe, bad override syntax, unknown key or wrong type.
    """
    import yaml
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from slimforge.config import register_schemas, unknown_key_error

    register_schemas()
    config_dir, name = locate_recipe(recipe)
    overrides = list(overrides)
    if config_dir != recipes_dir():
        overrides.append(f"hydra.searchpath=[file://{recipes_dir()}]")
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config_dir), version_base="1.3", job_name="slimforge"):
            return compose(config_name=name, overrides=overrides, return_hydra_config=with_hydra)
    except (HydraException, OmegaConfBaseException) as err:
        # Hydra chains OmegaConf's error as the cause (an override) or the context (a recipe file).
        origin = (err.__cause__ or err.__context__) if isinstance(err, HydraException) else err
        unknown = unknown_key_error(origin)
        if unknown is not None:
            raise unknown from None
        raise ConfigError(f"recipe {recipe!r}: {_hydra_message(err)}") from None
    except yaml.YAMLError as err:  # Hydra reads each recipe and preset file with PyYAML
        raise ConfigError(_yaml_message(err)) from None
    finally:
        GlobalHydra.instance().clear()


def _yaml_message(err: Any) -> str:
    """A YAML syntax error as one line: the file, the line and column, what the parser expected."""
    mark, context_mark = getattr(err, "problem_mark", None), getattr(err, "context_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    if mark is None:
        return f"a recipe file is not valid YAML ({problem}); fix its syntax"
    context = getattr(err, "context", None)
    if context and context_mark is not None and context_mark.line != mark.line:
        problem += f" ({context} that starts on line {context_mark.line + 1})"
    return (f"{mark.name} is not valid YAML: line {mark.line + 1}, column {mark.column + 1}: {problem}; "
            "fix the syntax there")


def expand_sweep(recipe: str, overrides: list[str]) -> list[list[str]]:
    """The override lists of every job in a sweep (``-m`` / ``hydra.sweeper.params``).

    Sweep values come from the command line (``key=a,b,c``, ``range(...)``,
    ``choice(...)``) and from the recipe's ``hydra.sweeper.params``; the
    command line wins for a key given in both. Expansion is Hydra's own.
    """
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    cfg = compose_recipe(recipe, [o for o in overrides if not _is_sweep(o)], with_hydra=True)
    params = cfg.hydra.sweeper.get("params") or {}
    cli_keys = {o.split("=", 1)[0] for o in overrides}
    recipe_sweeps = [f"{k}={v}" for k, v in params.items() if k not in cli_keys]
    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides) + recipe_sweeps)
        batches = BasicSweeper.split_arguments(parsed, max_batch_size=None)
    except HydraException as err:
        raise ConfigError(f"sweep overrides: {_hydra_message(err)}") from None
    return [list(job) for batch in batches for job in batch]


def compose_run(recipe: str, overrides: list[str]) -> tuple[Any, bool]:
    """Compose a recipe for ``slimforge run``: (the config without its ``hydra`` node, whether it is a sweep).

    A recipe that sets ``hydra.mode: MULTIRUN`` is a sweep by default, as it would be
    under ``@hydra.main``: its ``hydra.sweeper.params`` run without ``-m``, and
    ``hydra.mode=RUN`` runs one job. One composition serves both answers.
    """
    from omegaconf import open_dict

    sweeps = [o for o in overrides if _is_sweep(o)]
    cfg = compose_recipe(recipe, [o for o in overrides if o not in sweeps], with_hydra=True)
    multirun = str(cfg.hydra.get("mode")).rsplit(".", 1)[-1] == "MULTIRUN"
    if sweeps and not multirun:
        return compose_recipe(recipe, overrides), False  # a sweep value without -m: Hydra's own error
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg, multirun


def _is_sweep(override: str) -> bool:
    """A crude pre-filter for composing the base config; Hydra's parser does the real work."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        return OverridesParser.create().parse_override(override).is_sweep_override()
    except Exception:
        return False
