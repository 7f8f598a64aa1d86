"""The GGUF stage: the parent model as one GGUF file, verified, with its size.

F16, Q8_0, Q5_0 and Q4_0 are written by slimforge's own writer
(:mod:`slimforge.quantize.gguf_export`); llama.cpp's mixtures (Q4_K_M, IQ4_NL, ...) by
llama.cpp's quantizer from that writer's exact F32 file, with an importance matrix from the
run's training split (:mod:`slimforge.quantize.gguf_llamacpp`). Either way the file is loaded
back and checked against the weights it should hold.
"""

from __future__ import annotations

import logging
import time
from collections import Counter

import torch

from slimforge.arch import count_parameters
from slimforge.pretokenize import detect_pre_tokenizer
from slimforge.quantize import gguf_llamacpp as by_llamacpp
from slimforge.quantize.common import check_parent, quantizable_linears
from slimforge.quantize.config import GgufConfig
from slimforge.quantize.gguf_arch import default_model_name
from slimforge.quantize.gguf_export import (
    exact_context_length,
    intended_model,
    verify_against,
    write_gguf,
)
from slimforge.quantize.report import artifact_report, linear_numel
from slimforge.stage import StageContext, StageOutput, TeacherInfo

log = logging.getLogger(__name__)


def gguf_stage(ctx: StageContext) -> StageOutput:
    """Export the parent to one GGUF file, verify it, and report its size."""
    from slimforge.data import blocks_tensor

    cfg: GgufConfig = ctx.config
    config = check_parent(ctx.parent, cfg)
    cfg.check_input(TeacherInfo(config, None))  # the plan could not, when no earlier stage said what it makes
    window = by_llamacpp.imatrix_window(cfg, exact_context_length(config))
    calibration = None
    if cfg.uses_imatrix():  # before the model loads: too little training text fails at once
        calibration = by_llamacpp.calibration_text(ctx.data(), ctx.session.teacher_tokenizer(),
                                                   cfg.imatrix_samples, window, ctx.seed)
    # On the CPU in fp32: the gguf quantizers are numpy, and verification compares fp32 logits.
    model, tokenizer = ctx.parent.load(device="cpu", dtype=torch.float32)
    detect_pre_tokenizer(tokenizer)
    path = ctx.out_dir / (cfg.file_name or f"model-{cfg.type}.gguf")
    name = cfg.model_name or default_model_name(config.model_type, tokenizer.get_vocab())
    start = time.perf_counter()
    if cfg.by_llamacpp():
        export = by_llamacpp.export_with_llamacpp(model, tokenizer, path, cfg, name, calibration, window,
                                                  ctx.work_dir)
        written = by_llamacpp.llamacpp_info(export)
    else:
        output = cfg.resolved_output_type()
        export = write_gguf(model, tokenizer, path, cfg.type, output, name)
        written = {"output_type": output, "tensor_types": dict(Counter(export.types.values())),
                   "fallback_f16": export.fallback_f16}
    seconds = time.perf_counter() - start
    info = {"type": cfg.type, "pre_tokenizer": export.pre_tokenizer, "context_length": exact_context_length(config),
            **written}
    if cfg.verify:
        blocks = blocks_tensor(ctx.data().heldout, cfg.verify_blocks)
        intended = by_llamacpp.intended_from_file(model, path) if cfg.by_llamacpp() else intended_model(model, export)
        info["verify"] = verify_against(ctx.out_dir, path.name, model, tokenizer, intended, export.types.values(),
                                        blocks)
        log.info("gguf: reloaded %s: KL to source %.4g, top-1 agreement %.3f", path.name,
                 info["verify"]["kl_to_source"], info["verify"]["top1_agreement_to_source"])
    # The exact tokenizer beside the file: slimforge's loader prefers it to transformers' rebuild.
    tokenizer.save_pretrained(ctx.out_dir)
    numel = linear_numel(model, list(quantizable_linears(model)))
    meta = artifact_report(ctx.out_dir, numel, count_parameters(model), sum(export.tensor_bytes.values()), seconds,
                           tensor_bytes=export.tensor_bytes, quantization={"format": "gguf", **info})
    meta.update(gguf_file=path.name, architecture=type(model).__name__, model_type=config.model_type)
    metrics = {k: meta[k] for k in ("bits_per_weight", "size_on_disk_bytes", "quantize_seconds")}
    return StageOutput(meta=meta, metrics=metrics)
