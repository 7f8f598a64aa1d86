"""Methods not built for mixture-of-experts models refuse an MoE teacher in one line, before any stage runs;
and the MoE-only GPTQ settings are checked like any other."""

from __future__ import annotations

from bad_inputs.harness import REPO, BadInput, Env
from bad_inputs.w8a8 import mixtral_teacher, nothing_ran

STUDENT = str(REPO / "tests" / "assets" / "recipes" / "student.yaml")


def moe_run(env: Env, stage: str, *extra: str) -> list[str]:
    """argv for ``slimforge run`` of one stage (``group@stages.s=preset``) on a tiny Mixtral teacher, no evaluation."""
    return ["run", STUDENT, f"teacher.path={mixtral_teacher(env)}", "data=text", f"data.path={env.corpus_dir}",
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
    BadInput("architecture-search", lambda env: moe_run(env, "prune=search", "stages.s.target_params=100000"),
             _refused("the architecture search") + "the experts method", after=nothing_ran),
    BadInput("gptq-moe-calibration-unknown",
             lambda env: moe_run(env, "quantize=gptq", "stages.s.moe_calibration=some"),
             r"invalid value stages\.s\.moe_calibration='some': must be one of all, routed", after=nothing_ran),
]
