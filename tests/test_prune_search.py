"""Architecture search to a parameter budget (prune method ``search``): the grid, the Pareto set,
candidates built by slicing, the ranking by KL, and the stage's artifact and metadata."""

from __future__ import annotations

import copy
import dataclasses
import json
import random

import pytest
import torch
from conftest import (
    MOE_ARCHS,
    REPO,
    build_model,
    build_moe_model,
    sharpened,
    tiny_config,
    tiny_moe_config,
)
from transformers import AutoModelForCausalLM

from slimforge import arch, moe
from slimforge.config import FieldError
from slimforge.prune import search
from slimforge.prune.search_config import BYTE_UNITS, PARAM_UNITS, SearchConfig, parse_size
from slimforge.prune.width_targets import config_accepts, pruned_config

TINY_COMPRESS = str(REPO / "tests" / "assets" / "recipes" / "tiny_compress.yaml")


def _built_params(config, shape: search.Shape) -> int:
    """Parameters of a model really built at ``shape`` (on the meta device)."""
    cut = pruned_config(config, shape.width)
    cut.num_hidden_layers = shape.layers
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cut)
    return arch.count_parameters(model)


def _legal(config, shape: search.Shape, round_to: int) -> bool:
    w, kv = shape.width, arch.num_kv_heads(config)
    return (1 <= shape.layers <= config.num_hidden_layers
            and w.num_attention_heads % kv == 0 and w.num_key_value_heads == kv
            and w.num_attention_heads <= config.num_attention_heads
            and w.intermediate_size <= config.intermediate_size and w.hidden_size <= config.hidden_size
            and (w.intermediate_size % round_to == 0 or w.intermediate_size == config.intermediate_size)
            and config_accepts(config, w.hidden_size, w.num_attention_heads, w.num_key_value_heads))


@pytest.mark.parametrize("arch_name,tied", [("llama", True), ("llama", False), ("qwen3", False), ("phi3", False),
                                           ("gemma", True)])
@pytest.mark.parametrize("ratio", [0.55, 0.7, 0.85])
def test_grid_lands_within_tolerance_and_only_legal_shapes(tokenizer, arch_name, tied, ratio):
    config = tiny_config(arch_name, len(tokenizer), layers=6)
    config.tie_word_embeddings = tied
    full = _built_params(config, search.full_shape(config))
    target = ratio * full
    shapes = search.enumerate_shapes(config, target, 0.03, [1.0, 0.9, 0.8, 0.7], [("mlp", "heads", "hidden"),
                                     ("mlp", "hidden"), ("mlp",), ("hidden",)], "query", 8)
    assert shapes, "the grid found nothing"
    assert len(set(shapes)) == len(shapes)
    for shape in shapes:
        counted = search.shape_param_count(config, shape)
        assert counted == _built_params(config, shape)  # the count is the real model's
        assert abs(counted - target) <= 0.03 * target
        assert _legal(config, shape, 8), shape
    assert len({s.layers for s in shapes}) >= 2  # depth is searched, not fixed
    floored = search.enumerate_shapes(config, target, 0.03, [1.0, 0.9, 0.8, 0.7], [("mlp", "heads", "hidden"),
                                      ("mlp", "hidden"), ("mlp",), ("hidden",)], "query", 8, min_ratio=0.5)
    assert set(floored) == {s for s in shapes if s.width.hidden_size >= config.hidden_size / 2
                            and s.width.intermediate_size >= config.intermediate_size / 2
                            and s.width.num_attention_heads >= config.num_attention_heads / 2}


def test_grid_is_capped_evenly():
    items = list(range(10))
    assert search.spread(items, 4) == [0, 3, 6, 9]
    assert search.spread(items, 20) == items and search.spread(items, 1) == [0]


def _dominates(a, b):
    return a[0] <= b[0] and a[1] <= b[1] and a != b


@pytest.mark.parametrize("seed", range(5))
def test_pareto_front_matches_brute_force(seed):
    rng = random.Random(seed)
    points = [(rng.randint(1, 6), rng.choice([0.1, 0.2, 0.3, 0.4])) for _ in range(12)]
    brute = {i for i, p in enumerate(points) if not any(_dominates(q, p) for q in points)}
    front = search.pareto_front(points)
    assert set(front) == brute
    assert [points[i][0] for i in front] == sorted(points[i][0] for i in front)
    kls = [points[i][1] for i in front]  # along the front, more parameters buy lower KL
    assert all(a >= b for a, b in zip(kls, kls[1:]))


def test_choose_takes_the_lowest_kl_then_fewer_parameters():
    records = [{"kl_after": 0.3, "parameters": 10}, {"kl_after": 0.2, "parameters": 12},
               {"kl_after": 0.2, "parameters": 11}]
    assert search.choose(records) == 2


def test_sizes_parse():
    assert parse_size("t", "80M", PARAM_UNITS) == 80_000_000
    assert parse_size("t", 1234, PARAM_UNITS) == 1234
    assert parse_size("t", "1.5b", PARAM_UNITS) == 1_500_000_000
    assert parse_size("t", "38MiB", BYTE_UNITS) == 38 * 2**20
    cfg = SearchConfig(target_params=None, target_bytes="40MB", bits=4)
    cfg.check()
    assert cfg.target_count() == 80_000_000
    for bad in ("80X", "-3", "lots", "0"):
        with pytest.raises(FieldError):
            parse_size("t", bad, PARAM_UNITS)


def test_layer_importance_follows_the_kept_layers(tokenizer):
    from slimforge.prune.width import WidthImportance

    imp = WidthImportance(mlp=[torch.full((4,), float(i)) for i in range(4)],
                          heads=[torch.full((2,), float(i)) for i in range(4)], hidden=torch.ones(3),
                          norm_energy={"model.layers.0.input_layernorm": torch.zeros(3),
                                       "model.layers.2.post_attention_layernorm": torch.ones(3),
                                       "model.norm": torch.full((3,), 2.0)})
    cut = search.importance_of_layers(imp, [1, 2])
    assert [float(m[0]) for m in cut.mlp] == [1.0, 2.0] and [float(h[0]) for h in cut.heads] == [1.0, 2.0]
    assert set(cut.norm_energy) == {"model.layers.1.post_attention_layernorm", "model.norm"}
    assert search.kept_layers([0.5, 0.1, 0.9, 0.3], 2) == [0, 2]


def _calibration(tokenizer, n: int = 4, length: int = 24) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(3, len(tokenizer), (n, length), generator=g)


@pytest.mark.parametrize("arch_name", ["llama", "phi3", "gemma"])
def test_candidate_is_the_counted_shape_and_reloads(tokenizer, tmp_path, arch_name):
    model = build_model(arch_name, tokenizer, layers=4)
    importance = search.measure_importance(model, _calibration(tokenizer), batch_size=2)
    shape = search.Shape(3, dataclasses.replace(search.full_shape(model.config).width, intermediate_size=40,
                                                hidden_size=24, num_attention_heads=2))
    candidate = search.build_candidate(model, importance, shape)
    assert arch.num_layers(model) == 4  # the input is left alone
    assert arch.count_parameters(candidate) == search.shape_param_count(model.config, shape)
    candidate.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = _calibration(tokenizer, 1, 8)
    assert arch.count_parameters(again) == search.shape_param_count(model.config, shape)
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, candidate(input_ids=ids).logits)


class _Split:
    """A packed split as the search reads it (``select``, columns), over a token tensor."""

    def __init__(self, ids: torch.Tensor) -> None:
        import datasets

        self.ds = datasets.Dataset.from_dict({"input_ids": ids.tolist(), "loss_mask": torch.ones_like(ids).tolist()})

    def __getattr__(self, name):
        return getattr(self.ds, name)

    def __len__(self) -> int:
        return len(self.ds)


def test_zero_step_kl_ranks_the_important_channels_first(tokenizer):
    """Half the MLP channels are silenced; the candidate keeping the live half must score a far lower KL
    than the same shape keeping the silenced half (the importance inverted)."""
    torch.manual_seed(0)
    model = sharpened(build_model("llama", tokenizer, layers=2), 3.0)
    with torch.no_grad():
        for layer in arch.decoder_layers(model):
            layer.mlp.down_proj.weight[:, 1::2] *= 1e-3  # odd channels write almost nothing
    importance = search.measure_importance(model, _calibration(tokenizer), batch_size=2)
    assert all(bool((m[0::2] > m[1::2]).all()) for m in importance.width.mlp)
    inverted = dataclasses.replace(importance, width=dataclasses.replace(
        importance.width, mlp=[-m for m in importance.width.mlp]))
    shape = search.Shape(2, dataclasses.replace(search.full_shape(model.config).width, intermediate_size=32))
    data = search.score_data(_Split(_calibration(tokenizer, 8, 16)), 4, 0, 2, 2, 0, "cpu")
    kept = search.run_search(model, importance, [shape], data, 0, 1e-3, "query", True, "cpu")[0]
    wrong = search.run_search(model, inverted, [shape], data, 0, 1e-3, "query", True, "cpu")[0]
    assert kept["kl_before"] == kept["kl_after"] and kept["heal_loss"] == []
    assert kept["kl_after"] < 0.2 * wrong["kl_after"]


def test_healing_lowers_the_kl(tokenizer):
    model = sharpened(build_model("llama", tokenizer, layers=2), 3.0)
    importance = search.measure_importance(model, _calibration(tokenizer), batch_size=2)
    shape = search.Shape(1, dataclasses.replace(search.full_shape(model.config).width, intermediate_size=32))
    split = _Split(_calibration(tokenizer, 12, 16))
    data = search.score_data(split, 4, 6, 4, 4, 0, "cpu")
    torch.manual_seed(0)
    record = search.run_search(model, importance, [shape], data, 6, 3e-3, "query", True, "cpu")[0]
    assert record["kl_after"] < record["kl_before"] and len(record["heal_loss"]) == 6


def _run(teacher_dir, corpus_dir, run_dir, *extra):
    from slimforge import cli

    return cli.main(["run", TINY_COMPRESS, f"teacher.path={teacher_dir}", f"data.path={corpus_dir}",
                     f"run_dir={run_dir}", "+prune@stages.search=search", "pipeline=[search]",
                     "stages.search.num_samples=4", "stages.search.seq_len=16", "stages.search.batch_size=2",
                     "stages.search.round_to=8", "stages.search.heal_steps=2", "stages.search.heal_batch_size=2",
                     "stages.search.score_blocks=2", *extra])


def test_stage_records_candidates_and_writes_the_chosen_shape(teacher_dir, corpus_dir, tmp_path):
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
    full = arch.count_parameters(teacher)
    target = int(0.7 * full)
    assert _run(teacher_dir, corpus_dir, tmp_path / "run", f"stages.search.target_params={target}") == 0
    folder = tmp_path / "run" / "stages" / "search"
    meta = json.loads((folder / "slimforge.json").read_text())
    records = meta["candidates"]
    assert len(records) >= 2 and meta["pareto"] and meta["chosen"] in range(len(records))
    for r in records:
        assert abs(r["parameters"] - target) <= 0.02 * target
        assert {"shape", "kl_before", "kl_after", "seconds"} <= set(r) and len(r["heal_loss"]) == 2
    chosen = records[meta["chosen"]]
    assert chosen["kl_after"] == min(r["kl_after"] for r in records)
    assert set(meta["pareto"]) == set(search.pareto_front([(r["parameters"], r["kl_after"]) for r in records]))
    assert len(meta["candidates_table"]) == len(records) + 2
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert arch.count_parameters(model) == chosen["parameters"] == meta["parameters_after"] < full
    assert model.config.num_hidden_layers == chosen["shape"]["layers"]
    assert model.config.intermediate_size == chosen["shape"]["intermediate_size"]
    card = (folder / "README.md").read_text()
    assert f"{len(records)} candidates" in card and "## Architecture search" in card
    rows = [line for line in card.splitlines() if line.startswith("| ") and line.endswith(" |") and "KL" not in line]
    assert sum(" | chosen |" in row for row in rows) == 1
    assert sum(row.count(f"| {r['parameters']:,} |") for row in rows for r in records) >= len(records)


def test_an_extra_axis_multiplies_the_grid_and_counts(tokenizer):
    """The extension point for MoE experts: a further axis's levels multiply the grid and its count
    shifts every solve (a stand-in axis that removes 1,000 parameters per level below 4)."""
    from slimforge.prune.search_grid import ExtraAxis

    config = tiny_config("llama", len(tokenizer), layers=6)
    axis = ExtraAxis("experts", lambda c: [4, 2], lambda c, s: -1000 * (4 - dict(s.extra)["experts"]))
    target = 0.7 * search.shape_param_count(config, search.full_shape(config))
    shapes = search.enumerate_shapes(config, target, 0.03, [1.0, 0.8], [("mlp", "heads", "hidden"), ("mlp",)],
                                     "query", 8, axes=[axis])
    assert {dict(s.extra)["experts"] for s in shapes} == {4, 2}
    for shape in shapes:
        dense = search.shape_param_count(config, dataclasses.replace(shape, extra=()))
        counted = search.shape_param_count(config, shape, [axis])
        assert counted == dense - 1000 * (4 - dict(shape.extra)["experts"])
        assert abs(counted - target) <= 0.03 * target


def test_stage_after_a_depth_prune_and_without_healing(teacher_dir, corpus_dir, tmp_path):
    """Later in a pipeline the search is planned against its input's size (the depth prune's 3 layers);
    with heal_steps 0 it ranks by the unhealed KL."""
    assert _run(teacher_dir, corpus_dir, tmp_path / "run", "pipeline=[depth,search]", "stages.search.heal_steps=0",
                "stages.search.target_params=30000", "stages.search.depth_keep=[1.0,0.7]") == 0
    meta = json.loads((tmp_path / "run" / "stages" / "search" / "slimforge.json").read_text())
    assert meta["dims_before"]["layers"] == 3 and meta["heal_steps"] == 0
    assert all(r["kl_before"] == r["kl_after"] and r["heal_loss"] == [] for r in meta["candidates"])
    assert {r["shape"]["layers"] for r in meta["candidates"]} <= {3, 2}
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "stages" / "search")
    assert arch.count_parameters(model) == meta["parameters_after"] == meta["candidates"][meta["chosen"]]["parameters"]


# --- mixture-of-experts inputs: depth x experts -----------------------------------------------


def _moe_built_params(config, layers: int, experts: int) -> int:
    """Parameters of a model of ``config`` really built with ``layers`` layers and ``experts`` experts (meta device)."""
    cut = copy.deepcopy(config)
    cut.num_hidden_layers = layers
    moe.set_expert_count(cut, experts)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cut)
    return arch.count_parameters(model)


@pytest.mark.parametrize("arch_name", MOE_ARCHS)
def test_moe_grid_is_depth_by_experts_and_counts_exactly(tokenizer, arch_name):
    config = tiny_moe_config(arch_name, len(tokenizer), layers=6, experts=6, top_k=2)
    full = _moe_built_params(config, 6, 6)
    assert search.shape_param_count(config, search.full_shape(config)) == full
    cfg = SearchConfig(target_params=str(int(0.72 * full)), tolerance=0.06, depth_keep=[1.0, 0.8, 0.6])
    cfg.check()
    shapes = cfg.shapes(config)
    axes = cfg.axes(config)
    assert [a.name for a in axes] == ["experts"]
    for shape in shapes:
        experts = dict(shape.extra)["experts"]
        assert shape.width == search.full_shape(config).width  # widths stay whole
        assert 2 <= experts <= 6  # never below the router's top-k
        counted = search.shape_param_count(config, shape, axes)
        assert counted == _moe_built_params(config, shape.layers, experts)
        assert abs(counted - cfg.target_count()) <= 0.06 * cfg.target_count()
    assert len({s.layers for s in shapes}) >= 2 and len({dict(s.extra)["experts"] for s in shapes}) >= 2


@pytest.mark.parametrize("arch_name", ["mixtral", "qwen2_moe"])
def test_moe_candidate_keeps_each_kept_layers_best_scored_experts(tokenizer, tmp_path, arch_name):
    from slimforge.prune.expert_scores import choose_kept

    model = build_moe_model(arch_name, tokenizer, layers=4, experts=4, top_k=2)
    importance = search.measure_importance(model, _calibration(tokenizer), batch_size=2)
    assert importance.width is None and len(importance.extra["experts"]) == 4
    whole = search.Shape(4, search.full_shape(model.config).width, (("experts", 4),))
    ids = _calibration(tokenizer, 2, 12)
    with torch.no_grad():  # the full shape is the input itself
        torch.testing.assert_close(search.build_candidate(model, importance, whole)(input_ids=ids).logits,
                                   model(input_ids=ids).logits, rtol=0, atol=0)
    shape = search.Shape(3, search.full_shape(model.config).width, (("experts", 3),))
    candidate = search.build_candidate(model, importance, shape)
    assert moe.num_experts(model.config) == 4 and arch.num_layers(model) == 4  # the input is left alone
    kept_layers = search.kept_layers(importance.depth, 3)
    for new, old in enumerate(kept_layers):
        kept = choose_kept(torch.tensor(importance.extra["experts"][old]), 3)
        router_before = moe.moe_blocks(model)[old].router.weight
        router_after = moe.moe_blocks(candidate)[new].router.weight
        torch.testing.assert_close(router_after, router_before[kept], rtol=0, atol=0)
        for slot, expert in enumerate(kept):
            for a, b in zip(moe.expert_weights(moe.moe_blocks(candidate)[new], slot),
                            moe.expert_weights(moe.moe_blocks(model)[old], expert), strict=True):
                torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert arch.count_parameters(candidate) == search.shape_param_count(model.config, shape,
                                                                         [search.experts_axis(model.config)])
    candidate.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, candidate(input_ids=ids).logits)


def test_moe_experts_nobody_routes_to_go_first(tokenizer):
    """Two experts of every layer are never routed to: the search's saliency scores them zero, and a
    candidate keeping 2 of 4 experts keeps the other two, losslessly."""
    from test_prune_experts import never_routed

    model = build_moe_model("mixtral", tokenizer, layers=2, experts=4, top_k=2)
    ids = _calibration(tokenizer, 2, 12)  # fewer tokens than the hidden size: never_routed solves exactly
    never_routed(model, ids, [1, 3])
    importance = search.measure_importance(model, ids, batch_size=2)
    for layer in importance.extra["experts"]:
        assert layer[1] == layer[3] == 0 and layer[0] > 0 and layer[2] > 0
    shape = search.Shape(2, search.full_shape(model.config).width, (("experts", 2),))
    candidate = search.build_candidate(model, importance, shape)
    assert moe.num_experts(candidate.config) == 2
    with torch.no_grad():
        torch.testing.assert_close(candidate(input_ids=ids).logits, model(input_ids=ids).logits)


@pytest.mark.parametrize("arch_name", MOE_ARCHS)
def test_moe_search_through_the_cli(tokenizer, corpus_dir, tmp_path, arch_name):
    """The stage on each MoE family: candidates over depth and experts, the chosen one written, reloaded
    and generating; its card's table has the experts and active-parameter columns."""
    teacher = tmp_path / "teacher"
    build_moe_model(arch_name, tokenizer, layers=6, experts=4, top_k=2).save_pretrained(teacher)
    tokenizer.save_pretrained(teacher)
    config = AutoModelForCausalLM.from_pretrained(teacher).config
    full = _moe_built_params(config, 6, 4)
    target = int(0.72 * full)
    run = tmp_path / "run"
    assert _run(teacher, corpus_dir, run, f"stages.search.target_params={target}", "stages.search.tolerance=0.08",
                "stages.search.depth_keep=[1.0,0.84,0.67]") == 0
    folder = run / "stages" / "search"
    meta = json.loads((folder / "slimforge.json").read_text())
    records = meta["candidates"]
    assert len(records) >= 2 and meta["axes"] == ["depth", "experts"]
    assert len({r["shape"]["experts"] for r in records}) >= 2 and len({r["shape"]["layers"] for r in records}) >= 2
    chosen = records[meta["chosen"]]
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert moe.num_experts(model.config) == chosen["shape"]["experts"] == meta["experts_after"]
    assert model.config.num_hidden_layers == chosen["shape"]["layers"] == len(meta["kept_experts"])
    assert arch.count_parameters(model) == chosen["parameters"] == meta["parameters_after"] < full
    assert moe.active_parameters(model) == chosen["active_parameters"] == meta["active_parameters_after"]
    ids = torch.tensor([tokenizer("Now is the winter of our discontent")["input_ids"]])
    assert model.generate(ids, max_new_tokens=4, do_sample=False).shape == (1, ids.shape[1] + 4)
    assert all(0 <= r["kl_after"] < 1 for r in records)
    card = (folder / "README.md").read_text()
    assert "| experts | active |" in card and f"{chosen['shape']['experts']} experts per layer" in card
