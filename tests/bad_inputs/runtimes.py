"""``slimforge runtime``: what the runtime checks and installs refuse, in one line, before any model loads."""

from __future__ import annotations

from pathlib import Path

from bad_inputs.harness import BadInput, Env


def _gguf_named(env: Env) -> Path:
    """A file named .gguf that is not one."""
    path = env.tmp / "model.gguf"
    path.write_bytes(b"GGUF" + bytes(60))
    return path


def _gguf_header_only(env: Env) -> Path:
    """A valid GGUF file (a header, no tensors): enough to get past the file checks."""
    import gguf

    path = env.tmp / "header.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _vllm_shaped(env: Env) -> Path:
    """The tiny teacher with a head size vLLM's CPU attention takes (config only: vLLM is looked up before any weight loads)."""
    import json
    import shutil

    folder = Path(shutil.copytree(env.teacher_dir, env.tmp / "vllm-shaped"))
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "head_dim": 32}))
    return folder


CASES = [
    BadInput("missing-path", lambda env: ["runtime", "check", str(env.tmp / "nowhere")], r"does not exist"),
    BadInput("folder-for-llamacpp", lambda env: ["runtime", "check", str(env.teacher_dir), "--runtime", "llama.cpp"],
             r"holds no \.gguf file.*gguf stage"),
    BadInput("text-file-missing", lambda env: ["runtime", "check", str(env.teacher_dir), "--text",
                                               str(env.tmp / "none.txt")], r"--text .* is not a file"),
    BadInput("max-tokens-zero", lambda env: ["runtime", "check", str(env.teacher_dir), "--max-tokens", "0"],
             r"--max-tokens must be at least 1"),
    # A GGUF check where llama.cpp was never built names the command that builds it.
    BadInput("gguf-garbled", lambda env: ["runtime", "check", str(_gguf_named(env))], r"is not a readable GGUF file"),
    BadInput("llamacpp-not-built", lambda env: ["runtime", "check", str(_gguf_header_only(env))],
             r"llama\.cpp is not installed.*slimforge runtime install llama\.cpp",
             env={"SLIMFORGE_CACHE": "/nonexistent-slimforge-cache", "SLIMFORGE_LLAMACPP_BIN": ""}),
    BadInput("llamacpp-bin-incomplete", lambda env: ["runtime", "check", str(_gguf_header_only(env))],
             r"SLIMFORGE_LLAMACPP_BIN=.* lacks llama-quantize", env={"SLIMFORGE_LLAMACPP_BIN": "/tmp"}),
    BadInput("vllm-python-missing", lambda env: ["runtime", "check", str(_vllm_shaped(env)), "--runtime", "vllm"],
             r"SLIMFORGE_VLLM_PYTHON=.* is not a file", env={"SLIMFORGE_VLLM_PYTHON": "/nonexistent/python"}),
    BadInput("install-offline", lambda env: ["runtime", "install", "llama.cpp"],
             r"not built and SLIMFORGE_OFFLINE is set",
             env={"SLIMFORGE_CACHE": "/tmp/slimforge-offline-test-cache", "SLIMFORGE_OFFLINE": "1",
                  "SLIMFORGE_LLAMACPP_BIN": ""}),
]
CASES.append(BadInput("ctx-too-small", lambda env: ["runtime", "check", str(env.teacher_dir), "--ctx", "2"],
                      r"--ctx must be at least 8"))
