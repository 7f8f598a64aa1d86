"""The contract between the pipeline and every stage.

A stage is a function ``run(ctx: StageContext) -> StageOutput`` registered under
a kind (student, prune, distill, quantize). It receives its parent model (the
teacher for the first stage, otherwise the previous stage's artifact), the
run's :class:`~slimforge.session.Session` (the lazily loaded teacher and data, the
device and dtype), and two folders: ``out_dir``
(a temporary folder that becomes the artifact when the stage succeeds) and
``work_dir`` (kept across interrupted attempts, for checkpoints). Stages never
reach into earlier stages' internals: only into their artifact folders.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from slimforge.config import StageConfig
    from slimforge.data import DataBundle
    from slimforge.models import ModelRef
    from slimforge.session import Session


@dataclass
class TeacherInfo:
    """What preflight checks may look at: the teacher's config and tokenizer, not its weights."""

    config: Any
    tokenizer: Any


@dataclass
class StageContext:
    """Everything a stage may use."""

    name: str
    config: StageConfig
    parent: ModelRef
    teacher_ref: ModelRef
    session: Session
    out_dir: Path
    work_dir: Path
    seed: int

    @property
    def device(self) -> torch.device:
        return self.session.device

    @property
    def dtype(self) -> torch.dtype:
        return self.session.dtype

    def teacher(self) -> tuple[Any, Any]:
        """The teacher model and tokenizer (loaded once per run, in eval mode)."""
        return self.session.teacher()

    def data(self) -> DataBundle:
        """The packed training and held-out blocks."""
        return self.session.data()

    def load_parent(self, dtype: Any = None) -> tuple[Any, Any]:
        """A fresh copy of the parent model and its tokenizer."""
        return self.parent.load(device=self.device, dtype=dtype or self.dtype)


@dataclass
class StageOutput:
    """What a stage hands back.

    Either ``model`` (and ``tokenizer``), which the pipeline saves as the
    artifact, or nothing, when the stage wrote its own files into ``ctx.out_dir``.
    ``meta`` lands in ``slimforge.json``; ``metrics`` also in ``manifest.json``.
    """

    model: Any = None
    tokenizer: Any = None
    meta: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)


class StageFn(Protocol):
    def __call__(self, ctx: StageContext) -> StageOutput: ...


@dataclass
class EvalContext:
    """What an eval task receives besides the model: shared settings and data."""

    session: Session
    batch_size: int
    seed: int

    @property
    def device(self) -> torch.device:
        return self.session.device

    def data(self) -> DataBundle:
        return self.session.data()


class TaskFn(Protocol):
    def __call__(self, model: Any, tokenizer: Any, config: Any, ctx: EvalContext) -> dict[str, Any]: ...
