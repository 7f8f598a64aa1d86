"""Architecture search to a parameter budget (Minitron's search, on plain Hugging Face models).

Given a target size, the search

1. enumerates a small, diverse grid of legal shapes (:func:`enumerate_shapes`): every depth
   level of ``depth_keep`` times every width *mix* of ``width_mixes`` (the width axes that
   shrink together), each solved for a common shrink factor of its axes so that the
   parameter count lands nearest the target (a mix holding ``mlp`` then refines the MLP width
   alone, its finest step); shapes outside ``tolerance`` of the target are dropped, duplicates
   merged, and at most ``max_candidates`` kept, evenly spread over the grid;
2. measures importance **once**, on the input model: Block Influence per layer
   (:func:`slimforge.prune.depth.block_influence_scores`) and Minitron's activation importance
   of MLP channels, heads and hidden channels (:func:`slimforge.prune.width.width_importance`);
3. builds each candidate by slicing (:func:`build_candidate`): depth first (the layers with
   the highest Block Influence stay), then width from the teacher's importances of the kept
   layers, as Minitron does (importance is not measured again on the depth-pruned model);
4. scores each candidate by forward KL to its input model on training blocks that healing
   never reads (never the run's held-out split, which the evaluation reports), after
   ``heal_steps`` of logit distillation (:func:`heal`, the project's
   :func:`slimforge.distill.losses.kd_loss`), or at once with ``heal_steps: 0``;
5. returns every candidate, the Pareto set over (parameters, KL) (:func:`pareto_front`), and
   the chosen one: the lowest KL after healing (all candidates are within the budget).

The stage writes the chosen shape, sliced from its input but *not* healed (the few healing
steps only rank the shapes): the recipe's distillation stage heals it.

The axes are pluggable. Depth and width are built in; a further axis is an
:class:`~slimforge.prune.search_grid.ExtraAxis` (its levels and its effect on the parameter
count), passed to :func:`enumerate_shapes` (``axes``), which multiplies the grid by its levels and
records the size in each :class:`Shape`'s ``extra``, plus a slicer in :data:`SLICERS`. The dense
search passes none. On a mixture-of-experts input the grid is depth x ``experts``
(:func:`~slimforge.prune.search_grid.experts_axis`: routed experts kept per layer, top-k at the
least) with whole widths: the importance measured once is Block Influence and every expert's
REAP (or frequency) score per layer (:func:`slimforge.prune.experts.expert_saliency`), and each
kept layer keeps its highest-scoring experts (:func:`slice_experts`), as the experts method
does, but from the input's scores rather than layer by layer.
"""

from __future__ import annotations

import copy
import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from slimforge import arch
from slimforge.prune.search_grid import (  # noqa: F401  (re-exported: the search's API in one place)
    ExtraAxis,
    Shape,
    depth_levels,
    enumerate_shapes,
    experts_axis,
    full_shape,
    nearest_counts,
    parse_mix,
    shape_param_count,
    smallest_shape,
    solve_shape,
    spread,
)
from slimforge.prune.width_targets import full_targets

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from slimforge.prune.search_config import SearchConfig
    from slimforge.prune.width import WidthImportance
    from slimforge.stage import StageContext, StageOutput

log = logging.getLogger(__name__)


# --- the Pareto set ----------------------------------------------------------------------------


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point dominates (lower or equal in both, lower in one), by size.

    Both coordinates are minimised (parameters, KL). Equal points are all kept.
    """
    front = []
    for i, (pi, ki) in enumerate(points):
        dominated = any((pj <= pi and kj <= ki) and (pj < pi or kj < ki) for j, (pj, kj) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: (points[i][0], points[i][1], i))


def choose(records: Sequence[dict[str, Any]]) -> int:
    """The index of the candidate with the lowest KL after healing (ties: fewer parameters, then first)."""
    return min(range(len(records)), key=lambda i: (records[i]["kl_after"], records[i]["parameters"], i))


# --- importance once, candidates by slicing ----------------------------------------------------


@dataclass
class Importance:
    """What the search measures once on its input: Block Influence per layer, and width importance."""

    depth: list[float]
    width: WidthImportance | None  # None on an MoE input (its widths stay whole)
    extra: dict[str, Any] = field(default_factory=dict)  # per-layer lists, by axis (``experts``)


def measure_importance(model: Any, input_ids: torch.Tensor, batch_size: int = 8, device: Any = None,
                       expert_score: str = "reap") -> Importance:
    """Block Influence, and Minitron's width importance of a dense ``model`` or every expert's
    ``expert_score`` per layer of an MoE one, on ``input_ids`` (two calibration passes)."""
    from slimforge.moe_layout import is_moe_config
    from slimforge.prune.depth import block_influence_scores

    depth = block_influence_scores(model, input_ids, batch_size, device)
    if is_moe_config(model.config):
        from slimforge.prune.experts import expert_saliency

        return Importance(depth, None, {"experts": expert_saliency(model, input_ids, expert_score, batch_size, device)})
    from slimforge.prune.width import width_importance

    return Importance(depth, width_importance(model, input_ids, batch_size, device))


def kept_layers(scores: Sequence[float], layers: int) -> list[int]:
    """The ``layers`` blocks with the highest Block Influence, in order (ShortGPT's choice, as depth pruning)."""
    from slimforge.prune.depth import keep_from_drop, layers_to_remove

    return keep_from_drop(len(scores), layers_to_remove(list(scores), len(scores) - layers, "block_influence"))


_LAYER_IN_NAME = re.compile(r"(^|\.)layers\.(\d+)\.")


def importance_of_layers(importance: WidthImportance, kept: list[int]) -> WidthImportance:
    """The width importance of a model cut to the layers ``kept``: per-layer lists and norm names renumbered.

    The hidden-channel importance stays the whole model's (Minitron measures it once).
    """
    from slimforge.prune.width import WidthImportance

    new_index = {old: new for new, old in enumerate(kept)}
    energy = {}
    for name, value in importance.norm_energy.items():
        match = _LAYER_IN_NAME.search(name)
        if match is None:
            energy[name] = value
        elif int(match.group(2)) in new_index:
            start, end = match.span(2)
            energy[name[:start] + str(new_index[int(match.group(2))]) + name[end:]] = value
    return WidthImportance(mlp=[importance.mlp[i] for i in kept], heads=[importance.heads[i] for i in kept],
                           hidden=importance.hidden, norm_energy=energy)


def slice_depth(model: Any, importance: Importance, shape: Shape, options: dict[str, Any]) -> tuple[Any, Importance]:
    """Keep ``shape.layers`` layers (highest Block Influence), in place; the importance follows."""
    keep = kept_layers(importance.depth, shape.layers)
    if len(keep) < arch.num_layers(model):
        arch.keep_layers(model, keep)
    width = importance_of_layers(importance.width, keep) if importance.width is not None else None
    return model, Importance([importance.depth[i] for i in keep], width,
                             {axis: [values[i] for i in keep] for axis, values in importance.extra.items()})


def slice_experts(model: Any, importance: Importance, shape: Shape, options: dict[str, Any]) -> tuple[Any, Importance]:
    """Keep ``shape``'s ``experts`` count in every MoE layer: each layer's highest-scoring experts, in place."""
    from slimforge import moe
    from slimforge.prune.expert_scores import choose_kept

    count = dict(shape.extra).get("experts")
    if count is None or count == moe.num_experts(model.config):
        return model, importance
    import torch

    keep = [choose_kept(torch.tensor(scores), count) for scores in importance.extra["experts"] if scores is not None]
    moe.keep_experts(model, keep)
    return model, importance


def slice_width(model: Any, importance: Importance, shape: Shape, options: dict[str, Any]) -> tuple[Any, Importance]:
    """Keep the most important channels and heads for ``shape.width`` (a new, smaller model)."""
    from slimforge.prune.width import build_pruned_model, select_channels

    if importance.width is None or shape.width == full_targets(model.config):
        return model, importance
    kept = select_channels(importance.width, model.config, shape.width, options.get("head_mode", "query"))
    energy = importance.width.norm_energy if options.get("rescale_norms", True) else None
    return build_pruned_model(model, kept, shape.width, energy), importance


Slicer = Callable[[Any, Importance, Shape, dict[str, Any]], tuple[Any, Importance]]
# The steps that cut an input model to a shape, in order (experts does nothing on a dense model).
SLICERS: list[tuple[str, Slicer]] = [("depth", slice_depth), ("experts", slice_experts), ("width", slice_width)]


def build_candidate(model: Any, importance: Importance, shape: Shape, head_mode: str = "query",
                    rescale_norms: bool = True) -> Any:
    """A new model of ``shape`` sliced from ``model`` (left unchanged) by the importance measured once."""
    options = {"head_mode": head_mode, "rescale_norms": rescale_norms}
    out = copy.deepcopy(model)
    for _, slicer in SLICERS:
        out, importance = slicer(out, importance, shape, options)
    return out.eval()


# --- scoring -----------------------------------------------------------------------------------


def heal(student: Any, teacher: Any, batches: Sequence[tuple[torch.Tensor, torch.Tensor]], steps: int,
         lr: float) -> list[float]:
    """``steps`` of logit distillation (forward KL at T = 1, :func:`~slimforge.distill.losses.kd_loss`)
    with AdamW at a constant ``lr``, cycling through ``batches`` of (ids, loss mask); the losses."""
    import torch

    from slimforge.distill.losses import kd_loss

    losses = []
    if steps <= 0:
        return losses
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    student.train()
    try:
        for step in range(steps):
            ids, mask = batches[step % len(batches)]
            with torch.no_grad():
                t_logits = teacher(input_ids=ids, use_cache=False).logits[:, :-1]
            s_logits = student(input_ids=ids, use_cache=False).logits[:, :-1]
            loss = kd_loss(s_logits, t_logits, mask[:, 1:])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
    finally:
        student.eval()
    return losses


@dataclass
class ScoreData:
    """What every candidate is scored on alike: training blocks to heal on, blocks it never trains on."""

    split: Any  # the packed training split
    score_blocks: list[int]
    heal_batches: list[tuple[torch.Tensor, torch.Tensor]]
    batch_size: int


def score_data(train: Any, score_blocks: int, heal_steps: int, heal_batch_size: int, batch_size: int,
               seed: int, device: Any) -> ScoreData:
    """The last ``score_blocks`` training blocks to score on; the heal batches drawn by ``seed`` from the rest."""
    import numpy as np
    import torch

    from slimforge.data import blocks_tensor

    n = len(train)
    scored = list(range(n - score_blocks, n))
    rest = np.random.default_rng(seed).permutation(n - score_blocks)
    batches = []
    for step in range(min(heal_steps, max(1, (n - score_blocks) // heal_batch_size))):
        rows = sorted(int(i) for i in rest[step * heal_batch_size: (step + 1) * heal_batch_size])
        part = train.select(rows)
        ids = blocks_tensor(part).to(device)
        mask = blocks_tensor(part, column="loss_mask").to(device) if "loss_mask" in train.column_names \
            else torch.ones_like(ids)
        batches.append((ids, mask))
    return ScoreData(train, scored, batches, batch_size)


def score_candidate(student: Any, teacher: Any, data: ScoreData, heal_steps: int, heal_lr: float,
                    device: Any) -> dict[str, Any]:
    """KL to ``teacher`` (and perplexity) on the scoring blocks, before and after ``heal_steps`` of KD."""
    from slimforge.distill.metrics import heldout_metrics

    def measure() -> dict[str, float]:
        return heldout_metrics(student, data.split, data.score_blocks, data.batch_size, device, teacher=teacher)

    before = measure()
    losses = heal(student, teacher, data.heal_batches, heal_steps, heal_lr)
    after = measure() if heal_steps else before
    return {"kl_before": before["eval_kl"], "kl_after": after["eval_kl"], "ppl_before": before["eval_ppl"],
            "ppl_after": after["eval_ppl"], "top1_after": after["eval_top1"],
            "heal_loss": [round(x, 6) for x in losses]}


def run_search(model: Any, importance: Importance, shapes: Sequence[Shape], data: ScoreData, heal_steps: int,
               heal_lr: float, head_mode: str, rescale_norms: bool, device: Any,
               seed: int = 0) -> list[dict[str, Any]]:
    """Build, heal and score every shape against ``model``; one record per shape (shape, parameters, KL, seconds)."""
    import torch

    from slimforge.moe import active_parameters

    records = []
    for i, shape in enumerate(shapes):
        start = time.perf_counter()
        torch.manual_seed(seed)
        student = build_candidate(model, importance, shape, head_mode, rescale_norms)
        params = arch.count_parameters(student)
        active = active_parameters(student, params)
        scores = score_candidate(student, model, data, heal_steps, heal_lr, device)
        del student
        record = {"index": i, "shape": shape.as_dict(), "parameters": params,
                  **({"active_parameters": active} if active is not None else {}), **scores,
                  "seconds": round(time.perf_counter() - start, 2)}
        log.info("search: candidate %d/%d (%s): %d parameters, KL %.4f -> %.4f (%.1f s)", i + 1, len(shapes),
                 shape.describe(), params, scores["kl_before"], scores["kl_after"], record["seconds"])
        records.append(record)
    return records


def summarize(records: Sequence[dict[str, Any]]) -> tuple[list[int], int]:
    """The Pareto set over (parameters, KL after healing) and the chosen index."""
    front = pareto_front([(r["parameters"], r["kl_after"]) for r in records])
    return front, choose(records)


def candidates_table(records: Sequence[dict[str, Any]], front: Sequence[int], chosen: int) -> list[str]:
    """Markdown rows of every candidate: shape, parameters, KL before/after healing, seconds, Pareto, chosen."""
    experts = any("experts" in r["shape"] for r in records)
    head = ["| # | layers | hidden | mlp | heads (kv) |" + (" experts | active |" if experts else "")
            + " parameters | KL before | KL after | seconds | |",
            "|---:|---:|---:|---:|---:|" + ("---:|---:|" if experts else "") + "---:|---:|---:|---:|---|"]
    rows = []
    for r in records:
        s = r["shape"]
        mark = "chosen" if r["index"] == chosen else ("Pareto" if r["index"] in front else "")
        moe_cells = f" {s.get('experts', '')} | {r.get('active_parameters') or 0:,} |" if experts else ""
        rows.append(f"| {r['index']} | {s['layers']} | {s['hidden_size']} | {s['intermediate_size']} | "
                    f"{s['num_attention_heads']} ({s['num_key_value_heads']}) |{moe_cells} {r['parameters']:,} | "
                    f"{r['kl_before']:.4f} | {r['kl_after']:.4f} | {r['seconds']:.1f} | {mark} |")
    return head + rows


# --- the stage -------------------------------------------------------------------------------


def search_stage(ctx: StageContext) -> StageOutput:
    """Search depth x width shapes to a parameter budget; write the one with the lowest KL after a short heal."""
    from slimforge.calibration.windows import calibration_windows, load_for_calibration
    from slimforge.moe import active_parameters
    from slimforge.moe_layout import is_moe_config
    from slimforge.stage import StageOutput

    cfg: SearchConfig = ctx.config
    model, tokenizer = load_for_calibration(ctx, cfg.offload_model)
    if not is_moe_config(model.config):
        arch.require_supported(model.config)
    target = cfg.target_count()
    shapes = cfg.shapes(model.config)  # the input's real config: the plan checked the same
    data = ctx.data()
    cfg.check_data(len(data.train))
    importance = measure_importance(model, calibration_windows(ctx, cfg), cfg.batch_size, ctx.device,
                                    cfg.expert_score)
    if cfg.offload_model:
        model.to(ctx.device)
    scoring = score_data(data.train, cfg.score_blocks, cfg.heal_steps, cfg.heal_batch_size, cfg.batch_size,
                         ctx.seed, ctx.device)
    records = run_search(model, importance, shapes, scoring, cfg.heal_steps, cfg.heal_lr, cfg.head_mode,
                         cfg.rescale_norms, ctx.device, ctx.seed)
    front, chosen = summarize(records)
    best = shapes[chosen]
    pruned = build_candidate(model, importance, best, cfg.head_mode, cfg.rescale_norms)
    params_before, params_after = arch.count_parameters(model), arch.count_parameters(pruned)
    if params_after != records[chosen]["parameters"]:
        raise RuntimeError(f"the search rebuilt {params_after} parameters where it scored {records[chosen]['parameters']}")
    keep = kept_layers(importance.depth, best.layers)
    meta = {"target_parameters": int(target), "tolerance": cfg.tolerance,
            "parameters_before": params_before, "parameters_after": params_after,
            "parameter_ratio": round(params_after / params_before, 6),
            "dims_before": full_shape(model.config).as_dict(), "dims_after": best.as_dict(),
            "axes": ["depth", *(name for name, _ in best.extra)] + ([] if importance.width is None else ["width"]),
            "kept_layers": keep,
            "depth_scores": [round(s, 6) for s in importance.depth],
            "candidates": records, "pareto": front, "chosen": chosen,
            "candidates_table": candidates_table(records, front, chosen),
            "heal_steps": cfg.heal_steps, "score_blocks": cfg.score_blocks,
            "calibration": {"samples": cfg.num_samples, "seq_len": cfg.seq_len}}
    removed = sorted(set(range(arch.num_layers(model))) - set(keep))
    if removed:  # the card's outcome names them
        meta["removed_layers"] = removed
    if importance.width is None:  # MoE: the experts each kept layer keeps, by its score on the input
        import torch

        from slimforge.moe import num_experts
        from slimforge.prune.expert_scores import choose_kept

        count, scores = dict(best.extra)["experts"], importance.extra["experts"]
        meta.update(expert_score=cfg.expert_score, experts_before=num_experts(model.config), experts_after=count,
                    active_parameters_before=active_parameters(model, params_before),
                    active_parameters_after=active_parameters(pruned, params_after),
                    expert_scores=[[round(v, 6) for v in layer] for layer in scores],
                    kept_experts={str(i): choose_kept(torch.tensor(scores[i]), count) for i in keep})
    log.info("search: chose candidate %d (%s): %d -> %d parameters, KL after %d steps %.4f; Pareto set %s",
             chosen, best.describe(), params_before, params_after, cfg.heal_steps, records[chosen]["kl_after"], front)
    del model
    return StageOutput(model=pruned, tokenizer=tokenizer, meta=meta,
                       metrics={"parameters_after": params_after, "parameter_ratio": meta["parameter_ratio"],
                                "search_kl": records[chosen]["kl_after"], "candidates": len(records)})
