"""Bad quantization-aware distillation (``qat``) inputs: a parent that is not integer weight-only
compressed-tensors, and settings that make no sense for QAT. Each is refused in one line, the
parent checks before any training (at plan time wherever the stages before it say what they make)."""

from __future__ import annotations

from bad_inputs.harness import REPO, BadInput, Env

TINY_COMPRESS = str(REPO / "tests" / "assets" / "recipes" / "tiny_compress.yaml")  # prune + quantize stages
QAT_INPUT = r"distill method qat trains the integer grid of a weight-only compressed-tensors model \(a gptq, rtn, " \
            r"awq or mixed_precision stage's artifact\), but "
WHAT_TO_DO = r"; put such a stage before it, e\.g\. pipeline=\[gptq, qat\]$"


def qat_run(env: Env, pipeline: str, *extra: str) -> list[str]:
    """argv for the tiny prune/quantize recipe (no evaluation) with a two-step ``qat`` stage added."""
    return ["run", TINY_COMPRESS, f"teacher.path={env.teacher_dir}", f"data.path={env.corpus_dir}",
            f"run_dir={env.tmp / 'run'}", "+distill@stages.qat=qat", f"pipeline={pipeline}", "stages.qat.steps=2",
            "stages.qat.batch_size=2", *extra]


def nothing_ran(env: Env) -> None:
    assert not (env.tmp / "run" / "stages").exists(), "a stage ran before the plan refused the recipe"


def no_qat_artifact(env: Env) -> None:
    assert not (env.tmp / "run" / "stages" / "qat").exists()
    assert not (env.tmp / "run" / "work" / "qat" / "checkpoints").exists(), "qat trained before refusing"


CASES = [
    BadInput("on-the-full-precision-teacher", lambda env: qat_run(env, "[qat]"),
             QAT_INPUT + r"the teacher is not quantized" + WHAT_TO_DO, after=nothing_ran),
    BadInput("after-a-prune", lambda env: qat_run(env, "[depth,qat]"),
             QAT_INPUT + r"the model the stages before it will make is not quantized" + WHAT_TO_DO, after=nothing_ran),
    BadInput("after-bitsandbytes-nf4",
             lambda env: qat_run(env, "[nf4,qat]", "+quantize@stages.nf4=bnb_nf4"),
             r"stages\.qat: " + QAT_INPUT + r"its input nf4 is quantized by bitsandbytes, not stored as integer codes "
             r"and scales in compressed-tensors" + WHAT_TO_DO, after=no_qat_artifact),
    BadInput("after-w8a8",
             lambda env: qat_run(env, "[w8,qat]", "+quantize@stages.w8=w8a8_int8", "stages.w8.rounding=rtn",
                                 "stages.w8.smoothquant_alpha=null", "stages.w8.num_samples=4", "stages.w8.seq_len=16",
                                 "stages.w8.batch_size=2"),
             r"stages\.qat: " + QAT_INPUT + r"its input w8 quantizes activations too \(config group group_0\), which a "
             r"weight-only QAT does not train" + WHAT_TO_DO, after=no_qat_artifact),
    BadInput("lora", lambda env: qat_run(env, "[rtn,qat]", "stages.qat.lora.enabled=true"),
             r"invalid value stages\.qat\.lora\.enabled=True: qat trains the quantized weights and scales themselves, "
             r"not adapters; for LoRA on a frozen NF4 base use method kd \(QLoRA-KD, recipe qlora_kd\)$",
             after=nothing_ran),
    BadInput("keep-sparsity", lambda env: qat_run(env, "[rtn,qat]", "stages.qat.keep_sparsity=true"),
             r"invalid value stages\.qat\.keep_sparsity=True: a quantized layer's zero codes are not pruned weights",
             after=nothing_ran),
    BadInput("unknown-trainable", lambda env: qat_run(env, "[rtn,qat]", "stages.qat.trainable=[weights,biases]"),
             r"invalid value stages\.qat\.trainable=\['weights', 'biases'\]: each must be one of weights, scales, "
             r"norms$", after=nothing_ran),
    BadInput("nothing-trainable", lambda env: qat_run(env, "[rtn,qat]", "stages.qat.trainable=[]"),
             r"invalid value stages\.qat\.trainable=\[\]: name at least one of weights, scales, norms to train$",
             after=nothing_ran),
    BadInput("scale-lr", lambda env: qat_run(env, "[rtn,qat]", "stages.qat.scale_lr=0"),
             r"invalid value stages\.qat\.scale_lr=0(\.0)?: must be > 0$", after=nothing_ran),
]
