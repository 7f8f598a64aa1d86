"""Quantization-aware distillation: the fake quantizer's math on nn.Linear, the stage on a tiny GPTQ model,
export exactness, resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import save_sharp_teacher
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from slimforge import cli
from slimforge.config import DataConfig
from slimforge.data import build_data
from slimforge.distill.config import QatConfig, integer_grid_problem
from slimforge.distill.qat import fake_quantize_model, write_artifact
from slimforge.distill.qat_params import fake_quant_linears, qat_parameters
from slimforge.distill.trainer import DistillTrainer
from slimforge.models import load_model
from slimforge.quantize.fakequant import (
    FakeQuantLinear,
    LsqFakeQuantize,
    export_weight,
    fake_quantize_lsq,
    fake_quantize_reference,
    lsq_gradient_scale,
    scaled_codes,
    stored_scales,
)
from slimforge.quantize.intquant import (
    code_range,
    dequantize_codes,
    fake_quantize,
    round_scales,
    rtn_quantize,
    symmetric_scales,
)

GRIDS = [(4, 32), (4, -1), (3, 16), (8, 32)]


def weight(rows: int = 12, cols: int = 64, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    w = torch.randn(rows, cols) * 0.05
    w[0, 3] = 0.4  # an outlier: its group's scale differs a lot from the others'
    return w


def shrunk_scales(w: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Latent scales below min-max (so some weights clamp), not yet on the bf16 grid."""
    return symmetric_scales(w, bits, group_size) * 0.7 + 1e-5


def loop_fake_quantize(w: torch.Tensor, s_r: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """The grid, one weight at a time in Python floats: s * clamp(round-half-even(w / s))."""
    low, high = code_range(bits)
    size = w.shape[1] if group_size <= 0 else group_size
    out = torch.empty_like(w)
    for r in range(w.shape[0]):
        for c in range(w.shape[1]):
            s = float(s_r[r, c // size])
            out[r, c] = s * min(max(round(float(w[r, c]) / s), low), high)
    return out


def lsq_gradients(w, s_r, grad, bits, group_size):
    """LSQ's analytic gradients, written out per weight: dw = g inside the range; ds = sum of g * (q - v)
    inside and g * bound where clamped, times 1 / sqrt(group size * q_max)."""
    low, high = code_range(bits)
    size = w.shape[1] if group_size <= 0 else group_size
    factor = 1.0 / (size * high) ** 0.5
    gw, gs = torch.zeros_like(w, dtype=torch.float64), torch.zeros_like(s_r, dtype=torch.float64)
    for r in range(w.shape[0]):
        for c in range(w.shape[1]):
            s = float(s_r[r, c // size])
            v, g = float(w[r, c]) / s, float(grad[r, c])
            if low <= v <= high:
                gw[r, c] = g
                gs[r, c // size] += g * (round(v) - v) * factor
            else:
                gs[r, c // size] += g * (low if v < low else high) * factor
    return gw, gs


# --- the fake quantizer on bare tensors ------------------------------------------------------


@pytest.mark.parametrize("bits,group_size", GRIDS)
def test_forward_is_the_stored_grid_to_the_bit(bits, group_size):
    """The forward value is intquant's grid with the bf16-rounded scales, the Python loop's, and the export's."""
    w, s = weight(), shrunk_scales(weight(), bits, group_size)
    s_r = round_scales(s, torch.bfloat16)
    assert not torch.equal(s, s_r)  # the latent scales are off the bf16 grid: rounding them matters
    ours = fake_quantize_lsq(w, s, bits, group_size, torch.bfloat16)
    assert torch.equal(ours, fake_quantize(w, s_r, bits, group_size))
    assert torch.equal(ours, loop_fake_quantize(w, s_r, bits, group_size))
    exported = export_weight(w, s, bits, group_size, torch.bfloat16)
    assert torch.equal(exported.weight, ours) and torch.equal(exported.scales, s_r)
    assert torch.equal(exported.scales, exported.scales.to(torch.bfloat16).float())


@pytest.mark.parametrize("bits,group_size", GRIDS)
def test_gradients_are_lsq_and_match_the_textbook_expression(bits, group_size):
    """The autograd function's gradients equal LSQ's formula (loop) and autograd through the plain expression."""
    w, s = weight(), shrunk_scales(weight(), bits, group_size)
    grad = torch.randn(w.shape, generator=torch.Generator().manual_seed(1))
    results = []
    for fn in (fake_quantize_lsq, fake_quantize_reference):
        w_, s_ = w.clone().requires_grad_(), s.clone().requires_grad_()
        (fn(w_, s_, bits, group_size, torch.bfloat16) * grad).sum().backward()
        results.append((w_.grad, s_.grad))
    (gw, gs), (ref_gw, ref_gs) = results
    torch.testing.assert_close(gw, ref_gw, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gs, ref_gs, rtol=1e-5, atol=1e-6)
    loop_gw, loop_gs = lsq_gradients(w, round_scales(s, torch.bfloat16), grad, bits, group_size)
    torch.testing.assert_close(gw.double(), loop_gw, rtol=0, atol=0)
    torch.testing.assert_close(gs.double(), loop_gs, rtol=1e-5, atol=1e-6)
    low, high = code_range(bits)
    ratio = w / round_scales(s, torch.bfloat16).repeat_interleave(w.shape[1] // s.shape[1], dim=1)
    assert ((ratio < low) | (ratio > high)).any() and (gw == 0).any()  # clamped weights: no weight gradient


def test_lsq_gradient_scale_and_stored_scales():
    assert lsq_gradient_scale(64, 4) == pytest.approx(1 / (64 * 7) ** 0.5)
    assert lsq_gradient_scale(576, 8) == pytest.approx(1 / (576 * 127) ** 0.5)
    latent = torch.tensor([[0.0123456, -0.5, 0.0, 3.0]])
    stored = stored_scales(latent, torch.bfloat16)
    assert (stored > 0).all()  # pushed below zero by training: the smallest positive scale, never a sign flip
    assert stored[0, 0] == torch.tensor(0.0123456).to(torch.bfloat16).float() and stored[0, 3] == 3.0


def test_fake_quant_linear_is_smooth_in_its_input():
    """Finite differences where the function is smooth: the layer is linear in its input (float64)."""
    linear = torch.nn.Linear(32, 8, bias=True).double()
    layer = FakeQuantLinear.from_linear(linear, symmetric_scales(linear.weight.float(), 4, 16), 4, 16, torch.bfloat16)
    layer.double()
    x = torch.randn(3, 32, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: layer(t), (x,))


def test_fake_quant_linear_starts_where_its_grid_is_and_exports_what_it_computes():
    linear = torch.nn.Linear(64, 16, bias=True)
    quantized = rtn_quantize(linear.weight.detach(), 4, 32, torch.bfloat16)
    with torch.no_grad():
        linear.weight.copy_(quantized.weight)
    layer = FakeQuantLinear.from_linear(linear, quantized.scales, 4, 32, torch.bfloat16)
    x = torch.randn(5, 64)
    assert torch.equal(layer(x), linear(x))  # on its grid already: nothing changes
    optimizer = torch.optim.Adam([layer.weight, layer.weight_scale], lr=5e-3)
    target = torch.randn(5, 16)
    for _ in range(20):
        optimizer.zero_grad()
        ((layer(x) - target) ** 2).mean().backward()
        optimizer.step()
    codes = torch.round(layer.exported().weight.reshape(16, 2, 32) / layer.exported().scales.unsqueeze(-1))
    first = torch.round(quantized.weight.reshape(16, 2, 32) / quantized.scales.unsqueeze(-1))
    assert not torch.equal(codes, first) and not torch.equal(layer.exported().scales, quantized.scales)
    assert torch.equal(layer.to_linear()(x), layer(x))  # the exported layer computes what the fake one does


@pytest.mark.parametrize("bits,group_size", GRIDS)
def test_frozen_codes_give_the_scales_their_exact_gradient(bits, group_size):
    """With codes fixed the quantizer is s_r * q: the scale's gradient is sum(g * q), exactly."""
    w = weight()
    grid = rtn_quantize(w, bits, group_size, torch.bfloat16)
    codes = torch.round(grid.weight / grid.scales.repeat_interleave(w.shape[1] // grid.scales.shape[1], dim=1))
    scales = (grid.scales * 1.013).requires_grad_()  # off the bf16 grid: rounded in the forward pass
    grad = torch.randn(w.shape, generator=torch.Generator().manual_seed(2))
    out = scaled_codes(codes.to(torch.int8), scales, group_size)
    (out * grad).sum().backward()
    size = w.shape[1] // scales.shape[1]
    expected = (grad * codes).reshape(w.shape[0], -1, size).sum(-1)
    torch.testing.assert_close(scales.grad, expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(out, dequantize_codes(codes, round_scales(scales.detach(), torch.bfloat16), group_size))


def test_a_layer_with_frozen_codes_keeps_them_whatever_its_scales_do():
    linear = torch.nn.Linear(64, 16, bias=False)
    quantized = rtn_quantize(linear.weight.detach(), 4, 32, torch.bfloat16)
    layer = FakeQuantLinear.from_linear(linear, quantized.scales, 4, 32, torch.bfloat16)
    x = torch.randn(5, 64)
    before = layer(x)
    layer.freeze_codes()
    assert torch.equal(layer(x), before) and not layer.weight.requires_grad
    frozen = layer.codes.clone()
    with torch.no_grad():
        layer.weight_scale.mul_(1.3)  # far enough that the latent weights would round to other codes
    assert torch.equal(layer.codes, frozen)
    exported = layer.exported()
    size = 32
    codes = torch.round(exported.weight.reshape(16, 2, size) / exported.scales.unsqueeze(-1)).reshape(16, 64)
    assert torch.equal(codes, frozen.float()) and torch.equal(layer.to_linear()(x), layer(x))
    thawed = FakeQuantLinear.from_linear(linear, quantized.scales * 1.3, 4, 32, torch.bfloat16)
    assert not torch.equal(thawed.exported().weight, exported.weight)  # LSQ's layer would have re-rounded


def test_integer_grid_problem_names_what_the_input_is():
    from types import SimpleNamespace

    def config(**group):
        weights = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 64}
        return SimpleNamespace(quantization_config={"quant_method": "compressed-tensors", "config_groups": {
            "group_0": {"weights": {**weights, **group.pop("weights", {})}, **group}}})

    assert integer_grid_problem(config()) is None
    assert integer_grid_problem(config(weights={"strategy": "channel", "group_size": None, "num_bits": 8})) is None
    assert integer_grid_problem(SimpleNamespace()) == "is not quantized"
    assert "bitsandbytes" in integer_grid_problem(SimpleNamespace(quantization_config={"quant_method": "bitsandbytes"}))
    assert "quantizes activations too" in integer_grid_problem(
        config(input_activations={"num_bits": 8, "type": "int", "dynamic": True}))
    assert "float weights of 8 bits" in integer_grid_problem(config(weights={"type": "float", "num_bits": 8}))
    assert "asymmetric" in integer_grid_problem(config(weights={"symmetric": False}))
    assert "tensor grid" in integer_grid_problem(config(weights={"strategy": "tensor"}))


def test_autograd_function_keeps_less_than_the_expression():
    """Why the function exists: it saves int8 codes, the expression's graph keeps fp32 intermediates."""
    w, s = weight(64, 256).requires_grad_(), shrunk_scales(weight(64, 256), 4, 32).requires_grad_()
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fake_quantize_lsq(w, s, 4, 32)
    ours = sum(t.numel() * t.element_size() for t in saved if t.data_ptr() not in (w.data_ptr(), s.data_ptr()))
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fake_quantize_reference(w, s, 4, 32)
    reference = sum(t.numel() * t.element_size() for t in saved if t.data_ptr() not in (w.data_ptr(), s.data_ptr()))
    assert ours <= w.numel() + s.numel() * 4 < reference
    assert LsqFakeQuantize.apply(w, s, 4, 32, torch.bfloat16, 1.0).dtype == torch.float32


# --- the stage on a tiny GPTQ model ----------------------------------------------------------


@pytest.fixture(scope="module")
def sharp_teacher(tmp_path_factory, tokenizer):
    """A 2-layer sharpened tiny Llama: GPTQ, then QAT, each in seconds."""
    return save_sharp_teacher(tmp_path_factory.mktemp("qat-teacher"), tokenizer, layers=2)


TINY = ["data=text", "data.block_size=32", "dtype=float32", "stages.quant.bits=3", "stages.quant.group_size=32",
        "stages.quant.block_size=32", "stages.quant.num_samples=8", "stages.quant.seq_len=32", "stages.qat.batch_size=4",
        "stages.qat.eval_blocks=8", "stages.qat.precision=fp32", "eval.batch_size=4", "eval.tasks.perplexity.max_blocks=4"]


@pytest.fixture(scope="module")
def qat_run(sharp_teacher, corpus_dir, tmp_path_factory):
    """The shipped qat_gptq recipe (its preset: scales and norms, codes frozen) on the tiny teacher: GPTQ
    int3 g32, then 12 QAT steps at the tiny model's learning rates."""
    run_dir = tmp_path_factory.mktemp("qat-run")
    args = ["run", "qat_gptq", f"teacher.path={sharp_teacher}", f"data.path={corpus_dir}", f"run_dir={run_dir}", *TINY,
            "stages.qat.steps=12", "stages.qat.eval_every=12", "stages.qat.lr=0.01", "stages.qat.scale_lr=0.005"]
    assert cli.main(args) == 0
    return run_dir


def tensors(folder, suffix):
    with safe_open(str(folder / "model.safetensors"), "pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys() if k.endswith(suffix)}  # noqa: SIM118


def test_qat_recipe_trains_the_scales_and_norms_and_keeps_the_format(qat_run):
    quant, qat = qat_run / "stages" / "quant", qat_run / "stages" / "qat"
    meta = json.loads((qat / "slimforge.json").read_text())
    before, after = meta["distill"]["before"], meta["distill"]["history"][-1]
    assert after["eval_kl"] < 0.97 * before["eval_kl"]  # measured: 7% lower after 12 steps
    assert meta["distill"]["qat"] == {"trainable": ["scales", "norms"], "grids": "int3 g32"}
    assert meta["quantization"]["bits"] == 3 and meta["quantization"]["group_size"] == 32
    parent_config = json.loads((quant / "config.json").read_text())["quantization_config"]
    config = json.loads((qat / "config.json").read_text())["quantization_config"]
    def grid(quantization):  # act-order is how GPTQ visited the columns, not part of the grid
        return {k: v for k, v in quantization["config_groups"]["group_0"]["weights"].items() if k != "actorder"}

    assert grid(config) == grid(parent_config)
    assert config["ignore"] == parent_config["ignore"] == ["lm_head"]
    packed, parent_packed = tensors(qat, "weight_packed"), tensors(quant, "weight_packed")
    scales, parent_scales = tensors(qat, "weight_scale"), tensors(quant, "weight_scale")
    assert set(packed) == set(parent_packed) and len(packed) == 14
    assert all(torch.equal(packed[k], parent_packed[k]) for k in packed)  # codes frozen: only scales and norms train
    assert sum(not torch.equal(scales[k], parent_scales[k]) for k in scales) == 14
    assert {t.dtype for t in scales.values()} == {torch.bfloat16}
    norms, parent_norms = tensors(qat, "norm.weight"), tensors(quant, "norm.weight")
    assert len(norms) == 5 and all(not torch.equal(norms[k], parent_norms[k]) for k in norms)
    frozen = [k for k in tensors(quant, "") if k.endswith(("embed_tokens.weight", "lm_head.weight", "weight_shape"))]
    assert frozen and all(torch.equal(tensors(qat, k)[k], tensors(quant, k)[k]) for k in frozen)
    fidelity = json.loads((qat_run / "report.json").read_text())["fidelity"]
    assert fidelity["qat"]["perplexity"]["kl_mean"] < fidelity["quant"]["perplexity"]["kl_mean"]


# --- export exactness and resume, through the trainer itself ------------------------------------


@pytest.fixture(scope="module")
def bundle(corpus_dir, tokenizer, tmp_path_factory):
    return build_data(DataConfig(path=str(corpus_dir), block_size=32, heldout_fraction=0.2), tokenizer,
                      cache_dir=tmp_path_factory.mktemp("qat-data"))


def fake_quantized_parent(qat_run, norms=False):
    model, tokenizer = load_model(str(qat_run / "stages" / "quant"), dtype=torch.float32)
    return fake_quantize_model(model, torch.bfloat16, norms=norms), tokenizer


def train(qat_run, sharp_teacher, bundle, work_dir, trainable=("weights", "scales"), **overrides):
    cfg = QatConfig(**{"steps": 4, "batch_size": 4, "lr": 0.05, "scale_lr": 0.02, "warmup_steps": 0,
                       "eval_every": 100, "eval_blocks": 2, "checkpoint_every": 100, "precision": "fp32",
                       "trainable": list(trainable), **overrides})
    student, tokenizer = fake_quantized_parent(qat_run, "norms" in trainable)
    teacher = AutoModelForCausalLM.from_pretrained(sharp_teacher).eval()
    trainer = DistillTrainer(cfg, student, bundle, work_dir, None, seed=0, device=torch.device("cpu"), teacher=teacher)
    return trainer.train(), tokenizer


def layer_values(model):
    """Each fake-quantized layer's latent weight and stored scales, and each norm's gain as it computes."""
    out = {}
    for name, layer in fake_quant_linears(model).items():
        out[f"{name}.weight"], out[f"{name}.scales"] = layer.weight.detach().clone(), layer.exported().scales
    for name, module in model.named_modules():
        if name.endswith("norm"):
            out[f"{name}.gain"] = module.weight.detach().clone()
    return out


@pytest.mark.parametrize("trainable", [("weights", "scales"), ("scales", "norms")],
                         ids=["LSQ-weights+scales", "frozen-codes-scales+norms"])
def test_exported_artifact_computes_what_the_fake_quantized_model_computed(qat_run, sharp_teacher, bundle, tmp_path,
                                                                          trainable):
    start, _ = fake_quantized_parent(qat_run)
    parent = AutoModelForCausalLM.from_pretrained(qat_run / "stages" / "quant", dtype=torch.float32)
    ids = torch.tensor(bundle.heldout[0:2]["input_ids"])
    with torch.no_grad():
        assert torch.equal(start(input_ids=ids).logits, parent(input_ids=ids).logits)  # it starts as the parent
    result, tokenizer = train(qat_run, sharp_teacher, bundle, tmp_path / "work", trainable)
    model = result.model.eval()
    before, after = layer_values(start), layer_values(model)
    changed = {key.rsplit(".", 1)[-1] for key in before if not torch.equal(before[key], after[key])}
    assert changed == ({"weight", "scales"} if "weights" in trainable else {"scales", "gain"})  # nothing else
    assert torch.equal(model.get_input_embeddings().weight, start.get_input_embeddings().weight)
    with torch.no_grad():
        trained = model(input_ids=ids).logits
    report = write_artifact(model, tokenizer, tmp_path / "out", torch.bfloat16)
    assert report["quantization"]["grids"] == "int3 g32" and 3.0 < report["bits_per_weight"] < 4.0
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    assert reloaded.config.quantization_config.quant_method == "compressed-tensors"
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, trained)  # bit for bit, fp32


def test_qat_parameters_and_groups(qat_run):
    model, _ = fake_quantized_parent(qat_run, norms=True)
    cfg = QatConfig(trainable=["scales", "norms"], lr=1e-4, scale_lr=3e-6)
    cfg.set_trainable(model)
    found = qat_parameters(model)
    assert len(found["weights"]) == len(found["scales"]) == 14 and len(found["norms"]) == 5
    assert not any(p.requires_grad for p in found["weights"])
    assert all(p.requires_grad for p in found["scales"] + found["norms"])
    groups = cfg.param_groups(model)
    assert [len(g["params"]) for g in groups] == [1] * (14 + 5)  # one per tensor: each its own rate
    by_tensor = {id(g["params"][0]): g for g in groups}
    for layer in fake_quant_linears(model).values():  # relative to the layer's grid step
        group = by_tensor[id(layer.weight_scale)]
        assert group["lr"] == pytest.approx(3e-6 * float(layer.weight_scale.detach().abs().mean()))
        assert group["weight_decay"] == 0.0
    for gain in found["norms"]:
        assert by_tensor[id(gain)]["lr"] == pytest.approx(1e-4 * float(gain.detach().abs().mean()))
    assert len(fake_quant_linears(model)) == 14


def test_interrupted_training_resumes_to_the_same_scales(qat_run, sharp_teacher, bundle, tmp_path, monkeypatch):
    """A run stopped after its step-2 checkpoint resumes from it (latent weights, scales, norms, optimizer)
    to exactly the straight run."""
    every = ("weights", "scales", "norms")
    straight, _ = train(qat_run, sharp_teacher, bundle, tmp_path / "straight", every, checkpoint_every=2)
    real = DistillTrainer._train_step

    def stop_at_step_3(self, run):
        if run.step == 2 and run.first_step == 0:
            raise KeyboardInterrupt
        return real(self, run)

    monkeypatch.setattr(DistillTrainer, "_train_step", stop_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        train(qat_run, sharp_teacher, bundle, tmp_path / "stopped", every, checkpoint_every=2)
    assert (tmp_path / "stopped" / "checkpoints" / "step-000002").is_dir()
    resumed, _ = train(qat_run, sharp_teacher, bundle, tmp_path / "stopped", every, checkpoint_every=2)
    np.testing.assert_allclose(resumed.losses, straight.losses, rtol=1e-6)
    a, b = layer_values(straight.model), layer_values(resumed.model)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
