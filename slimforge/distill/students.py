"""Student initialisation stages."""

from __future__ import annotations

import logging
from typing import Any

from slimforge.arch import num_layers
from slimforge.distill.config import (
    CheckpointStudentConfig,
    DropLayersConfig,
    FromConfigStudentConfig,
)
from slimforge.prune.depth import drop_layers
from slimforge.stage import StageContext, StageOutput

log = logging.getLogger(__name__)


def drop_layers_stage(ctx: StageContext) -> StageOutput:
    """The teacher (or parent) with decoder layers removed and the rest renumbered."""
    cfg: DropLayersConfig = ctx.config
    model, tokenizer = ctx.load_parent()
    total = num_layers(model)
    keep = set(cfg.layers_to_keep(total))
    dropped = drop_layers(model, [i for i in range(total) if i not in keep])  # the same removal as prune.depth
    log.info("student keeps %d of %d layers; dropped %s", len(dropped.kept), total, dropped.removed)
    meta = {"layers_before": total, "layers_after": len(dropped.kept), "kept_layers": dropped.kept,
            "dropped_layers": dropped.removed}
    return StageOutput(model=model, tokenizer=tokenizer, meta=meta)


def checkpoint_stage(ctx: StageContext) -> StageOutput:
    """An existing checkpoint as a slimforge artifact.

    A local folder is copied file by file (exact bytes, and it works for formats
    transformers can load but not re-save, such as pre-quantized bitsandbytes
    weights); a hub id or GGUF file is loaded and saved as a standard folder.
    """
    import shutil
    from pathlib import Path

    from slimforge.models import META_FILE, RECIPE_FILE, classify_source

    cfg: CheckpointStudentConfig = ctx.config
    source = cfg.source()
    if classify_source(source.path, source.gguf_file) == "folder":
        folder = Path(source.path).expanduser()
        for item in folder.iterdir():
            if item.name in (META_FILE, RECIPE_FILE) or item.name.startswith("."):
                continue
            copy = shutil.copytree if item.is_dir() else shutil.copy2
            copy(item, ctx.out_dir / item.name)
        return StageOutput(meta={"source": cfg.path, "num_parameters": _count_saved(ctx.out_dir)})
    model, tokenizer = source.load(device=ctx.device, dtype=ctx.dtype)
    return StageOutput(model=model, tokenizer=tokenizer, meta={"source": cfg.path})


def _count_saved(folder) -> int | None:
    """Parameters of a saved folder from its safetensors headers (no weights loaded).

    None for quantized checkpoints, whose packed tensors do not count parameters.
    """
    import json
    import math

    from safetensors import safe_open

    config = folder / "config.json"
    if config.is_file() and "quantization_config" in json.loads(config.read_text()):
        return None
    total = 0
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as fh:
            total += sum(math.prod(fh.get_slice(key).get_shape()) for key in fh.keys())  # noqa: SIM118 - safe_open is not a dict
    return total or None


def from_config_stage(ctx: StageContext) -> StageOutput:
    """A randomly initialised student: the parent's config with the requested sizes."""
    import torch
    from transformers import AutoModelForCausalLM

    cfg: FromConfigStudentConfig = ctx.config
    base = ctx.parent.load_config()
    changes = cfg.size_changes(base)
    config = cfg.student_config(base)
    tokenizer = ctx.parent.load_tokenizer()
    meta = {"init": "from_config", "changes": changes}
    if cfg.tokenizer == "domain_bpe":
        texts = training_texts(ctx.data(), ctx.session.teacher_tokenizer())
        tokenizer = train_domain_tokenizer(texts, cfg.vocab_size, tokenizer)
        config.vocab_size = len(tokenizer)
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if getattr(config, name, None) is not None:
                setattr(config, name, getattr(tokenizer, name))
        meta["tokenizer"] = {"kind": "domain_bpe", "vocab_size": len(tokenizer), "trained_on_blocks": len(texts)}
        log.info("student tokenizer: byte-level BPE of %d tokens trained on %d blocks", len(tokenizer), len(texts))
    torch.manual_seed(ctx.seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    log.info("fresh student: %s", ", ".join(f"{k}={v}" for k, v in changes.items()) or "teacher-sized")
    return StageOutput(model=model, tokenizer=tokenizer, meta=meta)


def training_texts(data: Any, tokenizer: Any) -> list[str]:
    """The text of the run's training blocks (never the held-out ones), decoded with the tokenizer that packed them."""
    from slimforge.data import blocks_tensor

    return [tokenizer.decode(row, skip_special_tokens=True) for row in blocks_tensor(data.train).tolist()]


def train_domain_tokenizer(texts: list[str], vocab_size: int, like: Any) -> Any:
    """A byte-level BPE of at most ``vocab_size`` tokens trained on ``texts``, with the special tokens and
    chat template of ``like`` (the teacher's tokenizer), as a transformers fast tokenizer.

    Byte-level, so every text encodes without unknown tokens and each token stands for exact bytes
    (what :func:`~slimforge.distill.cross_vocab.teacher_view` aligns by). Deterministic for one input.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = list(dict.fromkeys(str(t) for t in like.all_special_tokens))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    named = {role: str(getattr(like, role)) for role in ("bos_token", "eos_token", "pad_token", "unk_token")
             if getattr(like, role, None) is not None}
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **named)
    if getattr(like, "chat_template", None):
        fast.chat_template = like.chat_template
    return fast
