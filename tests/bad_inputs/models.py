"""Bad model folders and model references: one line, before any weights load where the files allow it.

Each case damages a copy of the tiny teacher and gives it to ``slimforge run`` as the teacher or to
``slimforge eval`` as a student: both go through the same checks and the same loader.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from bad_inputs.harness import BadInput, Env

FANCY_AUTO_MAP = {"AutoConfig": "configuration_fancy.FancyConfig",
                  "AutoModelForCausalLM": "modeling_fancy.FancyForCausalLM"}


class NotATensor:
    """Pickled into a checkpoint, which ``torch.load(weights_only=True)`` then refuses."""


def _copy(env: Env, name: str = "model") -> Path:
    return Path(shutil.copytree(env.teacher_dir, env.tmp / name))


def _without_config(env: Env) -> Path:
    folder = _copy(env)
    (folder / "config.json").unlink()
    return folder


def _damaged_weights(how: str):
    def build(env: Env) -> Path:
        folder = _copy(env)
        weights = folder / "model.safetensors"
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 3] if how == "truncated" else bytes(range(255, -1, -1)) * 100)
        return folder
    return build


def _config_edit(**changes):
    def build(env: Env) -> Path:
        folder = _copy(env)
        config = json.loads((folder / "config.json").read_text())
        config.update(changes)
        (folder / "config.json").write_text(json.dumps(config))
        return folder
    return build


def _pickle_of(payload: str):
    def build(env: Env) -> Path:
        import torch
        from safetensors.torch import load_file

        folder = _copy(env)
        state = load_file(folder / "model.safetensors")
        (folder / "model.safetensors").unlink()
        if payload == "object":
            torch.save({**state, "extra": NotATensor()}, folder / "pytorch_model.bin")
        else:
            (folder / "pytorch_model.bin").write_bytes(bytes(range(256)) * 32)
        return folder
    return build


def _garbled_record(env: Env) -> Path:
    folder = _copy(env)
    (folder / "slimforge.json").write_text('{"stage": "student", "fingerprint": ')  # cut off mid-write
    return folder


def as_teacher(make, *extra: str):
    """argv for ``slimforge run`` with the folder ``make`` builds as the teacher."""
    def build(env: Env) -> list[str]:
        argv = env.tiny_run(env.tmp / "run", *extra)
        return [a if not a.startswith("teacher.path=") else f"teacher.path={make(env)}" for a in argv]
    return build


def as_student(make):
    """argv for ``slimforge eval`` with the folder ``make`` builds as the student."""
    def build(env: Env) -> list[str]:
        return ["eval", "--teacher", str(env.teacher_dir), "--students", str(make(env)), "--tasks", "perplexity",
                "--data", str(env.corpus_dir), "--block-size", "32", "--max-blocks", "2", "--out", str(env.tmp / "ev")]
    return build


def nothing_ran(env: Env) -> None:
    assert not (env.tmp / "run" / "stages").exists() and not (env.tmp / "ev" / "report.json").exists()


NO_CONFIG = r"^slimforge: error: model folder \S+/model has no config\.json; give a complete Hugging Face model folder"
BROKEN = r"model\.safetensors: the safetensors weights are truncated or corrupt \(Error while deserializing header: "
GARBLED = (r"^slimforge: error: \S+/model/slimforge\.json is not a readable JSON object, so what made this model is "
           r"unknown; restore it from the run that wrote it, or delete it to use \S+/model as a plain model folder$")
REMOTE = r"needs its own model code \('fancy_llm' is not in transformers [\d.]+; config\.json names its classes in auto_map\)"

CASES = [
    BadInput("teacher-without-config", as_teacher(_without_config), NO_CONFIG, after=nothing_ran),
    BadInput("student-without-config", as_student(_without_config), NO_CONFIG, after=nothing_ran),
    BadInput("teacher-truncated-safetensors", as_teacher(_damaged_weights("truncated")), BROKEN, after=nothing_ran),
    BadInput("teacher-random-safetensors", as_teacher(_damaged_weights("random")), BROKEN + "header too large",
             after=nothing_ran),
    BadInput("student-truncated-safetensors", as_student(_damaged_weights("truncated")), BROKEN, after=nothing_ran),
    BadInput("student-random-safetensors", as_student(_damaged_weights("random")), BROKEN + "header too large",
             after=nothing_ran),
    BadInput("teacher-garbled-slimforge-json", as_teacher(_garbled_record), GARBLED, after=nothing_ran),
    BadInput("student-garbled-slimforge-json", as_student(_garbled_record), GARBLED, after=nothing_ran),
    BadInput("teacher-needs-remote-code", as_teacher(_config_edit(model_type="fancy_llm", auto_map=FANCY_AUTO_MAP)),
             REMOTE + r"; set teacher\.trust_remote_code=true only if you trust that code$", after=nothing_ran),
    BadInput("student-needs-remote-code", as_student(_config_edit(model_type="fancy_llm", auto_map=FANCY_AUTO_MAP)),
             REMOTE + r", which slimforge eval does not run; in a recipe, set trust_remote_code=true for it "
             r"\(teacher\.trust_remote_code=true for a teacher\) only if you trust that code$", after=nothing_ran),
    BadInput("teacher-type-unknown-to-transformers", as_teacher(_config_edit(model_type="fancy_llm")),
             r"is a 'fancy_llm' model, a type transformers [\d.]+ does not know; upgrade transformers",
             after=nothing_ran),
    BadInput("trusted-teacher-code-missing",
             as_teacher(_config_edit(model_type="fancy_llm", auto_map=FANCY_AUTO_MAP), "teacher.trust_remote_code=true"),
             r"could not read the model config of \S+/model: .*configuration_fancy\.py", after=nothing_ran),
    BadInput("pickle-with-objects", as_teacher(_pickle_of("object"), "teacher.allow_pickle=true"),
             r"/model: the pickle weights hold non-tensor objects \(such as bad_inputs\.models\.NotATensor\), so they "
             r"were not loaded: allow_pickle=true reads plain tensors only; convert the checkpoint to safetensors$"),
    BadInput("pickle-of-garbage", as_teacher(_pickle_of("garbage"), "teacher.allow_pickle=true"),
             r"/model: the pickle weights are not a checkpoint of plain tensors \(.+\), so they were not loaded"),
    BadInput("hub-id-offline", lambda env: env.tiny_run(env.tmp / "run", "teacher.path=nobody/no-such-model"),
             r"could not load a tokenizer from nobody/no-such-model: .*; if this machine is offline, give a local folder$",
             env={"HF_HUB_OFFLINE": "1"}),
]
