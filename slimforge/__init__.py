"""slimforge: turn a teacher LLM into small language models.

``import slimforge`` stays cheap: the heavy libraries (torch, transformers,
datasets, Hydra) load only when a function that needs them runs.

The Python API (:mod:`slimforge.api`) is re-exported here: ``slimforge.run``,
``slimforge.prune``, ``slimforge.distill``, ``slimforge.quantize``,
``slimforge.evaluate``. ``prune``, ``distill`` and ``quantize`` are also the names of
the stage subpackages; each of those modules is made callable, so that
``slimforge.prune(...)`` runs the API function and ``slimforge.prune.config`` is
still the subpackage's module.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

from slimforge._version import __version__

if TYPE_CHECKING:  # pragma: no cover
    from slimforge.api import EvalResult, evaluate, run_stage
    from slimforge.pipeline import RunResult

# Names served by slimforge.api, loaded on first use.
_API = ("EvalResult", "evaluate", "run_stage")
# Stage subpackages that double as API functions.
_STAGE_FUNCTIONS = ("prune", "distill", "quantize")


class _StagePackage(types.ModuleType):
    """A stage subpackage that is also its API function: ``slimforge.prune(...)``."""

    def _api_function(self) -> Any:
        from slimforge import api

        return getattr(api, self.__name__.rpartition(".")[2])

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run this stage through the Python API (see :mod:`slimforge.api`)."""
        return self._api_function()(*args, **kwargs)

    @property
    def __signature__(self) -> Any:  # what help() and notebooks show for the call
        import inspect

        return inspect.signature(self._api_function())


class _Package(types.ModuleType):
    """``slimforge`` itself: a stage subpackage becomes callable when the import system attaches it here."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _STAGE_FUNCTIONS and type(value) is types.ModuleType:
            value.__class__ = _StagePackage
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def run(recipe: str = "default", overrides: list[str] | None = None, **kwargs: Any) -> RunResult:
    """Run a recipe, as ``slimforge run <recipe> <overrides...>`` does.

    Args:
        recipe: a shipped recipe name (see ``slimforge recipes``) or a path to a recipe YAML.
        overrides: Hydra overrides, e.g. ``["student.num_layers=20", "seed=1"]``.
        **kwargs: passed to :func:`slimforge.pipeline.run_recipe`.

    Returns:
        The run's result: its directory, manifest and evaluation metrics.
    """
    from slimforge.pipeline import run_recipe

    return run_recipe(recipe, list(overrides or []), **kwargs)


def __getattr__(name: str) -> Any:
    if name in _STAGE_FUNCTIONS:
        return importlib.import_module(f"slimforge.{name}")  # attached, callable, by _Package.__setattr__
    if name in _API:
        from slimforge import api

        return getattr(api, name)
    raise AttributeError(f"module 'slimforge' has no attribute {name!r}")


__all__ = ["EvalResult", "__version__", "distill", "evaluate", "prune", "quantize", "run", "run_stage"]
