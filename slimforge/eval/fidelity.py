"""Teacher-relative fidelity: how closely a student reproduces its teacher, not just the labels.

Pure functions on logits and per-item results: per-token KL(teacher || student),
top-1 token agreement, answer flips and choice agreement on multiple-choice
items, and a summary of a KL distribution.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

KL_PERCENTILES = (50, 90, 99)


def token_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """KL(p_teacher || p_student) at every position, in fp32.

    Args:
        teacher_logits: [..., V] logits.
        student_logits: [..., V] logits over the same vocabulary.

    Returns:
        [...] non-negative KL per position, in nats.
    """
    t = F.log_softmax(teacher_logits.float(), dim=-1)
    s = F.log_softmax(student_logits.float(), dim=-1)
    # clamp: rounding can leave a true zero slightly negative.
    return (t.exp() * (t - s)).sum(dim=-1).clamp_min(0.0)


def top1_agreement(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Whether the student's most likely next token is the teacher's, per position (bool)."""
    return teacher_logits.argmax(dim=-1) == student_logits.argmax(dim=-1)


def kl_summary(kl: torch.Tensor) -> dict[str, float]:
    """Mean, percentiles and maximum of per-token KL values."""
    flat = kl.flatten().double()
    out = {"kl_mean": float(flat.mean())}
    qs = torch.quantile(flat, torch.tensor([p / 100 for p in KL_PERCENTILES], dtype=torch.float64))
    out.update({f"kl_p{p}": float(q) for p, q in zip(KL_PERCENTILES, qs)})
    out["kl_max"] = float(flat.max())
    return out


def answer_flips(teacher_correct: list[float], student_correct: list[float]) -> dict[str, Any]:
    """Items whose correctness changed between teacher and student, in each direction.

    Args:
        teacher_correct: per-item 1/0 correctness of the teacher.
        student_correct: the student's, for the same items in the same order.

    Returns:
        ``lost`` (teacher right, student wrong), ``gained`` (the reverse),
        ``net`` (gained - lost), ``items`` and ``flip_rate`` ((lost + gained) / items).
    """
    if len(teacher_correct) != len(student_correct):
        raise ValueError("flips need the same items for teacher and student")
    lost = sum(1 for t, s in zip(teacher_correct, student_correct) if t >= 0.5 > s)
    gained = sum(1 for t, s in zip(teacher_correct, student_correct) if s >= 0.5 > t)
    n = len(teacher_correct)
    return {"lost": lost, "gained": gained, "net": gained - lost, "items": n,
            "flip_rate": (lost + gained) / n if n else 0.0}


def choice_agreement(teacher_choices: list[int], student_choices: list[int]) -> float:
    """Share of items where the student picks the same answer as the teacher (right or wrong)."""
    if len(teacher_choices) != len(student_choices) or not teacher_choices:
        raise ValueError("choice agreement needs the same, non-empty items for teacher and student")
    return sum(t == s for t, s in zip(teacher_choices, student_choices)) / len(teacher_choices)
