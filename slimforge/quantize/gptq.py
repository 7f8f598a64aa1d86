"""GPTQ on the shared OBS solver, and the layer-by-layer loop that applies it to a model.

GPTQ (Frantar et al., 2022) is the Optimal-Brain-Surgeon column sweep of
:mod:`slimforge.calibration.hessian` with one choice per column: round it to the integer grid.
The rounding error of each column is moved onto the columns not yet visited through the
inverse Hessian of the layer's inputs, so later columns absorb what earlier ones lost; the
result minimises the layer's output error on the calibration inputs far better than
rounding every weight alone (RTN), at the same bits and the same format.

Grid and scales are :mod:`slimforge.quantize.intquant`'s (compressed-tensors' conventions).
Scales of a group are fixed when the sweep reaches its first column, from the weights as
the sweep has updated them (GPTQ's default), or, with ``act_order``, all up front from the
unquantized weight: then columns may be visited by decreasing input energy
(``diag(H)``), the most sensitive first, while each still uses its own group's scale, so the
saved layout stays plain contiguous groups (compressed-tensors' ``actorder: weight``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from slimforge.calibration.activations import record_linear_inputs
from slimforge.calibration.hessian import (
    inverse_hessian_cholesky,
    obs_sweep,
    permute_columns,
    solver_threads,
    unpermute_columns,
    zero_dead_columns,
)
from slimforge.calibration.layerwise import layerwise
from slimforge.quantize.intquant import (
    fake_quantize_column,
    group_scales,
    groups_of,
)

log = logging.getLogger(__name__)


@dataclass
class GptqResult:
    """One layer after GPTQ."""

    weight: torch.Tensor  # fp32 [rows, cols]: codes * scales, in the original column order
    scales: torch.Tensor  # fp32 [rows, groups]
    loss: float  # the sweep's output-error estimate
    dead_columns: int  # input columns that never fired (zeroed)


def gptq_quantize_weight(weight: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int,
                         act_order: bool = False, percdamp: float = 0.01, block_size: int = 128,
                         scale_dtype: torch.dtype | None = None, scale_search: str = "minmax",
                         scales: torch.Tensor | None = None,
                         grid: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> GptqResult:
    """Quantize one linear weight with GPTQ.

    Args:
        weight: [rows, cols] (not modified).
        hessian: [cols, cols] mean of ``x x^T`` over the layer's calibration inputs.
        bits: grid width.
        group_size: input columns per scale, ``-1`` for one scale per row.
        act_order: visit columns by decreasing ``diag(hessian)`` (scales fixed up front).
        percdamp: dampening, as a fraction of the mean Hessian diagonal.
        block_size: columns per lazy-update block; a multiple of ``group_size``.
        scale_dtype: the dtype scales are stored in (they are rounded to it before use).
        scale_search: ``minmax`` (each group's largest magnitude) or ``mse`` (the clipping
            that minimises the group's rounding error weighted by ``diag(hessian)``).
        scales: fp32 [rows, groups] scales to round to, fixed up front (AWQ's clipping search
            chooses them); None: ``scale_search`` chooses them.
        grid: ``grid(column, scale) -> rounded column`` for a grid other than the ``bits``-wide
            integer one (W8A8's FP8); it needs ``scales``.

    Returns:
        A :class:`GptqResult` whose ``weight`` lies exactly on the grid of ``scales``.
    """
    if group_size > 0 and block_size % group_size:
        raise ValueError(f"block_size {block_size} must be a multiple of group_size {group_size}")
    w = weight.detach().float().clone()
    h = hessian.float()
    dead = torch.diagonal(h) == 0
    zero_dead_columns(w, dead)
    rows, cols = w.shape
    size = cols if group_size <= 0 else group_size
    # Groups whose scale is known before the sweep (per-channel, act_order's static groups, or given).
    static = group_size <= 0 or act_order or scales is not None
    energy = torch.diagonal(h).clone()
    if scales is not None:
        scales = scales.float().to(w.device).clone()
    elif static:
        scales = group_scales(w, bits, group_size, scale_dtype, scale_search, energy)
    else:
        scales = torch.empty(rows, groups_of(cols, group_size))
    perm = None
    if act_order:
        w, h, perm = permute_columns(w, h)
    group_of = (perm if perm is not None else torch.arange(cols)) // size

    def round_column(start: int, col: int, block: torch.Tensor, hinv_diag: torch.Tensor) -> torch.Tensor:
        j = start + col
        if not static and j % size == 0:
            # The group's scale from its columns as the sweep left them (errors included).
            scales[:, j // size] = group_scales(block[:, col:col + size], bits, size, scale_dtype, scale_search,
                                                energy[j:j + size]).squeeze(1)
        if grid is not None:
            return grid(block[:, col], scales[:, group_of[j]])
        return fake_quantize_column(block[:, col], scales[:, group_of[j]], bits)

    with solver_threads(w.device):
        inverse = inverse_hessian_cholesky(h, percdamp)
        swept = obs_sweep(w, inverse.upper, round_column, block_size=block_size)
    out = swept.weight if perm is None else unpermute_columns(swept.weight, perm)
    return GptqResult(weight=out, scales=scales, loss=swept.loss, dead_columns=int(dead.sum()))


def gptq_quantize_model(model: Any, input_ids: torch.Tensor, bits: int, group_size: int,
                        act_order: bool, percdamp: float, block_size: int, batch_size: int,
                        device: torch.device, scale_dtype: torch.dtype | None,
                        only: set[str] | None = None, scale_search: str = "minmax",
                        widths: dict[str, int] | None = None, moe_calibration: str = "all",
                        moe_min_tokens: int | None = None) -> dict[str, Any]:
    """Quantize the linear layers of every decoder block in place, block by block.

    Each block is calibrated on the outputs of the blocks before it *after* they were
    quantized, so later layers correct for earlier layers' errors too.

    A mixture-of-experts model is quantized in :func:`slimforge.moe.unfused_experts`'s view: each
    expert's linears (``...mlp.experts.<e>.up_proj``) get a Hessian of their own, routers none (never
    quantized). With ``moe_calibration="all"`` every expert's Hessian comes from every calibration token
    while the block's output still follows the true routing; with ``"routed"`` only from the tokens routed
    to it, and an expert routed fewer than ``moe_min_tokens`` (default: the linear's input width, below
    which its Hessian is rank-deficient) is rounded to nearest instead (an identity Hessian).

    Args:
        only: full module names to quantize (default: every linear in the blocks, experts' too).
        widths: full module name -> that layer's width, for layers not on ``bits`` (mixed precision).

    Returns:
        ``{"scales": {module name: fp32 [rows, groups]}, "loss": {module name: float},
        "dead_columns": int, "moe": the experts' coverage report or None}``; the model's linear weights
        now lie on their grids.
    """
    from slimforge import moe

    scales: dict[str, torch.Tensor] = {}
    losses: dict[str, float] = {}
    dead = 0
    coverage = moe.ExpertCoverage(moe_min_tokens or int(getattr(model.config, "hidden_size", 1)))
    rounded: set[str] = set()  # experts quantized round-to-nearest (routed mode, too few tokens)
    with moe.unfused_experts(model):
        names = {id(module): name for name, module in model.named_modules()}
        for step in layerwise(model, input_ids, batch_size=batch_size, device=device, desc="gptq"):
            linears = {local: m for local, m in step.linears().items() if only is None or names[id(m)] in only}
            see_all = moe.every_expert_sees_every_token(model) if moe_calibration == "all" else nullcontext()
            with record_linear_inputs(linears, hessian=True) as stats, moe.routed_tokens(step.layer) as routed, \
                    see_all:
                step.run()
            coverage.add(step.index, routed)
            for local, linear in linears.items():
                name = names[id(linear)]
                expert = moe.expert_name(local)
                few = expert is not None and routed[expert] < (moe_min_tokens or linear.in_features)
                if local not in stats or (moe_calibration == "routed" and few):
                    hessian = torch.eye(linear.in_features, device=linear.weight.device)  # round to nearest
                    rounded.add(f"layers.{step.index}.{expert}")
                else:
                    hessian = stats[local].hessian
                result = gptq_quantize_weight(linear.weight, hessian, (widths or {}).get(name, bits),
                                              group_size, act_order=act_order, percdamp=percdamp,
                                              block_size=block_size, scale_dtype=scale_dtype,
                                              scale_search=scale_search)
                linear.weight.data.copy_(result.weight.to(linear.weight.dtype))
                scales[name] = result.scales.cpu()
                losses[name] = result.loss
                dead += result.dead_columns
            log.debug("gptq: block %d done (%d linears, mean loss %.4g)", step.index, len(linears),
                     sum(losses[names[id(m)]] for m in linears.values()) / max(len(linears), 1))
    report = coverage.report(policy=moe_calibration, experts_rounded_to_nearest=len(rounded))
    return {"scales": scales, "loss": losses, "dead_columns": dead, "moe": report}
