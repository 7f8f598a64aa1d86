"""Bad AWQ settings and inputs: refused in one line while planning, before any calibration runs."""

from __future__ import annotations

from pathlib import Path

from bad_inputs.harness import REPO, BadInput, Env

STUDENT = str(REPO / "tests" / "assets" / "recipes" / "student.yaml")


def awq_run(env: Env, *extra: str, teacher: Path | None = None) -> list[str]:
    """argv for ``slimforge run`` of one awq stage on the tiny teacher (or ``teacher``), no evaluation."""
    return ["run", STUDENT, f"teacher.path={teacher or env.teacher_dir}", "data=text", f"data.path={env.corpus_dir}",
            "data.block_size=32", f"run_dir={env.tmp / 'run'}", "+quantize@stages.quant=awq", "pipeline=[quant]",
            "~eval.tasks.perplexity", "stages.quant.group_size=32", "stages.quant.block_size=32", *extra]


def olmo_teacher(env: Env) -> Path:
    """A tiny OLMo: a decoder transformers knows but ``arch.py`` has no channel-scaling layout for."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("olmo", vocab_size=len(env.tokenizer), hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=1, num_attention_heads=4, pad_token_id=0, bos_token_id=1,
                                  eos_token_id=2)
    folder = env.tmp / "olmo"
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder)
    env.tokenizer.save_pretrained(folder)
    return folder


def nothing_ran(env: Env) -> None:
    assert not (env.tmp / "run" / "stages").exists(), "a stage ran before the plan refused the recipe"


CASES = [
    BadInput("unknown-layer-layout",
             lambda env: awq_run(env, teacher=olmo_teacher(env)),
             r"quantize method awq needs a known decoder-block layout, and model type 'olmo' is not one; "
             r"supported model types: llama, mistral",
             after=nothing_ran),
    BadInput("empty-exponent-grid",
             lambda env: awq_run(env, "stages.quant.grid=0"),
             r"invalid value stages\.quant\.grid=0: must be >= 1",
             after=nothing_ran),
    BadInput("unknown-rounding",
             lambda env: awq_run(env, "stages.quant.rounding=nearest"),
             r"invalid value stages\.quant\.rounding='nearest': must be one of rtn, gptq",
             after=nothing_ran),
]
