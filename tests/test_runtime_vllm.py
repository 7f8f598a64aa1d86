"""vLLM's CPU build as a runtime for slimforge's folders: what it refuses, how the comparison judges, and real runs.

The inspection and the comparison are tested on hand-made configs and log-probs. The tests that
run vLLM use tiny Llamas whose shapes vLLM's CPU kernels take (head size 32, widths multiples
of 32) and skip, saying why, where vLLM is not installed (``slimforge runtime install vllm``).
They share one vLLM process for the float32 checks (its start-up is most of the cost).
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import build_tokenizer

import slimforge
from slimforge.errors import RuntimeCheckError
from slimforge.quantize.config import GROUP_SIZES, INT_BITS
from slimforge.runtimes import install
from slimforge.runtimes import vllm as rv

# One compressed-tensors group as slimforge's writer (slimforge/quantize/compressed.py) puts it in config.json.
W4A16_G64 = {"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {"group_0": {
    "format": "pack-quantized", "input_activations": None, "output_activations": None, "targets": ["Linear"],
    "weights": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 64}}}}
LLAMA = {"model_type": "llama", "hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 4,
         "num_key_value_heads": 2, "head_dim": 32, "max_position_embeddings": 256}


def needs_vllm():
    if install.find_vllm() is None:
        pytest.skip("vLLM is not installed: slimforge runtime install vllm")


def int_scheme(bits: int, group_size: int) -> dict:
    qc = json.loads(json.dumps(W4A16_G64))
    weights = qc["config_groups"]["group_0"]["weights"]
    weights.update(num_bits=bits, strategy="group" if group_size > 0 else "channel",
                   group_size=group_size if group_size > 0 else None)
    return qc


# --- inspection: what vLLM's CPU build is refused before it starts ---------------------------------


@pytest.mark.parametrize("bits", INT_BITS)
@pytest.mark.parametrize("group_size", GROUP_SIZES)
def test_every_int_format_slimforge_writes_has_a_verdict(bits, group_size, monkeypatch):
    """4-bit runs wherever the CPU has the kernel, at every group size; 3- and 8-bit never do."""
    config = {**LLAMA, "quantization_config": int_scheme(bits, group_size)}
    scheme = rv.quantization_scheme(config)
    assert scheme.name == f"W{bits}A16"
    assert scheme.group_size == (group_size if group_size > 0 else None)
    monkeypatch.setattr(rv, "cpu_runs_wna16", lambda: True)
    reason = rv.cpu_refusal(config, scheme)
    assert (reason is None) == (bits == 4), reason
    if bits != 4:
        assert f"{bits}-bit" in reason and "4-bit weights only" in reason
    monkeypatch.setattr(rv, "cpu_runs_wna16", lambda: False)
    if bits == 4:
        assert "AVX-512" in rv.cpu_refusal(config, scheme)


@pytest.mark.parametrize(("config", "match"), [
    ({**LLAMA, "head_dim": 8}, r"head sizes 32, 64.*this model's is 8"),
    ({**LLAMA, "quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True}},
     r"no bitsandbytes support.*full-precision folder"),
    ({**LLAMA, "intermediate_size": 240, "quantization_config": W4A16_G64},
     r"multiples of 32.*intermediate_size=240"),
    ({**LLAMA, "quantization_config": {**W4A16_G64, "format": "dense",
                                      "config_groups": {"g": {**W4A16_G64["config_groups"]["group_0"],
                                                              "format": "dense"}}}},
     r"read the pack-quantized format, and this folder is dense"),
])
def test_refused_configs_say_why(config, match, monkeypatch):
    monkeypatch.setattr(rv, "cpu_runs_wna16", lambda: True)
    reason = rv.cpu_refusal(config, rv.quantization_scheme(config))
    assert reason is not None
    assert re.search(match, reason), reason


def w8a8_scheme(kind: str, dynamic: bool, weights: str = "channel") -> dict:
    """A W8A8 group as slimforge's w8a8 stage (slimforge/quantize/w8a8_stage.py) puts it in config.json."""
    qc = json.loads(json.dumps(W4A16_G64))
    group = qc["config_groups"]["group_0"]
    qc["format"] = group["format"] = "int-quantized" if kind == "int" else "float-quantized"
    group["weights"].update(num_bits=8, type=kind, strategy=weights, group_size=None)
    group["input_activations"] = {"num_bits": 8, "type": kind, "symmetric": True, "dynamic": dynamic,
                                  "strategy": "token" if dynamic else "tensor"}
    return qc


def test_full_precision_and_unknown_schemes_go_to_vllm():
    """vLLM itself answers for full-precision folders and for other tools' formats."""
    assert rv.cpu_refusal(LLAMA, None) is None
    assert rv.cpu_refusal(LLAMA, rv.Scheme(method="awq", name="awq")) is None


@pytest.mark.parametrize(("kind", "dynamic", "weights", "refused"), [
    ("int", True, "channel", r"int8 GEMM \(oneDNN\) on a CPU without VNNI adds products in saturating 16-bit pairs"),
    ("int", False, "channel", r"without VNNI"), ("int", True, "tensor", r"without VNNI"),
    ("float", True, "channel", None),
    ("float", False, "channel", r"static per-tensor activation scale \(narrow\(\) of a 0-dim tensor\)"),
    ("float", False, "tensor", r"static per-tensor activation scale"),
    ("float", True, "tensor", r"per-tensor FP8 weights need its static_scaled_fp8_quant kernel"),
])
def test_every_w8a8_scheme_slimforge_writes_has_a_verdict(kind, dynamic, weights, refused, monkeypatch):
    """As measured on this AVX2 CPU (no VNNI, no AVX512-BF16): FP8 with per-token scales and per-channel
    weights runs; int8 runs where the CPU has VNNI; per-tensor FP8 weights where it has AVX512-BF16."""
    monkeypatch.setattr(rv, "cpu_has_vnni", lambda: False)
    monkeypatch.setattr(rv, "cpu_has_avx512_bf16", lambda: False)
    scheme = rv.quantization_scheme({**LLAMA, "quantization_config": w8a8_scheme(kind, dynamic, weights)})
    assert scheme.name == f"W8A8-{kind}" and scheme.activations == f"{kind}8" and scheme.dynamic == dynamic
    assert scheme.label().endswith(f"per {weights}, {'dynamic' if dynamic else 'static'} activations "
                                   f"({'int' if kind == 'int' else 'float'}-quantized)")
    reason = rv.cpu_refusal(LLAMA, scheme)
    assert (reason is None) == (refused is None), reason
    if refused:
        assert re.search(refused, reason), reason
    assert rv.runtime_dtype(scheme, "auto") == "float32"  # its CPU kernels take float32 activations
    monkeypatch.setattr(rv, "cpu_has_vnni", lambda: True)
    monkeypatch.setattr(rv, "cpu_has_avx512_bf16", lambda: True)  # vLLM's full extension has the FP8 kernels
    assert (rv.cpu_refusal(LLAMA, scheme) is None) == (kind == "int" or dynamic)


def test_dtype_choice():
    w4 = rv.quantization_scheme({"quantization_config": W4A16_G64})
    assert rv.runtime_dtype(None, "auto") == "float32"
    assert rv.runtime_dtype(w4, "auto") == "bfloat16"
    assert rv.runtime_dtype(None, "bfloat16") == "bfloat16"
    with pytest.raises(RuntimeCheckError, match="bfloat16 or float16 only"):
        rv.runtime_dtype(w4, "float32")
    with pytest.raises(RuntimeCheckError, match="not one of auto, float32, bfloat16"):
        rv.runtime_dtype(None, "float16")


def test_folders_that_are_not_models_are_refused(tmp_path, teacher_dir):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(RuntimeCheckError, match="GGUF artifact.*--runtime llama.cpp"):
        rv.plan_check(gguf)
    adapter = Path(shutil.copytree(teacher_dir, tmp_path / "adapter"))
    (adapter / "adapter_config.json").write_text("{}")
    with pytest.raises(RuntimeCheckError, match="LoRA adapter.*merge the adapter into its base first"):
        rv.plan_check(adapter)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(RuntimeCheckError, match="holds no config.json"):
        rv.plan_check(empty)
    # The shared tiny teacher has head size 8, which vLLM's CPU attention does not take.
    with pytest.raises(RuntimeCheckError, match=r"cannot run .*\(this model\).*this model's is 8"):
        rv.plan_check(teacher_dir)


def test_prompts_longer_than_the_model_takes_are_refused(tmp_path, teacher_dir):
    folder = Path(shutil.copytree(teacher_dir, tmp_path / "short"))
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "head_dim": 32, "max_position_embeddings": 16}))
    with pytest.raises(RuntimeCheckError, match=r"the prompts and 16 new tokens need \d+ positions, .* takes 16"):
        rv.plan_check(folder, max_tokens=16)
    with pytest.raises(RuntimeCheckError, match="max_tokens must be at least 1"):
        rv.plan_check(folder, max_tokens=0)


# --- the comparison ----------------------------------------------------------------------------------


def greedy_of(rows: list[list[float]]) -> rv.Greedy:
    """transformers' side from log-prob rows: the greedy token of each row."""
    lp = torch.tensor(rows).log_softmax(-1)
    return rv.Greedy(lp.argmax(-1).tolist(), lp)


ROWS = [[2.0, 1.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 1.0]]


def test_the_same_tokens_and_log_probs_agree():
    ours = greedy_of(ROWS)
    out = rv.compare_prompt(ours.token_ids, ours.chosen(), ours, tolerance=1e-3)
    assert out == {"agreeing_prefix": 3, "compared": 3, "max_abs_diff": 0.0, "divergence": None, "ok": True}


def test_log_probs_beyond_the_tolerance_fail():
    ours = greedy_of(ROWS)
    theirs = [v + 0.01 for v in ours.chosen()]
    out = rv.compare_prompt(ours.token_ids, theirs, ours, tolerance=1e-3)
    assert not out["ok"] and out["max_abs_diff"] == pytest.approx(0.01, rel=1e-4)


def test_parting_at_a_tie_passes_and_elsewhere_fails():
    tie = greedy_of([[1.0, 1.0 - 1e-4, 0.0], *ROWS[1:]])  # tokens 0 and 1 tie within rounding
    # vLLM picks token 1 at step 0, with its log-prob as transformers has it: a tie, compared there.
    theirs_ids = [1, 2, 2]
    theirs_lp = [float(tie.logprobs[0, 1]), -5.0, -5.0]
    out = rv.compare_prompt(theirs_ids, theirs_lp, tie, tolerance=1e-3)
    assert out["agreeing_prefix"] == 0 and out["compared"] == 1
    assert out["divergence"]["tie"] and out["ok"]
    clear = greedy_of(ROWS)  # token 0 leads by a full nat: parting there is a misreading
    out = rv.compare_prompt([1, 1, 2], [float(clear.logprobs[0, 1]), 0.0, 0.0], clear, tolerance=1e-3)
    assert out["divergence"] == {"position": 0, "vllm_token": 1, "transformers_token": 0,
                                 "gap": pytest.approx(1.0), "tie": False}
    assert not out["ok"]


# --- real runs on tiny models -------------------------------------------------------------------------


def vllm_tiny_model(tokenizer, seed: int):
    """A 2-layer Llama that vLLM's CPU kernels take: head size 32, every width a multiple of 32."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = AutoConfig.for_model("llama", vocab_size=len(tokenizer), **{k: v for k, v in LLAMA.items()
                                                                         if k != "model_type"},
                                  num_hidden_layers=2, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                  tie_word_embeddings=False, initializer_range=0.1)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


# W8A8 folders slimforge writes (SmoothQuant + GPTQ int8 by default): FP8 with dynamic activations, which
# vLLM's CPU build runs here; int8, which it runs exactly only on CPUs with VNNI; FP8 with static
# activations, which it cannot run.
W8A8_CALIB = {"num_samples": 8, "seq_len": 32, "batch_size": 4}
W8A8 = {"w8a8_int8_dynamic": {}, "w8a8_int8_static": {"activations": "static"},
        "w8a8_fp8_dynamic": {"type": "fp8", "smoothquant_alpha": None, "rounding": "rtn"},
        "w8a8_fp8_static": {"type": "fp8", "smoothquant_alpha": None, "activations": "static"}}
W8A8_INT8 = ("w8a8_int8_dynamic", "w8a8_int8_static")


@pytest.fixture(scope="module")
def folders(tmp_path_factory, corpus_dir):
    """Two tiny models of different seeds, a copy with truncated weights, and 4-bit folders slimforge wrote."""
    root = tmp_path_factory.mktemp("vllm-tiny")
    tokenizer = build_tokenizer()
    out = {}
    for name, seed in (("plain", 0), ("other", 1)):
        out[name] = root / name
        vllm_tiny_model(tokenizer, seed).save_pretrained(out[name])
        tokenizer.save_pretrained(out[name])
    out["broken"] = Path(shutil.copytree(out["plain"], root / "broken"))
    weights = out["broken"] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:4096])
    data = {"path": str(corpus_dir), "block_size": 32}
    for name, method, options in (("rtn_g32", "rtn", {"group_size": 32}),
                                  ("rtn_channel", "rtn", {"group_size": -1}),
                                  ("gptq_g64", "gptq", {"group_size": 64, "num_samples": 8, "seq_len": 32}),
                                  ("gptq_g128", "gptq", {"group_size": 128, "num_samples": 8, "seq_len": 32}),
                                  ("rtn8", "rtn", {"bits": 8, "group_size": 64}),
                                  ("rtn3", "rtn", {"bits": 3, "group_size": 32}),
                                  *((name, "w8a8", {**W8A8_CALIB, **options}) for name, options in W8A8.items())):
        out[name] = slimforge.quantize(out["plain"], root / name, method=method, data=data, name=name,
                                       dtype="float32", **options)
    return out


W4A16_NAMES = ("rtn_g32", "rtn_channel", "gptq_g64", "gptq_g128")


@pytest.fixture(scope="module")
def checked(folders):
    """One vLLM process for every check: float32, bfloat16, a broken copy and the W8A8 folders vLLM's CPU
    build runs (the 4-bit folders: the avx512 test)."""
    needs_vllm()
    plans = {name: rv.plan_check(folders[name], max_tokens=12) for name in ("plain", "other", "broken")}
    plans["plain_bf16"] = rv.plan_check(folders["plain"], max_tokens=8, dtype="bfloat16")
    plans["w8a8_fp8_dynamic"] = rv.plan_check(folders["w8a8_fp8_dynamic"], max_tokens=8)
    return dict(zip(plans, rv.check_plans(list(plans.values()))))


def test_a_full_precision_folder_agrees_in_float32(checked):
    result = checked["plain"]
    assert result["ok"] and result["loads"] and result["dtype"] == "float32" and result["format"] == "hf"
    assert result["greedy"]["all_agree"] and result["greedy"]["agreeing_prefix"] == [12, 12, 12]
    assert result["logprob"]["max_abs_diff"] <= rv.FP32_TOLERANCE
    assert result["logprob"]["compared_tokens"] == 36
    assert result["versions"]["vllm_env"]["vllm"] == install.VLLM_VERSION


def test_a_different_model_fails_the_comparison(checked, folders):
    """vLLM's run of one model against transformers' run of another: the comparison must see it."""
    theirs = checked["other"]["samples"]
    ours = rv.transformers_greedy(folders["plain"], [s["prompt_ids"] for s in theirs], max_tokens=12)
    verdicts = [rv.compare_prompt(s["vllm"]["token_ids"], s["vllm"]["logprobs"], g, rv.FP32_TOLERANCE)
                for s, g in zip(theirs, ours)]
    assert not any(v["ok"] for v in verdicts)
    assert all(v["max_abs_diff"] > 100 * rv.FP32_TOLERANCE for v in verdicts)
    assert checked["other"]["ok"]  # and against its own weights, that model agrees


def test_a_folder_vllm_cannot_load_is_a_failed_check(checked):
    result = checked["broken"]
    assert not result["ok"] and not result["loads"]
    assert result["error"].startswith("vLLM failed at load:")
    assert "greedy" not in result


def test_4bit_folders_are_refused_in_one_line_without_avx512(folders, monkeypatch):
    """Every group size slimforge writes, RTN and GPTQ: on AVX2-only x86 CPUs, before vLLM starts."""
    monkeypatch.setattr(rv, "cpu_runs_wna16", lambda: False)
    for name in W4A16_NAMES:
        with pytest.raises(RuntimeCheckError, match=r"W4A16 .*built only into its AVX-512 extension"):
            rv.check_vllm(folders[name])


@pytest.mark.avx512
def test_4bit_folders_run_where_the_cpu_has_the_kernel(folders):
    """Only on x86 CPUs with AVX-512 (``pytest -m avx512``): never yet run, the dev box has AVX2 only."""
    if not rv.cpu_runs_wna16():
        pytest.fail("this test needs vLLM's 4-bit CPU kernel: an x86 CPU with AVX-512 (or another architecture)")
    needs_vllm()
    results = rv.check_plans([rv.plan_check(folders[name], max_tokens=8) for name in W4A16_NAMES])
    for name, result in zip(W4A16_NAMES, results):
        assert result["ok"], (name, result)
        assert result["dtype"] == "bfloat16" and result["format"].startswith("compressed-tensors W4A16")
        assert result["logprob"]["tolerance"] == max(rv.FP32_TOLERANCE,
                                                     rv.BF16_FACTOR * result["logprob"]["bf16_rounding"])


@pytest.mark.parametrize("name", ["rtn8", "rtn3"])
def test_other_bit_widths_are_refused_everywhere(folders, name):
    with pytest.raises(RuntimeCheckError, match=r"W[38]A16 .*4-bit weights only"):
        rv.check_vllm(folders[name])


def test_bfloat16_is_judged_by_the_models_own_bf16_rounding(checked):
    result = checked["plain_bf16"]
    lp = result["logprob"]
    assert result["dtype"] == "bfloat16" and lp["bf16_rounding"] > 0
    assert lp["tolerance"] == max(rv.FP32_TOLERANCE, rv.BF16_FACTOR * lp["bf16_rounding"])
    assert result["ok"], result


# compressed-tensors as vLLM's environment pins it (0.17) reads the 4- and 8-bit folders slimforge's
# (0.20) writes: the same logits through that environment's transformers as through slimforge's.
READ_BACK = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM
folders, ids, out = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
with torch.no_grad():
    logits = {name: AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)(torch.tensor([ids])).logits[0]
              for name, folder in folders.items()}
torch.save(logits, out)
"""


def assert_pinned_reader_agrees(folders: dict, names: list[str], ids: list[int], tmp_path, atol: float,
                                timeout: int) -> None:
    """vLLM's environment (compressed-tensors 0.17) reads each folder to slimforge's own logits."""
    from slimforge.models import load_model

    out = tmp_path / "logits.pt"
    proc = subprocess.run([str(install.require_vllm()), "-c", READ_BACK,
                           json.dumps({n: str(folders[n]) for n in names}), json.dumps(ids), str(out)],
                          capture_output=True, text=True, env={**rv.worker_env(tmp_path), "HF_HUB_OFFLINE": "1"},
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-2000:]
    theirs = torch.load(out)
    for name in names:
        model = load_model(str(folders[name]), dtype=torch.float32, with_tokenizer=False)
        with torch.no_grad():
            ours = model(torch.tensor([ids])).logits[0]
        assert torch.allclose(theirs[name], ours, rtol=0, atol=atol), (name, float((theirs[name] - ours).abs().max()))


def test_the_pinned_compressed_tensors_reads_the_4_and_8_bit_folders(folders, tmp_path):
    needs_vllm()
    assert_pinned_reader_agrees(folders, [*W4A16_NAMES, "rtn8"], list(range(3, 40)), tmp_path, 1e-5, 600)


def test_3bit_folders_pack_densely_as_vllm_reads_them(folders):
    """compressed-tensors 0.20 packs 3-bit codes densely (32 codes in 3 words), the layout vLLM 0.32's
    WNA16 loader allocates (ceil(in * bits / 32) words a row); 0.17's own decompressor predates it
    and padded 10 codes to a word, so only 4- and 8-bit folders read back through it."""
    from safetensors import safe_open

    with safe_open(str(folders["rtn3"] / "model.safetensors"), "pt") as fh:
        packed = [k for k in fh.keys() if k.endswith("weight_packed")]  # noqa: SIM118
        assert packed
        for key in packed:
            in_features = int(fh.get_tensor(key.replace("weight_packed", "weight_shape"))[1])
            width = fh.get_slice(key).get_shape()[1]
            assert width == math.ceil(in_features * 3 / 32) != math.ceil(in_features / (32 // 3)), key


# --- W8A8: int8 and FP8 activations ---------------------------------------------------------------


def test_an_fp8_folder_agrees_in_float32_within_its_own_rounding_sensitivity(checked):
    """Judged by how far transformers moves when its quantized inputs are jittered by a few float32 ulps."""
    result = checked["w8a8_fp8_dynamic"]
    lp = result["logprob"]
    assert result["loads"] and result["dtype"] == "float32", result
    assert result["format"] == "compressed-tensors W8A8-float per channel, dynamic activations (float-quantized)"
    assert lp["rounding_sensitivity"] > 0 and lp["bf16_rounding"] is None
    assert lp["tolerance"] == max(rv.FP32_TOLERANCE, rv.W8A8_FACTOR * lp["rounding_sensitivity"])
    assert result["ok"], result


def test_the_yardstick_is_the_quantized_folders_own(checked, folders):
    """The float32 model has nothing rounded and nothing jittered: recomputed in one pass it agrees to ~1e-5."""
    ids = [s["prompt_ids"] for s in checked["plain"]["samples"]]
    ours = rv.transformers_greedy(folders["plain"], ids, max_tokens=12)
    assert rv.rounding_sensitivity(folders["plain"], ids, ours) < 1e-4


def test_misread_weight_scales_fail_the_w8a8_comparison(checked, folders, tmp_path):
    """vLLM's run of the FP8 folder against transformers' run of a copy whose weight scales are doubled:
    the tolerance must not stretch to cover a wrong scale."""
    from safetensors.torch import load_file, save_file

    copy = Path(shutil.copytree(folders["w8a8_fp8_dynamic"], tmp_path / "off"))
    tensors = load_file(str(copy / "model.safetensors"))
    save_file({k: v * 2 if k.endswith("weight_scale") else v for k, v in tensors.items()},
              str(copy / "model.safetensors"), metadata={"format": "pt"})
    theirs = checked["w8a8_fp8_dynamic"]
    ours = rv.transformers_greedy(copy, [s["prompt_ids"] for s in theirs["samples"]], max_tokens=8)
    tolerance = theirs["logprob"]["tolerance"]
    verdicts = [rv.compare_prompt(s["vllm"]["token_ids"], s["vllm"]["logprobs"], g, tolerance)
                for s, g in zip(theirs["samples"], ours)]
    assert not all(v["ok"] for v in verdicts), (tolerance, verdicts)


def test_int8_and_static_fp8_folders_are_refused_in_one_line_here(folders, monkeypatch):
    """Without VNNI (this AVX2 CPU) vLLM's int8 GEMM saturates; static FP8 fails everywhere without AMX-FP8."""
    monkeypatch.setattr(rv, "cpu_has_vnni", lambda: False)
    for name in W8A8_INT8:
        with pytest.raises(RuntimeCheckError, match=r"W8A8-int per channel, .* activations \(int-quantized\)\): "
                                                    r"its int8 GEMM \(oneDNN\) on a CPU without VNNI"):
            rv.check_vllm(folders[name])
    with pytest.raises(RuntimeCheckError, match=r"W8A8-float per channel, static activations \(float-quantized\)\): "
                                                r"its CPU FP8 kernel .* cannot take a static per-tensor activation"):
        rv.check_vllm(folders["w8a8_fp8_static"])


@pytest.mark.avx512
def test_int8_folders_run_where_the_cpu_has_vnni(folders):
    """Only on x86 CPUs with AVX-512 VNNI (``pytest -m avx512``): never yet run, the dev box has AVX2 only."""
    if not rv.cpu_has_vnni():
        pytest.fail("this test needs an x86 CPU with VNNI, where vLLM's int8 GEMM sums in 32 bits")
    needs_vllm()
    for name, result in zip(W8A8_INT8, rv.check_plans([rv.plan_check(folders[n], max_tokens=8) for n in W8A8_INT8])):
        assert result["ok"] and result["dtype"] == "float32", (name, result)
