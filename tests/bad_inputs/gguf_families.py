"""GGUF export of a model whose settings llama.cpp's graph for its family cannot run: refused at plan time."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from bad_inputs.harness import REPO, BadInput, Env

TINY_COMPRESS = str(REPO / "tests" / "assets" / "recipes" / "tiny_compress.yaml")  # has a gguf stage


def _gemma2_with(env: Env, **settings) -> Path:
    """A copy of the tiny Gemma 2 whose config.json says ``settings``."""
    folder = Path(shutil.copytree(env.model_dirs["gemma2"], env.tmp / "gemma2"))
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **settings}))
    return folder


def _gguf_run(env: Env, teacher: Path) -> list[str]:
    return ["run", TINY_COMPRESS, f"teacher.path={teacher}", f"data.path={env.corpus_dir}",
            f"run_dir={env.tmp / 'run'}", "pipeline=[gguf]"]


def _nothing_ran(env: Env) -> None:
    assert not (env.tmp / "run" / "stages").exists(), "a stage ran before the plan refused the recipe"


CASES = [
    # llama.cpp's Gemma 1/2 graphs always read the output matrix from the embedding.
    BadInput("gemma2-untied",
             lambda env: _gguf_run(env, _gemma2_with(env, tie_word_embeddings=False)),
             r"GGUF export of gemma2 needs tied embeddings: llama\.cpp's gemma2 graph always uses the embedding "
             r"matrix as the output matrix; tie lm_head to the embedding first$",
             after=_nothing_ran),
    # ... and always caps logits, with the caps the file names.
    BadInput("gemma2-uncapped",
             lambda env: _gguf_run(env, _gemma2_with(env, final_logit_softcapping=None)),
             r"GGUF export of gemma2 needs final_logit_softcapping: llama\.cpp's gemma2 graph always caps",
             after=_nothing_ran),
]
