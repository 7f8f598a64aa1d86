"""W8A8 (int8 with SmoothQuant, FP8 E4M3): the math on nn.Linear against references and compressed-tensors,
and the stage on a tiny Llama, whose reloaded folder computes exactly what the stage emulated."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from compressed_tensors.quantization import QuantizationArgs
from compressed_tensors.quantization.lifecycle.forward import fake_quantize as ct_fake_quantize
from compressed_tensors.quantization.lifecycle.helpers import disable_quantization
from compressed_tensors.quantization.utils import compute_dynamic_scales_and_zp
from conftest import build_model, tiny_config
from safetensors import safe_open
from test_quant_stages import quant_args
from transformers import AutoModelForCausalLM

from slimforge import cli
from slimforge.arch import decoder_layers, scaling_groups
from slimforge.config import DataConfig
from slimforge.data import build_data, calibration_samples
from slimforge.quantize.config import SMOOTHING_GROUPS, W8A8_TYPES, W8A8Config
from slimforge.quantize.gptq import gptq_quantize_weight
from slimforge.quantize.w8a8 import (
    FP8_MAX,
    HALF_RANGE,
    dynamic_token_scales,
    fake_quantize,
    fake_quantize_activation,
    quantize_inputs,
    reader_column_max,
    search_alpha,
    smoothed_output_error,
    smoothquant_scales,
    static_scale,
    weight_scales,
)
from slimforge.quantize.w8a8_stage import CT_TYPES, FORMATS, w8a8_quantize_model

KINDS = ("int8", "fp8")


def linear(seed: int = 0, rows: int = 24, cols: int = 48) -> nn.Linear:
    torch.manual_seed(seed)
    layer = nn.Linear(cols, rows, bias=False)
    with torch.no_grad():
        layer.weight[0, 3] = 0.9  # an outlier row: per-channel scales must differ from per-tensor ones
    return layer


def activations(cols: int = 48, seed: int = 1, outlier: float = 40.0) -> torch.Tensor:
    """[batch, tokens, features] inputs with one outlier channel, as LLM activations have."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 7, cols, generator=g)
    x[..., 5] *= outlier
    x[1, 3] = 0.0  # an all-zero token
    return x


def ct_args(kind: str, strategy: str, dynamic: bool = False) -> QuantizationArgs:
    return QuantizationArgs(num_bits=8, type=CT_TYPES[kind], symmetric=True, strategy=strategy, dynamic=dynamic)


def e4m3_values() -> torch.Tensor:
    """Every finite E4M3 value, from its 256 bit patterns (NaN is 0x7f / 0xff): the grid, built without casting."""
    bits = torch.arange(256, dtype=torch.int32)
    sign = torch.where(bits >= 128, -1.0, 1.0)
    exponent, mantissa = (bits >> 3) & 0xF, (bits & 0x7).float()
    normal = (1 + mantissa / 8) * torch.pow(2.0, exponent.float() - 7)
    values = sign * torch.where(exponent == 0, mantissa / 8 * 2.0**-6, normal)
    return values[(bits & 0x7F) != 0x7F].unique()


# --- the grids against compressed-tensors and simple references ------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("per_channel", [True, False])
def test_weight_rounding_matches_compressed_tensors_to_the_bit(kind, per_channel):
    w = linear().weight.detach()
    scales = weight_scales(w, kind, per_channel, torch.bfloat16)
    assert scales.shape == ((24, 1) if per_channel else (1, 1))
    theirs = ct_fake_quantize(w, scales, torch.zeros_like(scales), ct_args(kind, "channel" if per_channel else "tensor"))
    assert torch.equal(fake_quantize(w, scales, kind), theirs)


@pytest.mark.parametrize("kind", KINDS)
def test_dynamic_per_token_activations_match_compressed_tensors_to_the_bit(kind):
    """compressed-tensors' own dynamic scales and quantize-dequantize, on a [batch, tokens, features] input
    (its per-token strategy reduces over the last dimension of a 3-D input: a linear's input in a model)."""
    x = activations()
    args = ct_args(kind, "token", dynamic=True)
    scale, zero = compute_dynamic_scales_and_zp(x, args, module=None)
    assert torch.equal(dynamic_token_scales(x, kind), scale)
    assert torch.equal(fake_quantize_activation(x, kind), ct_fake_quantize(x, scale, zero, args))
    assert torch.equal(fake_quantize_activation(x, kind)[1, 3], torch.zeros(48))  # the zero token stays zero


@pytest.mark.parametrize("kind", KINDS)
def test_static_activations_match_compressed_tensors_and_clip_beyond_the_calibrated_range(kind):
    x = activations()
    scale = static_scale(x.abs().amax() / 2, kind, torch.bfloat16)  # calibrated on half the range seen now
    ours = fake_quantize_activation(x, kind, scale)
    assert torch.equal(ours, ct_fake_quantize(x, scale, torch.zeros_like(scale), ct_args(kind, "tensor")))
    edge = float(scale) * (128 if kind == "int8" else FP8_MAX)  # int8's lowest code is -128
    assert ours.abs().max() <= edge and (x.abs() > 1.5 * ours.abs()).any()  # the outliers clipped


def test_int8_rounds_to_the_nearest_of_256_codes():
    w = linear().weight.detach()
    scales = weight_scales(w, "int8")
    values = fake_quantize(w, scales, "int8")
    codes = (values / scales).round()
    assert torch.equal(codes * scales, values) and codes.min() >= -128 and codes.max() <= 127
    # Nearest: no value is more than half a step off (a row's largest, at +127.5, is clamped to 127).
    assert (w / scales - codes).abs().max() <= 0.5 + 1e-4
    assert torch.allclose(scales.squeeze(1), w.abs().amax(1) / 127.5)


def test_fp8_rounds_to_the_nearest_e4m3_value():
    """Against the E4M3 value table, not torch's cast: each scaled weight lands on a nearest grid value."""
    w = linear().weight.detach()
    scales = weight_scales(w, "fp8")
    grid = e4m3_values()
    assert grid.numel() == 253 and grid.max() == FP8_MAX  # 254 finite patterns, +0 and -0 one value
    nearest = grid[((w / scales).unsqueeze(-1) - grid).abs().argmin(dim=-1)]
    assert torch.equal(fake_quantize(w, scales, "fp8"), nearest * scales)


def test_scales_are_rounded_to_their_storage_dtype_and_never_zero():
    w = torch.zeros(4, 8)
    w[0] = torch.linspace(-1, 1, 8) * 0.3337
    scales = weight_scales(w, "int8", scale_dtype=torch.bfloat16)
    assert torch.equal(scales, scales.to(torch.bfloat16).float())
    assert (scales > 0).all()  # all-zero rows get an epsilon scale and keep zero codes
    assert torch.equal(fake_quantize(w, scales, "int8")[1:], torch.zeros(3, 8))


# --- activation rounding on an nn.Linear ------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_an_input_hook_rounds_what_the_linear_sees(kind):
    layer, x = linear(), activations()
    plain = layer(x)
    handle = quantize_inputs(layer, kind)
    rounded = layer(x)
    assert torch.equal(rounded, F.linear(fake_quantize_activation(x, kind), layer.weight))
    assert (rounded - plain).abs().max() > 1e-4  # rounding really happened
    handle.remove()
    assert torch.equal(layer(x), plain)


# --- SmoothQuant -----------------------------------------------------------------------------------


def test_smoothquant_scales_follow_the_formula():
    act, wmax = torch.tensor([8.0, 1.0, 0.0, 2.0]), torch.tensor([0.5, 2.0, 1.0, 0.0])
    s = smoothquant_scales(act, wmax, 0.5)
    assert torch.allclose(s, torch.tensor([4.0, 0.5 ** 0.5, 1.0, 1.0]))  # dead channels keep 1
    assert torch.allclose(smoothquant_scales(act, wmax, 1.0)[:2], act[:2])
    assert torch.allclose(smoothquant_scales(act, wmax, 0.0)[:2], 1 / wmax[:2])
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        smoothquant_scales(act, wmax, 1.2)


def test_smoothing_evens_out_channels_and_cuts_the_w8a8_error_of_an_outlier_input():
    """On a linear fed an outlier channel: alpha=1 makes every channel's largest input equal, alpha=0 every
    weight column's largest value; alpha=0.5 lowers the output error of int8 weights and activations."""
    layer, x = linear(), activations(outlier=60.0)
    act_max = x.abs().flatten(0, 1).amax(0)
    wmax = reader_column_max([layer.weight])
    for alpha, even in ((1.0, act_max / smoothquant_scales(act_max, wmax, 1.0)),
                        (0.0, wmax * smoothquant_scales(act_max, wmax, 0.0))):
        assert torch.allclose(even, torch.ones_like(even)), alpha

    def w8a8_error(s: torch.Tensor) -> float:
        w = layer.weight.detach() * s
        w_q = fake_quantize(w, weight_scales(w, "int8"), "int8")
        y = F.linear(fake_quantize_activation(x / s, "int8"), w_q)
        return float((y - layer(x)).detach().pow(2).mean())

    assert w8a8_error(smoothquant_scales(act_max, wmax, 0.5)) < 0.5 * w8a8_error(torch.ones(48))


@pytest.mark.parametrize("static", [False, True])
def test_the_alpha_search_scores_each_alpha_by_the_readers_output_error_and_keeps_the_least(static):
    """Two readers of one outlier input: each grid point's error is the brute-force sum over the readers
    of ``|Q_a(X/s) Q_w(W s)^T - X W^T|^2``, and the search returns the grid's minimum, which beats no smoothing."""
    readers = [linear(seed=0), linear(seed=4, rows=16)]
    x = activations(outlier=60.0).flatten(0, 1)
    act_max = x.abs().amax(0)
    weights = [r.weight for r in readers]
    grid = [0.2, 0.4, 0.5, 0.6, 0.8, 0.95]

    def brute(alpha: float | None) -> float:
        s = torch.ones_like(act_max) if alpha is None else smoothquant_scales(act_max, reader_column_max(weights), alpha)
        scale = static_scale((act_max / s).max(), "int8") if static else None
        x_q = fake_quantize_activation(x / s, "int8", scale)
        total = 0.0
        for r in readers:
            w = r.weight.detach() * s
            total += float((F.linear(x_q, fake_quantize(w, weight_scales(w, "int8"), "int8")) - r(x)).detach()
                           .pow(2).sum())
        return total

    best, errors = search_alpha(x, weights, act_max, grid, "int8", static=static)
    assert errors == pytest.approx([brute(a) for a in grid], rel=1e-5)
    assert best == grid[errors.index(min(errors))]
    assert len(set(errors)) == len(grid)  # the grid points really differ
    assert smoothed_output_error(x, weights, act_max, grid[1], "int8", static=static) == errors[1]
    assert min(errors) < 0.5 * brute(None)  # no smoothing


# --- GPTQ on the 8-bit grids ------------------------------------------------------------------------


def correlated(cols: int = 48, tokens: int = 1024) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    return torch.randn(tokens, cols, generator=g) @ (torch.randn(cols, cols, generator=g) / cols**0.5 + torch.eye(cols))


@pytest.mark.parametrize("kind", KINDS)
def test_gptq_on_the_w8a8_grid_stays_on_it_and_beats_rtn(kind):
    w, x = linear().weight.detach(), correlated()
    h = x.T @ x / len(x)
    scales = weight_scales(w, kind, scale_dtype=torch.bfloat16)
    result = gptq_quantize_weight(w, h, 8, -1, act_order=True, block_size=16, scales=scales,
                                  grid=lambda column, scale: fake_quantize(column, scale, kind))
    assert torch.equal(fake_quantize(result.weight, scales, kind), result.weight)
    rtn = fake_quantize(w, scales, kind)
    err = {name: float(((x @ (w - q).T) ** 2).mean()) for name, q in (("gptq", result.weight), ("rtn", rtn))}
    assert err["gptq"] < 0.8 * err["rtn"], err


def test_the_grid_hook_is_the_integer_path_on_the_int8_grid():
    """Parity: GPTQ with W8A8's int8 grid passed in computes what its own 8-bit integer grid does, bit for bit."""
    w, x = linear().weight.detach(), correlated()
    h = x.T @ x / len(x)
    scales = weight_scales(w, "int8", scale_dtype=torch.bfloat16)
    hooked = gptq_quantize_weight(w, h, 8, -1, block_size=16, scales=scales,
                                  grid=lambda column, scale: fake_quantize(column, scale, "int8"))
    own = gptq_quantize_weight(w, h, 8, -1, block_size=16, scales=scales)
    assert torch.equal(hooked.weight, own.weight)


# --- what the writer cannot express ---------------------------------------------------------------


def test_a_decoder_weight_that_is_not_a_linear_is_refused_before_calibration(tokenizer):
    """Fused experts (transformers 5 keeps them as 3-D parameters) would stay unquantized unannounced."""
    from slimforge.errors import ConfigError
    from slimforge.quantize.w8a8_stage import check_writable

    model = build_model("llama", tokenizer, layers=1)
    check_writable(model, W8A8Config(type="fp8"))  # a dense Llama: every decoder weight is a Linear's
    experts = nn.Module()
    experts.gate_up_proj = nn.Parameter(torch.zeros(4, 16, 32))
    decoder_layers(model)[0].mlp.experts = experts
    with pytest.raises(ConfigError, match=r"quantize method w8a8 \(fp8\) writes compressed-tensors schemes for "
                                          r"nn\.Linear layers, and this model's decoder also holds "
                                          r"layers\.0\.mlp\.experts\.gate_up_proj \(Module \(4, 16, 32\)\)"):
        check_writable(model, W8A8Config(type="fp8"))


# --- one source per choice -------------------------------------------------------------------------


def test_every_type_the_schema_accepts_has_a_grid_and_a_format():
    assert set(HALF_RANGE) == set(FORMATS) == set(CT_TYPES) == set(W8A8_TYPES)


def test_smoothing_groups_are_the_layouts_group_names(tokenizer):
    """The schema's group names are those arch.py gives a block (v -> o only without GQA)."""
    names = {g.name for g in scaling_groups(decoder_layers(build_model("llama", tokenizer, 1))[0],
                                            tiny_config("llama", len(tokenizer), 1))}
    config = tiny_config("llama", len(tokenizer), 1)
    config.num_key_value_heads = config.num_attention_heads
    names |= {g.name for g in scaling_groups(decoder_layers(AutoModelForCausalLM.from_config(config))[0], config)}
    assert names == set(SMOOTHING_GROUPS)


# --- the stage on a tiny Llama: the reloaded folder computes what the stage emulated ---------------

TINY_CALIB = ["stages.quant.num_samples=4", "stages.quant.seq_len=16", "stages.quant.batch_size=2"]
# The two presets, with the other activation scheme on FP8 so both schemes and both grids are run.
RUNS = {
    "int8": ("w8a8_int8", []),
    "fp8_static": ("w8a8_fp8", ["stages.quant.activations=static", "stages.quant.weight_scales=tensor"]),
    # One SmoothQuant alpha everywhere instead of the preset's search, and RTN.
    "int8_fixed_alpha": ("w8a8_int8", ["stages.quant.smoothquant_alpha_grid=null", "stages.quant.rounding=rtn"]),
}


@pytest.fixture(scope="module")
def runs(teacher_dir, corpus_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("w8a8-runs")
    out = {}
    for name, (preset, overrides) in RUNS.items():
        args = quant_args(teacher_dir, corpus_dir, root / name, preset, *TINY_CALIB, *overrides,
                          "~eval.tasks.perplexity")
        assert cli.main(args) == 0, name
        out[name] = root / name / "stages" / "quant"
    return out


def recorded_config(folder: Path) -> W8A8Config:
    from slimforge.config import stage_config_from_meta

    cfg = stage_config_from_meta(json.loads((folder / "slimforge.json").read_text()))
    assert isinstance(cfg, W8A8Config)
    return cfg


def emulate(teacher_dir, corpus_dir, tokenizer, cfg: W8A8Config):
    """The stage's own math on the teacher in memory, with what the folder stores in bf16 rounded to bf16."""
    from slimforge.quantize.common import quantizable_linears

    model = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    bundle = build_data(DataConfig(path=str(corpus_dir), block_size=32), tokenizer)
    ids = calibration_samples(bundle, cfg.num_samples, cfg.seq_len, seed=0)
    linears = quantizable_linears(model)
    result = w8a8_quantize_model(model, ids, cfg, torch.device("cpu"), torch.bfloat16, set(linears))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.rsplit(".", 1)[0] not in linears:
                param.copy_(param.to(torch.bfloat16).float())
    return model, result


@pytest.mark.parametrize("name", list(RUNS))
def test_the_reloaded_folder_computes_exactly_the_emulation_and_rounds_its_activations(
        runs, name, teacher_dir, corpus_dir, tokenizer):
    folder = runs[name]
    cfg = recorded_config(folder)
    ours, result = emulate(teacher_dir, corpus_dir, tokenizer, cfg)
    reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.randint(3, len(tokenizer), (2, 24), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        theirs, emulated = reloaded(input_ids=ids).logits, ours(input_ids=ids).logits
        assert torch.equal(theirs, emulated)  # same grids, same scales, same rounding, same order
        reloaded.apply(disable_quantization)  # compressed-tensors' switch: its forward then rounds nothing
        result.remove_hooks()
        weight_only, emulated_weight_only = reloaded(input_ids=ids).logits, ours(input_ids=ids).logits
    assert torch.equal(weight_only, emulated_weight_only)
    # Activation rounding is really in the reloaded forward: switching it off moves the logits.
    assert (theirs - weight_only).abs().max() > 1e-3
    if cfg.activations == "static":
        q_proj = decoder_layers(reloaded)[1].self_attn.q_proj
        assert torch.equal(q_proj.input_scale.detach().reshape(1),
                           result.input_scales["model.layers.1.self_attn.q_proj"])


def test_the_folders_hold_8bit_codes_and_declare_their_activation_scheme(runs):
    expected = {"int8": ("int-quantized", "int", "I8", True, "token"),
                "fp8_static": ("float-quantized", "float", "F8_E4M3", False, "tensor")}
    for name, (fmt, kind, dtype, dynamic, strategy) in expected.items():
        folder = runs[name]
        qc = json.loads((folder / "config.json").read_text())["quantization_config"]
        group = qc["config_groups"]["group_0"]
        assert qc["format"] == fmt and qc["ignore"] == ["lm_head"], name
        assert group["weights"]["type"] == group["input_activations"]["type"] == kind
        assert (group["input_activations"]["dynamic"], group["input_activations"]["strategy"]) == (dynamic, strategy)
        with safe_open(str(folder / "model.safetensors"), "pt") as fh:
            prefix = "model.layers.0.mlp.down_proj."
            keys = set(fh.keys())  # noqa: SIM118
            assert fh.get_slice(prefix + "weight").get_dtype() == dtype
            assert fh.get_slice(prefix + "weight_scale").get_dtype() == "BF16"
            assert (prefix + "input_scale" in keys) == (not dynamic)
            assert not any(k.endswith("zero_point") for k in keys)
            assert fh.get_slice("model.norm.weight").get_dtype() == "BF16"
        meta = json.loads((folder / "slimforge.json").read_text())
        assert 8.0 < meta["bits_per_weight"] < 8.6, name  # 8-bit codes and a bf16 scale per row (or tensor)
        assert meta["quantization"]["format"] == f"compressed-tensors/{fmt}"


def test_smoothquant_changed_the_int8_folders_norms_and_spread_is_reported(runs, teacher_dir):
    meta = json.loads((runs["int8"] / "slimforge.json").read_text())["quantization"]
    assert set(meta["smoothing_spread"]) == {"attn_in", "mlp_in", "up_down"}
    assert all(spread > 1 for spread in meta["smoothing_spread"].values())
    with safe_open(str(runs["int8"] / "model.safetensors"), "pt") as fh:
        norm = fh.get_tensor("model.layers.0.input_layernorm.weight").float()
    with safe_open(str(Path(teacher_dir) / "model.safetensors"), "pt") as fh:
        original = fh.get_tensor("model.layers.0.input_layernorm.weight").float()
    assert not torch.allclose(norm, original, atol=1e-2)  # the fold divided it by the channel scales


def test_the_alpha_search_reports_its_choice_per_group_and_block(runs, teacher_dir):
    meta = json.loads((runs["int8"] / "slimforge.json").read_text())["quantization"]
    alphas = meta["smoothquant_alphas"]
    blocks = json.loads((Path(teacher_dir) / "config.json").read_text())["num_hidden_layers"]
    assert set(alphas) == {"attn_in", "mlp_in", "up_down"}
    grid = {0.3, 0.4, 0.5, 0.6, 0.7, 0.8}  # the preset's
    assert all(len(v) == blocks and set(v) <= grid for v in alphas.values())
    fixed = json.loads((runs["int8_fixed_alpha"] / "slimforge.json").read_text())["quantization"]
    assert "smoothquant_alphas" not in fixed and fixed["smoothquant_alpha"] == 0.5


def test_slimforges_loader_keeps_the_8bit_codes_and_counts_no_scale_as_a_parameter(runs, teacher_dir):
    """The evaluation's loader casts what is stored in bf16 to float32, but not FP8 codes (they stay one
    byte each); the parameter count is the teacher's (scales and activation scales are metadata)."""
    from slimforge.arch import count_parameters
    from slimforge.eval.efficiency import logical_parameters
    from slimforge.models import load_model

    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
    for name, codes in (("int8", torch.int8), ("fp8_static", torch.float8_e4m3fn)):
        model = load_model(str(runs[name]), dtype=torch.float32, with_tokenizer=False)
        layer = decoder_layers(model)[0].mlp.down_proj
        assert layer.weight.dtype == codes and layer.weight_scale.dtype == torch.float32, name
        assert logical_parameters(model) == count_parameters(teacher), name
