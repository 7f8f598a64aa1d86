"""Typed schemas for recipes, and the validation that runs before any model loads.

A recipe is a Hydra config whose top level follows :class:`RecipeConfig`. The
teacher, data and eval sections are typed dataclasses, so Hydra rejects unknown
keys and wrong types while composing. Each stage under ``stages:`` names a
``kind`` and a ``method``; its schema comes from that kind's registry and is
checked by :func:`validate_recipe`. Range checks live in each schema's
``check()`` method and raise :class:`FieldError`, which the validator turns into
a one-line error naming the full config path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

from slimforge.errors import ConfigError

DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("auto", "float32", "bfloat16", "float16")


class FieldError(ConfigError):
    """A value outside its allowed range; ``field`` is relative to its schema."""

    def __init__(self, name: str, value: Any, requirement: str) -> None:
        self.field = name
        self.value = value
        self.requirement = requirement
        super().__init__(f"{name}={value!r} is invalid: {requirement}")

    def at(self, prefix: str) -> ConfigError:
        """The same error with the full dotted path of the offending key."""
        path = f"{prefix}.{self.field}" if prefix else self.field
        return ConfigError(f"invalid value {path}={self.value!r}: {self.requirement}")


# --- small checks used by every schema -------------------------------------------------


# numpy's and transformers' set_seed accept 0 .. 2**32 - 1.
SEED_MAX = 2**32 - 1


def check_int(name: str, value: int | None, low: int | None = None, high: int | None = None) -> None:
    """``value`` must lie in [low, high] (either bound optional); None passes."""
    if value is None:
        return
    if (low is not None and value < low) or (high is not None and value > high):
        if high is None:
            raise FieldError(name, value, f"must be >= {low}")
        if low is None:
            raise FieldError(name, value, f"must be <= {high}")
        raise FieldError(name, value, f"must be between {low} and {high}")


def check_fraction(
    name: str, value: float | None, low_open: bool = True, high_open: bool = True
) -> None:
    """``value`` must lie in the unit interval, with the given ends open or closed."""
    if value is None:
        return
    ok = not math.isnan(value)
    ok = ok and (value > 0 if low_open else value >= 0)
    ok = ok and (value < 1 if high_open else value <= 1)
    if not ok:
        interval = ("(" if low_open else "[") + "0, 1" + (")" if high_open else "]")
        raise FieldError(name, value, f"must be in {interval}")


def check_choice(name: str, value: str | None, choices: tuple[str, ...]) -> None:
    if value is not None and value not in choices:
        raise FieldError(name, value, f"must be one of {', '.join(choices)}")


def check_choices(name: str, values: list[str] | None, choices: tuple[str, ...]) -> None:
    """Each of ``values`` must be one of ``choices``, none twice; None and an empty list pass."""
    if values is None:
        return
    if any(v not in choices for v in values):
        raise FieldError(name, list(values), f"each must be one of {', '.join(choices)}")
    twice = sorted({v for v in values if list(values).count(v) > 1})
    if twice:
        raise FieldError(name, list(values), f"lists {', '.join(twice)} more than once; name each once")


# --- what a stage's config hash covers ----------------------------------------------------

# Metadata of a field that changes where a stage reports, never what it makes: such a field stays
# out of the stage's config hash (adding or changing it redoes no finished stage) and out of what
# a training checkpoint records (it may change between attempts).
NOT_HASHED: dict[str, Any] = {"hashed": False}
# Metadata of a field added to a schema after stages were made with it: it joins the config hash
# only when set away from its default, so the stages that leave it alone keep their hashes.
HASHED_WHEN_SET: dict[str, Any] = {"hashed": "when set"}


def hashed_config(obj: Any) -> dict[str, Any]:
    """``dataclasses.asdict(obj)`` without the fields declared with :data:`NOT_HASHED`, nor those
    declared with :data:`HASHED_WHEN_SET` that hold their default, at any depth."""
    import dataclasses

    values = dataclasses.asdict(obj)
    _drop_unhashed(obj, values)
    return values


def _drop_unhashed(obj: Any, values: dict[str, Any]) -> None:
    import dataclasses

    for f in dataclasses.fields(obj):
        hashed = f.metadata.get("hashed", True)
        if hashed is False or (hashed == "when set" and getattr(obj, f.name) == _field_default(f)):
            del values[f.name]
        elif dataclasses.is_dataclass(getattr(obj, f.name)):
            _drop_unhashed(getattr(obj, f.name), values[f.name])


def _field_default(f: Any) -> Any:
    import dataclasses

    return f.default_factory() if f.default is dataclasses.MISSING else f.default


# --- top-level sections ------------------------------------------------------------------


@dataclass
class TeacherConfig:
    """Where the teacher comes from.

    ``path`` is a Hugging Face hub id, a local model folder or a ``.gguf`` file,
    and wins over ``asset``, the name of a pinned embedded model
    (``slimforge fetch --list``).
    """

    path: str | None = None
    asset: str | None = None
    gguf_file: str | None = None
    revision: str | None = None
    trust_remote_code: bool = False
    allow_pickle: bool = False

    def check(self) -> None:
        if not self.path and not self.asset:
            raise FieldError("path", self.path, "set teacher.path (hub id, folder or .gguf) or teacher.asset")


DATA_FORMATS = ("auto", "text", "chat", "teacher_generated")
# Files a prompt source may be: one prompt per line, or rows with a ``prompt`` or ``messages`` field.


@dataclass
class GenerateConfig:
    """How the teacher writes its own training text (``data.format: teacher_generated``).

    ``prompts`` is a shipped prompt set (``general``: everyday topics x task templates, no
    outside data) or a file: ``.txt`` with one prompt per line, or ``.jsonl`` rows with a
    ``prompt`` string or a chat ``messages`` list (trailing assistant turns are dropped, so a
    chat dataset's answers are rewritten by the teacher). ``num_samples`` prompts are drawn by
    ``seed`` (cycling through the source, reshuffled each pass) and each is answered once,
    sampled at ``temperature`` / ``top_p`` / ``top_k`` (``top_k: 0`` and ``top_p: 1`` are off;
    ``do_sample: false`` is greedy) for up to ``max_new_tokens``, stopping at EOS. Every sample
    has its own random stream, so the corpus does not depend on ``batch_size`` or on where an
    interrupted generation resumed. ``chat_template`` renders prompts with the teacher's chat
    template (``null``: when it has one). ``include_prompt`` trains on the prompt and the answer
    with only the answer in the loss (else on the answer alone). Answers with fewer than
    ``min_response_tokens`` tokens, and repeated answers (ignoring case and whitespace), are dropped.
    """

    prompts: str = "general"
    num_samples: int = 256
    max_new_tokens: int = 128
    do_sample: bool = True
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 0
    batch_size: int = 16
    seed: int = 0
    chat_template: bool | None = None
    include_prompt: bool = True
    min_response_tokens: int = 8

    def check(self) -> None:
        from slimforge.prompts import PROMPT_FILE_SUFFIXES, PROMPT_SETS, is_prompt_file

        if not self.prompts or not (is_prompt_file(self.prompts) or self.prompts in PROMPT_SETS):
            raise FieldError("prompts", self.prompts, f"must be a shipped prompt set ({', '.join(PROMPT_SETS)}) "
                             f"or a {'/'.join(PROMPT_FILE_SUFFIXES)} file of prompts")
        check_int("num_samples", self.num_samples, low=1, high=10**8)
        check_int("max_new_tokens", self.max_new_tokens, low=1, high=10**6)
        if self.do_sample and (math.isnan(self.temperature) or not 0 < self.temperature <= 100):
            raise FieldError("temperature", self.temperature,
                             "must be in (0, 100] when sampling; for greedy answers set do_sample=false")
        check_fraction("top_p", self.top_p, low_open=True, high_open=False)
        check_int("top_k", self.top_k, low=0)
        check_int("batch_size", self.batch_size, low=1, high=1 << 16)
        check_int("seed", self.seed, low=0, high=SEED_MAX)
        check_int("min_response_tokens", self.min_response_tokens, low=0)

    def sampling(self) -> dict[str, Any]:
        """The settings the generated text depends on (not ``num_samples``: an entry grows; not
        ``batch_size``: each sample has its own random stream)."""
        keys = ("max_new_tokens", "do_sample", "temperature", "top_p", "top_k", "seed")
        settings = {k: getattr(self, k) for k in keys}
        if not self.do_sample:  # greedy: the sampling knobs change nothing
            settings.update(temperature=None, top_p=None, top_k=None, seed=None)
        return settings

    def describe(self) -> str:
        """The generation in a few words, for a model card."""
        how = (f"temperature {self.temperature:g}, top-p {self.top_p:g}"
               + (f", top-k {self.top_k}" if self.top_k else "") + f", seed {self.seed}") if self.do_sample else "greedy"
        return (f"teacher-generated text: {self.num_samples} answers to prompts {self.prompts} "
                f"({how}, up to {self.max_new_tokens} new tokens)")

    @classmethod
    def from_record(cls, values: dict[str, Any]) -> GenerateConfig:
        """The settings a recipe saved beside an artifact recorded (unknown keys dropped, values unchecked)."""
        return _tolerant_instance(cls, values)


@dataclass
class DataConfig:
    """A text source, tokenized with the teacher's tokenizer and packed into blocks.

    The file type comes from the path (.txt/.md, .jsonl/.json, .parquet, a
    ``save_to_disk`` folder, or a hub dataset name). ``format`` says whether to
    read plain text (``text_field``) or conversations (``messages_field``);
    ``auto`` picks chat when only the messages field exists. ``teacher_generated``
    reads no path or asset: the teacher answers prompts (``generate``) and its
    answers are the text.
    """

    path: str | None = None
    asset: str | None = None
    format: str = "auto"
    text_field: str = "text"
    messages_field: str = "messages"
    hf_config: str | None = None
    split: str = "train"
    revision: str | None = None
    block_size: int = 256
    heldout_fraction: float = 0.05
    max_documents: int | None = None
    add_eos: bool = True
    seed: int = 0
    generate: GenerateConfig = field(default_factory=GenerateConfig)

    def check(self) -> None:
        if self.format == "teacher_generated":
            for key in ("path", "asset"):
                if getattr(self, key):
                    raise FieldError(key, getattr(self, key), "must be unset with format teacher_generated (the "
                                     "teacher writes the text; give prompts with data.generate.prompts)")
        elif not self.path and not self.asset:
            raise FieldError("path", self.path, "set data.path (file, folder or dataset) or data.asset")
        check_choice("format", self.format, DATA_FORMATS)
        check_int("block_size", self.block_size, low=2)
        check_fraction("heldout_fraction", self.heldout_fraction)
        check_int("max_documents", self.max_documents, low=1)
        check_int("seed", self.seed, low=0, high=SEED_MAX)


def check_threshold(name: str, value: float | None, low: float, high: float, low_open: bool = True) -> None:
    """``value`` must lie in (low, high] (or [low, high]); None passes."""
    if value is None:
        return
    ok = not math.isnan(value) and (value > low if low_open else value >= low) and value <= high
    if not ok:
        raise FieldError(name, value, f"must be in {'(' if low_open else '['}{low:g}, {high:g}]")


# A student "kept" a task when its retention interval lies at or above this (eval.retention_threshold).
RETENTION_THRESHOLD = 0.9


@dataclass
class GateConfig:
    """Thresholds a student must meet; a miss makes ``slimforge eval``/``run`` exit 1.

    ``min_retained`` applies to every task's gating metric (student / teacher,
    teacher / student for lower-is-better ones); ``min_retained_tasks`` sets it
    per task (``arc_easy``) or per metric (``arc_easy.acc``) and wins over it.
    ``max_kl`` bounds the mean per-token KL(teacher || student) and
    ``min_top1_agreement`` the top-1 agreement, both from perplexity tasks.
    ``max_bias_shift`` bounds how far a student's overall BBQ bias scores (ambiguous and
    disambiguated, from bias tasks) move from the teacher's: |student - teacher|.
    """

    min_retained: float | None = None
    min_retained_tasks: dict[str, float] = field(default_factory=dict)
    max_kl: float | None = None
    min_top1_agreement: float | None = None
    max_bias_shift: float | None = None

    def check(self) -> None:
        check_threshold("min_retained", self.min_retained, 0.0, 2.0)
        for key, value in self.min_retained_tasks.items():
            check_threshold(f"min_retained_tasks.{key}", value, 0.0, 2.0)
        check_threshold("max_kl", self.max_kl, 0.0, 100.0, low_open=False)
        check_threshold("min_top1_agreement", self.min_top1_agreement, 0.0, 1.0, low_open=False)
        # Bias scores lie in [-1, 1], so a shift lies in [-2, 2].
        check_threshold("max_bias_shift", self.max_bias_shift, 0.0, 2.0, low_open=False)


@dataclass
class EvalConfig:
    """Which models to evaluate, with which tasks (a registry of task types), and how.

    Every model gets identical settings: ``batch_size``, ``seed`` (item subsets
    and few-shot sampling, kept apart from the training seed so that a sweep
    over seeds is scored on the same items), ``limit`` and ``num_fewshot`` (the
    defaults of benchmark tasks). ``include_path`` adds folders of lm-eval task
    YAMLs; one that runs Python (``!function``, ``hf_evaluate`` metrics, templates
    reaching Python internals) is refused unless ``allow_code`` is on, which you
    should do only for task folders you trust. ``cache`` reuses results keyed by
    model content and settings. ``retention_threshold`` is what "kept" means in the
    report's verdicts (a retention interval entirely at or above it) for a task the gate
    sets no threshold for.
    """

    models: list[str] = field(default_factory=lambda: ["teacher", "all"])
    batch_size: int = 8
    tasks: dict[str, Any] = field(default_factory=dict)
    seed: int = 1234
    limit: int | None = None
    num_fewshot: int | None = None
    include_path: list[str] = field(default_factory=list)
    allow_code: bool = False
    cache: bool = True
    retention_threshold: float = RETENTION_THRESHOLD
    gate: GateConfig = field(default_factory=GateConfig)

    def check(self) -> None:
        check_threshold("retention_threshold", self.retention_threshold, 0.0, 2.0)
        check_int("batch_size", self.batch_size, low=1)
        check_int("limit", self.limit, low=1)
        check_int("num_fewshot", self.num_fewshot, low=0)
        check_int("seed", self.seed, low=0, high=SEED_MAX)


@dataclass
class RecipeConfig:
    """The top level of every recipe."""

    name: str = "recipe"
    description: str = ""
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    data: DataConfig = field(default_factory=DataConfig)
    stages: dict[str, Any] = field(default_factory=dict)
    pipeline: list[str] = field(default_factory=list)
    eval: EvalConfig = field(default_factory=EvalConfig)
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    out_dir: str = "runs"
    run_name: str | None = None
    run_dir: str | None = None
    overwrite: bool = False

    def check(self) -> None:
        check_choice("device", self.device, DEVICES)
        check_choice("dtype", self.dtype, DTYPES)
        check_int("seed", self.seed, low=0, high=SEED_MAX)
        from slimforge.fsutil import path_component_problem

        # Both become folder names under out_dir: neither may lead out of it (run_dir chooses a place).
        for key in ("name", "run_name"):
            value = getattr(self, key)
            problem = None if value is None else path_component_problem(value)
            if problem:
                raise FieldError(key, value, f"{problem}; to write elsewhere, set run_dir=PATH")


# --- stage and task schemas --------------------------------------------------------------


@dataclass
class StageConfig:
    """Fields every stage has; each method's schema extends this.

    Besides its fields and checks (``check``; ``preflight``, ``check_input`` and
    ``planned_config`` where a method needs them), a schema answers the questions that
    orchestration would otherwise ask per method name. The defaults suit a stage that reads
    no data and writes a plain Hugging Face folder:

    - :meth:`uses_data`: whether the stage reads the run's data;
    - :meth:`card_settings`, :meth:`card_data` and :meth:`card_details`: how it describes itself on a model card;
    - :meth:`artifact_format`: the format of the folder it writes.
    """

    kind: str = ""
    method: str = ""

    def uses_data(self) -> bool:
        """Whether the stage reads the run's data (calibration windows, training or held-out blocks)."""
        return False

    def card_settings(self, meta: dict[str, Any]) -> list[str]:
        """The settings that define the stage, a few words each, for its model card's lineage table.

        Args:
            meta: the artifact's ``slimforge.json``, for what the stage recorded besides its config.
        """
        return []

    def card_data(self, meta: dict[str, Any], source: str) -> str | None:
        """What the model card says about the data that made this artifact, or None when none did.

        Args:
            meta: the artifact's ``slimforge.json``.
            source: the run's data in a few words (its path or asset, and block size).
        """
        return None

    def card_details(self, meta: dict[str, Any]) -> list[str]:
        """Markdown lines the artifact's own card adds after its lineage (a section of its own), or none."""
        return []

    def artifact_format(self, meta: dict[str, Any]) -> str | None:
        """The format of the folder the stage writes: ``hf``, ``bitsandbytes``, ``compressed-tensors``,
        ``gguf`` or ``lora``; None when only the folder's files can tell (then they are read)."""
        return "hf"


def named_settings(config: Any, names: tuple[str, ...]) -> list[str]:
    """``"<name> <value>"`` for each of ``names`` that ``config`` sets (not None), for a model card."""
    return [f"{name} {getattr(config, name)}" for name in names if getattr(config, name, None) is not None]


def calibration_card_data(meta: dict[str, Any], num_samples: int, seq_len: int, source: str) -> str:
    """The card's data line of a stage calibrated on windows of the run's data.

    What the artifact recorded (``calibration``) wins over the config's numbers.
    """
    recorded = meta.get("calibration") or {}
    return (f"calibrated on {recorded.get('samples', num_samples)} windows of "
            f"{recorded.get('seq_len', seq_len)} tokens from {source}")


def stage_config_from_meta(meta: dict[str, Any]) -> StageConfig | None:
    """The typed config an artifact's ``slimforge.json`` recorded; None if its method is not registered here.

    Tolerant, because artifacts outlive versions: fields this version's schema lacks are
    dropped, missing ones take their defaults, and no value is checked (the result only
    describes a stage that already ran).
    """
    from slimforge.registry import registry

    kind, method = meta.get("kind"), meta.get("method")
    if kind not in STAGE_KINDS or not method:
        return None
    try:
        schema = registry(str(kind)).get(str(method)).load_schema()
    except ConfigError:
        return None
    return _tolerant_instance(schema, {**(meta.get("config") or {}), "kind": kind, "method": method})


def _tolerant_instance(schema: type, values: dict[str, Any]) -> Any:
    """``schema(**values)`` with unknown keys dropped and nested sections built the same way."""
    import dataclasses

    known = {}
    for f in dataclasses.fields(schema):
        if f.name not in values or not f.init:
            continue
        value = values[f.name]
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            if not isinstance(value, dict):
                continue  # a section recorded in some other shape: keep the default
            value = _tolerant_instance(type(default), value)
        known[f.name] = value
    return schema(**known)


@dataclass
class TaskConfig:
    """Fields every eval task has; each task type's schema extends this.

    The evaluation engine asks a task's schema, never its type name, what the task needs.
    Class attributes: ``USES_DATA`` (reads held-out text, the run's or its :meth:`own_data`,
    which is then built before any model loads and whose fingerprint joins the result's cache
    key), ``PAIRED``
    (compares a student with the teacher, whose fingerprint then joins the key),
    ``TEACHER_TOKENS`` (compares token ids with the teacher's, so it is skipped for a
    student whose tokenizer differs) and ``FRESH`` (measured anew in every invocation, never
    taken from a cache). The methods below are the other hooks, each with a default that
    suits most tasks. ``settings`` is the :class:`slimforge.eval.config.EvalSettings` every
    model is evaluated with.
    """

    USES_DATA: ClassVar[bool] = False
    PAIRED: ClassVar[bool] = False
    TEACHER_TOKENS: ClassVar[bool] = False
    FRESH: ClassVar[bool] = False

    type: str = ""
    # The models this task runs on (``teacher`` and stage names, a subset of ``eval.models``);
    # None: every evaluated model. A report spends costly benchmarks on the teacher and the
    # final student and cheap perplexity/KL on the intermediate ones. Not part of a result's key.
    models: list[str] | None = None

    def check_eval(self, eval_cfg: EvalConfig) -> None:
        """Checks against the recipe's eval section, run while the recipe is validated (before any model)."""

    def check_data(self, data: DataConfig) -> None:
        """Checks against the run's data section (its block size, say), run while the recipe is validated."""

    @classmethod
    def from_command_line(cls, options: Any) -> TaskConfig | None:
        """This type as ``slimforge eval --tasks <type>`` makes it (``options``: the parsed
        arguments), or None when the type is not offered by name there."""
        return None

    def with_defaults(self, settings: Any) -> TaskConfig:
        """This task with the eval-wide defaults it takes (such as ``limit``) filled in."""
        return self

    def preflight(self, settings: Any) -> None:
        """Checks that need no model weights (names, files), so a mistake fails before any model loads."""

    def pairs_with_teacher(self) -> bool:
        """Whether a student's result depends on the teacher's (then the teacher joins its cache key)."""
        return self.PAIRED

    def measures_token_fidelity(self) -> bool:
        """Whether results carry KL and top-1 agreement with the teacher (what ``max_kl`` gates)."""
        return False

    def measures_bias(self) -> bool:
        """Whether results carry bias scores whose shift from the teacher's ``max_bias_shift`` gates."""
        return False

    def check_model(self, label: str, ref: Any) -> None:
        """Checks on one model that need no weights (its tokenizer, its config), run for every model
        before any loads; ``ref`` is its :class:`slimforge.models.ModelRef`."""

    def cache_key_extra(self, settings: Any) -> Any:
        """What a result depends on beyond this config, the model and the settings: files, the device."""
        return None

    def own_data(self) -> DataConfig | None:
        """For a ``USES_DATA`` task: the corpus it reads instead of the run's data, or None (the run's).

        The engine builds it with the teacher's tokenizer, gives it to the task as its data, keys
        the result by its fingerprint and labels the result out-of-domain (see
        :mod:`slimforge.eval.corpus`).
        """
        return None

    def key_settings(self) -> dict[str, Any]:
        """This config as its results' cache key sees it (fields keyed otherwise, e.g. by a fingerprint, left out)."""
        import dataclasses

        fields = dataclasses.asdict(self)
        fields.pop("models", None)  # which models run a task does not change any one model's result
        return fields


STAGE_KINDS = ("student", "prune", "distill", "quantize")


def register_schemas() -> None:
    """Put the typed schemas in Hydra's ConfigStore.

    ``slimforge_recipe`` is the top level. Every registered stage method's schema
    is stored as ``<kind>/schema_<method>``, so a preset in ``recipes/<kind>/``
    that starts with ``defaults: [schema_<method>, _self_]`` composes into a
    complete, typed node: every field overridable without ``+``, wrong types
    rejected while composing.
    """
    from hydra.core.config_store import ConfigStore

    from slimforge.registry import registry

    store = ConfigStore.instance()
    store.store(name="slimforge_recipe", node=RecipeConfig)
    for kind in STAGE_KINDS:
        reg = registry(kind)
        for name in reg.names():
            store.store(group=kind, name=f"schema_{name}", node=reg.get(name).load_schema())


# --- validation --------------------------------------------------------------------------


@dataclass
class Recipe:
    """A validated recipe: typed top level, and a typed config per pipeline stage."""

    config: RecipeConfig
    stages: dict[str, StageConfig]
    tasks: dict[str, TaskConfig]
    raw: Any  # the resolved DictConfig, saved beside every artifact

    @property
    def pipeline(self) -> list[str]:
        return list(self.config.pipeline)


def _check_tree(obj: Any, prefix: str) -> None:
    """Run ``check()`` on a dataclass and every dataclass nested in it."""
    import dataclasses

    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            _check_tree(value, f"{prefix}.{f.name}" if prefix else f.name)
    if hasattr(obj, "check"):
        try:
            obj.check()
        except FieldError as err:
            raise err.at(prefix) from None


def node_schema(node: Any) -> type | None:
    """The registered schema of a stage node (``kind`` and ``method``) or a task node (``type``), or of a
    section nested in one (a task's ``data``), or None."""
    from omegaconf import DictConfig

    from slimforge.registry import registry

    if not isinstance(node, DictConfig):
        return None
    try:
        if node.get("kind") and node.get("method"):
            return registry(str(node.kind)).get(str(node.method)).load_schema()
        if node.get("type"):
            return registry("eval").get(str(node.type)).load_schema()
    except ConfigError:  # an unknown kind or method: validation names it
        return None
    return _section_schema(node)


def _section_schema(node: Any) -> type | None:
    """The dataclass type its parent's schema gives the field that holds ``node``, or None."""
    import dataclasses
    import typing

    parent = node._get_parent()
    outer = node_schema(parent) if parent is not None else None
    if outer is None:
        return None
    hint = typing.get_type_hints(outer).get(str(node._key()))
    return next((t for t in (hint, *typing.get_args(hint)) if dataclasses.is_dataclass(t)), None)


def unknown_key_error(err: Any, prefix: str = "") -> ConfigError | None:
    """The one-line error for an OmegaConf error about a key that is not there; None for other errors.

    A key no schema has is refused the same way however it came (``key=value``, ``+key=value``,
    a recipe file): its full path, the nearest known key, and the known keys when none is near.
    Only a new entry under a free-form mapping (``stages``, ``eval.tasks``) is added with ``+``.
    """
    import dataclasses
    import difflib
    import typing

    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    key, parent_node = getattr(err, "key", None), getattr(err, "parent_node", None)
    if not isinstance(err, ConfigAttributeError | ConfigKeyError) or key is None:
        return None
    if parent_node is not None and key in parent_node:
        return None  # the key exists: some other problem
    full = str(getattr(err, "full_key", "") or key)
    path = f"{prefix}.{full}" if prefix else full
    parent = path.rpartition(".")[0]
    existing = [str(k) for k in parent_node] if parent_node is not None else []
    if typing.get_origin(getattr(err, "ref_type", None)) is dict:
        close = difflib.get_close_matches(str(key), existing, n=1)
        hint = f"; did you mean {parent}.{close[0]}?" if close else ""
        return ConfigError(f"{parent} has no entry {key!r}{hint} (to add a new entry there, start the override "
                           "with +)")
    object_type = getattr(err, "object_type", None)
    schema = object_type if dataclasses.is_dataclass(object_type) else node_schema(parent_node)
    known = [f.name for f in dataclasses.fields(schema)] if schema is not None else existing
    owner = schema.__name__ if schema is not None else (parent or "the recipe")
    if str(key) in known:  # a field the schema has, left out of an untyped entry (a task, a stage)
        return ConfigError(f"{path} is not set in the recipe, so there is nothing to override; add it with "
                           f"+{path}=VALUE")
    close = difflib.get_close_matches(str(key), known, n=1)
    hint = (f"did you mean {parent + '.' if parent else ''}{close[0]}?" if close
            else f"the keys there are: {', '.join(known)}")
    return ConfigError(f"unknown key {path}: {owner} has no {str(key)!r}; {hint}")


def _to_object(schema: type, node: Any, prefix: str) -> Any:
    """Merge ``node`` into ``schema``, build the dataclass and check its values."""
    from omegaconf import DictConfig, OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    # As plain data: a typed node merged into its own schema keeps keys the schema lacks
    # (added with +key=value), and to_object would then drop them without a word.
    plain = OmegaConf.create(OmegaConf.to_container(node)) if isinstance(node, DictConfig) else node
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), plain)
        obj = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        unknown = unknown_key_error(err, prefix)
        if unknown is not None:
            raise unknown from None
        key = getattr(err, "full_key", "") or ""
        where = f"{prefix}.{key}" if key and prefix else (key or prefix)
        first = str(err).splitlines()[0]
        raise ConfigError(f"invalid config at {where}: {first}") from None
    _check_tree(obj, prefix)
    return obj


def _typed_entries(raw: Any, section: str, key_field: str, kind_of: Any) -> dict[str, Any]:
    """Validate each named entry of ``raw`` against its registered schema."""
    from omegaconf import DictConfig

    from slimforge.registry import registry

    out = {}
    for name, node in raw.items():
        prefix = f"{section}.{name}"
        if not isinstance(node, DictConfig):
            raise ConfigError(f"{prefix} must be a mapping with a '{key_field}' key")
        kind = kind_of(node)
        method = node.get(key_field)
        if not kind or not method:
            missing = " and ".join(repr(k) for k, v in (("kind", kind), (key_field, method)) if not v)
            raise ConfigError(f"{prefix} needs {missing}")
        entry = registry(kind).get(str(method))
        out[str(name)] = _to_object(entry.load_schema(), node, prefix)
    return out


def _refuse_stray_stages(stages: Any, pipeline: list[str]) -> None:
    """A stage entry outside the pipeline is not validated, but one without kind and method is
    no stage at all: keys given to a misspelled stage name (``+stages.hael.steps=5``)."""
    import difflib

    from omegaconf import DictConfig

    for name, node in stages.items():
        if name in pipeline or (isinstance(node, DictConfig) and node.get("kind") and node.get("method")):
            continue
        close = difflib.get_close_matches(str(name), [str(n) for n in stages if n != name], n=1)
        hint = f"did you mean stages.{close[0]}?" if close else f"the stages are: {', '.join(map(str, stages))}"
        raise ConfigError(f"stages.{name} is not a stage (it has no kind and method); {hint}")


def validate_recipe(cfg: Any) -> Recipe:
    """Check a composed recipe completely, before anything heavy happens.

    Raises:
        ConfigError: one line naming the key, the bad value and what is allowed.
    """
    from omegaconf import OmegaConf

    OmegaConf.resolve(cfg)
    top = _to_object(RecipeConfig, cfg, "")
    unknown = [name for name in top.pipeline if name not in top.stages]
    if unknown:
        raise ConfigError(
            f"pipeline names stage(s) {unknown} that are not defined under stages: "
            f"defined stages are {sorted(top.stages)}"
        )
    if len(set(top.pipeline)) != len(top.pipeline):
        raise ConfigError(f"pipeline lists a stage twice: {top.pipeline}")
    _refuse_stray_stages(cfg.stages, top.pipeline)
    chosen = OmegaConf.create({name: cfg.stages[name] for name in top.pipeline})
    stages = _typed_entries(chosen, "stages", "method", lambda node: node.get("kind"))
    tasks = _typed_entries(cfg.eval.tasks, "eval.tasks", "type", lambda node: "eval")
    for name, task in tasks.items():
        task.check_eval(top.eval)
        try:
            task.check_data(top.data)
        except FieldError as err:
            raise err.at(f"eval.tasks.{name}") from None
    for name, stage in stages.items():
        if stage.kind == "student" and name != top.pipeline[0]:
            raise ConfigError(
                f"stage {name!r} initialises a student, so it must come first in the pipeline"
            )
    return Recipe(config=top, stages=stages, tasks=tasks, raw=cfg)
