"""``slimforge runtime check PATH --runtime vllm`` on folders vLLM's CPU build cannot take: one line, exit 2.

Every refusal comes from the folder's small files, before vLLM starts, so these cases hold
whether or not vLLM is installed. Each damages a copy of the tiny teacher's config.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from bad_inputs.harness import BadInput, Env

INT8_WEIGHTS = {"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {"group_0": {
    "format": "pack-quantized", "input_activations": None, "targets": ["Linear"],
    "weights": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel", "group_size": None}}}}


def _copy_with(**changes):
    def build(env: Env) -> Path:
        folder = Path(shutil.copytree(env.teacher_dir, env.tmp / "model"))
        config = json.loads((folder / "config.json").read_text())
        config.update(changes)
        (folder / "config.json").write_text(json.dumps(config))
        return folder
    return build


def _adapter(env: Env) -> Path:
    folder = Path(shutil.copytree(env.teacher_dir, env.tmp / "adapter"))
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": "x"}))
    return folder


def _gguf(env: Env) -> Path:
    path = env.tmp / "model.gguf"
    path.write_bytes(b"GGUF" + bytes(60))
    return path


def check(make):
    return lambda env: ["runtime", "check", str(make(env)), "--runtime", "vllm"]


CASES = [
    BadInput("bitsandbytes", check(_copy_with(quantization_config={"quant_method": "bitsandbytes",
                                                                    "load_in_4bit": True})),
             r"vLLM's CPU build cannot run .* \(bitsandbytes\): vLLM 0\.32 has no bitsandbytes support"),
    BadInput("int8-weights", check(_copy_with(quantization_config=INT8_WEIGHTS)),
             r"\(compressed-tensors W8A16 per channel \(pack-quantized\)\): .*takes 4-bit weights only"),
    BadInput("head-size", check(lambda env: env.teacher_dir),
             r"vLLM's CPU build cannot run .*: its attention takes head sizes 32, 64.* and this model's is 8"),
    BadInput("lora-adapter", check(_adapter), r"is a LoRA adapter, not a model; .*merge the adapter into its base"),
    BadInput("gguf-file", check(_gguf), r"is a GGUF artifact; .*--runtime llama\.cpp"),
]
