"""Both kinds of CPU: with native bf16 (AVX512-BF16/AMX) and without.

The two differ in what ``dtype: auto`` picks and in bitsandbytes' 4-bit path (it repacks weights
for an AVX512-BF16 kernel). Each test forces the detection, so every machine checks both kinds.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from bad_inputs.harness import TINY
from safetensors import safe_open
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from slimforge import cli, models
from slimforge.errors import ConfigError
from slimforge.models import CPU_BF16_ENV, load_model, resolve_dtype
from slimforge.quantize.bnb_cpu import fits_packed_cpu_layout, keep_4bit_layers_off_cpu_packing

PROMPT = [5, 17, 42, 99, 7, 63, 28, 11]
NF4 = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": torch.float32}


@pytest.fixture()
def packing_cpu(monkeypatch):
    """Linear4bit layers built from now on take bitsandbytes' packed path, as on an AVX512-BF16 CPU.

    Only the per-layer decision is forced: on a CPU without the instruction the packed kernel is
    not there (bitsandbytes then runs its plain kernel on the packed layout: wrong numbers, no
    error), so a test may only *run* layers that the fix keeps off the packed path.
    """
    import bitsandbytes.nn.modules as bnb_modules

    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: True)


@pytest.fixture(scope="module")
def misfit_teacher(tokenizer, tmp_path_factory):
    """A tiny Llama none of whose quantized widths the packed kernel can tile (hidden 48, like 432)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    folder = tmp_path_factory.mktemp("misfit-teacher")
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def packing_flags(model) -> dict[str, bool]:
    return {name: m.support_avx512bf16_for_cpu for name, m in model.named_modules()
            if hasattr(m, "support_avx512bf16_for_cpu")}


# --- dtype: auto ---------------------------------------------------------------------------


@pytest.mark.parametrize("forced,expected", [("1", torch.bfloat16), ("0", torch.float32)])
def test_the_environment_forces_the_cpu_kind(monkeypatch, forced, expected):
    monkeypatch.setenv(CPU_BF16_ENV, forced)
    assert models.cpu_supports_fast_bf16() is (forced == "1")
    assert resolve_dtype("auto", "cpu") == expected
    assert resolve_dtype("float32", "cpu") == torch.float32  # an explicit dtype is never overridden


def test_without_the_variable_the_cpu_flags_decide(monkeypatch):
    monkeypatch.delenv(CPU_BF16_ENV, raising=False)
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            flags = set(fh.read().split())
    except OSError:  # not Linux: no flags to read, so no native bf16 is assumed
        flags = set()
    assert models.cpu_supports_fast_bf16() is bool({"avx512_bf16", "amx_bf16"} & flags)


def test_a_value_other_than_1_or_0_is_refused(monkeypatch):
    monkeypatch.setenv(CPU_BF16_ENV, "yes")
    with pytest.raises(ConfigError, match=r"SLIMFORGE_CPU_BF16='yes' is not understood; set it to 1"):
        models.cpu_supports_fast_bf16()


@pytest.mark.parametrize("forced,stored", [("1", "BF16"), ("0", "F32")])
def test_a_recipe_with_nf4_runs_end_to_end_on_both_kinds(misfit_teacher, corpus_dir, tmp_path, monkeypatch,
                                                          packing_cpu, forced, stored):
    """The issue's machine (auto -> bf16, 4-bit layers repacked) and the other kind, with dtype: auto."""
    monkeypatch.setenv(CPU_BF16_ENV, forced)
    run_dir = tmp_path / "run"
    args = ["run", TINY, f"teacher.path={misfit_teacher}", f"data.path={corpus_dir}", "stages.student.num_layers=1",
            "+quantize@stages.q=bnb_nf4", "pipeline=[student,q]", f"run_dir={run_dir}"]
    assert cli.main(args) == 0
    with safe_open(str(run_dir / "stages" / "student" / "model.safetensors"), "pt") as fh:
        assert {fh.get_slice(k).get_dtype() for k in set(fh.keys())} == {stored}
    report = json.loads((run_dir / "report.json").read_text())
    perplexities = [m["tasks"]["perplexity"]["perplexity"] for m in report["models"].values()]
    assert len(perplexities) == 3 and all(math.isfinite(p) for p in perplexities)


# --- bitsandbytes 4-bit: the packed CPU path -----------------------------------------------


@pytest.mark.parametrize("in_features,out_features,blocksize", [
    (64, 64, 64), (128, 32, 64), (256, 96, 128), (576, 576, 64),            # fit
    (432, 576, 64), (576, 432, 64), (48, 64, 64), (64, 48, 64), (32, 64, 64), (64, 64, 128),  # do not
])
def test_the_fit_rule_is_exactly_what_bitsandbytes_can_repack(in_features, out_features, blocksize):
    """The rule against bitsandbytes' own repacking, so a change in bitsandbytes shows up here."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu, quantize_4bit

    weight = torch.randn(out_features, in_features)
    packed, state = quantize_4bit(weight, blocksize=blocksize, quant_type="nf4")
    try:
        _convert_weight_packed_for_cpu(packed, state)
        repacked = True
    except (RuntimeError, AssertionError):  # '[576, 6]' is invalid / N must be divisible by block_n
        repacked = False
    assert fits_packed_cpu_layout(in_features, out_features, blocksize) is repacked


def test_without_the_fix_a_misfit_width_crashes_in_eval(misfit_teacher, packing_cpu):
    """The issue's crash, reproduced on any CPU: plain transformers loading, eval forward pass."""
    model = AutoModelForCausalLM.from_pretrained(misfit_teacher, quantization_config=BitsAndBytesConfig(**NF4)).eval()
    assert all(packing_flags(model).values())
    with torch.no_grad(), pytest.raises((RuntimeError, AssertionError)):
        model(input_ids=torch.tensor([PROMPT]))


def test_loaded_4bit_models_of_a_misfit_width_evaluate_and_generate(misfit_teacher, tmp_path, packing_cpu):
    """Through the one loader (quantize stage and evaluation alike): same numbers as the plain path."""
    folder = tmp_path / "nf4"
    model, tokenizer = load_model(str(misfit_teacher), dtype=torch.float32,
                                  quantization_config=BitsAndBytesConfig(**NF4))
    assert packing_flags(model) and not any(packing_flags(model).values())
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    ids = torch.tensor([PROMPT])
    model, _ = load_model(str(folder), dtype=torch.float32)
    assert not any(packing_flags(model).values())
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    generated = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    plain = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    for module in plain.modules():  # the reference: every layer on the plain path, whatever this CPU is
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    with torch.no_grad():
        torch.testing.assert_close(logits, plain(input_ids=ids).logits, rtol=0, atol=0)
    assert generated.tolist() == plain.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0).tolist()


def test_fitting_layers_keep_the_fast_path(teacher_dir, packing_cpu):
    """The tiny teacher (hidden 32, MLP 64): only down_proj (64 in, 32 out) fits the kernel."""
    model, _ = load_model(str(teacher_dir), dtype=torch.float32, quantization_config=BitsAndBytesConfig(**NF4))
    flags = packing_flags(model)
    assert {name for name, on in flags.items() if on} == {n for n in flags if n.endswith("mlp.down_proj")}


def test_a_qlora_base_never_takes_the_packed_path(teacher_dir, corpus_dir, tokenizer, tmp_path, packing_cpu):
    """The packed kernel has no backward: the trainer keeps every layer of a 4-bit base off it."""
    from slimforge.config import DataConfig
    from slimforge.data import build_data
    from slimforge.distill.config import DistillConfig, LoraSpec
    from slimforge.distill.trainer import DistillTrainer

    student, _ = load_model(str(teacher_dir), dtype=torch.float32, quantization_config=BitsAndBytesConfig(**NF4))
    assert any(packing_flags(student).values())  # down_proj fits
    data = build_data(DataConfig(path=str(corpus_dir), block_size=32), tokenizer, cache_dir=tmp_path / "data")
    cfg = DistillConfig(steps=1, batch_size=2, lora=LoraSpec(enabled=True, r=4))
    DistillTrainer(cfg, student, data, tmp_path / "work", None, seed=0, device=torch.device("cpu"), teacher=student)
    assert not any(packing_flags(student).values())


def test_the_helper_leaves_other_models_alone(teacher_dir):
    model = AutoModelForCausalLM.from_pretrained(teacher_dir)
    assert keep_4bit_layers_off_cpu_packing(model, everywhere=True) == []


def test_the_model_card_snippet_keeps_the_same_layers_off(teacher_dir, packing_cpu):
    """Cards tell plain-transformers users the same rule, as code; both must pick the same layers."""
    from slimforge.quantize.bnb_cpu import PLAIN_PATH_SNIPPET

    quant = BitsAndBytesConfig(**NF4)
    ours, _ = load_model(str(teacher_dir), dtype=torch.float32, quantization_config=quant)
    namespace = {"model": AutoModelForCausalLM.from_pretrained(teacher_dir, quantization_config=quant)}
    exec("\n".join(PLAIN_PATH_SNIPPET), namespace)  # noqa: S102 - our own card's code
    flags = packing_flags(namespace["model"])
    assert flags == packing_flags(ours) and any(flags.values()) and not all(flags.values())
