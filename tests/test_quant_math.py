"""Quantization math on bare tensors and nn.Linear: the int grid, RTN, GPTQ, packing, GGUF row order, bit counts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
from compressed_tensors.quantization import QuantizationArgs
from compressed_tensors.quantization.lifecycle.forward import fake_quantize as ct_fake_quantize

from slimforge.quantize.config import COMPUTE_DTYPES, INT_BITS, SCALE_SEARCHES, STORAGE_DTYPES
from slimforge.quantize.gguf_export import rope_deinterleave, rope_interleave
from slimforge.quantize.gptq import gptq_quantize_weight
from slimforge.quantize.intquant import (
    code_range,
    dequantize_codes,
    fake_quantize,
    group_scales,
    mse_scales,
    quantize_codes,
    rtn_quantize,
    symmetric_scales,
)
from slimforge.quantize.report import bits_per_weight, safetensors_sizes


def weight(rows: int = 24, cols: int = 64, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    w = torch.randn(rows, cols) * 0.05
    w[0, 3] = 0.4  # an outlier, so some groups' scales differ a lot from others
    return w


def correlated_inputs(cols: int, tokens: int = 2048, seed: int = 1) -> torch.Tensor:
    """Inputs whose columns are strongly correlated and unequally scaled, like real activations."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(cols, cols, generator=g) / cols**0.5 + torch.eye(cols) * 0.3
    scale = torch.logspace(-1, 1, cols)[torch.randperm(cols, generator=g)]
    return (torch.randn(tokens, cols, generator=g) @ mixing) * scale


def output_error(w: torch.Tensor, w_q: torch.Tensor, x: torch.Tensor) -> float:
    return float(((x @ (w - w_q).T) ** 2).mean())


# --- the integer grid and RTN -------------------------------------------------------------


@pytest.mark.parametrize("bits,group_size", [(4, 32), (4, -1), (3, 16), (8, 32), (8, -1)])
def test_fake_quantize_matches_compressed_tensors_to_the_bit(bits, group_size):
    w = weight()
    scales = symmetric_scales(w, bits, group_size, torch.bfloat16)
    args = QuantizationArgs(num_bits=bits, type="int", symmetric=True,
                            strategy="group" if group_size > 0 else "channel",
                            group_size=group_size if group_size > 0 else None)
    theirs = ct_fake_quantize(w, scales, torch.zeros_like(scales), args)
    assert torch.equal(fake_quantize(w, scales, bits, group_size), theirs)


@pytest.mark.parametrize("bits,group_size", [(4, 32), (3, 16), (8, -1)])
def test_rtn_rounds_every_weight_to_its_nearest_grid_point(bits, group_size):
    w = weight()
    q = rtn_quantize(w, bits, group_size)
    codes = quantize_codes(w, q.scales, bits, group_size)
    low, high = code_range(bits)
    assert codes.min() >= low and codes.max() <= high
    assert torch.equal(dequantize_codes(codes, q.scales, group_size), q.weight)
    per_weight_scale = q.scales.repeat_interleave(w.shape[1] if group_size < 0 else group_size, dim=1)
    assert ((w - q.weight).abs() <= per_weight_scale / 2 + 1e-7).all()
    # The largest magnitude of each group uses the grid's full range.
    size = w.shape[1] if group_size < 0 else group_size
    grouped_w, grouped_codes = w.reshape(-1, size), codes.reshape(-1, size)
    at_max = grouped_codes.gather(1, grouped_w.abs().argmax(1, keepdim=True)).squeeze(1)
    assert (at_max.int().abs() >= high).all()


def test_rtn_scales_are_rounded_to_their_storage_dtype():
    w = weight()
    scales = symmetric_scales(w, 4, 32, torch.bfloat16)
    assert torch.equal(scales, scales.to(torch.bfloat16).float())
    zero_group = torch.zeros(2, 32)
    assert (symmetric_scales(zero_group, 4, 32) > 0).all()
    assert torch.equal(rtn_quantize(zero_group, 4, 32).weight, zero_group)


@pytest.mark.parametrize("bits", INT_BITS)  # every width the schema accepts
def test_pack_then_unpack_is_the_identity_on_our_codes(bits):
    w = weight(rows=10, cols=96)
    codes = quantize_codes(w, symmetric_scales(w, bits, 32), bits, 32)
    packed = pack_to_int32(codes, bits)
    assert packed.dtype == torch.int32 and packed.shape == (10, (96 * bits + 31) // 32)
    assert torch.equal(unpack_from_int32(packed, bits, codes.shape), codes)


# --- GPTQ ---------------------------------------------------------------------------------


@pytest.mark.parametrize("group_size,act_order", [(32, False), (32, True), (-1, False), (-1, True)])
def test_gptq_with_identity_hessian_is_rtn(group_size, act_order):
    w = weight()
    result = gptq_quantize_weight(w, torch.eye(w.shape[1]), 4, group_size, act_order=act_order, block_size=32)
    rtn = rtn_quantize(w, 4, group_size)
    assert torch.equal(result.weight, rtn.weight)
    assert torch.equal(result.scales, rtn.scales)


@pytest.mark.parametrize("bits,group_size,act_order", [(4, 32, False), (4, 32, True), (3, 32, True), (4, -1, False)])
def test_gptq_output_error_is_below_rtn_on_correlated_inputs(bits, group_size, act_order):
    w = weight(rows=48, cols=64)
    x = correlated_inputs(64)
    hessian = x.T @ x / len(x)
    result = gptq_quantize_weight(w, hessian, bits, group_size, act_order=act_order, block_size=32)
    rtn = rtn_quantize(w, bits, group_size)
    assert output_error(w, result.weight, x) < 0.7 * output_error(w, rtn.weight, x)


def test_gptq_weights_lie_on_their_grid_and_match_the_saved_codes():
    w = weight(rows=16, cols=64)
    x = correlated_inputs(64)
    result = gptq_quantize_weight(w, x.T @ x / len(x), 4, 32, act_order=True, block_size=64,
                                  scale_dtype=torch.bfloat16)
    assert torch.equal(fake_quantize(result.weight, result.scales, 4, 32), result.weight)
    codes = quantize_codes(result.weight, result.scales, 4, 32)
    assert torch.equal(dequantize_codes(codes, result.scales, 32), result.weight)


def test_gptq_lazy_blocks_do_not_change_the_result():
    w = weight(rows=16, cols=64)
    x = correlated_inputs(64)
    h = x.T @ x / len(x)
    small = gptq_quantize_weight(w, h, 4, 16, block_size=16)
    large = gptq_quantize_weight(w, h, 4, 16, block_size=64)
    # Lazy updates reorder fp32 sums: scales may differ in the last bit, codes (nearly) never.
    assert torch.allclose(small.scales, large.scales, rtol=1e-5)
    codes_small = quantize_codes(small.weight, small.scales, 4, 16)
    codes_large = quantize_codes(large.weight, large.scales, 4, 16)
    assert (codes_small == codes_large).float().mean() > 0.99


def test_gptq_zeroes_dead_columns_and_rejects_straddling_groups():
    w = weight(rows=8, cols=64)
    x = correlated_inputs(64)
    x[:, 5] = 0
    result = gptq_quantize_weight(w, x.T @ x / len(x), 4, 32, block_size=32)
    assert result.dead_columns == 1 and (result.weight[:, 5] == 0).all()
    with pytest.raises(ValueError, match="multiple of group_size"):
        gptq_quantize_weight(w, torch.eye(64), 4, 64, block_size=32)


def test_gptq_act_order_scales_come_from_the_original_groups():
    w = weight(rows=8, cols=64)
    x = correlated_inputs(64)
    result = gptq_quantize_weight(w, x.T @ x / len(x), 4, 32, act_order=True, block_size=32)
    assert torch.equal(result.scales, symmetric_scales(w, 4, 32))


@pytest.mark.parametrize("bits,group_size", [(4, 32), (3, 16), (4, -1)])
def test_mse_scales_never_lose_to_minmax_and_win_on_heavy_tails(bits, group_size):
    torch.manual_seed(3)
    w = torch.distributions.StudentT(2.0).sample((32, 64)) * 0.02  # heavy tails: clipping pays
    importance = torch.logspace(-1, 1, 64)

    def err(scales, imp=None):
        e = (fake_quantize(w, scales, bits, group_size) - w) ** 2
        return (e * imp if imp is not None else e).reshape(32, -1, 64 if group_size < 0 else group_size).sum(-1)

    minmax = symmetric_scales(w, bits, group_size)
    plain, weighted = mse_scales(w, bits, group_size), mse_scales(w, bits, group_size, importance=importance)
    assert (err(plain) <= err(minmax) + 1e-12).all()  # per group: the full range is one of the candidates
    assert err(plain).sum() < 0.9 * err(minmax).sum()
    assert (err(weighted, importance) <= err(plain, importance) + 1e-12).all()
    assert ((plain <= minmax) & (plain >= 0.5 * minmax - 1e-9)).all()  # only ever clips, at most to half
    assert torch.equal(group_scales(w, bits, group_size, search="minmax"), minmax)
    with pytest.raises(ValueError, match="scale search must be one of minmax, mse"):
        group_scales(w, bits, group_size, search="best")


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_with_mse_scales_lowers_the_output_error(act_order):
    torch.manual_seed(4)
    w = torch.distributions.StudentT(2.5).sample((48, 64)) * 0.02
    x = correlated_inputs(64)
    h = x.T @ x / len(x)
    minmax = gptq_quantize_weight(w, h, 4, 32, act_order=act_order, block_size=32)
    mse = gptq_quantize_weight(w, h, 4, 32, act_order=act_order, block_size=32, scale_search="mse")
    assert torch.equal(fake_quantize(mse.weight, mse.scales, 4, 32), mse.weight)  # still on its own grid
    assert output_error(w, mse.weight, x) < output_error(w, minmax.weight, x)


# --- GGUF row order ----------------------------------------------------------------------


@pytest.mark.parametrize("n_head", [1, 2, 4])
def test_rope_interleave_is_llama_cpp_order_and_transformers_undoes_it(n_head):
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    head_dim = 8
    w = torch.arange(n_head * head_dim * 3, dtype=torch.float32).reshape(n_head * head_dim, 3)
    inter = rope_interleave(w, n_head)
    # Within each head, rows go x0, y0, x1, y1, ... where x are the first half and y the second.
    first = inter[:head_dim, 0]
    expected = torch.stack([w[: head_dim // 2, 0], w[head_dim // 2: head_dim, 0]], dim=1).reshape(-1)
    assert torch.equal(first, expected)
    assert torch.equal(rope_deinterleave(inter, n_head), w)
    undone = LlamaTensorProcessor()._reverse_permute_weights(inter.numpy(), n_head, n_head)
    assert np.array_equal(undone, w.numpy())


# --- what the files cost ------------------------------------------------------------------


def test_bits_per_weight_counts_every_tensor_under_a_quantized_module():
    sizes = {"a.weight_packed": 512, "a.weight_scale": 64, "a.weight_shape": 16, "ab.weight": 999, "b.weight": 4096}
    assert bits_per_weight(sizes, {"a": 1024}) == pytest.approx(8 * (512 + 64 + 16) / 1024)
    assert bits_per_weight(sizes, {"a": 1024, "b": 2048}) == pytest.approx(8 * (512 + 64 + 16 + 4096) / 3072)


def test_safetensors_sizes_reads_the_header(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(3, 5), "y": torch.zeros(7, dtype=torch.int8)}, tmp_path / "m.safetensors")
    assert safetensors_sizes(tmp_path / "m.safetensors") == {"x": 60, "y": 7}


def test_group_size_errors_name_every_supported_size_that_divides():
    from types import SimpleNamespace

    from slimforge.config import FieldError
    from slimforge.quantize.config import GptqConfig, dividing_group_sizes_hint

    assert dividing_group_sizes_hint([576, 1536]) == "32 or 64 do"  # SmolLM2-135M
    assert dividing_group_sizes_hint([32, 64]) == "32 does"
    assert dividing_group_sizes_hint([48]) == "none of 32, 64, 128 does"
    smollm = SimpleNamespace(hidden_size=576, intermediate_size=1536, num_attention_heads=9, head_dim=64)
    with pytest.raises(FieldError) as caught:
        GptqConfig(group_size=128).check_widths(smollm, "the teacher")
    assert str(caught.value) == (
        "group_size=128 is invalid: must divide every linear input width, but the teacher has hidden_size=576, "
        "num_attention_heads*head_dim=576; pick a group size that divides them (32 or 64 do) or -1 (per channel)")
    GptqConfig(group_size=64).check_widths(smollm, "the teacher")  # fits: no error


# --- one source per choice: every name the schema accepts, the math runs ---------------------


@pytest.mark.parametrize("search", SCALE_SEARCHES)
def test_every_scale_search_the_schema_accepts_runs(search):
    w = weight()
    scales = group_scales(w, 4, 32, search=search, importance=torch.ones(64))
    assert scales.shape == (24, 2) and (scales > 0).all()
    h = torch.eye(64)
    result = gptq_quantize_weight(w, h, 4, 32, act_order=False, block_size=32, scale_search=search)
    assert torch.equal(fake_quantize(result.weight, result.scales, 4, 32), result.weight)


def test_an_unknown_scale_search_names_the_schemas_choices():
    with pytest.raises(ValueError, match=f"must be one of {', '.join(SCALE_SEARCHES)}, got 'best'"):
        group_scales(weight(), 4, 32, search="best")


def test_dtype_choices_are_torch_dtypes():
    for name in set(STORAGE_DTYPES + COMPUTE_DTYPES) - {"auto"}:
        assert isinstance(getattr(torch, name), torch.dtype), name


def test_the_schema_and_its_choice_sets_import_without_torch_or_gguf():
    import subprocess
    import sys

    code = ("import sys, slimforge.quantize.config\n"
            "print(sorted(m for m in ('torch', 'gguf', 'transformers', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
