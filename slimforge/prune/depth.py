"""Depth pruning: choosing which decoder layers to keep (pure index math)."""

from __future__ import annotations


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


def keep_from_drop(total: int, drop: list[int]) -> list[int]:
    """The layer indices that remain after removing ``drop``."""
    gone = set(drop)
    return [i for i in range(total) if i not in gone]


def keep_from_ratio(total: int, ratio: float) -> list[int]:
    """Evenly spaced layers keeping ``ratio`` of ``total`` (rounded, at least one)."""
    return evenly_spaced_keep(total, max(1, round(total * ratio)))
