"""GGUF K-quants and i-quants (llama.cpp's quantizer): refused in one line, before any model loads."""

from __future__ import annotations

import tempfile
from pathlib import Path

from bad_inputs.harness import REPO, BadInput, Env

TINY_COMPRESS = str(REPO / "tests" / "assets" / "recipes" / "tiny_compress.yaml")  # has a gguf stage
# A folder that passes for a llama.cpp build (every tool present, none runnable): enough for the
# checks that come before any tool runs, whether or not this machine has llama.cpp built.
FAKE_LLAMACPP = Path(tempfile.gettempdir()) / "slimforge-bad-inputs-llamacpp-bin"


def _fake_llamacpp() -> str:
    from slimforge.runtimes.install import LLAMACPP_TOOLS

    FAKE_LLAMACPP.mkdir(parents=True, exist_ok=True)
    for tool in LLAMACPP_TOOLS:
        (FAKE_LLAMACPP / tool).touch()
    return str(FAKE_LLAMACPP)


def _kquant_run(env: Env, *extra: str, teacher: Path | None = None, data: Path | None = None) -> list[str]:
    _fake_llamacpp()
    return ["run", TINY_COMPRESS, f"teacher.path={teacher or env.teacher_dir}", f"data.path={data or env.corpus_dir}",
            f"run_dir={env.tmp / 'run'}", "pipeline=[gguf]", "stages.gguf.type=Q4_K_M", *extra]


def _opt_teacher(env: Env) -> Path:
    """A tiny OPT: a family neither slimforge's GGUF writer nor llama.cpp runs."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("opt", vocab_size=len(env.tokenizer), hidden_size=32, ffn_dim=64,
                                  num_hidden_layers=1, num_attention_heads=4, max_position_embeddings=256,
                                  word_embed_proj_dim=32)
    folder = env.tmp / "opt"
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    env.tokenizer.save_pretrained(folder)
    return folder


def _scrap_of_text(env: Env) -> Path:
    """Two short documents: one for the training split, one held out, ~40 tokens each."""
    folder = env.tmp / "scrap"
    folder.mkdir()
    (folder / "a.txt").write_text("To be, or not to be, that is the question: whether 'tis nobler in the mind.")
    (folder / "b.txt").write_text("Now is the winter of our discontent made glorious summer by this sun of York.")
    return folder


def _nothing_ran(env: Env) -> None:
    assert not (env.tmp / "run" / "stages").exists(), "a stage ran before the plan refused the recipe"


def _no_artifact(env: Env) -> None:
    assert not list((env.tmp / "run").glob("stages/*/*.gguf")), "a GGUF file was written"


CASES = [
    # llama.cpp's quantizer was never built: the one command that builds it is named.
    BadInput("kquant-without-llamacpp", lambda env: ["run", TINY_COMPRESS, f"teacher.path={env.teacher_dir}",
                                                     f"data.path={env.corpus_dir}", f"run_dir={env.tmp / 'run'}",
                                                     "pipeline=[gguf]", "stages.gguf.type=Q4_K_M"],
             r"llama\.cpp is not installed for slimforge; build it once with `slimforge runtime install llama\.cpp`",
             after=_nothing_ran, env={"SLIMFORGE_LLAMACPP_BIN": ""}),
    # A K-quant of a family llama.cpp has no graph for: said before that llama.cpp is not built either.
    BadInput("kquant-of-an-unsupported-family", lambda env: _kquant_run(env, teacher=_opt_teacher(env)),
             r"GGUF export does not support model type 'opt'; supported: llama, mistral",
             after=_nothing_ran, env={"SLIMFORGE_LLAMACPP_BIN": ""}),
    # An importance matrix with less training text than one of its windows: refused before the model loads.
    BadInput("imatrix-without-calibration-text",
             lambda env: _kquant_run(env, "data.block_size=16", "stages.gguf.imatrix_seq_len=128",
                                     data=_scrap_of_text(env)),
             r"the importance matrix needs windows of 128 tokens of training text, but the training split holds "
             r"\d+; add data, lower imatrix_seq_len, or set imatrix=false$",
             after=_no_artifact, env={"SLIMFORGE_LLAMACPP_BIN": str(FAKE_LLAMACPP)}),
    # Settings the Python quantizers do not take.
    BadInput("imatrix-with-a-python-type",
             lambda env: _kquant_run(env, "stages.gguf.type=Q4_0", "stages.gguf.imatrix=true"),
             r"invalid value stages\.gguf\.imatrix=True: only llama\.cpp's types .* not type=Q4_0; pick one or "
             r"set imatrix=false$", after=_nothing_ran),
    BadInput("tensor-type-unknown",
             lambda env: _kquant_run(env, "+stages.gguf.tensor_types.ffn_down=Q7_K"),
             r"stages\.gguf\.tensor_types=.*: the type of 'ffn_down' must be one of F32, F16",
             after=_nothing_ran),
]
