"""Model I/O: device/dtype choice, safe loading, artifacts that plain transformers loads."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import build_model, build_tokenizer
from transformers import AutoModelForCausalLM

from slimforge import models
from slimforge.errors import ModelLoadError
from slimforge.models import (
    ModelRef,
    classify_source,
    count_parameters,
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


def test_tokenizer_mismatch(tokenizer):
    assert tokenizer_mismatch(tokenizer, tokenizer) is None
    other = build_tokenizer(vocab_size=300)
    assert "vocabulary sizes differ" in tokenizer_mismatch(tokenizer, other)
    shuffled = build_tokenizer(extra_text="zqzqzq xjxjxj " * 50)
    assert "different ids" in tokenizer_mismatch(tokenizer, shuffled)
