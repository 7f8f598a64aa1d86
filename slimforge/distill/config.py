"""Schemas of the student-initialisation and distillation methods."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from slimforge.config import (
    DTYPES,
    HASHED_WHEN_SET,
    NOT_HASHED,
    FieldError,
    StageConfig,
    check_choice,
    check_choices,
    check_fraction,
    check_int,
    named_settings,
)
from slimforge.distill.loss_names import KD_LOSSES
from slimforge.distill.tracker_names import TRACKERS, TRACKING_EXTRA, missing_tracker_packages

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

    def layers_to_keep(self, total: int) -> list[int]:
        """The indices of the layers that stay, of ``total``; ValueError if more are asked for than exist."""
        from slimforge.prune.depth import evenly_spaced_keep, keep_from_drop, keep_from_ratio

        if self.num_layers is not None:
            return evenly_spaced_keep(total, self.num_layers)
        if self.keep_ratio is not None:
            return keep_from_ratio(total, self.keep_ratio)
        return keep_from_drop(total, list(self.drop or []))

    def planned_config(self, parent: TeacherInfo) -> Any:
        """The input's config with the kept layers only (widths unchanged), for later stages' checks."""
        import copy

        config = copy.deepcopy(parent.config)
        try:
            config.num_hidden_layers = len(self.layers_to_keep(int(config.num_hidden_layers)))
        except ValueError:
            return None  # more layers asked for than the input has: the stage itself says so
        return config

    def card_settings(self, meta: dict[str, Any]) -> list[str]:
        return named_settings(self, ("num_layers", "keep_ratio", "drop"))


@dataclass
class CheckpointStudentConfig(StageConfig):
    """Start from an existing checkpoint: one that uses the teacher's tokenizer, or, with
    ``own_tokenizer: true``, one with a tokenizer of its own (a model of another family), which the
    distill stage after it distills across tokenizers (``cross_tokenizer.loss``)."""

    kind: str = "student"
    method: str = "checkpoint"
    path: str = ""
    gguf_file: str | None = None
    revision: str | None = None
    trust_remote_code: bool = False
    allow_pickle: bool = False
    own_tokenizer: bool = field(default=False, metadata=HASHED_WHEN_SET)

    def check(self) -> None:
        if not self.path:
            raise FieldError("path", self.path, "give the checkpoint's hub id, folder or .gguf file")

    def source(self) -> ModelRef:
        from slimforge.models import resolve_model

        return resolve_model(self.path, "student", gguf_file=self.gguf_file, revision=self.revision,
                             trust_remote_code=self.trust_remote_code, allow_pickle=self.allow_pickle)

    def preflight(self, teacher: TeacherInfo) -> None:
        """The checkpoint must exist and share the teacher's tokenizer."""
        from slimforge.errors import ConfigError
        from slimforge.models import tokenizer_mismatch

        why = tokenizer_mismatch(teacher.tokenizer, self.source().load_tokenizer())
        if why and not self.own_tokenizer:
            raise ConfigError(
                f"student checkpoint {self.path} does not share the teacher's tokenizer ({why}); "
                "use a student with the teacher's tokenizer, or set own_tokenizer: true and distill it with "
                "cross_tokenizer.loss: uld or hybrid"
            )

    def planned_config(self, parent: TeacherInfo) -> Any:
        """The checkpoint's own config (None for a GGUF file, whose config needs the weights loaded)."""
        source = self.source()
        if source.gguf_file or source.path.endswith(".gguf"):
            return None
        try:
            return source.load_config()
        except Exception:  # noqa: BLE001 - unreachable offline, say: later stages are checked when it loads
            return None

    def card_settings(self, meta: dict[str, Any]) -> list[str]:
        return named_settings(self, ("path",))

    def artifact_format(self, meta: dict[str, Any]) -> str | None:
        return None  # a copied folder keeps its source's format (a pre-quantized checkpoint stays quantized)


TEACHER_ARCH_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                       "num_key_value_heads", "head_dim")


# The student's tokenizer (``from_config``'s ``tokenizer``): the teacher's, or a byte-level BPE trained on the run's data.
STUDENT_TOKENIZERS = ("teacher", "domain_bpe")


@dataclass
class FromConfigStudentConfig(StageConfig):
    """A freshly initialised student: the teacher's config with smaller sizes, the teacher's tokenizer or its own.

    Any size left ``None`` keeps the teacher's value. ``init_std`` overrides the
    config's ``initializer_range`` when set.

    ``tokenizer: domain_bpe`` gives the student a tokenizer of its own instead: a byte-level BPE of
    (at most) ``vocab_size`` tokens trained on the text of the run's training blocks, with the
    teacher's special tokens and chat template, saved in the student's folder; its embeddings are sized
    to it. Such a student is distilled across tokenizers (``cross_tokenizer.loss`` of the distill stage).
    """

    kind: str = "student"
    method: str = "from_config"
    hidden_size: int | None = None
    intermediate_size: int | None = None
    num_hidden_layers: int | None = None
    num_attention_heads: int | None = None
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    init_std: float | None = None
    tokenizer: str = field(default="teacher", metadata=HASHED_WHEN_SET)
    vocab_size: int = field(default=8192, metadata=HASHED_WHEN_SET)

    def check(self) -> None:
        for name in TEACHER_ARCH_FIELDS:
            check_int(name, getattr(self, name), low=1)
        check_choice("tokenizer", self.tokenizer, STUDENT_TOKENIZERS)
        # A byte-level BPE starts from the 256 bytes; a few more for the teacher's special tokens and merges.
        check_int("vocab_size", self.vocab_size, low=300)

    def uses_data(self) -> bool:
        return self.tokenizer == "domain_bpe"  # the tokenizer is trained on the run's text

    def preflight(self, teacher: TeacherInfo) -> None:
        cfg = teacher.config
        heads = self.num_attention_heads or cfg.num_attention_heads
        kv = self.num_key_value_heads or getattr(cfg, "num_key_value_heads", heads) or heads
        hidden = self.hidden_size or cfg.hidden_size
        if heads % kv:
            raise FieldError("num_key_value_heads", kv, f"must divide num_attention_heads={heads}")
        head_dim = self.head_dim or getattr(cfg, "head_dim", None)
        if self.head_dim is None and (self.hidden_size or self.num_attention_heads) and hidden % heads:
            raise FieldError("hidden_size", hidden, f"must be divisible by num_attention_heads={heads} (or set head_dim)")
        del head_dim

    def size_changes(self, base: Any) -> dict[str, int]:
        """The sizes this student changes in ``base``; a new width or head count also sets head_dim."""
        changes = {name: getattr(self, name) for name in TEACHER_ARCH_FIELDS if getattr(self, name) is not None}
        resized = "hidden_size" in changes or "num_attention_heads" in changes
        if resized and self.head_dim is None and getattr(base, "head_dim", None) is not None:
            heads = changes.get("num_attention_heads", base.num_attention_heads)
            changes["head_dim"] = changes.get("hidden_size", base.hidden_size) // heads
        return changes

    def student_config(self, base: Any) -> Any:
        """``base`` (the parent's config) with this student's sizes and initialisation."""
        changes = self.size_changes(base)
        fields = {**base.to_dict(), **changes}
        if "num_hidden_layers" in changes and "layer_types" in fields:
            fields["layer_types"] = None  # let the config class derive the per-layer pattern for the new depth
        if self.init_std is not None:
            fields["initializer_range"] = self.init_std
        if self.tokenizer == "domain_bpe":  # the trained tokenizer may stop short of it: the stage sizes to it
            fields["vocab_size"] = self.vocab_size
        return type(base)(**fields)

    def planned_config(self, parent: TeacherInfo) -> Any:
        """The fresh student's config, for later stages' checks (None if the config class refuses it)."""
        try:
            return self.student_config(parent.config)
        except (TypeError, ValueError):  # the stage itself reports it, with the config class's reason
            return None

    def card_settings(self, meta: dict[str, Any]) -> list[str]:
        parts = named_settings(self, ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                      "num_key_value_heads"))
        if self.tokenizer == "domain_bpe":
            size = (meta.get("tokenizer") or {}).get("vocab_size", self.vocab_size)
            parts.append(f"own byte-level BPE tokenizer of {size} tokens, trained on the run's data")
        return parts


# --- checks against an architecture (its config, built on the meta device: no weights) ----------


def meta_model(config: Any) -> Any:
    """The causal LM ``config`` describes, with parameters on the meta device (no memory, ~0.1 s)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def adapter_module_names(model: Any) -> list[str]:
    """Full names of the modules LoRA can adapt: linear layers (quantized ones included) and embeddings."""
    import torch

    return [name for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear | torch.nn.Embedding)]


def config_adapter_names(config: Any) -> list[str] | None:
    """:func:`adapter_module_names` of the model ``config`` describes; None if it cannot be built here."""
    try:
        return adapter_module_names(meta_model(config))
    except Exception:  # noqa: BLE001 - custom code or an odd config: the stage checks the loaded student
        return None


def unmatched_targets(targets: list[str], names: list[str]) -> list[str]:
    """Targets that name none of ``names`` (peft's rule: the full name, or a suffix after a dot)."""
    return [t for t in targets if not any(n == t or n.endswith(f".{t}") for n in names)]


def layer_map_problem(layer_map: list[int], teacher_layers: int | None, student_layers: int | None) -> str | None:
    """Why ``layer_map`` (a teacher layer per student layer) does not fit these layer counts, or None."""
    if teacher_layers:
        bad = [j for j in layer_map if not 0 <= j < teacher_layers]
        if bad:
            return (f"it names teacher layers {bad}, but the teacher has {teacher_layers} "
                    f"(valid indices: 0..{teacher_layers - 1})")
    if student_layers and len(layer_map) != student_layers:
        return (f"it needs one teacher layer per student layer: the student has {student_layers} layers, "
                f"the map lists {len(layer_map)}")
    return None


def _layer_count(config: Any) -> int | None:
    return int(getattr(config, "num_hidden_layers", 0) or 0) or None


@dataclass
class LoraSpec:
    """LoRA adapters (peft) on the student; on a non-quantized base they are merged on save."""

    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj",
                                                               "gate_proj", "up_proj", "down_proj"])

    def check(self) -> None:
        check_int("r", self.r, low=1)
        check_int("alpha", self.alpha, low=1)
        check_fraction("dropout", self.dropout, low_open=False, high_open=True)


@dataclass
class OnPolicySpec:
    """GKD: a fraction of batches train on continuations generated from the blocks' prefixes."""

    fraction: float = 0.0
    source: str = "student"
    prompt_tokens: int = 64
    max_new_tokens: int = 64
    temperature: float = 1.0

    def check(self) -> None:
        check_fraction("fraction", self.fraction, low_open=False, high_open=False)
        check_choice("source", self.source, ("student", "teacher"))
        check_int("prompt_tokens", self.prompt_tokens, low=1)
        check_int("max_new_tokens", self.max_new_tokens, low=1)
        if self.temperature <= 0:
            raise FieldError("temperature", self.temperature, "must be > 0")


# How the processes of a launch share the models: whole copies (DDP) or FSDP2 shards.
SHARDINGS = ("none", "fsdp")


def fsdp_process_problem(world_size: int) -> str | None:
    """Why FSDP cannot run with ``world_size`` processes, or None."""
    if world_size >= 2:
        return None
    return (f"FSDP splits the student and the teacher over several processes, but this run has {world_size}; "
            "launch it with torchrun --nproc_per_node N or accelerate launch --multi_gpu --num_processes N "
            "(N >= 2), or set sharding=none")


# The losses of distillation across tokenizers (``cross_tokenizer.loss``); none: the plain, same-vocabulary loss.
CROSS_TOKENIZER_LOSSES = ("none", "uld", "hybrid")


@dataclass
class CrossTokenizerSpec:
    """Distillation from a teacher whose tokenizer differs from the student's (docs/distillation.md).

    ``loss``: ``uld`` (universal logit distillation: L1 between the two sorted probability vectors)
    or ``hybrid`` (KL over the tokens both vocabularies spell the same, ULD over the rest, the latter
    weighted by ``uld_weight``); ``none`` keeps the plain loss, which needs one shared tokenizer. The
    loss is ``ce_weight * CE(student's next token, every position) + weight * mean cross-tokenizer loss`` over the
    positions where both tokenizations end a token at the same character. ``top_k``: each side's
    ``top_k`` largest probabilities are compared (and the teacher cache keeps ``top_k`` per position).
    ``ce_weight`` scales the cross-entropy term (0: the teacher alone teaches).
    """

    loss: str = "none"
    weight: float = 1.0
    top_k: int = 64
    uld_weight: float = 1.0
    ce_weight: float = 1.0

    @property
    def enabled(self) -> bool:
        return self.loss != "none"

    def check(self) -> None:
        check_choice("loss", self.loss, CROSS_TOKENIZER_LOSSES)
        if not self.weight >= 0:
            raise FieldError("weight", self.weight, "must be >= 0")
        if not self.uld_weight >= 0:
            raise FieldError("uld_weight", self.uld_weight, "must be >= 0")
        if not self.ce_weight >= 0:
            raise FieldError("ce_weight", self.ce_weight, "must be >= 0")
        if self.loss != "none" and self.weight == 0 and self.ce_weight == 0:
            raise FieldError("weight", self.weight, "with ce_weight 0 too, nothing would train; set one of them > 0")
        check_int("top_k", self.top_k, low=1)


# What a distillation stage's result is for (``role``): a student in its own right, or a draft model.
DISTILL_ROLES = ("student", "draft")


@dataclass
class DistillConfig(StageConfig):
    """Logit (and optionally hidden-state) distillation of the parent model from the teacher.

    The loss is ``(1 - ce_weight) * T^2 * divergence(teacher || student at T) +
    ce_weight * CE(data) + hidden_weight * hidden-state loss``. At ``ce_weight`` 1 on text the teacher
    generated (``data=teacher_generated``) this is sequence-level KD (``distill@seqkd``): a training step
    then never runs the teacher (it still scores the held-out evaluations).

    ``trackers`` are where the main process reports training and held-out metrics, inside the
    stage's folder: ``tensorboard`` (``tensorboard/``), ``mlflow`` (a local file store,
    ``mlruns/``) and ``wandb`` (an offline run, ``wandb/``); ``[]`` reports to none. They are
    not part of the stage's config hash: changing them redoes no finished stage.

    ``sharding`` is how the processes of a multi-process launch share the models: ``none``
    (every rank holds the whole student and teacher; DDP) or ``fsdp`` (each rank holds a shard of
    every student and teacher decoder layer, FSDP2; it needs at least 2 processes). FSDP does not
    combine with on-policy batches, the 8-bit optimizer, a quantized (QLoRA) student or the ``qat``
    method (docs/multi_gpu.md).
    """

    kind: str = "distill"
    method: str = "kd"
    # objective
    loss: str = "forward_kl"
    temperature: float = 1.0
    beta: float = 0.5
    alpha: float = 0.1
    ce_weight: float = 0.0
    hidden_weight: float = 0.0
    hidden_loss: str = "mse"
    layer_map: list[int] | None = None
    # optimisation
    steps: int = 100
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 10
    schedule: str = "cosine"
    optimizer: str = "adamw"
    max_grad_norm: float | None = 1.0
    precision: str = "auto"
    # execution
    kd_backend: str = "chunked"
    chunk_size: int = 1024
    keep_sparsity: bool = False
    lora: LoraSpec = field(default_factory=LoraSpec)
    teacher_cache: bool = False
    top_k: int = 32
    on_policy: OnPolicySpec = field(default_factory=OnPolicySpec)
    sharding: str = field(default="none", metadata=HASHED_WHEN_SET)
    # monitoring and checkpoints
    eval_every: int = 50
    eval_blocks: int = 16
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    log_every: int = 1
    trackers: list[str] = field(default_factory=lambda: ["tensorboard"], metadata=NOT_HASHED)
    # What the result is for: a smaller model in its own right (student), or a draft that proposes
    # tokens for its teacher to verify in speculative decoding (draft: it must be smaller than the
    # teacher, checked before training; evaluate it with the ``speculative`` task).
    role: str = field(default="student", metadata=HASHED_WHEN_SET)
    # Distillation across tokenizers: the student keeps a tokenizer of its own (off by default).
    cross_tokenizer: CrossTokenizerSpec = field(default_factory=CrossTokenizerSpec, metadata=HASHED_WHEN_SET)

    def check(self) -> None:
        check_choice("loss", self.loss, tuple(KD_LOSSES))
        self._check_cross_tokenizer()
        check_choice("role", self.role, DISTILL_ROLES)
        if not self.temperature > 0:
            raise FieldError("temperature", self.temperature, "must be > 0 (1.0 is plain softmax)")
        check_fraction("beta", self.beta)
        check_fraction("alpha", self.alpha, low_open=False, high_open=True)
        check_fraction("ce_weight", self.ce_weight, low_open=False, high_open=False)
        if self.hidden_weight < 0:
            raise FieldError("hidden_weight", self.hidden_weight, "must be >= 0")
        check_choice("hidden_loss", self.hidden_loss, ("mse", "cosine"))
        for name in ("steps", "batch_size", "grad_accum", "chunk_size", "eval_blocks", "log_every",
                     "keep_checkpoints", "eval_every", "checkpoint_every"):
            check_int(name, getattr(self, name), low=1)
        check_int("warmup_steps", self.warmup_steps, low=0)
        if not self.lr > 0:
            raise FieldError("lr", self.lr, "must be > 0")
        if self.weight_decay < 0:
            raise FieldError("weight_decay", self.weight_decay, "must be >= 0")
        check_choice("schedule", self.schedule, ("cosine", "linear", "constant"))
        check_choice("optimizer", self.optimizer, ("adamw", "adamw_8bit"))
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise FieldError("max_grad_norm", self.max_grad_norm, "must be > 0, or null for no clipping")
        check_choice("precision", self.precision, ("auto", "fp32", "bf16"))
        check_choice("kd_backend", self.kd_backend, ("chunked", "naive"))
        check_int("top_k", self.top_k, low=1)
        if self.teacher_cache and self.on_policy.fraction > 0:
            raise FieldError("teacher_cache", True, "on-policy batches need the live teacher; "
                             "set on_policy.fraction=0 or teacher_cache=false")
        if self.ce_weight == 1 and self.on_policy.fraction > 0:
            raise FieldError("on_policy.fraction", self.on_policy.fraction,
                             "at ce_weight 1 (sequence-level KD) the student would learn its own samples back; "
                             "lower ce_weight below 1 or set on_policy.fraction=0")
        if self.ce_weight == 1 and self.teacher_cache and not self.hidden_weight:
            raise FieldError("teacher_cache", True, "at ce_weight 1 (sequence-level KD) training never reads the "
                             "teacher's distribution, so there is nothing to cache; set teacher_cache=false")
        check_choice("sharding", self.sharding, SHARDINGS)
        if self.sharding == "fsdp":
            self.check_sharding()
        if self.teacher_cache and self.hidden_weight > 0:
            raise FieldError("teacher_cache", True, "hidden-state distillation needs the live teacher; "
                             "set hidden_weight=0 or teacher_cache=false")
        check_choices("trackers", self.trackers, tuple(TRACKERS))
        missing = missing_tracker_packages(self.trackers)
        if missing:
            raise FieldError("trackers", list(self.trackers), f"not installed: {', '.join(missing)}; "
                             f"{TRACKING_EXTRA} (or take {'it' if len(missing) == 1 else 'them'} off the list)")

    def check_sharding(self) -> None:
        """What FSDP sharding cannot train: each of these needs whole weights, or the same work, on every rank."""
        refused = [
            ("on_policy.fraction", self.on_policy.fraction, "ranks generate continuations of different lengths, "
             "which sharded layers cannot follow; set on_policy.fraction=0 or sharding=none"),
            ("optimizer", self.optimizer if self.optimizer == "adamw_8bit" else None,
             "bitsandbytes' 8-bit AdamW does not step sharded (DTensor) parameters; use optimizer=adamw"),
            ("cross_tokenizer.loss", self.cross_tokenizer.loss if self.cross_tokenizer.enabled else None,
             "distillation across tokenizers is not wired for sharded models yet; use sharding=none (DDP)"),
        ]
        for name, value, why in refused:
            if value:
                raise FieldError(name, value, f"not supported with sharding=fsdp: {why}")

    def check_launch(self, world_size: int) -> None:
        """Checks against the launch (how many processes), before any stage runs."""
        why = fsdp_process_problem(world_size) if self.sharding == "fsdp" else None
        if why:
            raise FieldError("sharding", self.sharding, why)

    def _check_cross_tokenizer(self) -> None:
        if not self.cross_tokenizer.enabled:
            return
        loss = self.cross_tokenizer.loss
        if self.on_policy.fraction > 0:
            raise FieldError("cross_tokenizer.loss", loss, "on-policy batches are not distilled across tokenizers; "
                             "set on_policy.fraction=0")
        if self.hidden_weight > 0:
            raise FieldError("cross_tokenizer.loss", loss, "hidden-state distillation pairs positions of one "
                             "tokenization; set hidden_weight=0")
        if self.temperature != 1.0:
            raise FieldError("cross_tokenizer.loss", loss, "the cross-tokenizer losses compare probabilities at "
                             "T=1; set temperature=1")

    def check_teacher(self, teacher: TeacherInfo) -> None:
        """Checks against the teacher, valid wherever the stage sits in the pipeline."""
        vocab = int(getattr(teacher.config, "vocab_size", 0) or 0)
        if vocab and self.top_k > vocab:
            raise FieldError("top_k", self.top_k, f"exceeds the teacher's vocabulary of {vocab}")
        if self.layer_map:
            why = layer_map_problem(list(self.layer_map), _layer_count(teacher.config), None)
            if why:
                raise FieldError("layer_map", list(self.layer_map), why)

    def preflight(self, student: TeacherInfo) -> None:
        """The first stage's input is the student: check it now."""
        self.check_input(student)

    def check_input(self, student: TeacherInfo) -> None:
        """Checks against the student, wherever the pipeline knows its config before it exists."""
        self.check_student(student.config, config_adapter_names(student.config) if self.lora.enabled else None)

    def check_with_teacher(self, student: TeacherInfo, teacher: TeacherInfo) -> None:
        """Checks of the student against the teacher, where the pipeline knows both before training."""
        if self.role == "draft":
            self.check_draft_size(meta_model(student.config), teacher.config)

    def check_draft_size(self, student: Any, teacher_config: Any) -> None:
        """A draft (``role: draft``) must have fewer parameters than its teacher, or it cannot speed it up."""
        if self.role != "draft":
            return
        from slimforge.arch import count_parameters

        n_student, n_teacher = count_parameters(student), count_parameters(meta_model(teacher_config))
        if n_student >= n_teacher:
            raise FieldError("role", self.role, f"the draft has {n_student:,} parameters and its teacher {n_teacher:,}; "
                             "a draft must be much smaller than its teacher to speed it up: give the student "
                             "stage smaller sizes")

    def check_student(self, config: Any, adapter_names: list[str] | None) -> None:
        """LoRA targets against the student's module names, and the layer map against its depth.

        Args:
            config: the student's config.
            adapter_names: its :func:`adapter_module_names` (None: not known, not checked).
        """
        if self.lora.enabled and adapter_names is not None:
            targets = list(self.lora.target_modules)
            unknown = unmatched_targets(targets, adapter_names)
            if unknown:
                valid = ", ".join(sorted({n.rsplit(".", 1)[-1] for n in adapter_names}))
                raise FieldError("lora.target_modules", targets,
                                 f"{', '.join(map(repr, unknown))} names no linear or embedding layer of the "
                                 f"student ({getattr(config, 'model_type', '?')}); valid names: {valid}")
        if self.hidden_weight and self.layer_map:
            why = layer_map_problem(list(self.layer_map), None, _layer_count(config))
            if why:
                raise FieldError("layer_map", list(self.layer_map), why)

    def planned_config(self, parent: TeacherInfo) -> Any:
        """Distillation trains its input in place: the output has the input's config."""
        return parent.config

    def set_trainable(self, student: Any) -> None:
        """Mark what trains when no LoRA adapter does: here every parameter of the student."""
        student.requires_grad_(True)

    def param_groups(self, model: Any) -> list[dict[str, Any]]:
        """The optimizer's parameter groups over ``model``'s trainable parameters: here one, at ``lr``."""
        return [{"params": [p for p in model.parameters() if p.requires_grad]}]

    def uses_data(self) -> bool:
        return True

    def card_settings(self, meta: dict[str, Any]) -> list[str]:
        parts = [f"loss {self.loss} at T={self.temperature}"]
        if self.ce_weight:
            parts.append(f"ce_weight {self.ce_weight}")
        if self.hidden_weight:
            parts.append(f"hidden_weight {self.hidden_weight} ({self.hidden_loss})")
        accumulated = f" × {self.grad_accum} accumulated" if (self.grad_accum or 1) > 1 else ""
        parts.append(f"{self.steps} steps × batch {self.batch_size}{accumulated}")
        parts.append(f"lr {self.lr} ({self.schedule}, {self.warmup_steps} warm-up)")
        if self.lora.enabled:
            parts.append(f"LoRA r={self.lora.r} alpha={self.lora.alpha}")
        if self.keep_sparsity:
            parts.append("sparsity mask kept")
        if self.teacher_cache:
            parts.append(f"teacher top-{self.top_k} cache")
        if self.on_policy.fraction:
            parts.append(f"on-policy fraction {self.on_policy.fraction}")
        if self.cross_tokenizer.enabled:
            x = self.cross_tokenizer
            parts.append(f"across tokenizers: {x.loss} (weight {x.weight}, top-{x.top_k}) at aligned characters + CE")
        return parts

    def card_data(self, meta: dict[str, Any], source: str) -> str | None:
        tokens = (meta.get("metrics") or {}).get("tokens")
        return f"trained on {source}" + (f": {tokens:,} tokens seen" if tokens is not None else "")

    def artifact_format(self, meta: dict[str, Any]) -> str | None:
        # LoRA over a quantized base saves the adapter alone (over any other base it is merged).
        return "lora" if (meta.get("distill") or {}).get("lora") == "adapter" else "hf"


@dataclass
class MergeLoraConfig(StageConfig):
    """Merge a LoRA adapter folder (a QLoRA distillation's artifact) into its base: a folder that
    loads with plain transformers, no peft.

    The base's bitsandbytes layers are dequantized to the exact float32 weights its forward
    multiplies by, the adapter is added in float32, and the merged model is stored in ``dtype``
    (``auto``: the dtype of the base's unquantized tensors, which is the teacher's unless the bnb
    stage's ``storage_dtype`` chose another). ``requantize: true`` quantizes the merged model again
    with the base's own bitsandbytes settings: the base's format back, at the cost of one more
    rounding of every weight.
    """

    kind: str = "distill"
    method: str = "merge_lora"
    requantize: bool = False
    dtype: str = "auto"

    def check(self) -> None:
        check_choice("dtype", self.dtype, DTYPES)

    def card_settings(self, meta: dict[str, Any]) -> list[str]:
        merge = meta.get("merge") or {}
        if self.requantize:
            return [f"merged, then re-quantized as {merge.get('base_format', 'the base')}"]
        return [f"merged into the dequantized base, stored as {merge.get('dtype', self.dtype)}"]

    def artifact_format(self, meta: dict[str, Any]) -> str | None:
        return "bitsandbytes" if self.requantize else "hf"


# --- quantization-aware distillation -------------------------------------------------------

# What a QAT stage may train: the latent weights of the fake-quantized layers, their scales, and
# the norms' gains (kept on their storage dtype's grid too, so the export stays exact).
QAT_TRAINABLE = ("weights", "scales", "norms")
# The stages whose artifacts a QAT stage starts from (named in its error messages).
QAT_PARENTS = "gptq, rtn, awq or mixed_precision"


def integer_grid_problem(config: Any) -> str | None:
    """Why a model config does not describe symmetric integer weight-only compressed-tensors layers, or None.

    Reads ``config.json``'s ``quantization_config`` (a dict, or transformers' config object):
    every config group must quantize weights to a symmetric int grid of at most 8 bits, by
    group or by channel, and leave activations alone.
    """
    quant = getattr(config, "quantization_config", None)
    if quant is None:
        return "is not quantized"
    quant = quant if isinstance(quant, dict) else quant.to_dict()
    method = str(quant.get("quant_method"))
    if method != "compressed-tensors":
        return f"is quantized by {method}, not stored as integer codes and scales in compressed-tensors"
    for name, group in sorted((quant.get("config_groups") or {}).items()):
        weights = group.get("weights") or {}
        if group.get("input_activations") or group.get("output_activations"):
            return f"quantizes activations too (config group {name}), which a weight-only QAT does not train"
        if weights.get("type") != "int" or not 2 <= int(weights.get("num_bits") or 0) <= 8:
            return (f"stores {weights.get('type')} weights of {weights.get('num_bits')} bits (config group "
                    f"{name}), not an integer grid of 2 to 8 bits")
        if not weights.get("symmetric", False) or weights.get("strategy") not in ("group", "channel"):
            return (f"uses a {'symmetric' if weights.get('symmetric') else 'asymmetric'} "
                    f"{weights.get('strategy')} grid (config group {name}), not a symmetric per-group or "
                    "per-channel one")
    if not quant.get("config_groups"):
        return "declares compressed-tensors without any quantized layer"
    return None


def qat_input_error(source: str, why: str) -> str:
    """The one-line refusal of an input a QAT stage cannot train (``why``: what it is instead)."""
    return (f"distill method qat trains the integer grid of a weight-only compressed-tensors model (a {QAT_PARENTS} "
            f"stage's artifact), but {source} {why}; put such a stage before it, e.g. pipeline=[gptq, qat]")


def _refuse_moe_qat(config: Any) -> None:
    from slimforge.moe_layout import refuse_moe

    refuse_moe(config, "quantization-aware distillation (qat)", "distill method kd, then quantize method gptq")


@dataclass
class QatConfig(DistillConfig):
    """Quantization-aware distillation: the parent's integer layers trained through fake quantization.

    The parent is a weight-only compressed-tensors model (a gptq, rtn, awq or mixed_precision
    stage's artifact). Each quantized linear layer becomes a fake-quantized one on its own grid
    (bits and group size from the parent), its latent weight starting at the parent's
    ``codes * scales`` and its scales at the parent's; the forward pass rounds the weights to
    the grid (straight-through) and the scales to their storage dtype. ``trainable`` picks what
    trains: ``weights`` (the latent weights; the scales then learn LSQ-style), ``scales`` (no
    weight decay; without ``weights`` the codes are frozen and the scales' gradient is exact) and
    ``norms`` (the norms' gains, rounded to their storage dtype in the forward pass too).

    The learning rates are relative, because the layers' grid steps differ several-fold (SmolLM2:
    mean scales from 0.014 to 0.12): a layer's latent weights train at ``lr`` times its mean scale
    (``lr: 0.01``: up to 1% of a grid step per step), its scales at ``scale_lr`` times the same,
    a norm's gains at ``lr`` times their mean magnitude. The artifact is the parent's
    format with the trained codes and scales: bit for bit what the fake-quantized model
    computed. Every other distillation setting is ``kd``'s; LoRA and ``keep_sparsity`` are not
    for this method.
    """

    method: str = "qat"
    lr: float = 0.02
    scale_lr: float = 0.002
    trainable: list[str] = field(default_factory=lambda: ["weights", "scales"])

    def check(self) -> None:
        super().check()
        if self.lora.enabled:
            raise FieldError("lora.enabled", True, "qat trains the quantized weights and scales themselves, "
                             "not adapters; for LoRA on a frozen NF4 base use method kd (QLoRA-KD, recipe qlora_kd)")
        if self.keep_sparsity:
            raise FieldError("keep_sparsity", True, "a quantized layer's zero codes are not pruned weights, so "
                             "qat cannot tell a mask from them; set keep_sparsity=false")
        if self.sharding == "fsdp":
            raise FieldError("sharding", self.sharding, "qat's fake-quantized layers are not sharded; set "
                             "sharding=none (DDP)")
        if not self.scale_lr > 0:
            raise FieldError("scale_lr", self.scale_lr, "must be > 0")
        if not self.trainable:
            raise FieldError("trainable", list(self.trainable),
                             f"name at least one of {', '.join(QAT_TRAINABLE)} to train")
        check_choices("trainable", self.trainable, QAT_TRAINABLE)

    def preflight(self, student: TeacherInfo) -> None:
        """The first stage's input is the teacher: it must be integer weight-only compressed-tensors."""
        _refuse_moe_qat(student.config)
        self.require_integer_grid(student.config, "the teacher")

    def check_input(self, student: TeacherInfo) -> None:
        _refuse_moe_qat(student.config)
        super().check_input(student)
        self.require_integer_grid(student.config, "the model the stages before it will make")

    def require_integer_grid(self, config: Any, source: str) -> None:
        """Refuse an input that is not a weight-only integer compressed-tensors model, naming what to do.

        Raises:
            ConfigError: one line, with what the input is.
        """
        from slimforge.errors import ConfigError

        why = integer_grid_problem(config)
        if why:
            raise ConfigError(qat_input_error(source, why))

    def set_trainable(self, student: Any) -> None:
        """Only what ``trainable`` names; everything else (embeddings, lm_head, other layers) stays frozen.

        Without ``weights`` the fake-quantized layers' codes are frozen as they are.
        """
        from slimforge.distill.qat_params import fake_quant_linears, qat_parameters

        student.requires_grad_(False)
        for kind, params in qat_parameters(student).items():
            for param in params:
                param.requires_grad_(kind in self.trainable)
        if "weights" not in self.trainable:
            for layer in fake_quant_linears(student).values():
                layer.freeze_codes()

    def param_groups(self, model: Any) -> list[dict[str, Any]]:
        """One group per trained tensor, its learning rate ``lr`` or ``scale_lr`` times the tensor's own size."""
        from slimforge.distill.qat_params import relative_param_groups

        return relative_param_groups(model, self.lr, self.scale_lr)

    def card_settings(self, meta: dict[str, Any]) -> list[str]:
        grid = (meta.get("quantization") or {}).get("grids")
        codes = "codes trained (LSQ)" if "weights" in self.trainable else "codes frozen"
        parts = [f"fake-quantized {grid}" if grid else "fake-quantized", f"trains {', '.join(self.trainable)}",
                 codes, *super().card_settings(meta)]
        if "scales" in self.trainable:
            parts.append(f"scale_lr {self.scale_lr}")
        parts.append("learning rates relative to each tensor's size")
        return parts

    def artifact_format(self, meta: dict[str, Any]) -> str | None:
        return "compressed-tensors"
