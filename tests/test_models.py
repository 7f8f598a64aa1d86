"""Model I/O: device/dtype choice, safe loading, artifacts that plain transformers loads."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import build_model, build_tokenizer
from transformers import AutoModelForCausalLM

from slimforge import models
from slimforge.arch import count_parameters
from slimforge.errors import ModelLoadError
from slimforge.models import (
    ModelRef,
    classify_source,
    load_model,
    resolve_dtype,
    save_model,
    tokenizer_mismatch,
)


def test_dtype_helper_prefers_bf16_only_where_it_is_fast(monkeypatch):
    assert resolve_dtype("float32", "cpu") == torch.float32
    assert resolve_dtype("bfloat16", "cpu") == torch.bfloat16
    monkeypatch.setattr(models, "cpu_supports_fast_bf16", lambda: False)
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    monkeypatch.setattr(models, "cpu_supports_fast_bf16", lambda: True)
    assert resolve_dtype("auto", torch.device("cpu")) == torch.bfloat16


def test_device_helper(monkeypatch):
    assert models.resolve_device("cpu").type == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert models.resolve_device("auto").type == "cpu"
    with pytest.raises(ModelLoadError, match="device=cuda"):
        models.resolve_device("cuda")


def test_classify_source(tmp_path, teacher_dir):
    assert classify_source(str(teacher_dir)) == "folder"
    assert classify_source("HuggingFaceTB/SmolLM2-135M-Instruct") == "hub"
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert classify_source(str(gguf)) == "gguf"
    for missing in ("/no/such/model", "./nope", "a/b/c", "x.gguf"):
        with pytest.raises(ModelLoadError, match="does not exist"):
            classify_source(missing)
    with pytest.raises(ModelLoadError, match="not a .gguf"):
        (tmp_path / "weights.txt").write_text("x")
        classify_source(str(tmp_path / "weights.txt"))


def test_save_model_writes_a_plain_hf_folder(tmp_path, tokenizer):
    model = build_model("qwen2", tokenizer)
    dest = save_model(model, tokenizer, tmp_path / "out", {"stage": "unit", "fingerprint": "abc"}, recipe_yaml="name: x\n")
    names = {p.name for p in dest.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
            "slimforge.json", "recipe.yaml"} <= names
    assert not any(n.endswith(".bin") for n in names)
    meta = json.loads((dest / "slimforge.json").read_text())
    assert meta["stage"] == "unit" and meta["num_parameters"] == count_parameters(model)
    assert meta["model_type"] == "qwen2"
    reloaded = AutoModelForCausalLM.from_pretrained(dest)
    ids = torch.tensor([[1, 5, 9, 33]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits)
    ref = ModelRef.from_artifact(dest, "unit")
    assert ref.fingerprint == "abc" and ref.meta["stage"] == "unit"


def test_count_parameters_counts_tied_weights_once(tokenizer):
    model = build_model("gemma", tokenizer)  # ties lm_head to the embedding
    assert model.config.tie_word_embeddings
    assert count_parameters(model) == sum(p.numel() for p in model.parameters())
    assert count_parameters(model) < sum(p.numel() for p in model.state_dict().values())


def test_load_model_folder_on_cpu(teacher_dir):
    model, tok = load_model(str(teacher_dir), device="cpu", dtype=torch.float32)
    assert not model.training
    assert model.dtype == torch.float32
    assert tok.pad_token is not None


def test_pickle_weights_refused_unless_allowed(tmp_path, tokenizer):
    model = build_model("llama", tokenizer)
    folder = tmp_path / "pickled"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "model.safetensors").unlink()
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match=r"only pickle weights \(pytorch_model\.bin\).*allow_pickle=true"):
        load_model(str(folder), dtype=torch.float32)
    loaded, _ = load_model(str(folder), dtype=torch.float32, allow_pickle=True)
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


def test_remote_code_is_not_trusted_by_default(tmp_path, tokenizer, monkeypatch):
    """A checkpoint that asks for custom code is not run unless the recipe allows it."""
    import transformers

    seen = {}
    real = transformers.AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    folder = tmp_path / "m"
    build_model("llama", tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    load_model(str(folder), dtype=torch.float32)
    assert seen["trust_remote_code"] is False
    assert seen["use_safetensors"] is True


def test_offline_hub_id_gives_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match=r"could not load a causal LM from nobody/no-such-model.*offline"):
        load_model("nobody/no-such-model")
    with pytest.raises(ModelLoadError, match=r"could not load a tokenizer from nobody/no-such-model.*offline"):
        models.load_tokenizer("nobody/no-such-model")
    with pytest.raises(ModelLoadError, match=r"could not read the model config of nobody/no-such-model.*offline"):
        models.load_config("nobody/no-such-model")


# --- a broken or untrusted folder: one line, before anything loads -------------------------


def copy_of(folder, dest):
    import shutil

    return shutil.copytree(folder, dest)


def edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def test_a_folder_without_config_json_is_refused(tmp_path, teacher_dir):
    folder = copy_of(teacher_dir, tmp_path / "m")
    (folder / "config.json").unlink()
    with pytest.raises(ModelLoadError, match=rf"^model folder {folder} has no config\.json; give a complete"):
        ModelRef.from_source(str(folder), "teacher")
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match=r"config\.json is not valid JSON"):
        ModelRef.from_source(str(folder), "teacher")
    (folder / "config.json").unlink()
    (folder / "tiny.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelLoadError, match=rf"no config\.json but holds tiny\.gguf; give that file \({folder / 'tiny.gguf'}\)"):
        ModelRef.from_source(str(folder), "teacher")
    adapter = tmp_path / "adapter"  # a LoRA adapter folder has adapter_config.json instead, naming its base
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match=r"adapter_config\.json names no base model"):
        models.check_model_folder(adapter)
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "../gone"}))
    with pytest.raises(ModelLoadError, match=r"the LoRA adapter .* names its base model '\.\./gone', which is not there"):
        models.check_model_folder(adapter)
    relative = os.path.relpath(teacher_dir, adapter)  # relative to the adapter folder, as slimforge writes it
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": relative}))
    models.check_model_folder(adapter)


@pytest.mark.parametrize("damage", ["truncate", "random"])
def test_broken_safetensors_fail_in_one_line_early_and_at_load(tmp_path, teacher_dir, damage):
    folder = copy_of(teacher_dir, tmp_path / "m")
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncate" else bytes(range(256)) * 64)
    expected = r"the safetensors weights are truncated or corrupt \(Error while deserializing header"
    with pytest.raises(ModelLoadError, match=rf"^{weights}: {expected}"):
        ModelRef.from_source(str(folder), "teacher")
    with pytest.raises(ModelLoadError, match=rf"^{folder}: {expected}"):  # the loader itself, without the check
        load_model(str(folder), dtype=torch.float32)


def test_a_model_type_transformers_lacks_needs_trusted_code(tmp_path, teacher_dir):
    folder = copy_of(teacher_dir, tmp_path / "m")
    edit_config(folder, model_type="fancy_llm")
    with pytest.raises(ModelLoadError, match=r"'fancy_llm' model, a type transformers [\d.]+ does not know; upgrade"):
        ModelRef.from_source(str(folder), "teacher")
    edit_config(folder, auto_map={"AutoConfig": "configuration_fancy.FancyConfig",
                                  "AutoModelForCausalLM": "modeling_fancy.FancyForCausalLM"})
    with pytest.raises(ModelLoadError, match=r"needs its own model code \('fancy_llm' is not in transformers .*auto_map\); "
                                             r"set teacher\.trust_remote_code=true only if you trust that code$"):
        ModelRef.from_source(str(folder), "teacher")
    with pytest.raises(ModelLoadError, match=r"set trust_remote_code=true only if you trust"):
        ModelRef.from_source(str(folder), "student")
    with pytest.raises(ModelLoadError, match=r"which slimforge eval does not run"):
        ModelRef.from_source(str(folder), "teacher", code_setting=None)
    ref = ModelRef.from_source(str(folder), "teacher", trust_remote_code=True)  # trusted: checked no further
    with pytest.raises(ModelLoadError, match=r"could not read the model config of .*configuration_fancy\.py"):
        ref.load_config()  # ... until the code it names is missing


def test_auto_map_beside_a_known_model_type_loads_the_library_class(tmp_path, teacher_dir):
    """Phi-3 and others kept ``auto_map`` after joining transformers: nothing of theirs runs, and they load."""
    folder = copy_of(teacher_dir, tmp_path / "m")
    edit_config(folder, auto_map={"AutoModelForCausalLM": "modeling_x.XForCausalLM"})
    model, _ = ModelRef.from_source(str(folder), "teacher").load(dtype=torch.float32)
    assert type(model).__name__ == "LlamaForCausalLM"


class NotATensor:
    """Pickled into a checkpoint: ``torch.load(weights_only=True)`` refuses it."""


@pytest.mark.parametrize("payload", ["object", "garbage"])
def test_a_pickle_weights_only_refuses_fails_in_one_line(tmp_path, teacher_dir, payload):
    from safetensors.torch import load_file

    folder = copy_of(teacher_dir, tmp_path / "m")
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    if payload == "object":
        torch.save({**state, "extra": NotATensor()}, folder / "pytorch_model.bin")
        expected = (r"the pickle weights hold non-tensor objects \(such as [\w.]*NotATensor\), so they were not "
                    r"loaded: allow_pickle=true reads plain tensors only; convert the checkpoint to safetensors$")
    else:
        (folder / "pytorch_model.bin").write_bytes(bytes(range(256)) * 16)
        expected = r"the pickle weights are not a checkpoint of plain tensors \(.+\), so they were not loaded"
    with pytest.raises(ModelLoadError, match=rf"^{folder}: {expected}"):
        load_model(str(folder), dtype=torch.float32, allow_pickle=True)


def test_tokenizer_mismatch(tokenizer):
    import copy

    assert tokenizer_mismatch(tokenizer, tokenizer) is None
    other = build_tokenizer(vocab_size=300)
    assert "vocabulary sizes differ" in tokenizer_mismatch(tokenizer, other)
    shuffled = build_tokenizer(extra_text="zqzqzq xjxjxj " * 50)
    assert "teacher tokens are missing or have other ids" in tokenizer_mismatch(tokenizer, shuffled)
    # Added special tokens beyond the teacher's vocabulary change no teacher id (a GGUF rebuild adds one).
    extended = copy.deepcopy(tokenizer)
    extended.add_special_tokens({"additional_special_tokens": ["<|extra|>"]})
    assert tokenizer_mismatch(tokenizer, extended) is None
    size = len(extended.get_vocab())
    assert tokenizer_mismatch(extended, tokenizer) == (f"vocabulary sizes differ ({size} vs {size - 1}); "
                                                       f"1 of {size} teacher tokens are missing or have other ids")
