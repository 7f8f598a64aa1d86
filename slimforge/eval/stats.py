"""Per-item scores, their aggregates, and paired bootstrap confidence intervals.

Every task stores, per metric, the per-item values from which its headline
number is rebuilt exactly: a (weighted) mean, or ``exp`` of one for the
perplexities (``values`` are then negative log-likelihoods per unit, ``weights``
the units: tokens, words or bytes). Retention = student / teacher (teacher /
student when lower is better) and its interval come from resampling the *same*
items for both models, which is what makes a small difference on a few hundred
items meaningful or not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

TRANSFORMS = ("mean", "exp")
# Two-sided 95% confidence and 80% power: a true difference of (Z_CONFIDENCE + Z_POWER) standard
# errors is found significant four times in five (the textbook minimum detectable effect).
Z_CONFIDENCE = 1.959964
Z_POWER = 0.841621


@dataclass
class ItemScores:
    """Per-item values of one metric and how they aggregate."""

    values: list[float]
    weights: list[float] | None = None
    transform: str = "mean"

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"values": [round(float(v), 7) for v in self.values], "transform": self.transform}
        if self.weights is not None:
            out["weights"] = [float(w) for w in self.weights]
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ItemScores:
        return cls(list(data["values"]), data.get("weights"), data.get("transform", "mean"))


def aggregate(values: np.ndarray, weights: np.ndarray | None, transform: str) -> np.ndarray:
    """The metric from per-item values; a leading batch axis (bootstrap replicates) is kept.

    Args:
        values: [..., n] per-item values.
        weights: [..., n] per-item weights, or None for equal weights.
        transform: ``mean`` or ``exp`` (exp of the weighted mean).
    """
    if weights is None:
        mean = values.mean(axis=-1)
    else:
        mean = (values * weights).sum(axis=-1) / weights.sum(axis=-1)
    return np.exp(mean) if transform == "exp" else mean


def ratio(teacher: float, student: float, higher_is_better: bool) -> float | None:
    """Retained share of the teacher's quality: 1.0 = nothing lost, > 1 = better than the teacher."""
    num, den = (student, teacher) if higher_is_better else (teacher, student)
    if den == 0 or not (math.isfinite(num) and math.isfinite(den)):
        return None
    return num / den


def paired_replicates(scores: list[ItemScores], n_boot: int = 1000, seed: int = 0) -> list[np.ndarray] | None:
    """Each model's metric on ``n_boot`` resamples of the items, the same resample for every model.

    Returns:
        One float64 [n_boot] array per entry of ``scores``, or None when the items do not
        pair up (different counts or aggregations) or there are none.
    """
    n = len(scores[0].values)
    if n == 0 or any(len(s.values) != n for s in scores) or len({s.transform for s in scores}) > 1:
        return None
    idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    out = []
    for s in scores:
        weights = None if s.weights is None else np.asarray(s.weights, dtype=np.float64)[idx]
        out.append(aggregate(np.asarray(s.values, dtype=np.float64)[idx], weights, s.transform))
    return out


def ratio_replicates(teacher: ItemScores, student: ItemScores, higher_is_better: bool,
                     n_boot: int = 1000, seed: int = 0) -> np.ndarray | None:
    """Bootstrap replicates of the retention ratio, items resampled jointly for both models.

    Returns:
        float64 [n_boot], or None when the items do not pair up or the ratio is undefined
        in some replicate.
    """
    stats = paired_replicates([teacher, student], n_boot, seed)
    if stats is None:
        return None
    t_stat, s_stat = stats
    num, den = (s_stat, t_stat) if higher_is_better else (t_stat, s_stat)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = num / den
    return ratios if np.all(np.isfinite(ratios)) else None


def percentile_interval(replicates: np.ndarray, alpha: float = 0.05) -> tuple[float, float]:
    """The ``1 - alpha`` percentile interval of bootstrap replicates."""
    low, high = np.quantile(replicates, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def paired_bootstrap_ratio(teacher: ItemScores, student: ItemScores, higher_is_better: bool,
                           n_boot: int = 1000, seed: int = 0, alpha: float = 0.05) -> tuple[float, float] | None:
    """Percentile interval of the retention ratio, resampling items jointly for both models.

    Returns:
        ``(low, high)`` at level ``1 - alpha``, or None when the items do not pair
        up or the ratio is undefined in some replicate.
    """
    ratios = ratio_replicates(teacher, student, higher_is_better, n_boot, seed)
    return None if ratios is None else percentile_interval(ratios, alpha)


def detectable_difference(replicates: np.ndarray) -> float:
    """The smallest true difference these items detect at 95% confidence with 80% power.

    (z_0.975 + z_0.8) times the bootstrap standard error of the statistic: a difference
    that large lies outside the 95% interval four times in five. It shrinks as
    1 / sqrt(items).
    """
    # Rounded: identical replicates (a student equal to its teacher) give 0, not float dust.
    return round(float((Z_CONFIDENCE + Z_POWER) * np.std(replicates, ddof=1)), 10)


def gap_closed(teacher: float, parent: float, child: float) -> float | None:
    """Share of the teacher-parent gap a stage closed: (child - parent) / (teacher - parent).

    1.0 = the child is back at the teacher, 0 = no better than its parent, < 0 = worse.
    The sign works for either direction of a metric. None when teacher and parent score
    the same (there is no gap to close).
    """
    gap = teacher - parent
    if gap == 0 or not all(math.isfinite(v) for v in (teacher, parent, child)):
        return None
    return (child - parent) / gap


@dataclass
class GapInterval:
    """Bootstrap intervals behind a gap-closed figure.

    Attributes:
        gap: interval of teacher - parent; when it holds 0, the parent is not measurably
            apart from the teacher and the gap closed is undefined.
        closed: interval of (child - parent) / (teacher - parent), or None when undefined.
    """

    gap: tuple[float, float]
    closed: tuple[float, float] | None


def paired_bootstrap_gap(teacher: ItemScores, parent: ItemScores, child: ItemScores, n_boot: int = 1000,
                         seed: int = 0, alpha: float = 0.05) -> GapInterval | None:
    """Intervals of the teacher-parent gap and of the share of it the child closed, items resampled
    jointly for the three models; None when the items do not pair up."""
    stats = paired_replicates([teacher, parent, child], n_boot, seed)
    if stats is None:
        return None
    t_stat, p_stat, c_stat = stats
    gap = t_stat - p_stat
    gap_ci = percentile_interval(gap, alpha)
    if gap_ci[0] <= 0.0 <= gap_ci[1]:
        return GapInterval(gap_ci, None)
    with np.errstate(divide="ignore", invalid="ignore"):
        closed = (c_stat - p_stat) / gap
    return GapInterval(gap_ci, percentile_interval(closed[np.isfinite(closed)], alpha))


def bootstrap_mean_ci(values: list[float], n_boot: int = 1000, seed: int = 0,
                      alpha: float = 0.05) -> tuple[float, float] | None:
    """Percentile interval of a plain mean (a model's own accuracy, or KL and top-1 agreement per block)."""
    stats = paired_replicates([ItemScores(list(values))], n_boot, seed) if values else None
    return None if stats is None else percentile_interval(stats[0], alpha)
