"""``slimforge distill cache-teacher``: build the teacher cache a recipe's distill stage will read.

Orchestration (a recipe, its session, one of its stages) over the distill package, kept out
of it: stage packages never import the pipeline.
"""

from __future__ import annotations

import logging

from slimforge.distill.stages import ensure_teacher_cache
from slimforge.distill.teacher_cache import TeacherCache
from slimforge.errors import ConfigError

log = logging.getLogger(__name__)


def cache_teacher_for_recipe(recipe_name: str, overrides: list[str], stage: str | None = None) -> TeacherCache:
    """Build (or extend) the teacher cache of a recipe's distill stage; the teacher loads only if rows are missing.

    Args:
        recipe_name: a shipped recipe's name or a YAML path, as ``slimforge run`` takes it.
        overrides: Hydra overrides.
        stage: which distill stage (default: the pipeline's first).

    Raises:
        ConfigError: the recipe has no distill stage, or ``stage`` is not one.
    """
    from slimforge.pipeline import prepare
    from slimforge.session import Session

    recipe = prepare(recipe_name, overrides)
    candidates = [n for n in recipe.pipeline if recipe.stages[n].kind == "distill"]
    if stage is not None and stage not in candidates:
        raise ConfigError(f"--stage {stage!r} is not a distill stage of this recipe; its distill stages: {candidates}")
    if not candidates:
        raise ConfigError(f"recipe {recipe.config.name!r} has no distill stage in its pipeline, so there is nothing to cache")
    name = stage or candidates[0]
    cfg = recipe.stages[name]
    if cfg.cross_tokenizer.enabled:  # its rows need the student's tokenizer, which the stages before it make
        raise ConfigError(f"stage {name} distils across tokenizers (cross_tokenizer.loss={cfg.cross_tokenizer.loss}): "
                          "its cache needs the student's own tokenizer, so the stage builds it on first use; run "
                          f"the recipe with stages.{name}.teacher_cache=true instead")
    if not cfg.teacher_cache:
        log.warning("stage %s has teacher_cache=false: run it with stages.%s.teacher_cache=true to train from this cache",
                    name, name)
    session = Session.for_recipe(recipe)
    return ensure_teacher_cache(cfg, session, recipe.config.seed)
