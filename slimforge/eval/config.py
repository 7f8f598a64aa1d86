"""Schemas of the eval task types (kind ``eval``).

Class attributes tell the engine what a task's result depends on besides the
model: ``USES_DATA`` (the run's held-out text) and ``PAIRED`` (the teacher, for
fidelity metrics computed against it). Both go into the result's cache key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from slimforge.config import FieldError, TaskConfig, check_choice, check_int


@dataclass
class PerplexityTaskConfig(TaskConfig):
    """Token perplexity over the first ``max_blocks`` packed blocks of a split.

    With ``fidelity`` on, a student's blocks also go through the teacher in the
    same batches: per-token KL(teacher || student) and top-1 agreement come from
    the very forward passes that give the student's perplexity.
    """

    USES_DATA: ClassVar[bool] = True
    PAIRED: ClassVar[bool] = True

    type: str = "perplexity"
    split: str = "heldout"
    max_blocks: int | None = 64
    fidelity: bool = True

    def check(self) -> None:
        check_choice("split", self.split, ("heldout", "train"))
        check_int("max_blocks", self.max_blocks, low=1)


@dataclass
class WordPerplexityTaskConfig(TaskConfig):
    """lm-eval's word and byte perplexity (rolling log-likelihood) over held-out documents.

    The documents are the first ``max_documents`` held-out blocks, decoded back
    to text, so every model reads the same characters.
    """

    USES_DATA: ClassVar[bool] = True
    PAIRED: ClassVar[bool] = False

    type: str = "word_perplexity"
    split: str = "heldout"
    max_documents: int | None = 32

    def check(self) -> None:
        check_choice("split", self.split, ("heldout", "train"))
        check_int("max_documents", self.max_documents, low=1)


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

    USES_DATA: ClassVar[bool] = False
    PAIRED: ClassVar[bool] = False

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

    USES_DATA: ClassVar[bool] = False
    PAIRED: ClassVar[bool] = True

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


@dataclass
class EfficiencyTaskConfig(TaskConfig):
    """Size and speed on the current device, for one fixed prompt.

    Prefill and decode throughput and latency are medians over ``repeats``
    timed runs after one warm-up: ``prompt_tokens`` in, ``new_tokens`` out,
    batch 1, greedy.
    """

    USES_DATA: ClassVar[bool] = False
    PAIRED: ClassVar[bool] = False

    type: str = "efficiency"
    prompt_tokens: int = 128
    new_tokens: int = 32
    repeats: int = 3

    def check(self) -> None:
        check_int("prompt_tokens", self.prompt_tokens, low=1, high=32768)
        check_int("new_tokens", self.new_tokens, low=2, high=4096)
        check_int("repeats", self.repeats, low=1, high=100)
