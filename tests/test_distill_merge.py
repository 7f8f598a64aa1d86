"""QLoRA artifacts that load where users expect: merge_lora (dequantized or re-quantized) and the
adapter's relative base path, on the tiny Llama.

Tolerances, measured on this fixture (float32 compute everywhere):
- dequantized merge vs the adapter on its NF4 base: max |logit difference| 1.5e-7, the size of
  float32 reassociation (``x(W + BA)`` against ``xW + (xB)A``); the test allows 1e-5 (times the
  logits' scale), and any real slip (a layer left out, the base rounded to bf16 first: 5e-4 here)
  is far above it;
- re-quantized merge: bit-identical to one NF4 rounding of the merged weights, and its KL to the
  adapter model (4.0e-5) is the size of the base's own NF4 error (KL 3.0e-5 to the teacher) while
  the adapter moved the model 22x further (KL 8.8e-4): the rounding keeps the adapter's change.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import REPO
from transformers import AutoModelForCausalLM

from slimforge import cli
from slimforge.errors import ConfigError, ModelLoadError
from slimforge.models import adapter_base, load_model

TINY_DISTILL = str(REPO / "tests" / "assets" / "recipes" / "tiny_distill.yaml")
IDS = torch.randint(3, 380, (4, 32), generator=torch.Generator().manual_seed(0))


def qlora_args(teacher_dir, corpus_dir, run_dir, *extra: str) -> list[str]:
    """The tiny teacher -> NF4 (float32 compute) -> two KD steps into LoRA adapters, no evaluation."""
    return ["run", TINY_DISTILL, f"teacher.path={teacher_dir}", f"data.path={corpus_dir}", f"run_dir={run_dir}",
            "+quantize@stages.nf4=bnb_nf4", "stages.nf4.compute_dtype=float32", "stages.heal.lora.enabled=true",
            "stages.heal.lora.r=4", "stages.heal.steps=2", "stages.heal.batch_size=2", "stages.heal.eval_blocks=2",
            "dtype=float32", "~eval.tasks.perplexity", *extra]


@pytest.fixture(scope="module")
def qlora_run(teacher_dir, corpus_dir, tmp_path_factory):
    """One run directory: nf4 -> heal (the adapter) -> merged (float32); then requant added to the finished run."""
    run_dir = tmp_path_factory.mktemp("qlora") / "run"
    assert cli.main(qlora_args(teacher_dir, corpus_dir, run_dir, "+distill@stages.merged=merge_lora",
                               "stages.merged.dtype=float32", "pipeline=[nf4,heal,merged]")) == 0
    assert cli.main(qlora_args(teacher_dir, corpus_dir, run_dir, "+distill@stages.requant=merge_lora",
                               "stages.requant.requantize=true", "pipeline=[nf4,heal,requant]")) == 0
    return run_dir


def logits(folder) -> torch.Tensor:
    """The folder's logits on IDS in fp32; a 4-bit base on bitsandbytes' plain path (dequantize, then an fp32
    matmul), not the bf16 kernel it repacks for on AVX512-BF16 CPUs, so merges compare against exact math."""
    from slimforge.quantize.bnb_cpu import keep_4bit_layers_off_cpu_packing

    model = load_model(str(folder), dtype=torch.float32, with_tokenizer=False)
    keep_4bit_layers_off_cpu_packing(model, everywhere=True)
    with torch.no_grad():
        return model(input_ids=IDS).logits


def kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    """Mean per-token KL(P || Q)."""
    p, q = p_logits.log_softmax(-1), q_logits.log_softmax(-1)
    return float((p.exp() * (p - q)).sum(-1).mean())


# --- dequantization on single layers -------------------------------------------------------


@pytest.mark.parametrize("quant_type, double_quant", [("nf4", False), ("nf4", True), ("fp4", True)])
def test_dequantized_weight_is_what_the_4bit_layer_multiplies_by(teacher_dir, quant_type, double_quant):
    import bitsandbytes as bnb
    from transformers import BitsAndBytesConfig

    from slimforge.distill.merge import dequantized_weight

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_compute_dtype=torch.float32,
                               bnb_4bit_use_double_quant=double_quant)
    from slimforge.quantize.bnb_cpu import keep_4bit_layers_off_cpu_packing

    model = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.bfloat16, quantization_config=quant)
    keep_4bit_layers_off_cpu_packing(model, everywhere=True)  # the plain path on AVX512-BF16 CPUs too
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers
    for layer in layers[:4]:
        x = torch.randn(5, layer.in_features, generator=torch.Generator().manual_seed(1))
        weight = dequantized_weight(layer)
        assert weight.dtype == torch.float32 and weight.shape == (layer.out_features, layer.in_features)
        with torch.no_grad():
            torch.testing.assert_close(layer(x), x @ weight.T, rtol=0, atol=1e-6)
    # transformers' own dequantize() rounds to the bf16 storage dtype first: not the trained-on weights
    rounded = bnb.functional.dequantize_4bit(layers[0].weight.data, layers[0].weight.quant_state).float()
    assert not torch.equal(rounded, dequantized_weight(layers[0]))


def test_dequantized_int8_weight_is_within_half_a_step_of_the_original(teacher_dir):
    import bitsandbytes as bnb
    from transformers import BitsAndBytesConfig

    from slimforge.distill.merge import dequantized_weight

    original = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32,
                                                 quantization_config=BitsAndBytesConfig(load_in_8bit=True))
    found = {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear8bitLt)}
    assert found
    for name, layer in found.items():
        # bitsandbytes rounds the fp16 copy of the weight to int8 with one scale per row
        exact = original.get_submodule(name).weight.detach().half().float()
        step = exact.abs().amax(dim=1, keepdim=True) / 127
        assert ((dequantized_weight(layer) - exact).abs() <= step / 2 * (1 + 1e-3)).all(), name


def test_dequantize_bnb_layers_leaves_a_plain_model(teacher_dir, tmp_path):
    from transformers import BitsAndBytesConfig

    from slimforge.distill.merge import dequantize_bnb_layers

    nf4 = tmp_path / "nf4"
    quant = BitsAndBytesConfig(load_in_4bit=True)
    AutoModelForCausalLM.from_pretrained(teacher_dir, quantization_config=quant).save_pretrained(nf4)
    model = load_model(str(nf4), dtype=torch.float32, with_tokenizer=False)
    replaced = dequantize_bnb_layers(model)
    assert len(replaced) == 4 * 7  # q k v o gate up down in each of the 4 layers
    model.save_pretrained(tmp_path / "plain")
    config = json.loads((tmp_path / "plain" / "config.json").read_text())
    assert "quantization_config" not in config
    assert all(type(m).__module__.startswith("torch") for n, m in model.named_modules() if n in replaced)


# --- the merge_lora stage ------------------------------------------------------------------------


def test_the_adapter_names_its_base_relative_to_itself(qlora_run):
    heal = qlora_run / "stages" / "heal"
    assert json.loads((heal / "adapter_config.json").read_text())["base_model_name_or_path"] == "../nf4"
    meta = json.loads((heal / "slimforge.json").read_text())
    assert meta["base_model"] == str((qlora_run / "stages" / "nf4").resolve())
    assert adapter_base(heal) == str((qlora_run / "stages" / "nf4").resolve())


def test_dequantized_merge_loads_without_peft_and_matches_the_adapter(qlora_run):
    merged = qlora_run / "stages" / "merged"
    assert not (merged / "adapter_config.json").exists()
    config = json.loads((merged / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    plain = AutoModelForCausalLM.from_pretrained(merged)  # no peft, no bitsandbytes: see test_cards too
    with torch.no_grad():
        plain_logits = plain(input_ids=IDS).logits
    adapted = logits(qlora_run / "stages" / "heal")
    scale = max(1.0, float(adapted.abs().max()))
    assert float((plain_logits - adapted).abs().max()) <= 1e-5 * scale
    # and the adapter did change the model, so the match is not the base's
    assert float((logits(qlora_run / "stages" / "nf4") - adapted).abs().max()) > 1e-3
    meta = json.loads((merged / "slimforge.json").read_text())
    assert meta["merge"]["base_format"] == "bitsandbytes/nf4" and meta["merge"]["dequantized_layers"] == 28


def test_requantized_merge_is_one_nf4_rounding_of_the_merged_weights(qlora_run):
    import bitsandbytes as bnb

    from slimforge.distill.merge import dequantized_weight

    merged = load_model(str(qlora_run / "stages" / "merged"), dtype=torch.float32, with_tokenizer=False)
    requant = load_model(str(qlora_run / "stages" / "requant"), dtype=torch.float32, with_tokenizer=False)
    layers = {n: m for n, m in requant.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert len(layers) == 28
    for name, layer in layers.items():
        state = layer.weight.quant_state
        # the base's settings (the bnb_nf4 preset: double quantization), applied to the bf16 merged weights
        assert state.quant_type == "nf4" and state.nested
        packed, again = bnb.functional.quantize_4bit(merged.get_submodule(name).weight.detach().to(torch.bfloat16),
                                                     blocksize=state.blocksize, compress_statistics=True,
                                                     quant_type="nf4")
        again.dtype = torch.float32
        assert torch.equal(dequantized_weight(layer), bnb.functional.dequantize_4bit(packed, again)), name
    base, adapted = logits(qlora_run / "stages" / "nf4"), logits(qlora_run / "stages" / "heal")
    base_error = kl(logits(_teacher(qlora_run)), base)  # the NF4 rounding of the teacher
    requant_error = kl(adapted, logits(qlora_run / "stages" / "requant"))
    assert 0 < requant_error <= 2 * base_error  # one more rounding, the size of the base's own
    assert requant_error <= 0.2 * kl(base, adapted)  # small beside what the adapter changed: the change survives
    meta = json.loads((qlora_run / "stages" / "requant" / "slimforge.json").read_text())
    assert meta["quantization"]["format"] == "bitsandbytes/nf4" and meta["quantization"]["double_quant"] is True
    assert meta["bits_per_weight"] > 4 and meta["merge"]["requantized"] is True


def _teacher(run_dir):
    return json.loads((run_dir / "manifest.json").read_text())["teacher"]["path"]


def test_merging_is_added_to_a_finished_run_without_redoing_it(qlora_run):
    stages = json.loads((qlora_run / "manifest.json").read_text())["stages"]
    assert stages["nf4"]["status"] == "skipped" and stages["heal"]["status"] == "skipped"
    assert stages["requant"]["status"] == "done" and stages["merged"]["status"] == "done"


def test_requantize_needs_a_quantized_base(teacher_dir, corpus_dir, tmp_path, tokenizer):
    """An adapter over a full-precision base (made by hand, as other tools do) merges, but cannot re-quantize."""
    from peft import LoraConfig, get_peft_model

    import slimforge

    adapter = tmp_path / "adapter"
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.save_pretrained(adapter)
    tokenizer.save_pretrained(adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(teacher_dir)
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"requantize=true re-applies the base's bitsandbytes settings, but the "
                                          r"adapter's base .* is not quantized; set requantize=false"):
        slimforge.run_stage("distill", adapter, tmp_path / "requant", method="merge_lora", requantize=True,
                            data=corpus_dir)
    merged = slimforge.run_stage("distill", adapter, tmp_path / "merged", method="merge_lora", data=corpus_dir)
    assert json.loads((merged / "slimforge.json").read_text())["merge"]["base_format"] == "hf"
    expected = model.merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(merged)(input_ids=IDS).logits,
                                   expected(input_ids=IDS).logits, rtol=0, atol=1e-5)


# --- the adapter's base, after moves -------------------------------------------------------------


def test_a_copied_run_directory_loads_its_adapter_after_the_original_is_gone(qlora_run, tmp_path):
    original = tmp_path / "original"
    shutil.copytree(qlora_run, original)
    moved = tmp_path / "elsewhere" / "run"
    shutil.copytree(original, moved)
    shutil.rmtree(original)
    heal = moved / "stages" / "heal"
    recorded = json.loads((heal / "slimforge.json").read_text())["base_model"]
    assert adapter_base(heal) == str((moved / "stages" / "nf4").resolve()) != recorded
    torch.testing.assert_close(logits(heal), logits(qlora_run / "stages" / "heal"), rtol=0, atol=0)
    from slimforge.models import resolve_model

    assert resolve_model(str(heal), "heal").load_config().model_type == "llama"  # the base's config


def test_an_adapter_moved_alone_finds_its_base_where_it_was_made(qlora_run, tmp_path):
    alone = tmp_path / "alone"
    shutil.copytree(qlora_run / "stages" / "heal", alone)
    assert adapter_base(alone) == str((qlora_run / "stages" / "nf4").resolve())
    torch.testing.assert_close(logits(alone), logits(qlora_run / "stages" / "heal"), rtol=0, atol=0)
    meta = json.loads((alone / "slimforge.json").read_text())
    meta["base_model"] = str(tmp_path / "gone")
    (alone / "slimforge.json").write_text(json.dumps(meta))
    with pytest.raises(ModelLoadError, match=r"the LoRA adapter .*alone names its base model '\.\./nf4', which is "
                                             r"not there .*copy the base folder along with the adapter"):
        load_model(str(alone))


def test_peft_reads_the_base_relative_to_the_current_directory(qlora_run, tmp_path, monkeypatch):
    """What the docs tell users: AutoPeftModelForCausalLM works from inside the adapter folder only."""
    from peft import AutoPeftModelForCausalLM

    heal = qlora_run / "stages" / "heal"
    monkeypatch.chdir(tmp_path)
    with pytest.raises((OSError, ValueError)):
        AutoPeftModelForCausalLM.from_pretrained(heal)
    monkeypatch.chdir(heal)
    model = AutoPeftModelForCausalLM.from_pretrained(heal, dtype=torch.float32)
    from slimforge.models import _cast_unquantized
    from slimforge.quantize.bnb_cpu import keep_4bit_layers_off_cpu_packing

    keep_4bit_layers_off_cpu_packing(model, everywhere=True)  # what slimforge's loader does (cards say so too)

    _cast_unquantized(model, torch.float32)  # transformers leaves the NF4 base's bf16 norms in bf16
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS).logits, logits(heal), rtol=0, atol=1e-6)
