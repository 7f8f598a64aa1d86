"""Schemas of the eval task types (kind ``eval``), and the settings every model is evaluated with.

Each schema answers the engine's questions about its task itself (see
:class:`slimforge.config.TaskConfig`): what its result depends on besides the model
(``USES_DATA``, ``PAIRED``, :meth:`cache_key_extra`), what it checks before any model
loads (:meth:`preflight`), which eval-wide defaults it takes (:meth:`with_defaults`) and
whether ``slimforge eval --tasks`` offers it by name (:meth:`from_command_line`). Hooks
that need a task's implementation import it inside, so validating a recipe stays cheap.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from slimforge.config import DataConfig, FieldError, TaskConfig, check_choice, check_int

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from slimforge.config import EvalConfig


@dataclass
class EvalSettings:
    """What every model is evaluated with; part of every cache key."""

    device: torch.device
    dtype: torch.dtype
    batch_size: int = 8
    seed: int = 1234
    limit: int | None = None
    num_fewshot: int | None = None
    include_path: list[str] = field(default_factory=list)
    cache: bool = True
    allow_code: bool = False  # may include_path's task YAMLs run Python

    @classmethod
    def from_config(cls, cfg: EvalConfig, device: torch.device, dtype: torch.dtype) -> EvalSettings:
        return cls(device, dtype, cfg.batch_size, cfg.seed, cfg.limit, cfg.num_fewshot,
                   [str(Path(p).expanduser().resolve()) for p in cfg.include_path], cfg.cache, cfg.allow_code)

    def key(self) -> dict[str, Any]:
        return {"device": self.device.type, "dtype": str(self.dtype), "batch_size": self.batch_size,
                "seed": self.seed}


@dataclass
class EvalDataConfig(DataConfig):
    """An eval task's own corpus: any key of the recipe's ``data`` section, with the same checks.

    Read from a pinned asset (``asset: wikipedia``) or a ``path``, tokenized with the teacher's
    tokenizer and packed into ``block_size`` blocks with a ``heldout_fraction`` split. Text the
    teacher writes (``format: teacher_generated``) is refused: an eval corpus is fixed text.
    """

    def check(self) -> None:
        check_eval_data(self)


def check_eval_data(data: DataConfig) -> None:
    """The recipe data section's checks, and no ``teacher_generated`` (the field named relative to ``data``)."""
    if data.format == "teacher_generated":
        raise FieldError("format", data.format, "an eval corpus is fixed text, not text the teacher writes; "
                         "set its asset (e.g. wikipedia) or path instead")
    DataConfig.check(data)


@dataclass
class PerplexityTaskConfig(TaskConfig):
    """Token perplexity over the first ``max_blocks`` packed blocks of a split.

    With ``fidelity`` on, a student's blocks also go through the teacher in the
    same batches: per-token KL(teacher || student) and top-1 agreement come from
    the very forward passes that give the student's perplexity.

    The blocks come from the run's data (the text the students were healed on:
    *in-domain*), or, with a ``data`` section, from a corpus of the task's own
    (``data: {asset: wikipedia}``: *out-of-domain*), tokenized with the teacher's
    tokenizer; ``split`` picks that corpus' held-out or training blocks. A task
    whose own corpus is the run's data is labelled in-domain, with a warning.
    """

    USES_DATA: ClassVar[bool] = True
    PAIRED: ClassVar[bool] = True
    TEACHER_TOKENS: ClassVar[bool] = True  # the blocks are the teacher's token ids

    type: str = "perplexity"
    split: str = "heldout"
    max_blocks: int | None = 64
    fidelity: bool = True
    data: EvalDataConfig | None = None

    def check(self) -> None:
        check_choice("split", self.split, ("heldout", "train"))
        check_int("max_blocks", self.max_blocks, low=1)
        if self.data is not None:
            try:
                check_eval_data(self.data)
            except FieldError as err:
                raise FieldError(f"data.{err.field}", err.value, err.requirement) from None

    def own_data(self) -> DataConfig | None:
        return self.data

    def key_settings(self) -> dict[str, Any]:
        """Without ``data``: its fingerprint (source, settings, tokenizer) keys the result instead."""
        settings = dataclasses.asdict(self)
        del settings["data"]
        return settings

    @classmethod
    def from_command_line(cls, options: Any) -> PerplexityTaskConfig:
        return cls(max_blocks=options.max_blocks)

    def pairs_with_teacher(self) -> bool:
        return self.fidelity

    def measures_token_fidelity(self) -> bool:
        return self.fidelity


@dataclass
class WordPerplexityTaskConfig(TaskConfig):
    """lm-eval's word and byte perplexity (rolling log-likelihood) over held-out documents.

    The documents are the first ``max_documents`` held-out blocks, decoded back
    to text, so every model reads the same characters.
    """

    USES_DATA: ClassVar[bool] = True

    type: str = "word_perplexity"
    split: str = "heldout"
    max_documents: int | None = 32

    def check(self) -> None:
        check_choice("split", self.split, ("heldout", "train"))
        check_int("max_documents", self.max_documents, low=1)

    @classmethod
    def from_command_line(cls, options: Any) -> WordPerplexityTaskConfig:
        return cls()


@dataclass
class HarnessTaskConfig(TaskConfig):
    """An lm-evaluation-harness task or group, by its lm-eval name.

    The shipped offline tasks (``recipes/tasks/``) and the YAMLs under
    ``eval.include_path`` are found without indexing lm-eval's 14k built-in
    tasks; any other name is looked up there too (its data must be reachable).
    ``limit`` and ``num_fewshot`` default to the eval section's values; the
    items kept under a limit are a fixed random subset drawn with ``eval.seed``.
    ``metric`` is the one that gates and plots (default: ``acc_norm`` where the
    task has it, else its first metric).
    """

    type: str = "lm_eval"
    task: str = ""
    limit: int | None = None
    num_fewshot: int | None = None
    metric: str | None = None

    def check(self) -> None:
        if not self.task:
            raise FieldError("task", self.task, "name an lm-eval task or group, e.g. arc_easy")
        check_int("limit", self.limit, low=1)
        check_int("num_fewshot", self.num_fewshot, low=0)

    def check_eval(self, eval_cfg: EvalConfig) -> None:
        """Task YAMLs under ``include_path`` that run Python are refused unless ``allow_code`` is on."""
        if eval_cfg.include_path and not eval_cfg.allow_code:
            from slimforge.eval.taskcode import refuse_task_code

            refuse_task_code(eval_cfg.include_path)

    def with_defaults(self, settings: EvalSettings) -> HarnessTaskConfig:
        return dataclasses.replace(
            self, limit=self.limit if self.limit is not None else settings.limit,
            num_fewshot=self.num_fewshot if self.num_fewshot is not None else settings.num_fewshot)

    def preflight(self, settings: EvalSettings) -> None:
        """The task name is known, its YAMLs run no code that is not allowed, its offline data is fetched."""
        from slimforge.eval.harness import check_task_data

        check_task_data([self.task], settings.include_path, settings.allow_code)

    def cache_key_extra(self, settings: EvalSettings) -> Any:
        """The task YAMLs (shipped and ``include_path``) and the offline benchmark data."""
        from slimforge.assets import ASSETS
        from slimforge.eval.offline import ASSET, shipped_tasks_dir
        from slimforge.fsutil import tree_fingerprint

        return [tree_fingerprint(shipped_tasks_dir(), ("*.yaml", "*_yaml", "*.py")),
                [tree_fingerprint(p) for p in settings.include_path], ASSETS[ASSET].sha256]


@dataclass
class GenerationTaskConfig(TaskConfig):
    """Batched greedy generation over a jsonl file of prompts with reference outputs.

    Each line holds ``prompt_field`` and ``reference_field`` (text completion,
    summarization, translation: the prompt says which). ``template`` is an
    optional ``str.format`` pattern over the row's fields (e.g.
    ``"Translate to French: {source}\\nFrench:"``); ``chat`` wraps the prompt
    as a user turn with the tokenizer's chat template. Outputs are cut at the
    first of ``stop`` and scored by ROUGE-L and chrF against the references and,
    for students, against the teacher's own outputs.
    """

    PAIRED: ClassVar[bool] = True  # students are also scored against the teacher's outputs

    type: str = "generation"
    path: str = ""
    prompt_field: str = "prompt"
    reference_field: str = "reference"
    template: str | None = None
    chat: bool = False
    max_new_tokens: int = 64
    limit: int | None = None
    stop: list[str] = field(default_factory=list)

    def check(self) -> None:
        if not self.path:
            raise FieldError("path", self.path, "give a .jsonl file with prompt and reference fields")
        check_int("max_new_tokens", self.max_new_tokens, low=1, high=4096)
        check_int("limit", self.limit, low=1)

    def read_examples(self) -> list[dict[str, Any]]:
        """The jsonl rows (up to ``limit``), checked for the prompt and reference fields.

        Raises:
            DataError: the file is missing, empty, not JSON lines, or a row lacks a field.
        """
        import json

        from slimforge.errors import DataError

        path = Path(self.path).expanduser()
        if not path.is_file():
            raise DataError(f"generation data {self.path} does not exist; give a .jsonl file with "
                            f"{self.prompt_field!r} and {self.reference_field!r} fields")
        rows = []
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{lineno} is not valid JSON ({err.msg}); fix the line") from None
            if self.reference_field not in row or (self.template is None and self.prompt_field not in row):
                raise DataError(f"{path}:{lineno} lacks {self.reference_field!r} or {self.prompt_field!r}; "
                                "set prompt_field / reference_field to the file's field names")
            rows.append(row)
            if self.limit is not None and len(rows) >= self.limit:
                break
        if not rows:
            raise DataError(f"generation data {path} holds no examples")
        return rows

    def preflight(self, settings: EvalSettings) -> None:
        """The jsonl exists and every row has the prompt and reference fields."""
        self.read_examples()

    def cache_key_extra(self, settings: EvalSettings) -> Any:
        """The prompts file's bytes."""
        from slimforge.fsutil import sha256_file

        return sha256_file(Path(self.path).expanduser())


@dataclass
class EfficiencyTaskConfig(TaskConfig):
    """Size and speed on the current device, for one fixed prompt.

    Prefill and decode throughput and latency are medians over ``repeats``
    timed runs after one warm-up: ``prompt_tokens`` in, ``new_tokens`` out,
    batch 1, greedy.
    """

    # Timings are facts about this machine now, not about the model: measured afresh in every
    # invocation, so that all models of a report are timed under the same conditions.
    FRESH: ClassVar[bool] = True

    type: str = "efficiency"
    prompt_tokens: int = 128
    new_tokens: int = 32
    repeats: int = 3

    def check(self) -> None:
        check_int("prompt_tokens", self.prompt_tokens, low=1, high=32768)
        check_int("new_tokens", self.new_tokens, low=2, high=4096)
        check_int("repeats", self.repeats, low=1, high=100)

    @classmethod
    def from_command_line(cls, options: Any) -> EfficiencyTaskConfig:
        return cls()

    def cache_key_extra(self, settings: EvalSettings) -> Any:
        """The device's name: timings on another GPU or CPU are other results."""
        from slimforge.models import device_name

        return device_name(settings.device)
