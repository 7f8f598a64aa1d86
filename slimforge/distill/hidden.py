"""Hidden-state distillation: student layer outputs pulled toward mapped teacher layers.

The mapping says, for each student decoder layer, which teacher layer it should
imitate. By default a layer-dropped student maps each kept layer to the teacher
layer it came from (its ``kept_layers`` metadata); any other student spreads its
layers evenly over the teacher's, last to last. When widths differ, a learned
linear projection (trained with the student, not saved with it) maps student
states to the teacher's width.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F

from slimforge.arch import decoder_layers
from slimforge.config import FieldError
from slimforge.distill.config import layer_map_problem


def default_layer_map(student_layers: int, teacher_layers: int, kept_layers: list[int] | None = None) -> list[int]:
    """Teacher layer index for each student layer.

    >>> default_layer_map(3, 12)
    [3, 7, 11]
    """
    if kept_layers is not None and len(kept_layers) == student_layers and max(kept_layers) < teacher_layers:
        return list(kept_layers)
    return [round((i + 1) * teacher_layers / student_layers) - 1 for i in range(student_layers)]


def validate_layer_map(layer_map: list[int], student_layers: int, teacher_layers: int) -> None:
    """Raise a :class:`FieldError` on ``layer_map`` unless it maps each student layer to a teacher layer."""
    why = layer_map_problem(layer_map, teacher_layers, student_layers)
    if why:
        raise FieldError("layer_map", layer_map, why)


def hidden_state_loss(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, kind: str = "mse") -> torch.Tensor:
    """Mean over kept tokens of MSE (per feature) or 1 - cosine similarity.

    Args:
        student: [N, D] (already projected to the teacher's width).
        teacher: [N, D].
        mask: [N] token weights.
        kind: ``mse`` or ``cosine``.
    """
    if kind == "mse":
        per_token = (student.float() - teacher.float()).pow(2).mean(-1)
    else:
        per_token = 1 - F.cosine_similarity(student.float(), teacher.float(), dim=-1)
    return (per_token * mask).sum() / mask.sum().clamp_min(1)


@contextmanager
def capture_layer_outputs(model: Any, layers: list[int] | None = None) -> Iterator[dict[int, torch.Tensor]]:
    """Record the output hidden states of the chosen decoder layers during a forward pass."""
    captured: dict[int, torch.Tensor] = {}
    handles = []
    blocks = decoder_layers(model)
    for idx in layers if layers is not None else range(len(blocks)):
        def hook(_module, _inputs, output, idx=idx):
            captured[idx] = output[0] if isinstance(output, tuple) else output

        handles.append(blocks[idx].register_forward_hook(hook))
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


class HiddenProjections(torch.nn.Module):
    """One learned student-to-teacher width projection per mapped layer (identity when widths match)."""

    def __init__(self, student_width: int, teacher_width: int, count: int) -> None:
        super().__init__()
        self.identity = student_width == teacher_width
        if not self.identity:
            self.proj = torch.nn.ModuleList(torch.nn.Linear(student_width, teacher_width, bias=False)
                                            for _ in range(count))

    def forward(self, index: int, hidden: torch.Tensor) -> torch.Tensor:
        return hidden if self.identity else self.proj[index](hidden)
