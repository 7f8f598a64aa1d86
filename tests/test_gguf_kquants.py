"""GGUF K-quants and i-quants written by llama.cpp's quantizer, with and without an importance matrix.

Tiny models: a Llama 256 wide (every row fits K-quants' 256-value super-blocks) and the usual one
32 wide (none does: every matrix falls back). The tests that run llama.cpp's tools skip, saying
why, where they are not built.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import ARCHS, build_model, corpus_text, tiny_config
from gguf import GGUFReader

from slimforge.config import FieldError
from slimforge.pipeline import config_hash
from slimforge.quantize.config import LLAMACPP_GGUF_TYPES, GgufConfig
from slimforge.quantize.gguf_export import plan_tensors, verify_against
from slimforge.quantize.gguf_llamacpp import (
    calibration_text,
    export_with_llamacpp,
    file_tensors,
    hf_form,
    intended_from_file,
    quantize_arguments,
)
from slimforge.runtimes import install

WINDOW = 64  # the importance matrix's window on the tiny models (context 256)


def needs_llamacpp():
    if install.find_llamacpp() is None:
        pytest.skip("llama.cpp is not built: slimforge runtime install llama.cpp")


def wide_model(tokenizer, seed: int = 0):
    """A 2-layer Llama whose every matrix row is 256 or 512 wide."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config("llama", len(tokenizer), layers=2)
    config.hidden_size, config.intermediate_size, config.head_dim = 256, 512, 64
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def calibration(tokenizer):
    """Importance-matrix text from the test corpus (the role of a run's training split)."""
    return corpus_text()[:12000]


def export(model, tokenizer, folder, calibration=None, **settings):
    """Write ``model`` as the gguf stage does for a llama.cpp type; returns the export and the config."""
    cfg = GgufConfig(**{"type": "Q4_K_M", "imatrix_samples": 4, "imatrix_seq_len": WINDOW, **settings})
    cfg.check()
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(folder)
    path = folder / f"model-{cfg.type}.gguf"
    return export_with_llamacpp(model, tokenizer, path, cfg, "tiny", calibration, WINDOW, folder / "work"), cfg


def blocks_of(tokenizer, n: int = 2) -> torch.Tensor:
    return torch.tensor(tokenizer(corpus_text())["input_ids"][-n * 64:]).reshape(n, 64)


# --- pure pieces (no llama.cpp) -----------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_hf_form_inverts_the_writers_transform(arch, model_dirs):
    """What verification loads into the model is what the writer was given, for every family."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dirs[arch])
    state = model.state_dict()
    changed = 0
    for planned in plan_tensors(model, "F32", "F32").tensors:
        if not planned.hf_name:
            continue
        back = hf_form(planned, planned.data.reshape(-1), model.config)
        torch.testing.assert_close(back, state[planned.hf_name].float(), rtol=1e-6, atol=1e-6)
        changed += not np.array_equal(planned.data, state[planned.hf_name].float().numpy())
    assert changed > 0 or arch in ("qwen2", "qwen3", "phi3")  # the transform did something to undo


def test_config_offers_llamacpp_types_and_refuses_what_they_do_not_take():
    assert GgufConfig(type="IQ4_NL").uses_imatrix() and not GgufConfig(type="Q4_0").uses_imatrix()
    assert not GgufConfig(type="Q4_K_M", imatrix=False).uses_imatrix()
    assert GgufConfig(type="Q4_K_M").resolved_output_type() is None  # llama.cpp's own choice
    assert GgufConfig(type="Q4_0").resolved_output_type() == "Q8_0"
    refused = [
        ({"type": "Q4_0", "imatrix": True}, r"imatrix=True is invalid: only llama\.cpp's types .* not type=Q4_0"),
        ({"type": "Q8_0", "tensor_types": {"ffn_down": "Q6_K"}}, r"tensor_types=.*pick a llama\.cpp type"),
        ({"type": "Q4_K_M", "tensor_types": {"ffn_down": "Q7_K"}}, r"must be one of F32, F16"),
        ({"type": "Q4_K_M", "tensor_types": {"attn_(q": "Q8_0"}}, r"is not a regular expression"),
        ({"type": "Q4_K_M", "tensor_types": {"attn_q=": "Q8_0"}}, r"without '='"),
        ({"type": "Q4_K_M", "output_type": "Q7_K"}, r"output_type='Q7_K' is invalid: must be one of"),
        ({"type": "Q4_0", "output_type": "Q6_K"}, r"output_type='Q6_K' is invalid: must be one of F16, Q8_0, Q5_0, Q4_0$"),
        ({"type": "Q4_K_L"}, r"type='Q4_K_L' is invalid: must be one of .*Q4_K_M"),
        ({"type": "Q4_K_M", "imatrix_samples": 0}, r"imatrix_samples=0"),
        ({"type": "Q4_K_M", "imatrix_seq_len": 8}, r"imatrix_seq_len=8"),
    ]
    for settings, message in refused:
        with pytest.raises(FieldError, match=message):
            GgufConfig(**settings).check()


def test_an_output_type_whose_blocks_do_not_fit_the_embedding_is_refused_before_loading(tokenizer):
    from slimforge.stage import TeacherInfo

    narrow = TeacherInfo(tiny_config("llama", len(tokenizer)), tokenizer)  # hidden 32
    with pytest.raises(FieldError, match=r"output_type='Q6_K' is invalid: packs 256-value blocks, which do not divide the "
                                         r"embedding width \(32\); pick one of F32, F16, BF16, Q8_0, Q5_1"):
        GgufConfig(type="Q4_K_M", output_type="Q6_K").check_input(narrow)
    GgufConfig(type="Q4_K_M", output_type="IQ4_NL").check_input(narrow)


def test_new_settings_join_the_config_hash_only_when_set():
    """Finished GGUF stages made before these settings existed keep their hash (and are reused)."""
    base = config_hash(GgufConfig())
    assert config_hash(GgufConfig(imatrix=None, imatrix_samples=128, tensor_types={})) == base
    assert len({base, config_hash(GgufConfig(imatrix=False)), config_hash(GgufConfig(imatrix_samples=64)),
                config_hash(GgufConfig(tensor_types={"ffn_down": "Q6_K"}))}) == 4


def test_quantize_arguments_set_the_embedding_both_ways_and_keep_the_override_order():
    cfg = GgufConfig(type="IQ4_NL", output_type="Q5_0", tensor_types={"ffn_down": "Q6_K", "attn_v": "Q8_0"})
    assert quantize_arguments(cfg) == ["--output-tensor-type", "Q5_0", "--token-embedding-type", "Q5_0",
                                       "--tensor-type", "ffn_down=Q6_K", "--tensor-type", "attn_v=Q8_0"]
    assert quantize_arguments(GgufConfig(type="Q4_K_M")) == []


def test_calibration_text_comes_from_the_training_split_with_a_spare_window(tokenizer, corpus_dir):
    from slimforge.config import DataConfig
    from slimforge.data import build_data, calibration_samples
    from slimforge.errors import DataError

    bundle = build_data(DataConfig(path=str(corpus_dir), block_size=32), tokenizer)
    text = calibration_text(bundle, tokenizer, 3, 40, seed=0)
    windows = calibration_samples(bundle, 4, 40, 0)
    assert text == "\n\n".join(tokenizer.decode(w, skip_special_tokens=True) for w in windows)
    held = tokenizer.decode(bundle.heldout[0]["input_ids"], skip_special_tokens=True)
    assert held not in text
    with pytest.raises(DataError, match=r"needs windows of 100000 tokens of training text.*imatrix=false"):
        calibration_text(bundle, tokenizer, 3, 100_000, seed=0)


# --- through llama.cpp ----------------------------------------------------------------------------


@pytest.mark.runtime
def test_k_quants_apply_where_rows_fit_super_blocks(tokenizer, tmp_path):
    needs_llamacpp()
    model = wide_model(tokenizer)
    result, _ = export(model, tokenizer, tmp_path)
    types = result.types
    assert result.fallbacks == 0
    blocks = {n: t for n, t in types.items() if n.startswith("blk.") and not n.endswith("norm.weight")}
    assert len(blocks) == 14 and set(blocks.values()) == {"Q4_K", "Q6_K"}, blocks
    # Q4_K_M: Q4_K, with the V and FFN-down matrices of some layers and the output matrix at Q6_K.
    assert types["blk.1.ffn_down.weight"] == types["blk.1.attn_v.weight"] == "Q6_K"
    assert types["output.weight"] == result.output_type == "Q6_K" and types["token_embd.weight"] == "Q4_K"
    assert types["blk.0.attn_norm.weight"] == "F32"
    assert file_tensors(result.path)["blk.0.attn_q.weight"].n_bytes == 256 * 256 * 144 // 256


@pytest.mark.runtime
def test_rows_that_do_not_fit_fall_back_and_the_count_is_reported(tokenizer, tmp_path):
    needs_llamacpp()
    model = build_model("llama", tokenizer, layers=2)  # rows 32 and 64 wide
    result, _ = export(model, tokenizer, tmp_path)
    matrices = [n for n in result.types if not n.endswith("norm.weight")]
    # Every matrix but the output one, which llama.cpp's rule gives Q8_0 outright at such widths.
    assert len(matrices) == 2 * 7 + 2 and result.fallbacks == len(matrices) - 1
    assert result.output_type == result.types["output.weight"] == "Q8_0"
    assert not any(t.endswith("_K") for t in result.types.values()), result.types
    assert result.types["blk.0.attn_q.weight"] == "Q5_0"  # llama.cpp's fallback for Q4_K


@pytest.mark.runtime
@pytest.mark.parametrize("qtype", ["Q4_K_M", "IQ4_NL"])
def test_file_reloads_as_the_weights_llamacpp_wrote_and_llamacpp_runs_it(qtype, tokenizer, calibration, tmp_path):
    from slimforge.runtimes import llamacpp

    needs_llamacpp()
    model = wide_model(tokenizer)
    result, _ = export(model, tokenizer, tmp_path, calibration, type=qtype)
    blocks = blocks_of(tokenizer)
    checked = verify_against(tmp_path, result.path.name, model, tokenizer, intended_from_file(model, result.path),
                             result.types.values(), blocks)
    assert checked["reader"] == "transformers" and checked["tokenizer_roundtrip"]
    assert checked["max_abs_diff_to_expected"] < 1e-4
    assert 0 < checked["kl_to_source"] < 0.01 and checked["top1_agreement_to_source"] > 0.5  # random weights: flat
    expected = {"Q4_K_M": "Q4_K", "IQ4_NL": "IQ4_NL"}[qtype]
    assert result.types["blk.0.attn_q.weight"] == expected
    assert result.imatrix == {"windows": 4, "seq_len": WINDOW, "seconds": result.imatrix["seconds"]}
    (tmp_path / "text.txt").write_text(corpus_text()[:6000])
    assert llamacpp.perplexity(result.path, tmp_path / "text.txt", n_ctx=64, chunks=2).ppl > 1
    # llama-quantize records where the matrix and its text came from: names, not temporary paths.
    fields = GGUFReader(result.path).fields
    recorded = [bytes(fields[k].parts[-1]).decode() for k in ("quantize.imatrix.file", "quantize.imatrix.dataset")]
    assert recorded and not any("/" in r for r in recorded), recorded


@pytest.mark.runtime
def test_verification_fails_for_a_file_that_holds_other_weights(tokenizer, tmp_path):
    """The check is not vacuous: another model's weights in the file fail it."""
    needs_llamacpp()
    model = wide_model(tokenizer)
    result, _ = export(model, tokenizer, tmp_path)
    intended = intended_from_file(model, result.path)
    with torch.no_grad():
        intended.model.layers[1].mlp.down_proj.weight.mul_(1.5)
    with pytest.raises(RuntimeError, match="GGUF verification failed"):
        verify_against(tmp_path, result.path.name, model, tokenizer, intended, result.types.values(),
                       blocks_of(tokenizer))


@pytest.mark.runtime
def test_the_importance_matrix_changes_what_is_stored(tokenizer, calibration, tmp_path):
    needs_llamacpp()
    model = wide_model(tokenizer)
    plain, _ = export(model, tokenizer, tmp_path / "plain")
    weighted, _ = export(model, tokenizer, tmp_path / "imatrix", calibration)
    assert plain.types == weighted.types and plain.imatrix is None
    from gguf import GGUFReader

    from slimforge.quantize.gguf_llamacpp import dequantized

    a, b = ({t.name: dequantized(t) for t in GGUFReader(f.path).tensors} for f in (plain, weighted))
    in_blocks = [n for n, t in plain.types.items() if n.startswith("blk.") and t not in ("F32", "F16")]
    assert len(in_blocks) == 14 and all(not np.array_equal(a[n], b[n]) for n in in_blocks)
    # llama-imatrix records the inputs of the blocks' matrices only: the embedding is a lookup, and
    # the output matrix is left out by default.
    assert all(np.array_equal(a[n], b[n]) for n in a if not n.startswith("blk.") or n.endswith("norm.weight"))


@pytest.mark.runtime
def test_the_stage_writes_records_and_verifies_a_k_quant(teacher_dir, corpus_dir, tmp_path):
    """``slimforge run`` with a llama.cpp type: the importance matrix from the training split, the
    per-type tensor counts and the fallbacks in slimforge.json, the verification, the card."""
    from slimforge import cli

    needs_llamacpp()
    from bad_inputs.harness import REPO

    recipe = str(REPO / "tests" / "assets" / "recipes" / "tiny_compress.yaml")
    code = cli.main(["run", recipe, f"teacher.path={teacher_dir}", f"data.path={corpus_dir}",
                     f"run_dir={tmp_path / 'run'}", "pipeline=[gguf]", "stages.gguf.type=IQ4_NL",
                     "stages.gguf.imatrix_samples=4", f"stages.gguf.imatrix_seq_len={WINDOW}"])
    assert code == 0
    folder = tmp_path / "run" / "stages" / "gguf"
    meta = json.loads((folder / "slimforge.json").read_text())
    quant = meta["quantization"]
    assert meta["gguf_file"] == "model-IQ4_NL.gguf" and (folder / "model-IQ4_NL.gguf").is_file()
    assert quant["writer"] == "llama-quantize" and quant["imatrix"]["windows"] == 4
    # The tiny teacher: 4 layers of 7 matrices and the (untied) embedding at IQ4_NL; the output
    # matrix would take Q6_K, whose 256-value blocks do not fit its 32-wide rows: Q8_0 instead.
    assert quant["tensor_types"] == {"IQ4_NL": 29, "Q8_0": 1, "F32": 9} and quant["fallback_tensors"] == 1
    assert quant["output_type"] == "Q8_0"
    assert quant["verify"]["max_abs_diff_to_expected"] < 1e-4
    assert 4.4 < meta["bits_per_weight"] < 4.6  # IQ4_NL: 4.5 bits per weight
    card = (folder / "README.md").read_text()
    assert "importance matrix from 4 windows of 64 tokens" in card


@pytest.mark.runtime
def test_llamacpp_quantize_knows_every_type_the_schema_offers():
    import subprocess

    from slimforge.quantize.config import LLAMACPP_TENSOR_TYPES

    needs_llamacpp()
    listed = subprocess.run([str(install.require_llamacpp() / "llama-quantize"), "--help"], capture_output=True,
                            text=True).stdout + ""
    offered = {line.split(" or ")[1].split(":")[0].strip() for line in listed.splitlines() if " or " in line}
    assert set(LLAMACPP_GGUF_TYPES) <= offered, set(LLAMACPP_GGUF_TYPES) - offered
    import gguf

    assert all(t in gguf.GGMLQuantizationType.__members__ for t in LLAMACPP_TENSOR_TYPES)
