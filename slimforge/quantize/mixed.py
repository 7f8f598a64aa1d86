"""Mixed precision to a bit budget: what a width costs a layer, and the widths that fit a budget best.

Each unit (a group of linears that get one width together) has one cost and one measured
sensitivity per candidate width. Choosing one width per unit to minimise the summed sensitivity
with the summed cost at most the budget is a multiple-choice knapsack. :func:`allocate_widths`
solves it exactly by dynamic programming over the spare cost: every cost is an exact integer
count of stored bits (:func:`stored_bits`), and dividing all cost differences by their greatest
common divisor leaves a small grid (a few thousand steps for SmolLM2-135M at groups of 64).
Only when that grid would exceed ``max_cells`` are the differences rounded *up* to a coarser
grid: the budget still holds, and the result is optimal up to one grid step per unit.

Pure integer and float math: no torch, no models.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from slimforge.quantize.config import KEPT_WIDTH

# compressed-tensors stores each quantized module's original shape as two int64 values.
SHAPE_TENSOR_BITS = 2 * 64
PACK_WORD_BITS = 32


def stored_bits(rows: int, cols: int, width: int, group_size: int, scale_bits: int, bias: bool = False) -> int:
    """Exact bits a ``[rows, cols]`` linear stores at ``width`` in the compressed-tensors folder.

    What the artifact report counts under the module: the codes, packed densely into int32
    words row by row (``ceil(cols * width / 32)`` words a row), one ``scale_bits`` scale per
    group of ``group_size`` columns (``-1``: one per row), the int64 shape pair, and the bias;
    at width 16 the weight itself in the storage dtype (``scale_bits`` wide), and the bias.
    """
    bias_bits = rows * scale_bits if bias else 0
    if width == KEPT_WIDTH:
        return rows * cols * scale_bits + bias_bits
    groups = 1 if group_size <= 0 else cols // group_size
    codes = rows * math.ceil(cols * width / PACK_WORD_BITS) * PACK_WORD_BITS
    return codes + rows * groups * scale_bits + SHAPE_TENSOR_BITS + bias_bits


def cost_grid(extras: list[list[int]], spare: int, max_cells: int) -> tuple[list[list[int]], int, int]:
    """The knapsack's grid: each option's extra cost over its unit's cheapest, in grid steps.

    Args:
        extras: per unit, each option's cost minus the unit's cheapest (so each row holds a 0).
        spare: the budget left once every unit takes its cheapest option.
        max_cells: the largest table (units x steps) allowed before the grid coarsens.

    Returns:
        ``(extras in steps, spare budget in whole steps, step in cost units)``. The step is the
        greatest common divisor of the extras (exact), times a coarsening factor when the table
        would be larger than ``max_cells``; extras are then rounded up, so a choice that fits the
        grid fits the budget, and any choice fitting ``spare - units * step`` fits the grid.
    """
    step = 0
    for row in extras:
        for extra in row:
            step = math.gcd(step, extra)
    if step == 0:  # every option of every unit costs the same
        return [[0] * len(row) for row in extras], 0, 1
    # Beyond the most every unit's dearest option needs, more spare budget changes nothing.
    capacity = min(spare, sum(max(row) for row in extras)) // step
    step *= max(1, math.ceil(capacity * len(extras) / max_cells))
    steps = [[-(-extra // step) for extra in row] for row in extras]
    return steps, min(spare // step, sum(max(row) for row in steps)), step


def allocate_widths(costs: Sequence[Sequence[int]], losses: Sequence[Sequence[float]], budget: int,
                    max_cells: int = 1 << 25) -> list[int]:
    """One option per unit, minimising the summed loss with the summed cost at most ``budget``.

    Args:
        costs: per unit, the integer cost of each option (stored bits).
        losses: per unit, the loss of each option (its measured sensitivity), same shape.
        budget: the largest total cost allowed.
        max_cells: the dynamic programme's table size (units x grid steps) before the grid coarsens.

    Returns:
        The chosen option's index for each unit.

    Raises:
        ValueError: even the cheapest option of every unit exceeds the budget.
    """
    import numpy as np

    if len(costs) != len(losses) or any(len(c) != len(v) for c, v in zip(costs, losses)):
        raise ValueError("costs and losses must give one value per option of every unit")
    spare = budget - sum(min(c) for c in costs)
    if spare < 0:
        raise ValueError(f"the cheapest options cost {budget - spare}, above the budget {budget}")
    extras, capacity, _ = cost_grid([[c - min(row) for c in row] for row in costs], spare, max_cells)
    best = np.zeros(capacity + 1)  # best[k]: least loss of the units so far within k grid steps
    picks = np.zeros((len(costs), capacity + 1), dtype=np.int8)
    for unit, (steps, unit_losses) in enumerate(zip(extras, losses)):
        new = np.full(capacity + 1, np.inf)
        for option, (step, loss) in enumerate(zip(steps, unit_losses)):
            if step > capacity:
                continue
            candidate = np.full(capacity + 1, np.inf)
            candidate[step:] = best[:capacity + 1 - step] + loss
            better = candidate < new
            new[better] = candidate[better]
            picks[unit, better] = option
        best = new
    chosen, left = [], capacity
    for unit in range(len(costs) - 1, -1, -1):
        option = int(picks[unit, left])
        chosen.append(option)
        left -= extras[unit][option]
    return chosen[::-1]
