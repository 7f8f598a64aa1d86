"""GGUF export round trips: Llama, Mistral, Qwen2 at every type the schema accepts, reloaded with transformers' GGUF loader
(the other families: tests/test_gguf_arch.py)."""

from __future__ import annotations

import gguf
import pytest
import torch
from conftest import CHAT_TEMPLATE, build_model, corpus_text
from gguf import GGUFReader
from transformers import AutoTokenizer

from slimforge.errors import ConfigError
from slimforge.quantize.config import GGUF_TYPES, GgufConfig
from slimforge.quantize.gguf_export import detect_pre_tokenizer, file_type, verify_gguf, write_gguf

TYPES = tuple(GGUF_TYPES)  # the schema's choices: a type added there is exported and verified here


def bits_per_weight(qtype: str) -> float:
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]
    return 8 * size / block


@pytest.fixture(scope="module")
def blocks(tokenizer):
    return torch.tensor(tokenizer(corpus_text())["input_ids"][:96]).reshape(3, 32)


def export(model, tokenizer, folder, qtype, output=None):
    folder.mkdir(parents=True, exist_ok=True)
    name = f"model-{qtype}.gguf"
    return name, write_gguf(model, tokenizer, folder / name, qtype, output or qtype, f"slimforge-{model.config.model_type}")


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_each_type_reloads_as_the_weights_it_should_hold(arch, tokenizer, blocks, tmp_path):
    model = build_model(arch, tokenizer, layers=2)
    drift = {}
    for qtype in TYPES:
        name, result = export(model, tokenizer, tmp_path / qtype, qtype)
        checked = verify_gguf(tmp_path / qtype, name, model, tokenizer, result, blocks)
        assert checked["max_abs_diff_to_expected"] < 1e-4, (arch, qtype)
        assert checked["tokenizer_roundtrip"], (arch, qtype)
        assert GGUFReader(tmp_path / qtype / name).fields["general.file_type"].contents() == file_type(qtype)
        drift[qtype] = checked["kl_to_source"]
    # More bits, less drift from the source model.
    by_bits = sorted(TYPES, key=bits_per_weight, reverse=True)
    assert [drift[t] for t in by_bits] == sorted(drift.values()), drift
    assert drift["F16"] < 1e-6 and max(drift.values()) < 1e-2


def test_every_type_has_a_default_output_type_the_export_writes():
    """Below 8 bits the embedding / output matrix stays at Q8_0 by default, as llama.cpp keeps it higher."""
    for qtype in TYPES:
        output = GgufConfig(type=qtype).resolved_output_type()
        assert output in TYPES and bits_per_weight(output) >= max(bits_per_weight(qtype), 8.5), qtype
    assert GgufConfig(type="Q5_0").resolved_output_type() == "Q8_0"
    assert GgufConfig(type="Q4_0", output_type="Q4_0").resolved_output_type() == "Q4_0"


def test_a_wrong_row_order_would_be_caught(tokenizer, blocks, tmp_path, monkeypatch):
    """Verification is not vacuous: exporting Q/K without llama.cpp's reorder fails it."""
    from slimforge.quantize import gguf_export

    model = build_model("llama", tokenizer, layers=2)
    monkeypatch.setattr(gguf_export, "rope_interleave", lambda weight, n_head: weight)
    name, result = export(model, tokenizer, tmp_path, "F16")
    with pytest.raises(RuntimeError, match="GGUF verification failed"):
        verify_gguf(tmp_path, name, model, tokenizer, result, blocks)


def test_file_holds_tokenizer_chat_template_and_llama_cpp_types(tokenizer, tmp_path):
    model = build_model("llama", tokenizer, layers=2)
    model.config.tie_word_embeddings = True
    model.tie_weights()
    name, result = export(model, tokenizer, tmp_path, "Q4_0", output="Q8_0")
    reader = GGUFReader(tmp_path / name)
    fields = {key: field.contents() for key, field in reader.fields.items()}
    assert fields["general.architecture"] == "llama"
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    assert fields["tokenizer.chat_template"] == CHAT_TEMPLATE
    assert len(fields["tokenizer.ggml.tokens"]) == len(tokenizer) == fields["llama.vocab_size"]
    assert fields["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
    specials = [i for i, t in enumerate(fields["tokenizer.ggml.token_type"]) if t == 3]
    assert specials == sorted(tokenizer.all_special_ids + [tokenizer.convert_tokens_to_ids("<|user|>"),
                                                            tokenizer.convert_tokens_to_ids("<|assistant|>"),
                                                            tokenizer.convert_tokens_to_ids("<|system|>")])
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert "output.weight" not in types  # tied: the runtime reuses token_embd
    assert types["token_embd.weight"] == "Q8_0" and types["blk.0.attn_q.weight"] == "Q4_0"
    assert types["blk.0.attn_norm.weight"] == "F32"
    reloaded = AutoTokenizer.from_pretrained(tmp_path, gguf_file=name)
    messages = [{"role": "user", "content": "Who is Lear?"}]
    assert reloaded.apply_chat_template(messages, tokenize=False) == tokenizer.apply_chat_template(messages, tokenize=False)


def test_rows_that_do_not_fill_a_block_fall_back_to_f16(tokenizer, tmp_path):
    from conftest import tiny_config
    from transformers import AutoModelForCausalLM

    config = tiny_config("llama", len(tokenizer), layers=1)
    config.intermediate_size = 48  # down_proj rows of 48 do not split into 32-value blocks
    model = AutoModelForCausalLM.from_config(config)
    _, result = export(model, tokenizer, tmp_path, "Q8_0")
    assert result.fallback_f16 == ["blk.0.ffn_down.weight"]
    assert result.types["blk.0.ffn_down.weight"] == "F16" and result.types["blk.0.ffn_up.weight"] == "Q8_0"


def test_unsupported_architecture_and_tokenizer_are_refused_before_writing(tokenizer, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    gpt2 = AutoModelForCausalLM.from_config(AutoConfig.for_model("gpt2", vocab_size=len(tokenizer), n_embd=32,
                                                                 n_layer=1, n_head=4, n_positions=64))
    with pytest.raises(ConfigError, match="does not support model type 'gpt2'; supported: llama, mistral, qwen2, phi3"):
        write_gguf(gpt2, tokenizer, tmp_path / "x.gguf", "Q8_0", "Q8_0", "gpt2")
    assert not (tmp_path / "x.gguf").exists()
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    wordlevel = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>")))
    with pytest.raises(ConfigError, match="byte-level BPE"):
        detect_pre_tokenizer(wordlevel)


def test_a_gguf_named_pre_tokenizer_is_restored_on_import(tokenizer, tmp_path):
    """transformers rebuilds ``smollm`` (digits split one by one) as GPT-2 splitting; loading restores it."""
    import copy

    from slimforge.models import load_tokenizer
    from slimforge.pretokenize import pre_tokenizer_candidates

    smollm = copy.deepcopy(tokenizer)
    smollm.backend_tokenizer.pre_tokenizer = pre_tokenizer_candidates()["smollm"]
    assert detect_pre_tokenizer(smollm) == "smollm" and detect_pre_tokenizer(tokenizer) == "gpt-2"
    model = build_model("llama", tokenizer, layers=1)
    name, _ = export(model, smollm, tmp_path, "F16")
    assert GGUFReader(tmp_path / name).fields["tokenizer.ggml.pre"].contents() == "smollm"
    rebuilt = AutoTokenizer.from_pretrained(tmp_path, gguf_file=name)
    assert detect_pre_tokenizer(rebuilt) == "gpt-2"  # what transformers alone gives: the loss being fixed
    loaded = load_tokenizer(str(tmp_path / name))
    assert detect_pre_tokenizer(loaded) == "smollm"
    def split(tok):
        return [piece for piece, _ in tok.backend_tokenizer.pre_tokenizer.pre_tokenize_str("in 1623, 36 plays")]

    assert split(loaded) == split(smollm) == ["in", "Ġ", "1", "6", "2", "3", ",", "Ġ", "3", "6", "Ġplays"]
    assert split(rebuilt) == ["in", "Ġ1623", ",", "Ġ36", "Ġplays"]
