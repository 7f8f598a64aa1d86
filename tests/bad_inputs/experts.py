"""Bad expert-pruning settings (MoE models): refused in one line before any stage runs."""

from __future__ import annotations

from bad_inputs.harness import REPO, BadInput, Env

TINY_EXPERTS = str(REPO / "tests" / "assets" / "recipes" / "tiny_experts.yaml")  # prune: experts, optional heal


def _moe_teacher(env: Env, arch: str = "mixtral"):
    """A saved tiny MoE model (4 experts per layer, 2 per token) with the tiny tokenizer."""
    from conftest import build_moe_model

    folder = env.tmp / arch
    build_moe_model(arch, env.tokenizer, experts=4, top_k=2).save_pretrained(folder)
    env.tokenizer.save_pretrained(folder)
    return folder


def _experts_run(env: Env, teacher, *extra: str) -> list[str]:
    return ["run", TINY_EXPERTS, f"teacher.path={teacher}", f"data.path={env.corpus_dir}",
            f"run_dir={env.tmp / 'run'}", *extra]


def _nothing_ran(env: Env) -> None:
    assert not (env.tmp / "run" / "stages").exists(), "a stage ran before the plan refused the recipe"


CASES = [
    BadInput("experts-on-a-dense-model",
             lambda env: _experts_run(env, env.teacher_dir),
             r"model type 'llama' is not a mixture of experts; expert pruning needs one of mixtral, phimoe",
             after=_nothing_ran),
    BadInput("experts-remove-all-by-count",
             lambda env: _experts_run(env, env.teacher_dir, "stages.prune.ratio=null", "stages.prune.num_experts=0"),
             r"stages\.prune\.num_experts=0: every layer must keep at least one expert", after=_nothing_ran),
    BadInput("experts-remove-all-by-ratio",
             lambda env: _experts_run(env, env.teacher_dir, "stages.prune.ratio=1.0"),
             r"stages\.prune\.ratio=1\.0: would remove every expert of a layer", after=_nothing_ran),
    BadInput("experts-more-than-the-model-has",
             lambda env: _experts_run(env, _moe_teacher(env), "stages.prune.ratio=null", "stages.prune.num_experts=8"),
             r"stages\.prune\.num_experts=8: the model has only 4 experts per layer", after=_nothing_ran),
    BadInput("experts-top-k-above-what-remains",
             lambda env: _experts_run(env, _moe_teacher(env), "stages.prune.ratio=0.5", "stages.prune.top_k=3"),
             r"stages\.prune\.top_k=3: each token is routed to 3 experts but only 2 of 4 would remain",
             after=_nothing_ran),
    BadInput("experts-phimoe-top-k",
             lambda env: _experts_run(env, _moe_teacher(env, "phimoe"), "stages.prune.ratio=null", "stages.prune.top_k=1"),
             r"stages\.prune\.top_k=1: phimoe's router \(sparsemixer\) always routes each token to 2 experts",
             after=_nothing_ran),
]
