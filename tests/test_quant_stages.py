"""Every quantize method through a recipe on the tiny teacher: artifact, report, fresh-process reload, bad input."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import cli_env, corpus_text
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from slimforge import cli
from slimforge.eval.fidelity import token_kl
from slimforge.quantize.config import GGUF_TYPES
from slimforge.quantize.intquant import code_range, rtn_quantize

STUDENT = str(Path(__file__).resolve().parent / "assets" / "recipes" / "student.yaml")  # the runner's test recipe

PROMPT = [5, 17, 42, 99, 7, 63, 28, 11]
NO_EVAL = "~eval.tasks.perplexity"
# method -> (registered method, overrides): small settings that keep each run to seconds. Only
# the GGUF run keeps the recipe's evaluation (proof the eval stage loads a GGUF artifact);
# the others are scored below from the fresh-process reload.
RUNS = {
    "rtn": ("rtn", ["stages.quant.bits=3", "stages.quant.group_size=32", NO_EVAL]),
    # What dtype: auto gives on a CPU with native bf16: the parent is loaded in bf16.
    "rtn_bf16": ("rtn", ["stages.quant.bits=3", "stages.quant.group_size=32", NO_EVAL, "dtype=bfloat16"]),
    "gptq": ("gptq", ["stages.quant.bits=3", "stages.quant.group_size=32", "stages.quant.block_size=32",
                      "stages.quant.num_samples=32", "stages.quant.seq_len=32", NO_EVAL]),
    "gptq8": ("gptq", ["stages.quant.bits=8", "stages.quant.group_size=-1", "stages.quant.act_order=false",
                       "stages.quant.num_samples=8", "stages.quant.seq_len=32", NO_EVAL]),
    "bnb_int8": ("bnb_int8", [NO_EVAL]),
    "bnb_nf4": ("bnb_nf4", [NO_EVAL]),
    "bnb_fp4": ("bnb_fp4", ["stages.quant.double_quant=true", NO_EVAL]),
    "gguf": ("gguf", ["stages.quant.type=Q4_0", "eval.tasks.perplexity.max_blocks=4"]),
}


def quant_args(teacher_dir, corpus_dir, run_dir, method, *extra):
    """fp32 unless ``extra`` says otherwise (a later ``dtype=`` wins): the expected values are fp32 math."""
    return [
        "run", STUDENT, f"teacher.path={teacher_dir}", "data=text", f"data.path={corpus_dir}",
        "data.block_size=32", "eval.batch_size=4", f"run_dir={run_dir}", "dtype=float32",
        f"+quantize@stages.quant={method}", "pipeline=[quant]", *extra,
    ]


@pytest.fixture(scope="module")
def runs(teacher_dir, corpus_dir, tmp_path_factory):
    """Each method run once on the tiny teacher: name -> run directory."""
    root = tmp_path_factory.mktemp("quant-runs")
    out = {}
    for name, (method, overrides) in RUNS.items():
        assert cli.main(quant_args(teacher_dir, corpus_dir, root / name, method, *overrides)) == 0, name
        out[name] = root / name
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    return out


@pytest.fixture(scope="module")
def text_blocks(tokenizer):
    """Four 32-token blocks of the test corpus, the text every artifact is scored on."""
    ids = tokenizer(corpus_text())["input_ids"][:128]
    return torch.tensor(ids).reshape(4, 32)


RELOAD = r"""
import json, logging, sys, torch
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
from transformers import AutoModelForCausalLM
from slimforge.quantize.bnb_cpu import keep_4bit_layers_off_cpu_packing
items, prompt, blocks, out_file = json.loads(sys.argv[1]), json.loads(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4]
out = {}
for name, folder, gguf in items:
    kwargs = {"gguf_file": gguf} if gguf else {}
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs)
    # On AVX512-BF16 CPUs bitsandbytes cannot repack these tiny 4-bit widths for its kernel:
    # the one thing slimforge's loader adds to plain transformers (a no-op elsewhere).
    keep_4bit_layers_off_cpu_packing(model)
    with torch.no_grad():
        prompt_logits = model(input_ids=torch.tensor([prompt])).logits[0].float()
        block_logits = model(input_ids=torch.tensor(blocks)).logits.float()
    generated = model.generate(torch.tensor([prompt]), max_new_tokens=4, do_sample=False)
    out[name] = {"prompt_logits": prompt_logits, "block_logits": block_logits, "generated": generated[0].tolist(),
                 "layer_class": type(model.model.layers[0].self_attn.q_proj).__name__,
                 "quantized": model.hf_quantizer is not None}
torch.save(out, out_file)
"""


@pytest.fixture(scope="module")
def reloaded(runs, text_blocks, tmp_path_factory):
    """All artifacts loaded in ONE fresh process with plain transformers, each run on PROMPT and the text blocks."""
    items = []
    for name, run_dir in runs.items():
        folder = run_dir / "stages" / "quant"
        meta = json.loads((folder / "slimforge.json").read_text())
        items.append([name, str(folder), meta.get("gguf_file")])
    out_file = tmp_path_factory.mktemp("reload") / "logits.pt"
    proc = subprocess.run([sys.executable, "-c", RELOAD, json.dumps(items), json.dumps(PROMPT),
                           json.dumps(text_blocks.tolist()), str(out_file)],
                          capture_output=True, text=True, env=cli_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return torch.load(out_file)


@pytest.fixture(scope="module")
def kl_to_teacher(reloaded, teacher_dir, text_blocks):
    """Mean per-token KL(teacher || artifact) on the text blocks, from the fresh-process logits."""
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)
    with torch.no_grad():
        reference = teacher(input_ids=text_blocks).logits
    return {name: float(token_kl(reference, result["block_logits"]).mean()) for name, result in reloaded.items()}


def meta_of(runs, name):
    return json.loads((runs[name] / "stages" / "quant" / "slimforge.json").read_text())


def report_of(runs, name):
    return json.loads((runs[name] / "report.json").read_text())


def test_every_method_reloads_in_a_fresh_process_and_generates(reloaded):
    assert set(reloaded) == set(RUNS)
    for name, result in reloaded.items():
        assert len(result["generated"]) == len(PROMPT) + 4, name
        assert torch.isfinite(result["block_logits"]).all(), name
    assert reloaded["bnb_int8"]["layer_class"] == "Linear8bitLt"
    assert reloaded["bnb_nf4"]["layer_class"] == reloaded["bnb_fp4"]["layer_class"] == "Linear4bit"
    assert all(reloaded[n]["quantized"] for n in ("rtn", "gptq", "gptq8", "bnb_int8", "bnb_nf4", "bnb_fp4"))


@pytest.mark.parametrize("name,run_dtype", [("rtn", torch.float32), ("rtn_bf16", torch.bfloat16)])
def test_rtn_artifact_reloads_as_exactly_the_rtn_weights(reloaded, teacher_dir, name, run_dtype):
    """Our RTN math on the teacher as the run loaded it (fp32, or bf16), with everything else rounded
    to the bf16 storage, gives the reloaded logits: the codes times the scales, exactly."""
    expected = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)
    with torch.no_grad():
        for param_name, param in expected.named_parameters():
            if ".layers." in param_name and param_name.endswith("proj.weight"):
                param.copy_(rtn_quantize(param.to(run_dtype).float(), 3, 32, torch.bfloat16).weight)
            else:
                param.copy_(param.to(torch.bfloat16).float())
        logits = expected(input_ids=torch.tensor([PROMPT])).logits[0]
    assert torch.allclose(reloaded[name]["prompt_logits"], logits, atol=1e-5)


def test_quantized_artifacts_stay_close_to_the_teacher_in_order_of_precision(kl_to_teacher):
    kl = kl_to_teacher
    assert all(0 < value < 0.05 for value in kl.values()), kl
    assert kl["gptq"] < 0.8 * kl["rtn"]  # GPTQ beats RTN at the same bits and groups
    assert kl["gptq8"] < kl["rtn"] / 10 and kl["bnb_int8"] < kl["rtn"] / 10  # 8 bits >> 3 bits
    assert kl["bnb_int8"] < kl["bnb_nf4"] and kl["bnb_int8"] < kl["bnb_fp4"]


def test_compressed_tensors_artifact_is_packed_codes_and_scales(runs):
    folder = runs["gptq"] / "stages" / "quant"
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    weights = config["config_groups"]["group_0"]["weights"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    assert (weights["num_bits"], weights["group_size"], weights["symmetric"]) == (3, 32, True)
    assert weights["actorder"] == "weight" and config["ignore"] == ["lm_head"]
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    with safe_open(folder / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        prefix = "model.layers.0.mlp.down_proj."
        assert {prefix + "weight_packed", prefix + "weight_scale", prefix + "weight_shape"} <= keys
        assert prefix + "weight" not in keys and prefix + "weight_zero_point" not in keys
        packed, scale = f.get_tensor(prefix + "weight_packed"), f.get_tensor(prefix + "weight_scale")
        shape = f.get_tensor(prefix + "weight_shape").tolist()
        assert packed.dtype == torch.int32 and scale.dtype == torch.bfloat16
        assert shape == [32, 64] and scale.shape == (32, 2)
        codes = unpack_from_int32(packed, 3, torch.Size(shape))
        low, high = code_range(3)
        assert codes.min() >= low and codes.max() <= high and codes.min() < 0 < codes.max()
        assert f.get_tensor("lm_head.weight").dtype == torch.bfloat16


def test_meta_reports_bits_size_footprint_and_time(runs):
    bits = {}
    for name in RUNS:
        folder = runs[name] / "stages" / "quant"
        meta = meta_of(runs, name)
        on_disk = sum(p.stat().st_size for p in folder.iterdir() if p.suffix in (".safetensors", ".gguf"))
        assert meta["size_on_disk_bytes"] == on_disk, name
        assert meta["memory_footprint_bytes"] > 0 and meta["quantize_seconds"] >= 0, name
        assert meta["quantized_weights"] == 4 * (2 * 32 * 32 + 2 * 16 * 32 + 3 * 32 * 64), name
        bits[name] = meta["bits_per_weight"]
    # Nominal bits plus the scales (bf16 per 32 weights) and a few header tensors per layer.
    assert 3.5 < bits["rtn"] == bits["gptq"] < 3.7
    assert 8.0 < bits["gptq8"] < 8.7  # one bf16 scale per 32- or 64-wide row
    assert bits["gguf"] == 4.5  # Q4_0: 18 bytes per 32 weights
    assert 8.0 < bits["bnb_int8"] < 10.0  # int8 + an fp32 scale per row
    assert bits["bnb_fp4"] < bits["bnb_nf4"] + 1  # both 4-bit plus per-layer quantization maps
    assert meta_of(runs, "gptq")["quantization"]["calibration_tokens"] == 32 * 32
    assert meta_of(runs, "gptq")["quantization"]["scale_search"] == "mse"  # the preset's default
    manifest = json.loads((runs["gptq"] / "manifest.json").read_text())
    assert manifest["stages"]["quant"]["metrics"]["bits_per_weight"] == bits["gptq"]


def test_each_schema_declares_the_format_its_stage_recorded_and_wrote(runs):
    """The schema's artifact_format, the format slimforge.json records and the files agree, for every method."""
    from slimforge.models import artifact_format

    for name in RUNS:
        folder, meta = runs[name] / "stages" / "quant", meta_of(runs, name)
        declared = artifact_format(folder, meta.get("gguf_file"), meta)
        assert meta["quantization"]["format"].split("/")[0] == declared, name
        assert artifact_format(folder, meta.get("gguf_file")) == declared, name


def test_the_pipeline_evaluates_a_gguf_artifact_against_the_teacher(runs):
    report = report_of(runs, "gguf")
    assert report["models"]["quant"]["tasks"]["perplexity"]["perplexity"] > 1
    assert 0 < report["fidelity"]["quant"]["perplexity"]["kl_mean"] < 0.05


# --- bad input: one line, before any work --------------------------------------------------


def refused(capsys, args):
    code = cli.main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    return err[-1]


@pytest.mark.parametrize("method,overrides,message", [
    ("rtn", ["stages.quant.bits=5"], "stages.quant.bits=5: rtn writes 3, 4, 8-bit weights"),
    ("gptq", ["stages.quant.group_size=48"], "gptq supports group sizes -1, 32, 64, 128"),
    ("gptq", ["stages.quant.group_size=128", "stages.quant.block_size=64"], "must be a multiple of group_size=128"),
    ("gptq", ["stages.quant.scale_search=absmax"], "stages.quant.scale_search='absmax': must be one of minmax, mse"),
    ("rtn", ["stages.quant.group_size=64"], "but the teacher has hidden_size=32, num_attention_heads*head_dim=32; pick a group size that divides them (32 does)"),
    ("bnb_nf4", ["stages.quant.cpu_offload=true"], "needs CUDA"),
    ("gguf", ["stages.quant.type=Q5_K"], f"stages.quant.type='Q5_K': must be one of {', '.join(GGUF_TYPES)}"),
])
def test_bad_settings_fail_in_one_line_before_any_work(teacher_dir, corpus_dir, tmp_path, capsys, method,
                                                       overrides, message):
    if method == "bnb_nf4" and torch.cuda.is_available():
        pytest.skip("cpu_offload is valid where CUDA exists")
    run_dir = tmp_path / "run"
    line = refused(capsys, quant_args(teacher_dir, corpus_dir, run_dir, method, *overrides))
    assert message in line
    assert not (run_dir / "stages").exists()


def test_gguf_refuses_an_unsupported_architecture_naming_the_supported_ones(tokenizer, corpus_dir, tmp_path, capsys):
    from transformers import AutoConfig

    gpt2 = AutoConfig.for_model("gpt2", vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=4, n_positions=64,
                                bos_token_id=1, eos_token_id=2)
    AutoModelForCausalLM.from_config(gpt2).save_pretrained(tmp_path / "gpt2")
    tokenizer.save_pretrained(tmp_path / "gpt2")
    line = refused(capsys, quant_args(tmp_path / "gpt2", corpus_dir, tmp_path / "run", "gguf"))
    assert ("GGUF export does not support model type 'gpt2'; supported: llama, mistral, qwen2, phi3, qwen3, "
            "gemma, gemma2, gemma3_text (SmolLM is llama)") in line
    assert not (tmp_path / "run" / "stages").exists()


def test_an_already_quantized_teacher_is_refused(runs, corpus_dir, tmp_path, capsys):
    quantized = runs["rtn"] / "stages" / "quant"
    for method in ("gptq", "bnb_nf4", "gguf"):
        line = refused(capsys, quant_args(quantized, corpus_dir, tmp_path / method, method))
        assert f"quantize method {method} needs full-precision weights, but the teacher is already quantized " \
               "(compressed-tensors)" in line
        assert not (tmp_path / method / "stages").exists()


def test_a_quantized_stage_output_is_refused_by_the_next_quantize_stage(teacher_dir, corpus_dir, tmp_path, capsys):
    run_dir = tmp_path / "run"
    args = quant_args(teacher_dir, corpus_dir, run_dir, "bnb_nf4", "+quantize@stages.again=rtn",
                      "stages.again.group_size=32", "pipeline=[quant,again]")
    line = refused(capsys, args)
    assert "quantize method rtn needs full-precision weights, but its input quant is already quantized (bitsandbytes)" in line
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["stages"]["quant"]["status"] == "done"
    assert manifest["stages"]["again"]["status"] == "failed"
    assert not (run_dir / "stages" / "again").exists()


def test_a_gguf_input_is_refused(runs, corpus_dir, tmp_path, capsys):
    folder = runs["gguf"] / "stages" / "quant"
    line = refused(capsys, quant_args(folder, corpus_dir, tmp_path / "run", "rtn", "teacher.gguf_file=model-Q4_0.gguf",
                                      "stages.quant.group_size=32"))
    assert "quantize method rtn needs full-precision weights, but its input teacher is a GGUF file" in line


def test_nf4_artifact_loads_as_a_trainable_qlora_base(runs):
    """What a QLoRA distillation stage gets from ``load_model``: 4-bit frozen base, fp32 elsewhere, LoRA trains."""
    from peft import LoraConfig, get_peft_model

    from slimforge.models import load_model

    model, _ = load_model(str(runs["bnb_nf4"] / "stages" / "quant"), dtype=torch.float32)
    floats = {p.dtype for p in model.parameters() if p.dtype.is_floating_point}
    assert floats == {torch.float32}  # stored in bf16, brought to the asked dtype
    assert type(model.model.layers[0].mlp.down_proj).__name__ == "Linear4bit"
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    ids = torch.tensor([PROMPT])
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    lora = [p for n, p in model.named_parameters() if "lora_B" in n]
    # lora_B starts at zero, so at the first step only it receives a gradient.
    assert lora and all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in lora)
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
