"""The one Session: what a pipeline run, ``slimforge eval`` and the Python API share while they work.

A session knows the teacher's reference, the data settings, the device and the dtype, and
loads the teacher (weights and tokenizer), its tokenizer alone and the data once each, on
first use: planning a run reads only the tokenizer, so no weights load before a stage or an
evaluation needs them. Eval tasks that read a corpus of their own (out-of-domain text) get it
from here too, tokenized with the teacher's tokenizer and built once per corpus.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from slimforge.config import DataConfig, Recipe
    from slimforge.data import DataBundle, Source, TeacherHandle
    from slimforge.models import ModelRef

log = logging.getLogger(__name__)


class Session:
    """The teacher, its tokenizer and the data, each loaded once, on first use.

    Attributes:
        teacher_ref: where the teacher lives.
        data_config: what :meth:`data` builds, tokenized with the teacher's tokenizer.
        device, dtype: where and in which precision models load.
    """

    def __init__(self, teacher_ref: ModelRef, data_config: DataConfig, device: torch.device,
                 dtype: torch.dtype) -> None:
        self.teacher_ref = teacher_ref
        self.data_config = data_config
        self.device = device
        self.dtype = dtype
        self._teacher: tuple[Any, Any] | None = None
        self._tokenizer: Any = None
        self._data: DataBundle | None = None
        self._corpora: dict[str, DataBundle] = {}

    @classmethod
    def for_recipe(cls, recipe: Recipe, teacher_ref: ModelRef | None = None) -> Session:
        """A recipe's session: its teacher (resolved here unless given), data, device and dtype."""
        from slimforge.models import resolve_device, resolve_dtype

        device = resolve_device(recipe.config.device)
        return cls(teacher_ref or resolve_teacher(recipe), recipe.config.data, device,
                   resolve_dtype(recipe.config.dtype, device))

    def teacher(self) -> tuple[Any, Any]:
        """The teacher model (frozen, eval mode) and its tokenizer."""
        if self._teacher is None:
            log.info("loading teacher %s (%s, %s)", self.teacher_ref.path, self.device, self.dtype)
            model, tokenizer = self.teacher_ref.load(device=self.device, dtype=self.dtype)
            model.requires_grad_(False)
            self._teacher, self._tokenizer = (model, tokenizer), tokenizer
        return self._teacher

    def teacher_tokenizer(self) -> Any:
        """The teacher's tokenizer, without its weights."""
        if self._tokenizer is None:
            self._tokenizer = self.teacher_ref.load_tokenizer()
        return self._tokenizer

    def data(self, config: DataConfig | None = None) -> DataBundle:
        """The packed training and held-out blocks, tokenized with the teacher's tokenizer.

        Args:
            config: another corpus than the run's data (an eval task's own text); None: the run's data.

        Teacher-generated data loads the teacher's weights here, and only when its text is not cached yet.
        """
        from slimforge.data import build_data

        if config is None:
            if self._data is None:
                self._data = build_data(self.data_config, self.teacher_tokenizer(), teacher=self._teacher_handle())
            return self._data
        key = _config_key(config)
        if key not in self._corpora:
            self._corpora[key] = build_data(config, self.teacher_tokenizer(), teacher=self._teacher_handle())
        return self._corpora[key]

    def student_data(self, tokenizer: Any) -> DataBundle:
        """The run's data tokenized with a student's own tokenizer (distillation across tokenizers), built once
        per tokenizer; the blocks' cache is keyed by the tokenizer like any other."""
        from slimforge.data import build_data
        from slimforge.models import tokenizer_fingerprint

        key = "student:" + tokenizer_fingerprint(tokenizer)
        if key not in self._corpora:
            self._corpora[key] = build_data(self.data_config, tokenizer, teacher=self._teacher_handle())
        return self._corpora[key]

    def data_source(self, config: DataConfig | None = None) -> Source:
        """Where the run's data (or ``config``'s) comes from, with its fingerprint; nothing is read or generated."""
        from slimforge.data import data_source

        return data_source(config or self.data_config, self.teacher_tokenizer(), self._teacher_handle())

    def _teacher_handle(self) -> TeacherHandle:
        from slimforge.data import TeacherHandle

        return TeacherHandle(self.teacher_ref.fingerprint, lambda: self.teacher()[0], self.teacher_ref.path)

    def release_teacher(self) -> None:
        """Let the teacher's weights go (the tokenizer and the data stay)."""
        self._teacher = None


def _config_key(config: DataConfig) -> str:
    import dataclasses

    from slimforge.fsutil import stable_hash

    return stable_hash(dataclasses.asdict(config))


def resolve_teacher(recipe: Recipe) -> ModelRef:
    """A recipe's teacher as a :class:`~slimforge.models.ModelRef`: its path, or the embedded asset."""
    from slimforge.models import ModelRef, resolve_model

    cfg = recipe.config.teacher
    if cfg.path:
        return resolve_model(cfg.path, "teacher", gguf_file=cfg.gguf_file, revision=cfg.revision,
                             trust_remote_code=cfg.trust_remote_code, allow_pickle=cfg.allow_pickle)
    return ModelRef.from_asset(cfg.asset, "teacher")
