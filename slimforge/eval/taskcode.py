"""What in an lm-eval task YAML runs Python, found before anything loads.

lm-eval (0.4.13) runs code from a task folder in these ways: a ``!function module.name``
tag imports ``module.py`` beside the YAML (or any importable module) wherever it appears,
so ``process_docs``, ``doc_to_text``, ``process_results``, ``custom_dataset``, ``class``,
metric and filter functions all come through it; other YAML tags naming Python objects
(``!!python/name:...``) where the loader builds them; ``hf_evaluate: true`` in
``metric_list``, which has the ``evaluate`` library load metric code; and the Jinja prompt
templates, which outside a sandbox reach Python internals (``{{ x.__class__ ... }}``).

slimforge's rule (docs/concepts.md, "Security"): no config value runs code unless the user
says so. A task folder under ``eval.include_path`` that does any of the above is refused
unless ``eval.allow_code=true`` (``slimforge eval --allow-code``); the shipped tasks and
lm-eval's own are installed code and are trusted. The templates are also rendered in
jinja2's sandbox while such code is not allowed (:func:`sandboxed_templates`), which stops
what a static look cannot see (a key built at render time).
"""

from __future__ import annotations

import contextlib
import functools
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from slimforge.errors import ConfigError

ALLOW_CODE_HINT = "eval.allow_code=true in a recipe, --allow-code for slimforge eval"


class _FunctionTag(str):
    """The target of a ``!function`` tag, kept as text: nothing is imported."""


@functools.lru_cache(maxsize=1)
def _task_yaml_loader() -> type:
    """A safe YAML loader that records ``!function`` instead of importing it; other Python tags fail."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: _FunctionTag(loader.construct_scalar(node)))
    return Loader


def trusted_task_dirs() -> list[Path]:
    """Folders whose task code is installed code: slimforge's shipped tasks and lm-eval's own."""
    from importlib.util import find_spec

    from slimforge.eval.offline import shipped_tasks_dir

    dirs = [shipped_tasks_dir().resolve()]
    spec = find_spec("lm_eval")
    if spec is not None and spec.origin:
        dirs.append(Path(spec.origin).resolve().parent / "tasks")
    return dirs


def _is_trusted(path: Path, trusted: list[Path]) -> bool:
    return any(root == path or root in path.parents for root in trusted)


def template_problem(text: str) -> str | None:
    """What in a Jinja template reaches Python internals, or None.

    Dunder attributes or keys (``x.__class__``, ``x['__globals__']``) and the ``attr`` filter
    are how a template climbs to Python objects; ordinary prompts (``{{question}}``,
    ``{{choices.text}}``, ``{{choices.label.index(answerKey)}}``, a data field ``_id``) use
    none of them. What this cannot see (a key built while rendering) the sandbox stops.
    """
    if "{{" not in text and "{%" not in text:
        return None
    from jinja2 import Environment, TemplateSyntaxError, nodes

    try:
        tree = Environment().parse(text)
    except TemplateSyntaxError:
        return None  # lm-eval cannot render it either
    for node in tree.find_all((nodes.Getattr, nodes.Getitem, nodes.Filter)):
        if isinstance(node, nodes.Getattr) and node.attr.startswith("__"):
            return f"a template that reads .{node.attr}"
        if isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Const) \
                and str(node.arg.value).startswith("__"):
            return f"a template that reads [{node.arg.value!r}]"
        if isinstance(node, nodes.Filter) and node.name == "attr":
            return "a template that uses the attr filter"
    return None


def value_problem(value: Any) -> str | None:
    """What in a loaded task YAML's value runs code, or None (the files ``include`` names are read apart)."""
    if isinstance(value, _FunctionTag):
        return f"!function {value}"
    if isinstance(value, str):
        return template_problem(value)
    if isinstance(value, dict):
        if value.get("hf_evaluate") and "metric" in value:
            return f"hf_evaluate metric {value['metric']!r}, whose code the evaluate library loads"
        items: Any = value.values()
    elif isinstance(value, list):
        items = value
    else:
        return None
    for item in items:
        problem = value_problem(item)
        if problem:
            return problem
    return None


def _includes(cfg: dict[str, Any], path: Path) -> list[Path]:
    """The files a task YAML's ``include`` names, resolved as lm-eval resolves them."""
    names = cfg.get("include") or []
    names = names if isinstance(names, list) else [names]
    return [(path.parent / str(name)).resolve() for name in names]


def yaml_code_problem(path: Path, trusted: list[Path], seen: set[Path] | None = None) -> tuple[Path, str] | None:
    """(file, what) for the first code-running construct in a task YAML or the files it includes."""
    import yaml

    seen = set() if seen is None else seen
    path = path.resolve()
    if path in seen or _is_trusted(path, trusted) or not path.is_file():
        return None
    seen.add(path)
    try:
        cfg = yaml.load(path.read_text(encoding="utf-8"), Loader=_task_yaml_loader())  # noqa: S506 - a SafeLoader
    except yaml.constructor.ConstructorError as err:
        found = re.search(r"tag '([^']+)'", str(err))
        tag = found.group(1).replace("tag:yaml.org,2002:", "!!") if found else str(err).splitlines()[0]
        return path, f"the YAML tag {tag}, which names a Python object"
    except (yaml.YAMLError, UnicodeDecodeError):
        return None  # lm-eval cannot load it either, so it runs nothing
    if not isinstance(cfg, dict):
        return None
    problem = value_problem(cfg)
    if problem:
        return path, problem
    for included in _includes(cfg, path):
        found = yaml_code_problem(included, trusted, seen)
        if found:
            return found
    return None


def refuse_task_code(include_path: list[str] | tuple[str, ...]) -> None:
    """Refuse task folders whose YAMLs would run Python, before lm-eval reads any of them.

    Raises:
        ConfigError: one line naming the file, what runs code, and the setting that allows it.
    """
    trusted, seen = trusted_task_dirs(), set()
    for folder in include_path:
        root = Path(folder).expanduser()
        for path in sorted(root.glob("**/*.yaml")):  # the files lm-eval's task index reads
            found = yaml_code_problem(path, trusted, seen)
            if found:
                where, what = found
                raise ConfigError(f"{where} runs Python ({what}); task YAMLs from an include path may run code "
                                  f"only when you allow it ({ALLOW_CODE_HINT}), so do that only for tasks you trust")


@contextlib.contextmanager
def sandboxed_templates(enabled: bool = True) -> Iterator[None]:
    """Render lm-eval's Jinja prompt templates in jinja2's sandbox for the duration.

    lm-eval renders every template through the module-level environment ``lm_eval.utils.env``;
    a sandboxed copy (same loader, undefined, newline handling and filters) takes its place.
    """
    if not enabled:
        yield
        return
    import lm_eval.utils as lm_utils
    from jinja2.sandbox import SandboxedEnvironment

    original = lm_utils.env
    sandbox = SandboxedEnvironment(loader=original.loader, undefined=original.undefined,
                                   keep_trailing_newline=original.keep_trailing_newline)
    sandbox.filters.update({k: v for k, v in original.filters.items() if k not in sandbox.filters})
    lm_utils.env = sandbox
    try:
        yield
    finally:
        lm_utils.env = original
