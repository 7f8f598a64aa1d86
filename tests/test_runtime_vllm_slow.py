"""vLLM's CPU build on the real SmolLM2-135M teacher and what slimforge makes of it.

Marked ``slow`` (``pytest -m slow``): the teacher (float32 and bfloat16), a depth-pruned student,
and 4-bit RTN/GPTQ folders, checked in one vLLM process. The 4-bit folders run where the CPU
has vLLM's weight-only int kernel (AVX-512 on x86) and are refused in one line elsewhere; either
way the pinned compressed-tensors in vLLM's environment must read them as slimforge does.
Skips, saying why, where vLLM is not installed.
"""

from __future__ import annotations

import json

import pytest
from conftest import user_cache
from test_runtime_vllm import assert_pinned_reader_agrees, needs_vllm

import slimforge
from slimforge.errors import RuntimeCheckError
from slimforge.models import asset_model_folder
from slimforge.runtimes import vllm as rv

pytestmark = pytest.mark.slow

# SmolLM2-135M's widths (576, 1536) take groups of 32 and 64 and per-channel scales, not 128.
W4A16 = {"rtn_g32": ("rtn", {"group_size": 32}), "rtn_g64": ("rtn", {"group_size": 64}),
         "rtn_channel": ("rtn", {"group_size": -1}),
         "gptq_g64": ("gptq", {"group_size": 64, "num_samples": 16, "seq_len": 256})}
TOKENS = 16


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """The teacher's folder, a student with 4 of its 30 layers dropped, and 4- and 8-bit folders of the teacher."""
    needs_vllm()
    root = tmp_path_factory.mktemp("vllm-real")
    with user_cache():
        out = {"teacher": asset_model_folder("smollm2-135m")}
        out["depth"] = slimforge.prune("smollm2-135m", root / "depth", method="depth", criterion="list",
                                       layers=[20, 21, 22, 23], remove_ratio=None, dtype="float32", name="depth")
        for name, (method, options) in {**W4A16, "rtn8": ("rtn", {"bits": 8, "group_size": 64})}.items():
            out[name] = slimforge.quantize("smollm2-135m", root / name, method=method, name=name, dtype="float32",
                                           **options)
    return out


@pytest.fixture(scope="module")
def checked(artifacts):
    """Every check in one vLLM process."""
    plans = {"teacher": rv.plan_check(artifacts["teacher"], max_tokens=TOKENS),
             "teacher_bf16": rv.plan_check(artifacts["teacher"], max_tokens=TOKENS, dtype="bfloat16"),
             "depth": rv.plan_check(artifacts["depth"], max_tokens=TOKENS)}
    results = dict(zip(plans, rv.check_plans(list(plans.values()))))
    for name, result in results.items():  # the figures docs/runtimes.md reports
        print(name, json.dumps({k: result.get(k) for k in ("format", "dtype", "greedy", "logprob", "seconds")}))
    return results


@pytest.mark.parametrize("name", ["teacher", "depth"])
def test_full_precision_folders_agree_token_for_token_in_float32(checked, name):
    result = checked[name]
    assert result["ok"] and result["dtype"] == "float32"
    assert result["greedy"]["agreeing_prefix"] == [TOKENS] * len(rv.PROMPTS)
    assert result["logprob"]["max_abs_diff"] <= rv.FP32_TOLERANCE


def test_the_teacher_in_bfloat16_stays_within_its_own_rounding(checked):
    result = checked["teacher_bf16"]
    assert result["ok"], result
    assert 0 < result["logprob"]["max_abs_diff"] <= result["logprob"]["tolerance"]


@pytest.mark.parametrize("name", list(W4A16))
def test_4bit_folders_are_refused_in_one_line_without_avx512(artifacts, name, monkeypatch):
    monkeypatch.setattr(rv, "cpu_runs_wna16", lambda: False)
    with pytest.raises(RuntimeCheckError, match="built only into its AVX-512 extension"):
        rv.plan_check(artifacts[name])


@pytest.mark.avx512
def test_4bit_folders_run_where_the_cpu_has_the_kernel(artifacts):
    """Only on x86 CPUs with AVX-512 (``pytest -m "slow and avx512"``): never yet run, the dev box has AVX2 only."""
    if not rv.cpu_runs_wna16():
        pytest.fail("this test needs vLLM's 4-bit CPU kernel: an x86 CPU with AVX-512 (or another architecture)")
    results = rv.check_plans([rv.plan_check(artifacts[name], max_tokens=TOKENS) for name in W4A16])
    for name, result in zip(W4A16, results):
        assert result["ok"], (name, result)


def test_8bit_folders_are_refused(artifacts):
    with pytest.raises(RuntimeCheckError, match="W8A16 g64 .*4-bit weights only"):
        rv.plan_check(artifacts["rtn8"])


def test_the_pinned_compressed_tensors_reads_the_real_folders(artifacts, tmp_path):
    assert_pinned_reader_agrees(artifacts, [*W4A16, "rtn8"], list(range(100, 164)), tmp_path, 1e-4, 1200)
