"""The distillation stage, and the teacher cache it trains from (built here, or beforehand by
``slimforge distill cache-teacher``: :mod:`slimforge.teacher_cache_command`)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from slimforge.config import FieldError
from slimforge.distill.config import DistillConfig
from slimforge.distill.teacher_cache import (
    TeacherCache,
    cache_key,
    ensure_cached,
    open_teacher_cache,
)
from slimforge.distill.trainer import DistillTrainer, block_schedule, require_loss_tokens
from slimforge.errors import ConfigError
from slimforge.stage import StageContext, StageOutput

log = logging.getLogger(__name__)


def check_compatible(teacher_tok: Any, student_tok: Any, teacher_config: Any, student_config: Any) -> None:
    """Teacher and student must score the same vocabulary: same tokenizer, same logit width."""
    from slimforge.models import tokenizer_mismatch

    why = tokenizer_mismatch(teacher_tok, student_tok)
    if why:
        raise ConfigError(f"teacher and student vocabularies differ ({why}); distillation compares "
                          "per-token distributions, so the student needs the teacher's tokenizer, or distil "
                          "across tokenizers with cross_tokenizer.loss=uld or hybrid")
    if teacher_config.vocab_size != student_config.vocab_size:
        raise ConfigError(f"teacher and student vocabularies differ (logit widths {teacher_config.vocab_size} "
                          f"vs {student_config.vocab_size}); resize the student's embeddings to the teacher's")


# Text every tokenizer distilled across must spell back exactly from its tokens' bytes (what alignment reads).
SPELLING_PROBE = "The quick brown fox jumps over the lazy dog, 42 times; then: 'Why?'"


def check_student_vocabulary(tokenizer: Any, student_config: Any) -> None:
    """Across tokenizers: the student's logits must cover its own tokenizer's ids, and its tokens must spell
    text back byte for byte (byte-level BPE, or SentencePiece-style ``▁`` pieces), which alignment relies on."""
    from slimforge.distill.cross_vocab import token_bytes

    if int(student_config.vocab_size) < len(tokenizer):
        raise ConfigError(f"the student's logits ({student_config.vocab_size}) do not cover its tokenizer's "
                          f"{len(tokenizer)} tokens; resize its embeddings to its tokenizer")
    table = token_bytes(tokenizer)
    ids = tokenizer(SPELLING_PROBE, add_special_tokens=False)["input_ids"]
    spelled = b"".join(table.get(i, b"?") for i in ids)
    if spelled.lstrip(b" ") != SPELLING_PROBE.encode():
        raise ConfigError(f"the student's tokens do not spell its text back byte for byte ({spelled[:40]!r}...), so "
                          "its positions cannot be aligned with the teacher's by characters; give the student a "
                          "byte-level BPE (student stage tokenizer=domain_bpe) or a SentencePiece-style tokenizer")


def cache_plan(cfg: DistillConfig, data: Any, seed: int, world: int = 1) -> tuple[list[int], list[int]]:
    """The train and held-out blocks a run with ``cfg`` will touch: exactly what its cache needs."""
    per_step = cfg.batch_size * cfg.grad_accum * world
    train = sorted(set(block_schedule(len(data.train), cfg.steps * per_step, seed).tolist()))
    heldout = list(range(min(cfg.eval_blocks, len(data.heldout))))
    return train, heldout


def ensure_teacher_cache(cfg: DistillConfig, session: Any, seed: int, data: Any = None,
                         cross: Any = None) -> TeacherCache:
    """The cache holding this stage's blocks; the teacher loads only if some are missing.

    The main rank adds what is missing (under the entry's lock, so concurrent runs wait for
    each other instead of racing); the other ranks wait at the barrier, then open it.

    Across tokenizers, ``data`` is the student's blocks and ``cross`` the
    :class:`~slimforge.distill.cross_objective.TeacherReader` whose rows the entry holds (keyed
    apart from any plain entry by the student's tokenizer).
    """
    from slimforge import dist
    from slimforge.assets import cache_root

    data = data if data is not None else session.data()
    train, heldout = cache_plan(cfg, data, seed, dist.world_size())
    top_k = cross.top_k if cross is not None else cfg.top_k
    extra = cross.cache_extra if cross is not None else None
    key = cache_key(session.teacher_ref.fingerprint, data.fingerprint, top_k, cfg.temperature, extra)
    folder = cache_root() / "teacher_cache" / key
    if dist.is_main():
        loaded: list[bool] = []

        def load_teacher() -> Any:
            loaded.append(True)
            return session.teacher()[0]

        ensure_cached(load_teacher, data.train, data.heldout, train, heldout, top_k, cfg.temperature, folder,
                      key, session.device, batch_size=cfg.batch_size,
                      provenance={"teacher": session.teacher_ref.path, "data": data.stats.get("source")},
                      rows=cross.rows if cross is not None else None)
        if loaded:
            session.release_teacher()  # training reads the cache: the teacher's memory goes back now
    dist.barrier()
    return open_teacher_cache(folder)


def distill_stage(ctx: StageContext) -> StageOutput:
    """Distil the parent model from the teacher; the result is the healed student."""
    cfg: DistillConfig = ctx.config
    quantized_parent = bool(ctx.parent.meta.get("quantization") or _has_quant_config(ctx.parent.path))
    # Train fp32 master weights; precision=bf16 trains under autocast. Quantized bases keep their storage.
    student, tokenizer = ctx.parent.load(device=ctx.device, dtype=None if quantized_parent else torch.float32)
    t_config = teacher_config(ctx)
    warn_if_larger_than_teacher(student, t_config)
    try:
        cfg.check_draft_size(student, t_config)  # where the plan could not know the student's size
    except FieldError as err:
        raise err.at(f"stages.{ctx.name}") from None
    model, meta, metrics = train_from_teacher(ctx, student, tokenizer)
    if model is None:  # a rank of a sharded (FSDP) run other than the main one: it writes nothing
        return StageOutput(model=None, meta=meta, metrics=metrics)
    if cfg.lora.enabled:
        if quantized_parent:
            return _save_adapter(ctx, model, tokenizer, meta, metrics)
        model = model.merge_and_unload()
        meta["distill"]["lora"] = "merged"
    model.eval()
    return StageOutput(model=model, tokenizer=tokenizer, meta=meta, metrics=metrics)


def teacher_config(ctx: StageContext) -> Any:
    """The teacher's config: read from its folder, or from the loaded model for a GGUF teacher."""
    return ctx.teacher_ref.load_config() if ctx.teacher_ref.gguf_file is None else ctx.teacher()[0].config


def train_from_teacher(ctx: StageContext, student: Any, tokenizer: Any) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """Distil a loaded ``student`` as the stage's config says: the checks, the teacher or its cache, training.

    Shared by every distill method that trains a model (``kd``, ``qat``): they differ in how
    they load the student and write the result, not in how it learns.

    Returns:
        The trained student (unwrapped; None on the ranks of a sharded run but the main one), the artifact's ``distill`` meta (held-out metrics before
        training, history, losses) and the stage's metrics.
    """
    cfg: DistillConfig = ctx.config
    teacher_tok = ctx.session.teacher_tokenizer()
    teacher_cfg = teacher_config(ctx)
    from slimforge.distill.cross_objective import distils_across_tokenizers

    across = distils_across_tokenizers(cfg, teacher_tok, tokenizer)
    if across:
        check_student_vocabulary(tokenizer, student.config)
    else:
        check_compatible(teacher_tok, tokenizer, teacher_cfg, student.config)
    check_student(cfg, student, teacher_cfg, ctx.parent.meta.get("kept_layers"), f"stages.{ctx.name}")
    # Across tokenizers the blocks are the student's tokens (the teacher re-reads their text per block).
    data = ctx.session.student_data(tokenizer) if across else ctx.data()
    if len(data.train) == 0:
        raise ConfigError("the training split is empty; add data or lower data.heldout_fraction")
    require_loss_tokens(cfg, data)
    objective = cache = teacher = None
    if across:
        from slimforge.distill.cross_objective import CrossTokenizerObjective, TeacherReader

        reader = TeacherReader(tokenizer, teacher_tok, min(cfg.cross_tokenizer.top_k, int(teacher_cfg.vocab_size)))
        cache = ensure_teacher_cache(cfg, ctx.session, ctx.seed, data, reader) if cfg.teacher_cache else None
        teacher = None if cache is not None else ctx.teacher()[0]
        objective = CrossTokenizerObjective(cfg, tokenizer, teacher_tok, teacher=teacher, cache=cache,
                                            top_k=reader.top_k)
    else:
        cache = ensure_teacher_cache(cfg, ctx.session, ctx.seed) if cfg.teacher_cache else None
        teacher = None if cache is not None else ctx.teacher()[0]
    trainer = DistillTrainer(cfg, student, data, ctx.work_dir, ctx.out_dir, ctx.seed, ctx.device,
                             teacher=teacher, cache=cache, kept_layers=ctx.parent.meta.get("kept_layers"),
                             provenance={"parent": ctx.parent.fingerprint, "teacher": ctx.teacher_ref.fingerprint},
                             run_name=ctx.name, objective=objective)
    before = trainer.evaluate(student) if trainer.resume_point() is None else None
    result = trainer.train()
    if cfg.sharding == "fsdp" and teacher is not None:
        ctx.session.release_teacher()  # its layers are sharded now: whoever needs it next loads it whole
    meta: dict[str, Any] = {"distill": {"teacher_cache": cache.meta["key"] if cache else None,
                                        "history": result.history, "losses": result.losses}}
    if across:
        meta["distill"]["cross_tokenizer"] = {"loss": cfg.cross_tokenizer.loss, "student_vocab": len(tokenizer),
                                              "teacher_vocab": len(teacher_tok)}
    if before is not None:
        meta["distill"]["before"] = before
    metrics = dict(result.metrics)
    if before is not None:
        metrics.update({f"before_{k}": v for k, v in before.items()})
    return result.model, meta, metrics


def check_student(cfg: DistillConfig, student: Any, teacher_config: Any, kept_layers: list[int] | None,
                  where: str) -> None:
    """The checks planning could not make without the student: LoRA targets and the layer map.

    Run as soon as the student is loaded, before the teacher or its cache; errors name ``where``.
    """
    from slimforge.arch import num_layers
    from slimforge.config import FieldError
    from slimforge.distill.config import adapter_module_names
    from slimforge.distill.hidden import default_layer_map, validate_layer_map

    try:
        cfg.check_student(student.config, adapter_module_names(student) if cfg.lora.enabled else None)
        if cfg.hidden_weight:
            n_s, n_t = num_layers(student), int(teacher_config.num_hidden_layers)
            validate_layer_map(list(cfg.layer_map) if cfg.layer_map else default_layer_map(n_s, n_t, kept_layers),
                               n_s, n_t)
    except FieldError as err:
        raise err.at(where) from None


def warn_if_larger_than_teacher(student: Any, teacher_config: Any) -> None:
    """One warning when the student has more parameters than its teacher (counted on the meta device)."""
    from slimforge.arch import count_parameters
    from slimforge.distill.config import meta_model

    try:
        teacher_params = count_parameters(meta_model(teacher_config))
    except Exception:  # noqa: BLE001 - a config transformers cannot build here: nothing to compare
        return
    student_params = count_parameters(student)
    if student_params > teacher_params:
        log.warning("the student has more parameters than its teacher (%s vs %s): distillation will not make it "
                    "smaller; give the student stage smaller sizes", f"{student_params:,}", f"{teacher_params:,}")


def _has_quant_config(path: str) -> bool:
    config = Path(path) / "config.json"
    return config.is_file() and '"quantization_config"' in config.read_text()


def _save_adapter(ctx: StageContext, model: Any, tokenizer: Any, meta: dict[str, Any],
                  metrics: dict[str, Any]) -> StageOutput:
    """A quantized base keeps its weights; the artifact is the adapter, pointing at its base.

    ``adapter_config.json`` names the base relative to the adapter folder, so a run directory
    (which holds both) can be moved or copied; ``slimforge.json`` also records the absolute path.
    """
    from slimforge.models import point_adapter_at_base

    base = str(Path(ctx.parent.path).expanduser().resolve())
    for adapter in model.peft_config.values():
        adapter.base_model_name_or_path = base  # what peft's save reads (the base's vocabulary)
    model.save_pretrained(ctx.out_dir)
    # out_dir is a sibling of the final artifact folder, so a path relative to one is relative to the other.
    point_adapter_at_base(ctx.out_dir, Path(base))
    tokenizer.save_pretrained(ctx.out_dir)
    meta["distill"]["lora"] = "adapter"
    meta["base_model"] = base
    return StageOutput(model=None, meta=meta, metrics=metrics)
