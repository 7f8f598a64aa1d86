"""Expert pruning for mixture-of-experts models: REAP or frequency scores, removal or merging, top-k.

The math is :mod:`slimforge.prune.expert_scores`'s; the model edits are :mod:`slimforge.moe`'s.
Here the calibration windows go through the model one decoder block at a time
(:func:`slimforge.calibration.layerwise.layerwise`, so one layer's activations are alive at
once). In each MoE layer a pre-hook on the experts module sees exactly what the block routed
(tokens, chosen experts, gate weights: the family's own routing, PhiMoE's sparsemixer
included), and the scores are accumulated batch by batch. The layer's lowest-scoring experts
are then removed (with ``merge``, a second pass over the layer's inputs measures how alike the
removed and surviving experts' outputs are, and each removed expert is averaged into its
closest survivor first), before the layer produces the next layer's inputs: each layer is
scored on what the already-pruned layers before it produce. Top-k changes last.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from slimforge import arch, moe
from slimforge.calibration.layerwise import LayerStep, layerwise
from slimforge.prune import expert_scores as es

if TYPE_CHECKING:  # pragma: no cover
    from slimforge.prune.expert_config import ExpertsConfig
    from slimforge.stage import StageContext, StageOutput

log = logging.getLogger(__name__)


@dataclass
class LayerExperts:
    """What expert pruning did to one MoE layer."""

    layer: int
    kept: list[int]
    removed: list[int]
    scores: list[float]  # per original expert
    tokens: list[int]  # calibration tokens routed to each original expert
    merged_into: dict[int, int] = field(default_factory=dict)  # removed expert -> survivor

    def record(self) -> dict[str, Any]:
        out: dict[str, Any] = {"layer": self.layer, "kept": self.kept, "removed": self.removed,
                               "scores": [round(s, 6) for s in self.scores], "tokens": self.tokens}
        if self.merged_into:
            out["merged_into"] = {str(k): v for k, v in self.merged_into.items()}
        return out


@contextlib.contextmanager
def _routed(block: moe.MoEBlock, fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]) -> Iterator[None]:
    """Call ``fn(hidden [T, H], indices [T, k], weights [T, k])`` with what each forward routes to the experts."""

    def hook(_module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        values = list(args) + [kwargs[k] for k in ("hidden_states", "top_k_index", "top_k_weights") if k in kwargs]
        hidden, indices, weights = values[:3]
        indices = indices.reshape(-1, indices.shape[-1])
        fn(hidden.reshape(-1, hidden.shape[-1]), indices, weights.reshape(indices.shape))

    handle = block.experts.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def _expert_fn(block: moe.MoEBlock) -> es.ExpertFn:
    return lambda expert, hidden: moe.expert_forward(block, expert, hidden)


@torch.no_grad()
def score_layer(step: LayerStep, block: moe.MoEBlock, score: str) -> es.ExpertStats:
    """Run the layer's calibration batches and accumulate its per-expert routing statistics."""
    stats = es.ExpertStats.zeros(block.num_experts)
    expert_fn = _expert_fn(block)

    def add(hidden: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> None:
        norms = es.slot_output_norms(hidden, indices, expert_fn) if score == "reap" else None
        es.accumulate_stats(stats, indices, weights, norms)

    with _routed(block, add):
        step.run()
    return stats


@torch.no_grad()
def merge_layer(step: LayerStep, block: moe.MoEBlock, kept: list[int], removed: list[int],
                tokens: torch.Tensor) -> dict[int, int]:
    """Average each removed expert into its most alike survivor (output cosine on its tokens), in place.

    Returns:
        removed expert -> the survivor it joined.
    """
    sums = torch.zeros(len(removed), len(kept), dtype=torch.float64)
    counts = torch.zeros(len(removed), dtype=torch.float64)
    expert_fn = _expert_fn(block)
    with _routed(block, lambda hidden, indices, _w: es.accumulate_similarity(sums, counts, hidden, indices, removed,
                                                                             kept, expert_fn)):
        step.run()
    targets = es.merge_targets(sums / counts.clamp(min=1)[:, None], kept)
    for survivor, members in es.merge_groups(kept, removed, targets).items():
        weights = [moe.expert_weights(block, e) for e in members]
        counts_of = [float(tokens[e]) for e in members]
        merged = [es.frequency_weighted_average([w[i] for w in weights], counts_of) for i in range(3)]
        moe.set_expert_weights(block, survivor, *merged)
    return dict(zip(removed, targets, strict=True))


@torch.no_grad()
def prune_experts(model: torch.nn.Module, input_ids: torch.Tensor, keep: int, score: str = "reap",
                  merge: bool = False, batch_size: int = 8, device: torch.device | str | None = None
                  ) -> list[LayerExperts]:
    """Keep ``keep`` experts in every MoE layer, chosen by ``score`` on ``input_ids``, in place.

    Sets the config's expert count; the top-k is left as it was (:func:`slimforge.moe.set_top_k`).
    """
    moe.require_moe(model)
    done: list[LayerExperts] = []
    for step in layerwise(model, input_ids, batch_size=batch_size, device=device, desc=f"experts: {score}"):
        block = moe.moe_block(step.layer, step.index)
        if block is None:  # a dense layer (Qwen MoE's mlp_only_layers): the walk runs it unchanged
            continue
        stats = score_layer(step, block, score)
        scores = es.expert_scores(stats, score)
        kept = es.choose_kept(scores, keep)
        removed = [e for e in range(block.num_experts) if e not in kept]
        merged = merge_layer(step, block, kept, removed, stats.tokens) if merge and removed else {}
        moe.keep_block_experts(block, kept)
        done.append(LayerExperts(step.index, kept, removed, [float(s) for s in scores],
                                 [int(t) for t in stats.tokens], merged))
        log.info("layer %d: kept experts %s, removed %s", step.index, kept, removed)
    moe.set_expert_count(model.config, keep)
    return done


@torch.no_grad()
def expert_saliency(model: torch.nn.Module, input_ids: torch.Tensor, score: str = "reap", batch_size: int = 8,
                    device: torch.device | str | None = None) -> list[list[float] | None]:
    """Per decoder layer, every expert's ``score`` on ``input_ids`` with the model unchanged (None for a
    dense layer): what the architecture search measures once and slices every candidate by."""
    moe.require_moe(model, "expert scoring")
    out: list[list[float] | None] = []
    for step in layerwise(model, input_ids, batch_size=batch_size, device=device, desc=f"experts: {score}"):
        block = moe.moe_block(step.layer, step.index)
        if block is None:  # a dense layer: the walk runs it unchanged
            out.append(None)
            continue
        out.append([float(s) for s in es.expert_scores(score_layer(step, block, score), score)])
    return out


def experts_stage(ctx: StageContext) -> StageOutput:
    """Remove or merge the least salient experts of every MoE layer (REAP or frequency), and/or lower top-k."""
    from slimforge.calibration.windows import calibration_windows, load_for_calibration
    from slimforge.stage import StageOutput

    cfg: ExpertsConfig = ctx.config
    model, tokenizer = load_for_calibration(ctx, cfg.offload_model)
    total, keep, new_k = cfg.plan(model.config)  # the parent's real counts
    moe.require_moe(model)
    top_k_before = moe.top_k(model.config)
    params = {"parameters_before": arch.count_parameters(model), "active_parameters_before": moe.active_parameters(model)}
    start = time.perf_counter()
    layers: list[LayerExperts] = []
    if keep < total:
        layers = prune_experts(model, calibration_windows(ctx, cfg), keep, cfg.score, cfg.merge, cfg.batch_size,
                               ctx.device)
    if new_k != top_k_before:
        moe.set_top_k(model, new_k)
    params.update(parameters_after=arch.count_parameters(model), active_parameters_after=moe.active_parameters(model))
    log.info("expert pruning (%s%s): %d -> %d experts per layer, top-k %d -> %d", cfg.score,
             ", merged" if cfg.merge else "", total, keep, top_k_before, new_k)
    meta: dict[str, Any] = {"score": cfg.score, "merge": cfg.merge, "experts_before": total, "experts_after": keep,
                            "top_k_before": top_k_before, "top_k_after": new_k, **params,
                            "layers": [layer.record() for layer in layers]}
    if layers:
        meta["calibration"] = {"samples": cfg.num_samples, "seq_len": cfg.seq_len}
    metrics = {"experts_after": keep, "parameters_after": params["parameters_after"],
               "active_parameters_after": params["active_parameters_after"],
               "seconds": round(time.perf_counter() - start, 2)}
    return StageOutput(model=model, tokenizer=tokenizer, meta=meta, metrics=metrics)
