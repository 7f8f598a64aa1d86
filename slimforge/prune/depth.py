"""Depth pruning: remove whole decoder layers, giving a smaller HF model with renumbered layers.

Which layers go (``criterion``, one of :data:`slimforge.prune.config.DEPTH_CRITERIA`):

- ``block_influence`` (ShortGPT, Men et al. 2024): score every block by ``1 - cos(x_in, x_out)``,
  mean over tokens, and remove the ``count`` lowest;
- ``angular`` (Gromov et al. 2024): ``arccos(cos(x_l, x_{l+n})) / pi`` between the input of
  block ``l`` and the output of block ``l+n-1``, mean over tokens; the span of ``n`` blocks
  with the smallest distance goes (needs the inputs of the last ``n`` blocks);
- ``list``: the layers given.

Scores are measured block by block on calibration windows
(:func:`slimforge.calibration.layerwise.layerwise`). The layers are removed by
:func:`drop_layers`, the one way slimforge removes layers: the ``student.drop_layers`` stage
uses it too, with the index math here that picks evenly spaced layers.
"""

from __future__ import annotations

import collections
import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from slimforge import arch
from slimforge.calibration.layerwise import layerwise
from slimforge.prune.choices import DEPTH_CRITERIA

if TYPE_CHECKING:  # pragma: no cover
    from slimforge.prune.config import DepthConfig
    from slimforge.stage import StageContext, StageOutput

log = logging.getLogger(__name__)


# --- which layer indices stay ----------------------------------------------------------------


def evenly_spaced_keep(total: int, keep: int) -> list[int]:
    """``keep`` layer indices spread evenly over ``total``, always keeping the first and last.

    >>> evenly_spaced_keep(10, 4)
    [0, 3, 6, 9]
    """
    if not 1 <= keep <= total:
        raise ValueError(f"cannot keep {keep} of {total} layers")
    if keep == 1:
        return [0]
    step = (total - 1) / (keep - 1)
    return [round(i * step) for i in range(keep)]


def keep_from_drop(total: int, drop: Iterable[int]) -> list[int]:
    """The layer indices that remain after removing ``drop``."""
    gone = set(drop)
    return [i for i in range(total) if i not in gone]


def keep_from_ratio(total: int, ratio: float) -> list[int]:
    """Evenly spaced layers keeping ``ratio`` of ``total`` (rounded, at least one)."""
    return evenly_spaced_keep(total, max(1, round(total * ratio)))


# --- removing them ---------------------------------------------------------------------------


@dataclass(frozen=True)
class DroppedLayers:
    """What :func:`drop_layers` did: the layer count before, and the indices kept and removed."""

    before: int
    kept: list[int]
    removed: list[int]


def drop_layers(model: Any, remove: Iterable[int]) -> DroppedLayers:
    """Remove the decoder layers at ``remove`` in place; the rest are renumbered.

    The one way slimforge removes layers (depth pruning and the ``drop_layers`` student):
    :func:`slimforge.arch.keep_layers` renumbers the KV-cache indices and shortens the
    config's per-layer lists, so the saved folder reloads as the smaller model.
    """
    total = arch.num_layers(model)
    kept = keep_from_drop(total, remove)
    arch.keep_layers(model, kept)
    return DroppedLayers(before=total, kept=kept, removed=keep_from_drop(total, kept))


# --- scoring blocks --------------------------------------------------------------------------


def _cosine(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-token cosine similarity of two [..., hidden] tensors, in fp32."""
    return torch.nn.functional.cosine_similarity(x.float(), y.float(), dim=-1, eps=1e-8)


def block_influence(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-token ``1 - cos(x, y)``: how much a block changes its input (ShortGPT)."""
    return 1 - _cosine(x, y)


def angular_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-token ``arccos(cos(x, y)) / pi`` in [0, 1] (Gromov et al.)."""
    return torch.arccos(_cosine(x, y).clamp(-1, 1)) / math.pi


class _Mean:
    def __init__(self) -> None:
        self.total, self.count = 0.0, 0

    def add(self, values: torch.Tensor) -> None:
        self.total += float(values.double().sum())
        self.count += values.numel()

    @property
    def value(self) -> float:
        return self.total / max(self.count, 1)


def _mean_over_batches(fn: Any, xs: list[torch.Tensor], ys: list[torch.Tensor]) -> float:
    acc = _Mean()
    for x, y in zip(xs, ys):
        acc.add(fn(x, y))
    return acc.value


def block_influence_scores(model: torch.nn.Module, input_ids: torch.Tensor, batch_size: int = 8,
                           device: torch.device | str | None = None) -> list[float]:
    """Mean per-token Block Influence of each block; lower means more removable."""
    scores = []
    for step in layerwise(model, input_ids, batch_size=batch_size, device=device, desc="depth: block influence"):
        acc = _Mean()
        step.run(fn=lambda x, y, acc=acc: acc.add(block_influence(x, y)), keep_outputs=True)
        scores.append(acc.value)
    return scores


def angular_scores(model: torch.nn.Module, input_ids: torch.Tensor, span: int, batch_size: int = 8,
                   device: torch.device | str | None = None) -> list[float]:
    """Mean per-token angular distance for each span start ``l`` in ``[0, layers - span]``:
    between block ``l``'s input and block ``l + span - 1``'s output; lower means more removable."""
    total = arch.num_layers(model)
    if not 1 <= span < total:
        raise ValueError(f"the span must be between 1 and {total - 1}, got {span}")
    history: collections.deque[list[torch.Tensor]] = collections.deque(maxlen=span)
    distances = []
    last: list[torch.Tensor] = []
    for step in layerwise(model, input_ids, batch_size=batch_size, device=device, desc="depth: angular distance"):
        if len(history) == span:
            distances.append(_mean_over_batches(angular_distance, history[0], step.inputs))
        history.append(step.inputs)
        step.run(keep_outputs=True)
        last = step.outputs or []
    distances.append(_mean_over_batches(angular_distance, history[0], last))
    return distances


def depth_scores(model: torch.nn.Module, input_ids: torch.Tensor, criterion: str, span: int = 1,
                 batch_size: int = 8, device: torch.device | str | None = None) -> list[float]:
    """:func:`block_influence_scores` (one per layer) or :func:`angular_scores` (one per span start)."""
    if criterion == "block_influence":
        return block_influence_scores(model, input_ids, batch_size, device)
    if criterion == "angular":
        return angular_scores(model, input_ids, span, batch_size, device)
    raise ValueError(f"criterion {criterion!r} has no scores; scored criteria: block_influence, angular")


def layers_to_remove(scores: list[float], count: int, criterion: str) -> list[int]:
    """The indices to drop: the ``count`` lowest-scoring blocks, or the best span of ``count``."""
    if criterion == "block_influence":
        order = sorted(range(len(scores)), key=lambda i: (scores[i], i))
        return sorted(order[:count])
    start = min(range(len(scores)), key=lambda i: (scores[i], i))
    return list(range(start, start + count))


def choose_layers(model: torch.nn.Module, criterion: str, count: int, layers: list[int] | None = None,
                  calibration: Callable[[], torch.Tensor] | None = None, batch_size: int = 8,
                  device: torch.device | str | None = None) -> tuple[list[int], list[float]]:
    """The layers ``criterion`` removes, and the scores that chose them (none for ``list``).

    Args:
        model: the model to score (not changed).
        criterion: one of :data:`~slimforge.prune.config.DEPTH_CRITERIA`.
        count: how many layers go.
        layers: the layers ``list`` removes.
        calibration: gives the calibration token ids, asked only by the scored criteria.
    """
    if criterion not in DEPTH_CRITERIA:
        raise ValueError(f"criterion must be one of {DEPTH_CRITERIA}, got {criterion!r}")
    if criterion == "list":
        return sorted(layers or []), []
    assert calibration is not None, f"criterion {criterion} needs calibration tokens"
    scores = depth_scores(model, calibration(), criterion, span=count, batch_size=batch_size, device=device)
    return layers_to_remove(scores, count, criterion), scores


# --- the stage -------------------------------------------------------------------------------


def depth_stage(ctx: StageContext) -> StageOutput:
    """Remove decoder layers chosen by Block Influence, angular distance, or a list."""
    from slimforge.calibration.windows import calibration_windows, load_for_calibration
    from slimforge.stage import StageOutput, TeacherInfo

    cfg: DepthConfig = ctx.config
    model, tokenizer = load_for_calibration(ctx, cfg.offload_model)
    cfg.check_input(TeacherInfo(model.config, tokenizer))  # the parent's real layer count
    total = arch.num_layers(model)
    drop, scores = choose_layers(model, cfg.criterion, cfg.count(total), cfg.layers,
                                 lambda: calibration_windows(ctx, cfg), cfg.batch_size, ctx.device)
    params = arch.count_parameters(model)
    dropped = drop_layers(model, drop)
    log.info("depth pruning (%s) removed layers %s of %d", cfg.criterion, drop, total)
    meta = {"criterion": cfg.criterion, "layers_before": total, "layers_after": len(dropped.kept),
            "removed_layers": drop, "kept_layers": dropped.kept, "scores": [round(s, 6) for s in scores],
            "parameters_before": params, "parameters_after": arch.count_parameters(model)}
    return StageOutput(model=model, tokenizer=tokenizer, meta=meta,
                       metrics={"layers_after": len(dropped.kept), "parameters_after": meta["parameters_after"]})
