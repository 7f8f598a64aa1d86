"""Bad targets for the architecture search (prune method ``search``): refused in one line before any model loads."""

from __future__ import annotations

from bad_inputs.harness import REPO, BadInput, Env

TINY_COMPRESS = str(REPO / "tests" / "assets" / "recipes" / "tiny_compress.yaml")


def _search_run(env: Env, *extra: str) -> list[str]:
    """argv for a one-stage search on the tiny teacher (4 layers, hidden 32, MLP 64: 61,728 parameters)."""
    return ["run", TINY_COMPRESS, f"teacher.path={env.teacher_dir}", f"data.path={env.corpus_dir}",
            f"run_dir={env.tmp / 'run'}", "+prune@stages.search=search", "pipeline=[search]",
            "stages.search.round_to=8", *extra]


def _nothing_ran(env: Env) -> None:
    assert not (env.tmp / "run" / "stages").exists(), "a stage ran before the plan refused the recipe"


CASES = [
    # Below the smallest shape the grid reaches (fewest layers of depth_keep, every width at its minimum).
    BadInput("search-target-below-smallest-shape",
             lambda env: _search_run(env, "stages.search.target_params=1000"),
             r"stages\.search\.target_params='1000': the target is below the smallest shape this search reaches: "
             r"[\d,]+ \([\d.]+K\) parameters at 3 layers and minimal widths; raise the target, or add a smaller "
             r"fraction to depth_keep or lower min_width_ratio",
             after=_nothing_ran),
    BadInput("search-target-above-teacher",
             lambda env: _search_run(env, "stages.search.target_params=1M"),
             r"stages\.search\.target_params='1M': the target is not below the model's 61,728 \(61\.73K\) parameters; "
             r"nothing to prune",
             after=_nothing_ran),
    # After a depth prune the target is checked against that stage's planned output (3 of 4 layers), at plan time.
    BadInput("search-target-above-depth-pruned-input",
             lambda env: _search_run(env, "pipeline=[depth,search]", "stages.search.target_params=55000"),
             r"stages\.search\.target_params='55000': the target is not below the model's 52,448 \(52\.45K\) "
             r"parameters; nothing to prune",
             after=_nothing_ran),
    # A byte budget that, at its bits, is more than the teacher holds.
    BadInput("search-target-bytes-above-teacher",
             lambda env: _search_run(env, "stages.search.target_params=null", "stages.search.target_bytes=1MB",
                                     "stages.search.bits=4"),
             r"stages\.search\.target_bytes='1MB': the target \(= 2\.00M parameters at 4 bits\) is not below",
             after=_nothing_ran),
    BadInput("search-no-target",
             lambda env: _search_run(env, "stages.search.target_params=null"),
             r"stages\.search\.target_params=None: give exactly one of target_params or target_bytes \(got neither\)"),
    BadInput("search-both-targets",
             lambda env: _search_run(env, "stages.search.target_bytes=20KB", "stages.search.bits=4"),
             r"give exactly one of target_params or target_bytes \(got target_params and target_bytes\)"),
    BadInput("search-bytes-without-bits",
             lambda env: _search_run(env, "stages.search.target_params=null", "stages.search.target_bytes=20KB"),
             r"stages\.search\.bits=None: target_bytes needs bits"),
    BadInput("search-target-not-a-size",
             lambda env: _search_run(env, "stages.search.target_params=80X"),
             r"stages\.search\.target_params='80X': give a positive count, e\.g\. 80000000 or 80M"),
    BadInput("search-bad-mix",
             lambda env: _search_run(env, "stages.search.target_params=40000", "stages.search.width_mixes=[mlp+depth]"),
             r"stages\.search\.width_mixes='mlp\+depth': each mix joins distinct axes of mlp, heads, hidden with \+"),
]
