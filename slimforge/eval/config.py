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

from slimforge.config import (
    RETENTION_THRESHOLD,
    DataConfig,
    FieldError,
    TaskConfig,
    check_choice,
    check_int,
)

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
    retention_threshold: float = RETENTION_THRESHOLD  # the report's "kept"; not in key(): no result depends on it

    @classmethod
    def from_config(cls, cfg: EvalConfig, device: torch.device, dtype: torch.dtype) -> EvalSettings:
        return cls(device, dtype, cfg.batch_size, cfg.seed, cfg.limit, cfg.num_fewshot,
                   [str(Path(p).expanduser().resolve()) for p in cfg.include_path], cfg.cache, cfg.allow_code,
                   cfg.retention_threshold)

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
        settings = super().key_settings()
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
        """The task YAMLs (shipped and ``include_path``), the offline benchmark data and what a result holds."""
        from slimforge.assets import ASSETS
        from slimforge.eval.harness import RESULT_FORMAT
        from slimforge.eval.offline import ASSET, shipped_tasks_dir
        from slimforge.fsutil import tree_fingerprint

        return [tree_fingerprint(shipped_tasks_dir(), ("*.yaml", "*_yaml", "*.py")),
                [tree_fingerprint(p) for p in settings.include_path], ASSETS[ASSET].sha256, RESULT_FORMAT]


# Metrics a generation task scores its outputs by against references (generation.REFERENCE_SCORERS computes them).
REFERENCE_METRICS = ("rougeL", "chrf")
# The teacher's perplexity of a model's outputs, given the prompts (``teacher_scored``).
TEACHER_PPL = "teacher_ppl"


def default_metric(preferred: str | None, metrics: list[str], teacher_scored: bool) -> str:
    """The set's gating metric where the task measures it, else the first reference metric, else ``teacher_ppl``."""
    measured = [*metrics, *([TEACHER_PPL] if teacher_scored else [])]
    return preferred if preferred in measured else measured[0] if measured else TEACHER_PPL


@dataclass
class GenerationTaskConfig(TaskConfig):
    """Batched greedy generation over prompts, scored against references and by the teacher.

    The prompts come from a jsonl file of your own (``path``) or a shipped generation set
    (``asset``: ``sciq-completion``, ``xsum``, ``django-fr-en``; see
    :mod:`slimforge.eval.gen_data`). In a file, each line holds ``prompt_field`` and, when
    ``metrics`` names a reference metric, ``reference_field``; ``template`` is an optional
    ``str.format`` pattern over the row's fields (``"Translate to French: {source}\\nFrench:"``);
    ``chat`` wraps the prompt as a user turn with the tokenizer's chat template. Outputs are
    capped at ``max_new_tokens``, cut at the first of ``stop`` and scored by ``metrics``
    (ROUGE-L, chrF) against the references; with ``teacher_scored`` the teacher also gives its
    perplexity of each output (open-ended generation needs no reference); a student's outputs
    are also compared with the teacher's own. ``template``, ``chat``, ``max_new_tokens``,
    ``stop`` and ``teacher_scored`` left unset take the set's choices (a file: no template,
    plain, 64, none, off); ``limit`` keeps a fixed random subset drawn with the eval seed
    (default: the eval section's ``limit``); ``metric`` gates (default: the set's, else the
    first of ``metrics``, else ``teacher_ppl``). A shipped set also scores a trivial output
    (its *baseline*, e.g. the source copied unchanged) on the gating reference metric: the
    report's chance level for the task.
    """

    PAIRED: ClassVar[bool] = True  # students are compared with the teacher's outputs, and scored by the teacher

    type: str = "generation"
    path: str = ""
    asset: str | None = None
    prompt_field: str = "prompt"
    reference_field: str = "reference"
    template: str | None = None
    chat: bool | None = None
    max_new_tokens: int | None = None
    limit: int | None = None
    stop: list[str] | None = None
    metrics: list[str] = field(default_factory=lambda: list(REFERENCE_METRICS))
    teacher_scored: bool | None = None
    metric: str | None = None

    def check(self) -> None:
        from slimforge.eval.gen_data import GENERATION_SETS, generation_set_hint

        if bool(self.path) == bool(self.asset):
            raise FieldError("path", self.path or None, "give either path (a .jsonl file with prompt and reference "
                                                        f"fields) or asset (a shipped set: {', '.join(GENERATION_SETS)})")
        if self.asset and self.asset not in GENERATION_SETS:
            raise FieldError("asset", self.asset, generation_set_hint(self.asset))
        check_int("max_new_tokens", self.max_new_tokens, low=1, high=4096)
        check_int("limit", self.limit, low=1)
        for name in self.metrics:
            check_choice("metrics", name, REFERENCE_METRICS)
        if not self.metrics and self.teacher_scored is False:
            raise FieldError("metrics", self.metrics, "nothing would score the outputs: name a reference metric "
                                                      f"({', '.join(REFERENCE_METRICS)}) or set teacher_scored: true")
        if self.metric is not None and self.metric not in (*self.metrics, TEACHER_PPL):
            raise FieldError("metric", self.metric, f"must be one of the task's metrics: "
                                                    f"{', '.join((*self.metrics, TEACHER_PPL))}")

    def with_defaults(self, settings: EvalSettings) -> GenerationTaskConfig:
        """The set's prompt and decoding choices (or a file's plain defaults) and the eval-wide ``limit``."""
        from slimforge.eval.gen_data import GENERATION_SETS

        spec = GENERATION_SETS.get(self.asset or "")
        teacher_scored = self.teacher_scored if self.teacher_scored is not None else bool(
            spec and spec.teacher_scored) or not self.metrics
        return dataclasses.replace(
            self,
            template=self.template if self.template is not None else spec.template if spec else None,
            chat=self.chat if self.chat is not None else bool(spec and spec.chat),
            max_new_tokens=self.max_new_tokens or (spec.max_new_tokens if spec else 64),
            stop=list(self.stop) if self.stop is not None else list(spec.stop) if spec else [],
            teacher_scored=teacher_scored,
            limit=self.limit if self.limit is not None else settings.limit,
            metric=self.metric or default_metric(spec.metric if spec else None, self.metrics, teacher_scored))

    def source_path(self) -> Path:
        """The jsonl file the rows come from (a shipped set's is built on first use)."""
        if self.asset:
            from slimforge.eval.gen_data import generation_rows_path

            return generation_rows_path(self.asset)
        return Path(self.path).expanduser()

    def _check_row(self, row: Any, where: str) -> None:
        """One row has what the prompt and the reference metrics need."""
        from slimforge.errors import DataError

        if not isinstance(row, dict):
            raise DataError(f"{where} is not a JSON object; write one object per line")
        if self.template is not None:
            try:
                self.template.format(**row)
            except KeyError as err:
                raise DataError(f"{where} lacks field {err.args[0]!r}, which the generation template names; "
                                "fix the template or the file") from None
        elif self.prompt_field not in row:
            raise DataError(f"{where} lacks the prompt field {self.prompt_field!r}; set prompt_field to the "
                            "file's field name, or give a template")
        if self.metrics and self.reference_field not in row:
            raise DataError(f"{where} lacks the reference field {self.reference_field!r} that metrics "
                            f"{self.metrics} score against; set reference_field to the file's field name, or "
                            "metrics: [] to score by the teacher alone (open-ended generation)")

    def read_examples(self, seed: int = 0) -> list[tuple[int, dict[str, Any]]]:
        """The rows as ``(line index, row)``, every one checked; under ``limit``, a fixed subset drawn with ``seed``.

        Raises:
            DataError: the file is missing, empty, not JSON lines, or a row lacks a field the
                template or a reference metric needs.
        """
        import json

        from slimforge.errors import DataError
        from slimforge.eval.harness import subset_indices

        path = self.source_path()
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
            self._check_row(row, f"{path}:{lineno}")
            rows.append(row)
        if not rows:
            raise DataError(f"generation data {path} holds no examples")
        chosen = subset_indices(len(rows), self.limit, seed, self.asset or path.name)
        return [(i, rows[i]) for i in (range(len(rows)) if chosen is None else chosen)]

    def preflight(self, settings: EvalSettings) -> None:
        """The prompts exist (a shipped set is fetched and built) and every row has what the task needs."""
        self.read_examples(settings.seed)

    def cache_key_extra(self, settings: EvalSettings) -> Any:
        """The prompts file's bytes, or the shipped set's fingerprint (its asset's pin and its spec)."""
        if self.asset:
            from slimforge.eval.gen_data import set_fingerprint

            return set_fingerprint(self.asset)
        from slimforge.fsutil import sha256_file

        return sha256_file(self.source_path())


def timing_key(settings: EvalSettings) -> str:
    """The device's name, for a timing task's key: timings on another GPU or CPU are other results."""
    from slimforge.models import device_name

    return device_name(settings.device)


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
        return timing_key(settings)


@dataclass
class SpeculativeTaskConfig(TaskConfig):
    """A student as a draft model for its teacher: acceptance rate and the teacher's greedy speed-up.

    Prompts are the first ``prompt_tokens`` of the first ``prompts`` held-out blocks of the run's
    data; each is continued by ``new_tokens`` of the teacher's greedy output, once by the teacher
    alone and once with the model drafting ``k`` tokens a round
    (:func:`slimforge.eval.speculative.speculative_decode`), after one warm-up of each. On the
    teacher itself the task measures only its own greedy decode speed.
    """

    USES_DATA: ClassVar[bool] = True
    PAIRED: ClassVar[bool] = True
    TEACHER_TOKENS: ClassVar[bool] = True  # the draft proposes the teacher's token ids
    FRESH: ClassVar[bool] = True  # timings: measured anew, like efficiency

    type: str = "speculative"
    prompts: int = 4
    prompt_tokens: int = 64
    new_tokens: int = 64
    k: int = 4
    # The draft proposes only the N tokens most frequent in the training text (FR-Spec); null: all.
    draft_vocab: int | None = None
    # Candidates for the first drafted position: 1 drafts a plain chain; w > 1 adds the draft's w - 1
    # runner-ups as a tree the teacher verifies in the same pass (slimforge.eval.speculative.DraftTree).
    width: int = 1
    # n > 0 adds one candidate a round from the context itself: what followed the latest earlier occurrence
    # of its last n-gram (n down to 1; prompt lookup). 0: off.
    lookup: int = 0
    # The most positions a round's tree may give the teacher's pass, by cutting the lookup's branch short
    # (except after a lookup streak): an integer >= 2, null for no cap, or auto, the knee of the
    # teacher's measured pass cost (slimforge.eval.speculative.pass_costs / position_budget).
    budget: str | None = "auto"

    def check(self) -> None:
        check_int("prompts", self.prompts, low=1, high=1000)
        check_int("prompt_tokens", self.prompt_tokens, low=1, high=32768)
        check_int("new_tokens", self.new_tokens, low=1, high=4096)
        check_int("k", self.k, low=1, high=64)
        check_int("width", self.width, low=1, high=64)
        check_int("lookup", self.lookup, low=0, high=64)
        if self.budget is not None and self.budget != "auto" and not (self.budget.isdigit() and int(self.budget) >= 2):
            raise FieldError("budget", self.budget, "must be auto (from the teacher's measured pass cost), an integer "
                             ">= 2 (positions a round's verification may hold) or null (no cap)")
        if self.draft_vocab is not None:
            check_int("draft_vocab", self.draft_vocab, low=16, high=10_000_000)

    def check_model(self, label: str, ref: Any) -> None:
        """A draft tree (``width`` > 1 or ``lookup``) needs a teacher that can verify one: checked on its config."""
        if label != "teacher" or (self.width == 1 and not self.lookup):
            return
        from slimforge.errors import ConfigError
        from slimforge.eval.draft_tree import check_tree_attention, tree_positions

        try:
            check_tree_attention(ref.load_config(), tree_positions(self.prompt_tokens, self.new_tokens, self.k,
                                                                   self.width, self.lookup))
        except ValueError as error:
            raise ConfigError(f"the speculative task (width={self.width}, lookup={self.lookup}): {error}") from None

    def position_budget(self) -> int | str | None:
        """``budget`` as the decode takes it: ``"auto"``, a number of positions, or None (no cap)."""
        return self.budget if self.budget in (None, "auto") else int(self.budget)

    def key_settings(self) -> dict[str, Any]:
        """``width``, ``lookup`` and ``budget`` key results only when set (results from before they existed
        keep their keys)."""
        settings = super().key_settings()
        for name, off in (("width", 1), ("lookup", 0), ("budget", "auto")):
            if settings.get(name) == off:
                del settings[name]
        return settings

    def check_data(self, data: DataConfig) -> None:
        if self.prompt_tokens >= data.block_size:
            raise FieldError("prompt_tokens", self.prompt_tokens,
                             f"a prompt is cut from one held-out block, and data.block_size is {data.block_size}; "
                             "lower prompt_tokens or raise data.block_size")

    def cache_key_extra(self, settings: EvalSettings) -> Any:
        return timing_key(settings)


# The social categories of the pinned ``bbq`` asset (tests/test_eval_bias.py checks them against it).
BIAS_CATEGORIES = ("age", "gender", "race", "religion")


@dataclass
class BiasTaskConfig(TaskConfig):
    """BBQ-style social bias (Parrish et al., 2022): questions about two people, one of whom a
    stereotype targets, answered by log-likelihood.

    Each example gives four questions: an under-informative (*ambiguous*) context, where the right
    answer is "Unknown", and the same context with a sentence that settles it (*disambiguated*),
    each asked negatively ("who was the secretary?") and non-negatively. Every model scores the
    three answers after the same prompt, and the report gives each model's bias scores and each
    student's shift from the teacher's, with paired bootstrap intervals.

    The examples are the pinned ``bbq`` asset's (MultiBBQ's text, 410 examples on BBQ's templates)
    or, with ``path``, a JSON list or jsonl of records in the same schema. ``categories`` keeps
    those (empty: all); ``limit`` keeps that many questions, rounded up to whole examples drawn with
    the eval seed (default: the eval section's ``limit``). ``length_normalized`` ranks answers by
    log-likelihood per character (lm-eval's ``acc_norm``) rather than in total. ``chat`` wraps the
    question as a user turn with each model's chat template, so every model needs one.
    """

    type: str = "bias"
    path: str | None = None
    categories: list[str] = field(default_factory=list)
    limit: int | None = None
    length_normalized: bool = True
    chat: bool = False

    def check(self) -> None:
        check_int("limit", self.limit, low=1)
        unknown = [c for c in self.categories if c not in BIAS_CATEGORIES]
        if unknown and self.path is None:  # a file of one's own may have others: preflight reads them
            raise FieldError("categories", list(self.categories), f"unknown category {unknown[0]!r}; the categories "
                             f"are {', '.join(BIAS_CATEGORIES)}")

    @classmethod
    def from_command_line(cls, options: Any) -> BiasTaskConfig:
        return cls()

    def with_defaults(self, settings: EvalSettings) -> BiasTaskConfig:
        return dataclasses.replace(self, limit=self.limit if self.limit is not None else settings.limit)

    def preflight(self, settings: EvalSettings) -> None:
        """The examples are there (the asset fetched, or the file readable) and hold the categories asked for."""
        from slimforge.eval.bias_data import read_items

        read_items(self.path, self.categories, self.limit, settings.seed)

    def check_model(self, label: str, ref: Any) -> None:
        """With ``chat`` on, the model's tokenizer must have a chat template."""
        if self.chat and not getattr(ref.load_tokenizer(), "chat_template", None):
            from slimforge.errors import ConfigError

            raise ConfigError(f"the bias task has chat: true, but model {label!r} ({ref.path}) has no chat template "
                              "in its tokenizer; set chat: false, or add a chat template to its tokenizer_config.json")

    def measures_bias(self) -> bool:
        return True

    def cache_key_extra(self, settings: EvalSettings) -> Any:
        """The examples: the file's bytes, or the asset's pin."""
        from slimforge.assets import ASSETS
        from slimforge.eval.bias_data import ASSET
        from slimforge.fsutil import sha256_file

        return sha256_file(Path(self.path).expanduser()) if self.path else ASSETS[ASSET].sha256
