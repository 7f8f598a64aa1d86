"""Methods not built for mixture-of-experts models refuse an MoE teacher in one line, before any stage runs;
and the MoE-only GPTQ settings are checked like any other."""

from __future__ import annotations

from pathlib import Path

from bad_inputs.harness import REPO, BadInput, Env
from bad_inputs.w8a8 import mixtral_teacher, nothing_ran

STUDENT = str(REPO / "tests" / "assets" / "recipes" / "student.yaml")


def qwen2_moe_teacher(env: Env, **overrides: object) -> Path:
    """A tiny 2-layer Qwen2-MoE (4 experts, top-2, a shared expert), with config ``overrides``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("qwen2_moe", vocab_size=len(env.tokenizer), hidden_size=32, intermediate_size=48,
                                  moe_intermediate_size=48, shared_expert_intermediate_size=40, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                                  pad_token_id=0, bos_token_id=1, eos_token_id=2, **overrides)
    folder = env.tmp / "qwen2_moe"
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder)
    env.tokenizer.save_pretrained(folder)
    return folder


def moe_run(env: Env, stage: str, *extra: str, teacher: Path | None = None) -> list[str]:
    """argv for ``slimforge run`` of one stage (``group@stages.s=preset``) on a tiny Mixtral teacher (or
    ``teacher``), no evaluation."""
    return ["run", STUDENT, f"teacher.path={teacher or mixtral_teacher(env)}", "data=text", f"data.path={env.corpus_dir}",
            "data.block_size=32", f"run_dir={env.tmp / 'run'}", f"+{stage.split('=')[0]}@stages.s={stage.split('=')[1]}",
            "pipeline=[s]", "~eval.tasks.perplexity", *extra]


def _refused(what: str) -> str:
    return rf"{what} does not support mixture-of-experts models \(mixtral\) yet; use "


CASES = [
    BadInput("width-pruning", lambda env: moe_run(env, "prune=width"), _refused("width pruning") + "depth pruning",
             after=nothing_ran),
    BadInput("awq", lambda env: moe_run(env, "quantize=awq", "stages.s.group_size=-1"),
             _refused("AWQ") + "quantize method gptq or rtn", after=nothing_ran),
    BadInput("w8a8", lambda env: moe_run(env, "quantize=w8a8_int8"), _refused(r"W8A8 \(int8\)"), after=nothing_ran),
    BadInput("mixed-precision", lambda env: moe_run(env, "quantize=mixed_precision", "stages.s.group_size=-1"),
             _refused("mixed-precision quantization"), after=nothing_ran),
    BadInput("gguf", lambda env: moe_run(env, "quantize=gguf"), _refused("GGUF export"), after=nothing_ran),
    BadInput("bitsandbytes", lambda env: moe_run(env, "quantize=bnb_nf4"), _refused(r"bitsandbytes \(bnb_nf4\)"),
             after=nothing_ran),
    BadInput("qat", lambda env: moe_run(env, "distill=qat"), _refused(r"quantization-aware distillation \(qat\)"),
             after=nothing_ran),
    # The search on an MoE model is depth x experts; its smallest shape keeps top-k (2) experts per layer.
    BadInput("architecture-search-below-top-k-experts",
             lambda env: moe_run(env, "prune=search", "stages.s.target_params=1000"),
             r"stages\.s\.target_params='1000': the target is below the smallest shape this search reaches: [\d,]+ "
             r"\([\d.]+K\) parameters at 1 layers and 2 experts per layer; raise the target, or add a smaller "
             r"fraction to depth_keep$", after=nothing_ran),
    BadInput("architecture-search-dense-layers-among-moe",
             lambda env: moe_run(env, "prune=search", "stages.s.target_params=40000",
                                 teacher=qwen2_moe_teacher(env, mlp_only_layers=[1])),
             r"stages\.s\.method='search': the search needs every layer to be an MoE layer; this qwen2_moe has dense "
             r"layers \[1\] \(mlp_only_layers / decoder_sparse_step\); prune its experts with the experts method, "
             r"then its depth with the depth method", after=nothing_ran),
    BadInput("gptq-moe-calibration-unknown",
             lambda env: moe_run(env, "quantize=gptq", "stages.s.moe_calibration=some"),
             r"invalid value stages\.s\.moe_calibration='some': must be one of all, routed", after=nothing_ran),
]
