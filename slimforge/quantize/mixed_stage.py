"""The ``mixed_precision`` stage: measure each unit's sensitivity per width, fit the widths to a bit
budget, quantize with GPTQ at those widths, and save one compressed-tensors folder.

**Granularity.** A unit is the set of a block's linears that read one tensor: q/k/v together,
gate/up together, o and down alone. Finer (per linear) is not servable: vLLM fuses q/k/v and
gate/up into one layer each and refuses a checkpoint whose shards have different schemes, or
some kept and some quantized. Coarser (per block) would give the allocation a quarter of the
choices, when the sensitivity of a block's o or down projection differs from its q/k/v's by an
order of magnitude. A unit also shares one Hessian, so its linears are solved from one
recording. The units are found from the calibration itself (the linears the recorder saw fed
the very same tensor), not from layer names, so a new family needs nothing here.

**Sensitivity.** For each unit and each candidate width below 16, every linear of the unit is
GPTQ-quantized at that width from its Hessian in the unquantized model (all Hessians come from
one block-by-block pass, each (linear, width) is solved once), and the sensitivity is the mean
per-token KL from the unquantized input model (the teacher, when the stage comes first) to the
model with only that unit quantized, on windows apart from the GPTQ calibration's. Width 16
keeps the layer as it is, so its sensitivity is 0. The input model's logits and every block's
inputs on those windows are computed once; a unit's evaluation starts from its block's cached
inputs (the blocks before it pass their input through untouched), which halves the cost on
average and gives the same logits as a full forward (tested).

**Allocation** is :func:`slimforge.quantize.mixed.allocate_widths` on the exact stored bits of
each unit at each width; then GPTQ runs block by block as in the ``gptq`` method, each layer
at its width, and the folder gets one config group per width.

**Reuse.** The sensitivity table does not depend on the budget, and measuring it is most of the
stage's time, so it is kept in the cache (``sensitivity/``), keyed by everything it does depend
on: the input model's and the data's fingerprints, the seed, the run's dtype and every setting
but ``bits_budget``. Another budget on the same model (a sweep) only allocates and quantizes.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from slimforge import arch
from slimforge.config import FieldError, hashed_config
from slimforge.quantize.config import KEPT_WIDTH, MixedPrecisionConfig, widths_map_text
from slimforge.quantize.mixed import allocate_widths, stored_bits
from slimforge.stage import StageContext, StageOutput

log = logging.getLogger(__name__)


@dataclass
class Unit:
    """Linears of one block that read one tensor, so they take one width together."""

    names: tuple[str, ...]  # full module names
    costs: dict[int, int] = field(default_factory=dict)  # width -> stored bits of all the unit's linears
    sensitivity: dict[int, float] = field(default_factory=dict)  # width -> mean per-token KL

    @property
    def label(self) -> str:
        """``model.layers.0.self_attn.q_proj+k_proj+v_proj``."""
        return "+".join([self.names[0], *(n.rsplit(".", 1)[-1] for n in self.names[1:])])


@dataclass
class Reference:
    """The unquantized model on the sensitivity windows: token batches, every block's inputs, logits."""

    batches: list[torch.Tensor]
    block_inputs: list[list[torch.Tensor]]  # [block][batch]
    logits: list[torch.Tensor]  # per batch


def linear_costs(linears: dict[str, nn.Linear], widths: list[int], group_size: int,
                 scale_bits: int) -> dict[str, dict[int, int]]:
    """Exact stored bits of each linear at each width (see :func:`slimforge.quantize.mixed.stored_bits`)."""
    return {name: {w: stored_bits(m.out_features, m.in_features, w, group_size, scale_bits, m.bias is not None)
                   for w in widths}
            for name, m in linears.items()}


def check_exact_budget(cfg: MixedPrecisionConfig, costs: dict[str, dict[int, int]], numel: int) -> None:
    """The plan's budget check again, with the exact costs of the loaded layers (before any calibration)."""
    low, high = min(cfg.candidates), max(cfg.candidates)
    cfg.refuse_budget(sum(c[low] for c in costs.values()) / numel, low,
                      sum(c[high] for c in costs.values()) / numel, high)


@torch.no_grad()
def reference_run(model: Any, ids: torch.Tensor, batch_size: int, device: torch.device) -> Reference:
    """Record each block's inputs on ``ids`` and the model's logits (the model is not changed)."""
    from slimforge.calibration.layerwise import layerwise

    inputs = []
    for step in layerwise(model, ids, batch_size=batch_size, device=device):
        inputs.append(step.inputs)
        step.run(keep_outputs=True)
    batches = [ids[i:i + batch_size].to(device) for i in range(0, len(ids), batch_size)]
    logits = [model(input_ids=batch, use_cache=False).logits.float() for batch in batches]
    return Reference(batches=batches, block_inputs=inputs, logits=logits)


@contextlib.contextmanager
def resumed_at(model: Any, start: int) -> Iterator[list[torch.Tensor | None]]:
    """Make the model's forward skip blocks ``0 .. start-1``: the block before ``start`` hands on the
    tensor put in the yielded one-item list instead of computing it (the others pass their input on)."""
    layers = arch.decoder_layers(model)
    fed: list[torch.Tensor | None] = [None]

    def pass_on(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states

    def hand_over(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return fed[0] if fed[0] is not None else hidden_states

    for index in range(start):
        layers[index].forward = hand_over if index == start - 1 else pass_on
    try:
        yield fed
    finally:
        for index in range(start):
            del layers[index].forward


@torch.no_grad()
def kl_from_block(model: Any, start: int, reference: Reference) -> float:
    """Mean per-token KL(reference || model) on the reference windows, running blocks ``start`` on only."""
    from slimforge.eval.fidelity import token_kl

    total, tokens = 0.0, 0
    with resumed_at(model, start) as fed:
        for batch, hidden, ref_logits in zip(reference.batches, reference.block_inputs[start], reference.logits):
            fed[0] = hidden.to(batch.device)
            kl = token_kl(ref_logits, model(input_ids=batch, use_cache=False).logits)
            total += float(kl.sum())
            tokens += kl.numel()
    return total / tokens


def input_units(linears: dict[str, nn.Linear], stats: Any, names: dict[int, str]) -> list[tuple[str, ...]]:
    """The block's linears grouped by the input they read (the recorder shares one statistic per tensor)."""
    groups: dict[int, list[str]] = {}
    for local, linear in linears.items():
        groups.setdefault(id(stats[local]), []).append(names[id(linear)])
    return [tuple(group) for group in groups.values()]


@contextlib.contextmanager
def swapped_weights(modules: dict[str, nn.Linear], weights: dict[str, torch.Tensor]) -> Iterator[None]:
    """Give the named linears ``weights`` for the duration, then their own back."""
    saved = {name: modules[name].weight.data.clone() for name in weights}
    try:
        for name, weight in weights.items():
            modules[name].weight.data.copy_(weight.to(modules[name].weight.dtype))
        yield
    finally:
        for name, weight in saved.items():
            modules[name].weight.data.copy_(weight)


def measure_sensitivity(model: Any, calib_ids: torch.Tensor, reference: Reference, cfg: MixedPrecisionConfig,
                        only: set[str], device: torch.device, scale_dtype: torch.dtype) -> list[Unit]:
    """Each unit's KL to the unquantized model at each width below 16, quantized alone (module docstring).

    The model is unchanged afterwards.
    """
    from slimforge.calibration.activations import record_linear_inputs
    from slimforge.calibration.layerwise import layerwise
    from slimforge.quantize.gptq import gptq_quantize_weight

    names = {id(m): n for n, m in model.named_modules()}
    modules = {n: m for n, m in model.named_modules() if n in only}
    widths = sorted(w for w in cfg.candidates if w != KEPT_WIDTH)
    units: list[Unit] = []
    for step in layerwise(model, calib_ids, batch_size=cfg.batch_size, device=device, desc="sensitivity"):
        linears = {local: m for local, m in step.linears().items() if names[id(m)] in only}
        with record_linear_inputs(linears, hessian=True) as stats:
            step.run(keep_outputs=True)  # the block is left as it was: its outputs feed the next one
        local_of = {names[id(m)]: local for local, m in linears.items()}
        groups = input_units(linears, stats, names)
        for group in groups:
            unit = Unit(names=group, sensitivity={KEPT_WIDTH: 0.0} if KEPT_WIDTH in cfg.candidates else {})
            for width in widths:
                solved = {name: gptq_quantize_weight(modules[name].weight, stats[local_of[name]].hessian, width,
                                                     cfg.group_size, act_order=cfg.act_order, percdamp=cfg.percdamp,
                                                     block_size=cfg.block_size, scale_dtype=scale_dtype,
                                                     scale_search=cfg.scale_search).weight
                          for name in group}
                with swapped_weights(modules, solved):
                    unit.sensitivity[width] = kl_from_block(model, step.index, reference)
            units.append(unit)
        log.debug("sensitivity: block %d: %s", step.index,
                  "; ".join(f"{u.label.rsplit('.', 1)[-1]} {u.sensitivity}" for u in units[-len(groups):]))
    return units


# Part of the cache key: bump when the measurement itself changes.
SENSITIVITY_VERSION = 1


def sensitivity_cache_file(ctx: StageContext, cfg: MixedPrecisionConfig) -> Path:
    """Where this stage's sensitivity table is kept, by everything it depends on (module docstring)."""
    from slimforge.assets import cache_root
    from slimforge.fsutil import stable_hash

    settings = {k: v for k, v in hashed_config(cfg).items() if k != "bits_budget"}
    key = stable_hash([SENSITIVITY_VERSION, ctx.parent.fingerprint, ctx.data().fingerprint, ctx.seed,
                       str(ctx.dtype), settings])
    return cache_root() / "sensitivity" / f"{key}.json"


def load_sensitivity(path: Path) -> tuple[list[Unit], float] | None:
    """A kept sensitivity table and the seconds it took to measure, or None when none is (or it is unreadable)."""
    from slimforge.fsutil import read_json_or_none

    table = read_json_or_none(path, instead="measuring the sensitivity again")
    if not table:
        return None
    units = [Unit(names=tuple(u["names"]), sensitivity={int(w): float(v) for w, v in u["sensitivity"].items()})
             for u in table["units"]]
    return units, float(table["seconds"])


def save_sensitivity(path: Path, units: list[Unit], seconds: float) -> None:
    from slimforge.fsutil import atomic_write_json

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, {"seconds": round(seconds, 3),
                             "units": [{"names": list(u.names), "sensitivity": u.sensitivity} for u in units]})


def sensitivity_table(ctx: StageContext, model: Any, ids: torch.Tensor, only: set[str],
                      dtype: torch.dtype) -> tuple[list[Unit], float, bool]:
    """The units' sensitivities: kept from an earlier run of the same settings, or measured (and kept).

    Returns:
        ``(units, seconds the measurement took, whether it was reused)``.
    """
    from slimforge.data import calibration_samples

    cfg: MixedPrecisionConfig = ctx.config
    kept = sensitivity_cache_file(ctx, cfg)
    found = load_sensitivity(kept)
    if found is not None:
        log.info("mixed_precision: sensitivity table reused from %s", kept)
        return found[0], found[1], True
    start = time.perf_counter()
    # Apart from the calibration windows: the sensitivity is measured on text GPTQ did not fit.
    sens_ids = calibration_samples(ctx.data(), cfg.sensitivity_samples, cfg.sensitivity_seq_len, ctx.seed + 1)
    reference = reference_run(model, sens_ids, cfg.batch_size, ctx.device)
    units = measure_sensitivity(model, ids, reference, cfg, only, ctx.device, dtype)
    seconds = time.perf_counter() - start
    save_sensitivity(kept, units, seconds)
    log.info("mixed_precision: sensitivity of %d units at widths %s measured in %.1f s (%d tokens)", len(units),
             sorted(cfg.candidates), seconds, int(sens_ids.numel()))
    return units, seconds, False


def choose_widths(units: list[Unit], candidates: list[int], budget_bits: int) -> dict[str, int]:
    """The width of every linear that minimises the summed sensitivity within ``budget_bits``."""
    widths = sorted(candidates)
    picks = allocate_widths([[u.costs[w] for w in widths] for u in units],
                            [[u.sensitivity[w] for w in widths] for u in units], budget_bits)
    return {name: widths[pick] for unit, pick in zip(units, picks) for name in unit.names}


def mixed_precision_stage(ctx: StageContext) -> StageOutput:
    """Sensitivity per unit and width, exact allocation to ``bits_budget``, GPTQ at the chosen widths."""
    from slimforge.calibration.windows import calibration_windows
    from slimforge.quantize.compressed import _finish, _prepare
    from slimforge.quantize.gptq import gptq_quantize_model
    from slimforge.quantize.report import linear_numel

    cfg: MixedPrecisionConfig = ctx.config
    model, tokenizer, linears, dtype = _prepare(ctx)
    costs = linear_costs(linears, cfg.candidates, cfg.group_size, torch.finfo(dtype).bits)
    total = sum(linear_numel(model, list(linears)).values())
    try:
        check_exact_budget(cfg, costs, total)
    except FieldError as err:
        raise err.at(f"stages.{ctx.name}") from None
    ids = calibration_windows(ctx, cfg)
    start = time.perf_counter()
    units, sensed, reused = sensitivity_table(ctx, model, ids, set(linears), dtype)
    for unit in units:
        unit.costs = {w: sum(costs[name][w] for name in unit.names) for w in cfg.candidates}
    chosen = choose_widths(units, cfg.candidates, int(cfg.bits_budget * total))
    quantized = {name for name, width in chosen.items() if width != KEPT_WIDTH}
    result = gptq_quantize_model(model, ids, min(cfg.candidates), cfg.group_size, cfg.act_order, cfg.percdamp,
                                 cfg.block_size, cfg.batch_size, ctx.device, dtype, only=quantized,
                                 scale_search=cfg.scale_search, widths=chosen)
    seconds = time.perf_counter() - start
    missing = sorted(quantized - set(result["scales"]))
    if missing:
        raise RuntimeError(f"GPTQ did not reach layers {missing[:3]}")
    extra = {**_report(cfg, units, chosen, costs, total, result), "calibration_tokens": int(ids.numel()),
             "sensitivity_seconds": round(sensed, 3), "sensitivity_reused": reused}
    log.info("mixed_precision: %s", widths_map_text(chosen))
    return _finish(ctx, model, tokenizer, linears, {n: result["scales"][n] for n in linears if n in quantized},
                   dtype, seconds, cfg.act_order, extra, widths={name: chosen[name] for name in linears})


def _report(cfg: MixedPrecisionConfig, units: list[Unit], chosen: dict[str, int], costs: dict[str, dict[int, int]],
            total: int, result: dict[str, Any]) -> dict[str, Any]:
    """What ``slimforge.json`` records beside the format: the budget, the table, the prediction."""
    by_unit = {u.label: chosen[u.names[0]] for u in units}
    losses = list(result["loss"].values())
    return {
        "bits_budget": cfg.bits_budget,
        "candidates": sorted(cfg.candidates),
        "planned_bits_per_weight": round(sum(costs[n][w] for n, w in chosen.items()) / total, 4),
        # The allocation's own measure: the summed single-unit KLs of the chosen widths.
        "predicted_kl": float(f"{sum(u.sensitivity[by_unit[u.label]] for u in units):.6g}"),
        "sensitivity": {u.label: {str(w): float(f"{v:.6g}") for w, v in sorted(u.sensitivity.items())}
                        for u in units},
        "unit_widths": by_unit,
        "sensitivity_tokens": cfg.sensitivity_samples * cfg.sensitivity_seq_len,
        "percdamp": cfg.percdamp, "block_size": cfg.block_size, "scale_search": cfg.scale_search,
        "mean_layer_loss": sum(losses) / len(losses) if losses else 0.0,
        "dead_columns": result["dead_columns"],
    }
