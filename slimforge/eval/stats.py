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


def paired_bootstrap_ratio(teacher: ItemScores, student: ItemScores, higher_is_better: bool,
                           n_boot: int = 1000, seed: int = 0, alpha: float = 0.05) -> tuple[float, float] | None:
    """Percentile interval of the retention ratio, resampling items jointly for both models.

    Returns:
        ``(low, high)`` at level ``1 - alpha``, or None when the items do not pair
        up or the ratio is undefined in some replicate.
    """
    n = len(teacher.values)
    if n == 0 or len(student.values) != n or teacher.transform != student.transform:
        return None
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n))
    tv, sv = np.asarray(teacher.values, dtype=np.float64), np.asarray(student.values, dtype=np.float64)
    tw = None if teacher.weights is None else np.asarray(teacher.weights, dtype=np.float64)[idx]
    sw = None if student.weights is None else np.asarray(student.weights, dtype=np.float64)[idx]
    t_stat = aggregate(tv[idx], tw, teacher.transform)
    s_stat = aggregate(sv[idx], sw, student.transform)
    num, den = (s_stat, t_stat) if higher_is_better else (t_stat, s_stat)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = num / den
    if not np.all(np.isfinite(ratios)):
        return None
    low, high = np.quantile(ratios, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def bootstrap_mean_ci(values: list[float], n_boot: int = 1000, seed: int = 0,
                      alpha: float = 0.05) -> tuple[float, float] | None:
    """Percentile interval of a plain mean (for metrics without a teacher value, such as KL)."""
    if not values:
        return None
    arr = np.asarray(values, dtype=np.float64)
    idx = np.random.default_rng(seed).integers(0, len(arr), size=(n_boot, len(arr)))
    low, high = np.quantile(arr[idx].mean(axis=1), [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)
