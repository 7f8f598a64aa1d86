"""Schemas of the student-initialisation and distillation methods."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from slimforge.config import FieldError, StageConfig, check_fraction, check_int

if TYPE_CHECKING:  # pragma: no cover
    from slimforge.models import ModelRef
    from slimforge.stage import TeacherInfo


@dataclass
class DropLayersConfig(StageConfig):
    """Initialise the student from the teacher by dropping decoder layers.

    Give exactly one of: ``num_layers`` (layers to keep, evenly spaced, first
    and last always kept), ``keep_ratio`` (fraction of layers to keep) or
    ``drop`` (explicit layer indices to remove).
    """

    kind: str = "student"
    method: str = "drop_layers"
    num_layers: int | None = None
    keep_ratio: float | None = None
    drop: list[int] | None = None

    def check(self) -> None:
        given = [k for k in ("num_layers", "keep_ratio", "drop") if getattr(self, k) is not None]
        if len(given) != 1:
            raise FieldError("num_layers", self.num_layers,
                             f"give exactly one of num_layers, keep_ratio or drop (got {given or 'none'})")
        check_int("num_layers", self.num_layers, low=1)
        check_fraction("keep_ratio", self.keep_ratio, low_open=True, high_open=False)
        if self.drop is not None and (not self.drop or min(self.drop) < 0):
            raise FieldError("drop", self.drop, "must be a non-empty list of layer indices >= 0")

    def preflight(self, teacher: TeacherInfo) -> None:
        """Checks that need the teacher's config (but not its weights)."""
        total = int(getattr(teacher.config, "num_hidden_layers", 0))
        if self.num_layers is not None and self.num_layers > total:
            raise FieldError("num_layers", self.num_layers, f"the teacher has only {total} layers")
        if self.drop is not None:
            if max(self.drop) >= total:
                raise FieldError("drop", self.drop, f"layer indices must be < {total}, the teacher's layer count")
            if len(set(self.drop)) >= total:
                raise FieldError("drop", self.drop, f"would remove all {total} layers")


@dataclass
class CheckpointStudentConfig(StageConfig):
    """Start from an existing checkpoint that uses the teacher's tokenizer."""

    kind: str = "student"
    method: str = "checkpoint"
    path: str = ""
    gguf_file: str | None = None
    revision: str | None = None
    trust_remote_code: bool = False
    allow_pickle: bool = False

    def check(self) -> None:
        if not self.path:
            raise FieldError("path", self.path, "give the checkpoint's hub id, folder or .gguf file")

    def source(self) -> ModelRef:
        from slimforge.models import ModelRef

        return ModelRef.from_source(self.path, "student", gguf_file=self.gguf_file, revision=self.revision,
                                    trust_remote_code=self.trust_remote_code, allow_pickle=self.allow_pickle)

    def preflight(self, teacher: TeacherInfo) -> None:
        """The checkpoint must exist and share the teacher's tokenizer."""
        from slimforge.errors import ConfigError
        from slimforge.models import tokenizer_mismatch

        why = tokenizer_mismatch(teacher.tokenizer, self.source().load_tokenizer())
        if why:
            raise ConfigError(
                f"student checkpoint {self.path} does not share the teacher's tokenizer ({why}); "
                "distillation compares token distributions, so use a student with the teacher's tokenizer"
            )
