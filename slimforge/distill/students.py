"""Student initialisation stages."""

from __future__ import annotations

import logging

from slimforge.arch import keep_layers, num_layers
from slimforge.distill.config import CheckpointStudentConfig, DropLayersConfig
from slimforge.prune.depth import evenly_spaced_keep, keep_from_drop, keep_from_ratio
from slimforge.stage import StageContext, StageOutput

log = logging.getLogger(__name__)


def layers_to_keep(cfg: DropLayersConfig, total: int) -> list[int]:
    """Resolve a drop-layers config into the indices of the layers that stay."""
    if cfg.num_layers is not None:
        return evenly_spaced_keep(total, cfg.num_layers)
    if cfg.keep_ratio is not None:
        return keep_from_ratio(total, cfg.keep_ratio)
    return keep_from_drop(total, list(cfg.drop or []))


def drop_layers_stage(ctx: StageContext) -> StageOutput:
    """The teacher (or parent) with decoder layers removed and the rest renumbered."""
    cfg: DropLayersConfig = ctx.config
    model, tokenizer = ctx.load_parent()
    total = num_layers(model)
    keep = layers_to_keep(cfg, total)
    keep_layers(model, keep)
    dropped = [i for i in range(total) if i not in set(keep)]
    log.info("student keeps %d of %d layers; dropped %s", len(keep), total, dropped)
    meta = {"layers_before": total, "layers_after": len(keep), "kept_layers": keep, "dropped_layers": dropped}
    return StageOutput(model=model, tokenizer=tokenizer, meta=meta)


def checkpoint_stage(ctx: StageContext) -> StageOutput:
    """An existing checkpoint, re-saved as a slimforge artifact."""
    cfg: CheckpointStudentConfig = ctx.config
    model, tokenizer = cfg.source().load(device=ctx.device, dtype=ctx.dtype)
    return StageOutput(model=model, tokenizer=tokenizer, meta={"source": cfg.path})
