"""slimforge: turn a teacher LLM into small language models.

``import slimforge`` stays cheap: the heavy libraries (torch, transformers,
datasets, Hydra) load only when a function that needs them runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:  # pragma: no cover
    from slimforge.pipeline import RunResult


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


__all__ = ["__version__", "run"]
