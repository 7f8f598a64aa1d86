"""Mixed precision to a bit budget: the allocation, the exact costs, per-layer schemes in the format,
the sensitivity's shortcut forward, and the stage through a recipe on the tiny teacher."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import pytest
import torch
from conftest import ASSETS, build_model
from transformers import AutoModelForCausalLM

from slimforge import cli
from slimforge.eval.fidelity import token_kl
from slimforge.quantize.common import quantizable_linears
from slimforge.quantize.compressed import IntScheme, save_compressed
from slimforge.quantize.config import (
    KEPT_WIDTH,
    MIXED_WIDTHS,
    nominal_bits_per_weight,
    widths_map_text,
)
from slimforge.quantize.intquant import code_range, rtn_quantize
from slimforge.quantize.mixed import allocate_widths, cost_grid, stored_bits
from slimforge.quantize.mixed_stage import input_units, kl_from_block, reference_run
from slimforge.quantize.report import folder_tensor_sizes

STUDENT = str(ASSETS / "recipes" / "student.yaml")
BUDGET = 4.5  # between int3 (3.5 + shape tensors at groups of 32) and int8: every width is in play


# --- the allocation ----------------------------------------------------------------------


def brute_force(costs, losses, budget) -> float:
    """The least summed loss over every choice within the budget."""
    best = float("inf")
    for choice in itertools.product(*(range(len(c)) for c in costs)):
        if sum(c[j] for c, j in zip(costs, choice)) <= budget:
            best = min(best, sum(v[j] for v, j in zip(losses, choice)))
    return best


def random_instance(rng: random.Random, units: int, options: int):
    costs = [sorted(rng.sample(range(1, 60), options)) for _ in range(units)]
    losses = [sorted((rng.random() for _ in range(options)), reverse=True) for _ in range(units)]
    if rng.random() < 0.3:  # not always monotone: measured sensitivities need not be
        losses = [[rng.random() for _ in range(options)] for _ in range(units)]
    low, high = sum(min(c) for c in costs), sum(max(c) for c in costs)
    return costs, losses, rng.randint(low, high)


@pytest.mark.parametrize("seed", range(40))
def test_the_allocation_is_the_brute_force_optimum(seed):
    rng = random.Random(seed)
    costs, losses, budget = random_instance(rng, rng.randint(1, 6), rng.randint(2, 4))
    picks = allocate_widths(costs, losses, budget)
    assert sum(c[j] for c, j in zip(costs, picks)) <= budget
    assert sum(v[j] for v, j in zip(losses, picks)) == pytest.approx(brute_force(costs, losses, budget), abs=1e-12)


@pytest.mark.parametrize("seed", range(10))
def test_a_coarse_grid_keeps_the_budget_and_loses_at_most_one_step_per_unit(seed):
    rng = random.Random(100 + seed)
    costs, losses, budget = random_instance(rng, 5, 3)
    costs = [[c * 7 + rng.randint(0, 3) for c in row] for row in costs]  # a fine gcd: 1
    budget = budget * 7
    max_cells = 5 * 20
    _, _, step = cost_grid([[c - min(r) for c in r] for r in costs], budget - sum(map(min, costs)), max_cells)
    assert step > 1  # the grid did coarsen
    picks = allocate_widths(costs, losses, budget, max_cells=max_cells)
    got = sum(v[j] for v, j in zip(losses, picks))
    assert sum(c[j] for c, j in zip(costs, picks)) <= budget
    assert brute_force(costs, losses, budget) - 1e-12 <= got <= brute_force(costs, losses, budget - 5 * step) + 1e-12


def test_a_budget_below_the_cheapest_choice_is_refused():
    with pytest.raises(ValueError, match="above the budget"):
        allocate_widths([[3, 5], [4, 6]], [[1.0, 0.0], [1.0, 0.0]], 6)


def test_equal_losses_take_the_cheaper_width():
    assert allocate_widths([[1, 2, 4]], [[0.5, 0.0, 0.0]], 10) == [1]


# --- what a width costs, in the format ------------------------------------------------------


def test_nominal_bits_bound_the_exact_ones_from_below():
    for width, group in itertools.product(MIXED_WIDTHS, (32, 64, -1)):
        exact = stored_bits(576, 1536, width, group, 16) / (576 * 1536)
        assert nominal_bits_per_weight(width, group, 16) <= exact < nominal_bits_per_weight(width, group, 16) + 0.02
    assert nominal_bits_per_weight(4, 64, 16) == 4.25


# One width per unit (q/k/v, o, gate/up, down) of a 2-block Qwen2 (biases on q/k/v): all four widths.
UNIT_WIDTHS = [{"q_proj": 3, "k_proj": 3, "v_proj": 3, "o_proj": 8, "gate_proj": 4, "up_proj": 4, "down_proj": 16},
               {"q_proj": 16, "k_proj": 16, "v_proj": 16, "o_proj": 3, "gate_proj": 8, "up_proj": 8, "down_proj": 4}]


def test_per_layer_schemes_save_one_group_per_width_and_reload_exactly(tokenizer, tmp_path):
    model = build_model("qwen2", tokenizer, layers=2)
    linears = quantizable_linears(model)
    widths = {name: UNIT_WIDTHS[int(name.split(".")[2])][name.rsplit(".", 1)[-1]] for name in linears}
    scales = {}
    with torch.no_grad():
        for name, linear in linears.items():
            if widths[name] != KEPT_WIDTH:
                result = rtn_quantize(linear.weight, widths[name], 32, torch.bfloat16)
                linear.weight.copy_(result.weight)
                scales[name] = result.scales
        # What the folder must give back: codes * scales exactly, everything else rounded to bf16.
        for name, param in model.named_parameters():
            if name.removesuffix(".weight") not in scales:
                param.copy_(param.to(torch.bfloat16).float())
    ids = torch.tensor([[5, 17, 42, 99, 7, 63, 28, 11, 3, 250]])
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    shapes = {n: (m.out_features, m.in_features, m.bias is not None) for n, m in linears.items()}
    schemes = {name: IntScheme(widths[name], 32) for name in scales}
    save_compressed(model, tokenizer, tmp_path, scales, None, 32, False, torch.bfloat16, {}, schemes)

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=ids).logits, expected, rtol=0, atol=1e-5)
    quant = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    groups = {g["weights"]["num_bits"]: sorted(g["targets"]) for g in quant["config_groups"].values()}
    assert groups == {w: sorted(n for n in scales if widths[n] == w) for w in (3, 4, 8)}
    assert set(quant["ignore"]) == {"lm_head", *(n for n in linears if widths[n] == KEPT_WIDTH)}
    # Every module stores exactly the bits the allocation charged it.
    sizes = folder_tensor_sizes(tmp_path)
    for name, (rows, cols, bias) in shapes.items():
        saved = 8 * sum(size for key, size in sizes.items() if key.startswith(f"{name}."))
        assert saved == stored_bits(rows, cols, widths[name], 32, 16, bias), name


# --- units and the sensitivity's forward ------------------------------------------------------


@pytest.mark.parametrize(("arch", "expected"), [
    ("llama", [("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",)]),
    ("phi3", [("qkv_proj",), ("o_proj",), ("gate_up_proj",), ("down_proj",)]),
])
def test_units_are_the_linears_that_read_one_input(tokenizer, arch, expected):
    from slimforge.calibration.activations import record_linear_inputs
    from slimforge.calibration.layerwise import layerwise

    model = build_model(arch, tokenizer, layers=1)
    names = {id(m): n for n, m in model.named_modules()}
    step = next(layerwise(model, torch.randint(3, 300, (2, 16)), batch_size=2))
    with record_linear_inputs(step.linears()) as stats:
        step.run()
    units = input_units(step.linears(), stats, names)
    assert sorted(tuple(n.rsplit(".", 1)[-1] for n in unit) for unit in units) == sorted(expected)


@pytest.mark.parametrize("arch", ["llama", "gemma2"])  # gemma2: embedding scale, logit soft-capping, sliding window
def test_kl_from_a_blocks_cached_inputs_is_the_full_forwards(tokenizer, arch):
    model = build_model(arch, tokenizer, layers=3)
    ids = torch.randint(3, 300, (3, 24))
    reference = reference_run(model, ids, batch_size=2, device=torch.device("cpu"))
    assert kl_from_block(model, 2, reference) == pytest.approx(0.0, abs=1e-9)
    linears = quantizable_linears(model)
    for block in range(3):
        linear = next(m for n, m in linears.items() if f".layers.{block}." in n and n.endswith("o_proj"))
        saved = linear.weight.data.clone()
        torch.manual_seed(block)
        linear.weight.data.add_(saved.abs().mean() * 2 * torch.randn_like(saved))
        with torch.no_grad():
            full = torch.cat([token_kl(ref, model(input_ids=batch).logits).flatten()
                              for batch, ref in zip(reference.batches, reference.logits)]).mean()
        fast = kl_from_block(model, block, reference)
        assert float(full) > 1e-4 and fast == pytest.approx(float(full), rel=1e-4), block
        if block < 2:  # a later start never runs this block: it resumes from the cached, unchanged inputs
            assert kl_from_block(model, 2, reference) == pytest.approx(0.0, abs=1e-9)
        linear.weight.data.copy_(saved)


def test_the_width_map_is_one_row_per_run_of_equal_blocks():
    widths = {f"model.layers.{i}.self_attn.{p}": w for i, w in enumerate([4, 4, 8, 4, 4]) for p in ("q_proj", "o_proj")}
    widths["model.layers.4.self_attn.o_proj"] = 3
    assert widths_map_text(widths) == "widths per block (q_proj o_proj): 0-1: 4 4; 2: 8 8; 3: 4 4; 4: 4 3"


# --- the stage through a recipe ------------------------------------------------------------


def mixed_args(teacher_dir, corpus_dir, run_dir, *extra):
    return ["run", STUDENT, f"teacher.path={teacher_dir}", "data=text", f"data.path={corpus_dir}",
            "data.block_size=32", f"run_dir={run_dir}", "dtype=float32", "+quantize@stages.quant=mixed_precision",
            "pipeline=[quant]", "~eval.tasks.perplexity", "stages.quant.group_size=32", "stages.quant.block_size=32",
            "stages.quant.num_samples=16", "stages.quant.seq_len=32", "stages.quant.sensitivity_samples=4",
            "stages.quant.sensitivity_seq_len=32", *extra]


@pytest.fixture(scope="module")
def mixed_run(teacher_dir, corpus_dir, tmp_path_factory) -> Path:
    """The stage on the tiny teacher at an average 4.5 bits per weight: its artifact folder."""
    run_dir = tmp_path_factory.mktemp("mixed") / "run"
    assert cli.main(mixed_args(teacher_dir, corpus_dir, run_dir, f"stages.quant.bits_budget={BUDGET}")) == 0
    return run_dir / "stages" / "quant"


def test_the_stage_fits_the_budget_and_records_its_choice(mixed_run):
    meta = json.loads((mixed_run / "slimforge.json").read_text())
    quant = meta["quantization"]
    assert meta["bits_per_weight"] == quant["planned_bits_per_weight"] <= BUDGET
    assert quant["bits"] is None and len(set(quant["widths"].values())) > 1
    assert {w for unit in quant["sensitivity"].values() for w in unit} == {"3", "4", "8", "16"}
    assert all(unit["3"] > unit["4"] > unit["8"] > unit["16"] == 0 for unit in quant["sensitivity"].values())
    # One width per unit: q/k/v alike, gate/up alike, in every block.
    for unit, width in quant["unit_widths"].items():
        block = unit.rsplit(".", 1)[0]
        assert all(quant["widths"][f"{block}.{part}"] == width for part in unit.rsplit(".", 1)[1].split("+"))
    assert quant["predicted_kl"] == pytest.approx(sum(quant["sensitivity"][u][str(w)]
                                                      for u, w in quant["unit_widths"].items()), abs=1e-6)
    assert widths_map_text(quant["widths"]) in (mixed_run / "README.md").read_text()


def test_the_artifact_reloads_with_each_layer_on_its_own_grid(mixed_run, teacher_dir):
    """transformers reloads the folder to the teacher with each quantized layer at its codes (unpacked at that
    layer's width, within its range) times its scales, each kept layer as it was, the rest rounded to bf16."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from safetensors import safe_open

    widths = json.loads((mixed_run / "slimforge.json").read_text())["quantization"]["widths"]
    expected = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)
    modules = dict(expected.named_modules())
    with torch.no_grad(), safe_open(str(mixed_run / "model.safetensors"), "pt") as fh:
        for param in expected.parameters():
            param.copy_(param.to(torch.bfloat16).float())
        for name, width in widths.items():
            if width == KEPT_WIDTH:
                continue
            weight = modules[name].weight
            codes = unpack_from_int32(fh.get_tensor(f"{name}.weight_packed"), width, weight.shape)
            low, high = code_range(width)
            assert low <= int(codes.min()) and int(codes.max()) <= high, name
            scales = fh.get_tensor(f"{name}.weight_scale").float()
            weight.copy_((codes.float().reshape(weight.shape[0], -1, 32) * scales.unsqueeze(-1)).reshape(weight.shape))
        ids = torch.tensor([[5, 17, 42, 99, 7, 63, 28, 11]])
        reloaded = AutoModelForCausalLM.from_pretrained(mixed_run, dtype=torch.float32)
        assert torch.allclose(reloaded(input_ids=ids).logits, expected(input_ids=ids).logits, rtol=0, atol=1e-5)


def test_another_budget_reuses_the_sensitivity_table_and_never_predicts_better(mixed_run, teacher_dir, corpus_dir,
                                                                               tmp_path):
    run_dir = tmp_path / "run"
    assert cli.main(mixed_args(teacher_dir, corpus_dir, run_dir, "stages.quant.bits_budget=4.0")) == 0
    first = json.loads((mixed_run / "slimforge.json").read_text())["quantization"]
    second = json.loads((run_dir / "stages" / "quant" / "slimforge.json").read_text())
    assert not first["sensitivity_reused"] and second["quantization"]["sensitivity_reused"]
    assert second["quantization"]["sensitivity"] == first["sensitivity"]
    assert second["bits_per_weight"] <= 4.0 < first["planned_bits_per_weight"]
    assert second["quantization"]["predicted_kl"] > first["predicted_kl"]


def test_a_budget_only_the_loaded_shapes_refuse_fails_before_any_calibration(teacher_dir, corpus_dir, tmp_path,
                                                                             capsys, monkeypatch):
    import slimforge.calibration.windows as windows

    def calibrating(*args, **kwargs):
        raise AssertionError("calibration ran before the budget was checked")

    monkeypatch.setattr(windows, "calibration_windows", calibrating)
    assert cli.main(mixed_args(teacher_dir, corpus_dir, tmp_path / "run", "stages.quant.bits_budget=3.55")) == 2
    assert "bits_budget=3.55: is below 3.598" in capsys.readouterr().err
