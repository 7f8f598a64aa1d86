"""AWQ: its math on nn.Linear against brute force, the stage on every family, the preset through a run."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from conftest import ARCHS, build_model, corpus_text
from transformers import AutoModelForCausalLM

from slimforge import cli
from slimforge.arch import decoder_layers, query_key_projections, scaling_groups
from slimforge.calibration.activations import record_linear_inputs
from slimforge.calibration.layerwise import layerwise
from slimforge.config import FieldError
from slimforge.errors import ConfigError
from slimforge.eval.fidelity import token_kl
from slimforge.quantize.awq import (
    channel_scales,
    clip_scales,
    exponent_grid,
    scaled_rounding_error,
    search_scales,
    weight_channel_means,
)
from slimforge.quantize.awq_stage import ROUNDINGS, AwqResult, awq_quantize_model, scale_block
from slimforge.quantize.compressed import save_compressed
from slimforge.quantize.config import AWQ_ROUNDINGS, AwqConfig
from slimforge.quantize.intquant import fake_quantize, round_scales, rtn_quantize, symmetric_scales

STUDENT = str(Path(__file__).resolve().parent / "assets" / "recipes" / "student.yaml")
CPU = torch.device("cpu")


def outlier_inputs(cols: int, tokens: int = 512, outliers: tuple[int, ...] = (3, 17), seed: int = 0) -> torch.Tensor:
    """Activations with a few channels far larger than the rest: the premise AWQ is built on."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, cols, generator=g)
    x[:, list(outliers)] *= 25.0
    return x


def linear(rows: int = 24, cols: int = 64, seed: int = 1) -> torch.nn.Linear:
    torch.manual_seed(seed)
    layer = torch.nn.Linear(cols, rows, bias=False)
    layer.weight.data.normal_(0, 0.05)
    return layer


def hessian_of(x: torch.Tensor) -> torch.Tensor:
    return x.T @ x / x.shape[0]


# --- the math, against brute force ----------------------------------------------------------


def test_channel_scales_follow_the_formula_and_are_centred():
    act = torch.tensor([0.5, 2.0, 8.0, 0.0])
    w = torch.tensor([0.2, 0.9, 0.4, 0.5])
    for exponent in (0.0, 0.25, 0.8):
        raw = (act.pow(exponent) / (w.pow(1 - exponent) + 1e-4)).clamp_min(1e-4)
        torch.testing.assert_close(channel_scales(act, exponent, w), raw / (raw.max() * raw.min()).sqrt())
        got = channel_scales(act, exponent)
        assert torch.isclose(got.max() * got.min(), torch.tensor(1.0))
    assert torch.equal(channel_scales(act, 0.0), torch.ones(4))  # activations only, a = 0: no scaling
    assert exponent_grid(4) == [0.0, 0.25, 0.5, 0.75]


@pytest.mark.parametrize("group_size", [16, -1])
def test_weight_channel_means_is_each_weight_over_its_group_max_averaged(group_size):
    weights = [linear(8, 32, seed=2).weight, linear(5, 32, seed=3).weight]
    size = 32 if group_size < 0 else group_size
    expected = torch.zeros(32)
    rows = 0
    for w in weights:
        for r in range(w.shape[0]):
            for start in range(0, 32, size):
                chunk = w[r, start:start + size].abs()
                expected[start:start + size] += chunk / chunk.max()
            rows += 1
    torch.testing.assert_close(weight_channel_means(weights, group_size), expected / rows)


@pytest.mark.parametrize("group_size", [16, -1])
def test_scaled_rounding_error_is_the_output_error_of_the_scaled_rounded_linear(group_size):
    layer, x = linear(), outlier_inputs(64)
    s = torch.rand(64, generator=torch.Generator().manual_seed(4)) + 0.5
    scaled = copy.deepcopy(layer)  # the fold: columns times s, rounded; the input divided by s
    with torch.no_grad():
        scaled.weight.copy_(rtn_quantize(layer.weight * s, 4, group_size).weight)
        brute = float(((scaled(x / s) - layer(x)) ** 2).sum(1).mean())
    got = scaled_rounding_error(layer.weight, hessian_of(x), s, 4, group_size)
    assert got == pytest.approx(brute, rel=1e-4)


def test_search_scales_keeps_the_grid_point_with_the_least_loss():
    layer, x = linear(), outlier_inputs(64)
    h, act = hessian_of(x), x.abs().mean(0)
    wmean = weight_channel_means([layer.weight], 16)

    def loss(s):
        return scaled_rounding_error(layer.weight, h, s, 3, 16)

    choice = search_scales(act, loss, 10, wmean)
    tried = {a: loss(channel_scales(act, a, wmean)) for a in exponent_grid(10)}
    best = min(tried, key=tried.get)
    assert choice.exponent == best and choice.loss == tried[best]
    assert choice.loss < 0.7 * choice.unscaled_loss  # outlier channels: scaling pays
    torch.testing.assert_close(choice.scales, channel_scales(act, best, wmean))


def test_search_scales_keeps_no_scaling_when_nothing_beats_it():
    choice = search_scales(torch.rand(8) + 0.1, lambda s: float((s - 1).abs().sum()), 5, torch.rand(8) + 0.1)
    assert choice.exponent is None and torch.equal(choice.scales, torch.ones(8))
    assert choice.loss == choice.unscaled_loss == 0.0


@pytest.mark.parametrize("bits,group_size", [(4, 16), (3, 32), (4, -1)])
def test_clip_scales_pick_each_groups_best_range_by_brute_force(bits, group_size):
    layer, x = linear(), outlier_inputs(64, tokens=256)
    w = layer.weight.detach()
    steps, min_shrink = 8, 0.5
    got = clip_scales(w, hessian_of(x), bits, group_size, None, steps, min_shrink)
    size = 64 if group_size < 0 else group_size
    amax = w.reshape(24, -1, size).abs().amax(-1)
    best_err = torch.full(amax.shape, float("inf"))
    best = torch.zeros(amax.shape)
    for shrink in torch.linspace(1.0, min_shrink, steps).tolist():
        scales = round_scales(amax * shrink / ((2**bits - 1) / 2), None)
        q = fake_quantize(w, scales, bits, group_size)
        for r in range(24):
            for g in range(amax.shape[1]):
                cols = slice(g * size, (g + 1) * size)
                err = float(((x[:, cols] @ (w[r, cols] - q[r, cols])) ** 2).mean())  # the group's share of output r
                if err < best_err[r, g] * (1 - 1e-4):
                    best_err[r, g], best[r, g] = err, scales[r, g]
    torch.testing.assert_close(got, best)
    minmax = symmetric_scales(w, bits, group_size)
    clipped = float(((x @ (w - fake_quantize(w, got, bits, group_size)).T) ** 2).mean())
    plain = float(((x @ (w - fake_quantize(w, minmax, bits, group_size)).T) ** 2).mean())
    assert clipped < plain


# --- the stage's pieces on a tiny model ---------------------------------------------------------


def test_folded_hessians_are_those_the_scaled_block_records(tokenizer):
    """The closed-form H / (s s^T) the rounding uses equals a fresh recording of the scaled block."""
    model = build_model("llama", tokenizer, layers=1)
    ids = torch.randint(3, len(tokenizer), (4, 16), generator=torch.Generator().manual_seed(0))
    cfg = AwqConfig(group_size=32, grid=5)
    for step in layerwise(model, ids, batch_size=2, device=CPU):
        linears = step.linears()
        with record_linear_inputs(linears, hessian=True) as stats:
            step.run()
        hessians = {name: stats[name].hessian for name in linears}
        result = AwqResult()
        scale_block(step.layer, model.config, stats, hessians, cfg, torch.float32, result)
        assert any(a is not None for a in result.exponents[0].values())  # something was folded
        with record_linear_inputs(linears, hessian=True) as fresh:
            step.run()
        for name in linears:
            torch.testing.assert_close(hessians[name], fresh[name].hessian, rtol=1e-4, atol=1e-6)


def test_every_rounding_the_schema_offers_is_implemented():
    assert set(ROUNDINGS) == set(AWQ_ROUNDINGS)


# Every family, and across them both roundings, both group layouts, clip on and off.
FAMILY_SETTINGS = {
    "llama": dict(rounding="gptq", group_size=32, clip_search=True), "mistral": dict(rounding="rtn", group_size=-1),
    "qwen2": dict(rounding="rtn", group_size=32), "qwen3": dict(rounding="gptq", group_size=-1),
    "phi3": dict(rounding="gptq", group_size=32, act_order=False), "gemma": dict(rounding="rtn", group_size=32),
    "gemma2": dict(rounding="gptq", group_size=-1),
    "gemma3_text": dict(rounding="rtn", group_size=-1, clip_search=False),
}


@pytest.mark.parametrize("arch", ARCHS)
def test_every_family_quantizes_and_reloads_to_the_same_logits(arch, tokenizer, tmp_path):
    assert set(FAMILY_SETTINGS) == set(ARCHS)
    model = build_model(arch, tokenizer, layers=2)
    teacher = copy.deepcopy(model)
    ids = torch.randint(3, len(tokenizer), (4, 16), generator=torch.Generator().manual_seed(0))
    cfg = AwqConfig(grid=6, clip_grid=6, block_size=32, batch_size=2, **FAMILY_SETTINGS[arch])
    result = awq_quantize_model(model, ids, cfg, CPU, torch.float32)
    assert len(result.exponents) == 2 and result.scales
    per_block = [sum(isinstance(m, torch.nn.Linear) for m in layer.modules()) - len(query_key_projections(layer))
                 for layer in decoder_layers(model)]
    assert result.clipped == (sum(per_block) if cfg.clips() else 0)  # every linear but q and k, when on
    assert any(a is not None for block in result.exponents for a in block.values())
    prompt = torch.tensor([[5, 17, 42, 99, 7, 63, 28, 11]])
    with torch.no_grad():
        ours, reference = model(input_ids=prompt).logits, teacher(input_ids=prompt).logits
    assert 0 < float(token_kl(reference, ours).mean()) < 0.05  # quantized, and still close
    save_compressed(model, tokenizer, tmp_path, result.scales, cfg.bits, cfg.group_size,
                    cfg.rounding == "gptq" and cfg.act_order, torch.float32, {})
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert reloaded.hf_quantizer is not None
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=prompt).logits, ours, rtol=0, atol=1e-5)


def _inject_outlier_channels(model, channels: tuple[int, ...], factor: float) -> None:
    """Make a few hidden channels large where the norms write them, and their readers' columns small
    to match: the function is unchanged, but the activations now have AWQ's salient channels."""
    with torch.no_grad():
        for layer in decoder_layers(model):
            for group in scaling_groups(layer, model.config):
                if not group.source_is_norm:
                    continue
                layer.get_submodule(group.source).weight[list(channels)] *= factor
                for name in group.targets:
                    layer.get_submodule(name).weight[:, list(channels)] /= factor


def test_awq_with_rtn_beats_plain_rtn_when_a_few_channels_dominate(tokenizer):
    model = build_model("llama", tokenizer, layers=2)
    _inject_outlier_channels(model, (2, 9, 21), 20.0)
    ids = torch.randint(3, len(tokenizer), (8, 32), generator=torch.Generator().manual_seed(0))
    held_out = torch.randint(3, len(tokenizer), (4, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model(input_ids=held_out).logits
    plain = copy.deepcopy(model)
    with torch.no_grad():
        for layer in decoder_layers(plain):
            for module in layer.modules():
                if isinstance(module, torch.nn.Linear):
                    module.weight.copy_(rtn_quantize(module.weight, 4, 32).weight)
    awq = copy.deepcopy(model)
    awq_quantize_model(awq, ids, AwqConfig(bits=4, group_size=32, rounding="rtn", clip_search=False, batch_size=4),
                       CPU, torch.float32)
    with torch.no_grad():
        kl_plain = float(token_kl(reference, plain(input_ids=held_out).logits).mean())
        kl_awq = float(token_kl(reference, awq(input_ids=held_out).logits).mean())
    assert kl_awq < 0.5 * kl_plain, (kl_awq, kl_plain)


# --- the schema and the shipped preset ----------------------------------------------------------


@pytest.mark.parametrize("field,value,match", [
    ("rounding", "nearest", "must be one of rtn, gptq"),
    ("grid", 0, "must be >= 1"),
    ("clip_grid", 1, "must be >= 2"),
    ("clip_min_shrink", 1.0, r"must be in \(0, 1\)"),
    ("bits", 2, "writes 3, 4, 8-bit weights"),
])
def test_bad_settings_are_one_line_field_errors(field, value, match):
    with pytest.raises(FieldError, match=match) as err:
        AwqConfig(**{field: value}).check()
    assert err.value.field == field and "\n" not in str(err.value)


def test_the_clipping_search_runs_with_rtn_unless_told_otherwise():
    assert AwqConfig(rounding="rtn").clips() and not AwqConfig(rounding="gptq").clips()
    assert AwqConfig(rounding="gptq", clip_search=True).clips() and not AwqConfig(rounding="rtn", clip_search=False).clips()


def test_an_unknown_layout_is_refused_by_preflight_from_the_config_alone():
    from transformers import AutoConfig

    from slimforge.stage import TeacherInfo

    config = AutoConfig.for_model("gpt2", n_embd=32, n_layer=1, n_head=4)
    with pytest.raises(ConfigError, match="quantize method awq needs a known decoder-block layout, and model type "
                                          "'gpt2' is not one"):
        AwqConfig().preflight(TeacherInfo(config, None))


def test_the_preset_runs_through_a_recipe_and_reloads(teacher_dir, corpus_dir, tmp_path, tokenizer):
    run_dir = tmp_path / "run"
    assert cli.main([
        "run", STUDENT, f"teacher.path={teacher_dir}", "data=text", f"data.path={corpus_dir}", "data.block_size=32",
        f"run_dir={run_dir}", "dtype=float32", "+quantize@stages.quant=awq", "pipeline=[quant]",
        "~eval.tasks.perplexity", "stages.quant.group_size=32", "stages.quant.block_size=32",
        "stages.quant.num_samples=8", "stages.quant.seq_len=32", "stages.quant.batch_size=4", "stages.quant.grid=8",
    ]) == 0
    folder = run_dir / "stages" / "quant"
    meta = json.loads((folder / "slimforge.json").read_text())
    quant = meta["quantization"]
    assert quant["format"] == "compressed-tensors/pack-quantized" and quant["rounding"] == "gptq"
    assert len(quant["exponents"]) == 4
    assert quant["clip_search"] is False and quant["clipped_linears"] == 0  # with GPTQ, by default
    assert all(0 < r <= 1 for r in quant["mean_loss_ratio"].values())
    assert 4.0 < meta["bits_per_weight"] < 5.0
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert config["config_groups"]["group_0"]["weights"]["group_size"] == 32
    ids = torch.tensor(tokenizer(corpus_text())["input_ids"][:128]).reshape(4, 32)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)
    student = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        kl = float(token_kl(teacher(input_ids=ids).logits, student(input_ids=ids).logits).mean())
    assert 0 < kl < 0.05
