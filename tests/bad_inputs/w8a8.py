"""Bad W8A8 settings and inputs: refused in one line while planning, before any calibration runs."""

from __future__ import annotations

from pathlib import Path

from bad_inputs.awq import olmo_teacher
from bad_inputs.harness import REPO, BadInput, Env

STUDENT = str(REPO / "tests" / "assets" / "recipes" / "student.yaml")


def w8a8_run(env: Env, preset: str, *extra: str, teacher: Path | None = None) -> list[str]:
    """argv for ``slimforge run`` of one W8A8 stage (``preset``) on the tiny teacher (or ``teacher``), no evaluation."""
    return ["run", STUDENT, f"teacher.path={teacher or env.teacher_dir}", "data=text", f"data.path={env.corpus_dir}",
            "data.block_size=32", f"run_dir={env.tmp / 'run'}", f"+quantize@stages.quant={preset}", "pipeline=[quant]",
            "~eval.tasks.perplexity", "stages.quant.num_samples=2", "stages.quant.seq_len=16", *extra]


def mixtral_teacher(env: Env) -> Path:
    """A tiny Mixtral: its experts are fused 3-D tensors in transformers 5, not nn.Linear layers."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("mixtral", vocab_size=len(env.tokenizer), hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                  num_local_experts=4, num_experts_per_tok=2, pad_token_id=0, bos_token_id=1,
                                  eos_token_id=2)
    folder = env.tmp / "mixtral"
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder)
    env.tokenizer.save_pretrained(folder)
    return folder


def nothing_ran(env: Env) -> None:
    assert not (env.tmp / "run" / "stages").exists(), "a stage ran before the plan refused the recipe"


CASES = [
    BadInput("smoothquant-alpha-above-one",
             lambda env: w8a8_run(env, "w8a8_int8", "stages.quant.smoothquant_alpha=1.5"),
             r"invalid value stages\.quant\.smoothquant_alpha=1\.5: SmoothQuant's migration strength must be in "
             r"\[0, 1\] .*or null for no smoothing",
             after=nothing_ran),
    BadInput("smoothquant-alpha-negative",
             lambda env: w8a8_run(env, "w8a8_int8", "stages.quant.smoothquant_alpha=-0.2"),
             r"invalid value stages\.quant\.smoothquant_alpha=-0\.2: .*must be in \[0, 1\]",
             after=nothing_ran),
    BadInput("fp8-on-fused-experts",
             lambda env: w8a8_run(env, "w8a8_fp8", teacher=mixtral_teacher(env)),
             r"W8A8 \(fp8\) does not support mixture-of-experts models \(mixtral\) yet; use quantize method gptq",
             after=nothing_ran),
    BadInput("smoothquant-on-an-unknown-layer-layout",
             lambda env: w8a8_run(env, "w8a8_int8", teacher=olmo_teacher(env)),
             r"quantize method w8a8 \(int8\) with SmoothQuant needs a known decoder-block layout, and model type "
             r"'olmo' is not one; supported model types: llama",
             after=nothing_ran),
    BadInput("smoothing-v-o-under-grouped-query-attention",
             lambda env: w8a8_run(env, "w8a8_int8", "stages.quant.smoothquant_groups=[attn_in,v_o]"),
             r"stages\.quant\.smoothquant_groups=\['attn_in', 'v_o'\]: names v_o, but this model uses grouped-query "
             r"attention",
             after=nothing_ran),
    BadInput("unknown-type",
             lambda env: w8a8_run(env, "w8a8_int8", "stages.quant.type=int4"),
             r"invalid value stages\.quant\.type='int4': must be one of int8, fp8",
             after=nothing_ran),
    BadInput("unknown-smoothing-group",
             lambda env: w8a8_run(env, "w8a8_int8", "stages.quant.smoothquant_groups=[attn_in,qk]"),
             r"stages\.quant\.smoothquant_groups=\['attn_in', 'qk'\]: each must be one of attn_in, mlp_in, up_down, "
             r"v_o",
             after=nothing_ran),
]
