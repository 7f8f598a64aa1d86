"""Expert pruning of MoE models: REAP scores against a by-hand reference, lossless removal, merging, top-k, and
the CLI round trip per family."""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import pytest
import torch
from conftest import MOE_ARCHS, REPO, build_moe_model
from transformers import AutoModelForCausalLM

from slimforge import cli, moe
from slimforge.config import FieldError
from slimforge.errors import ConfigError
from slimforge.prune import expert_scores as es
from slimforge.prune.expert_config import ExpertsConfig
from slimforge.prune.experts import experts_stage, prune_experts
from slimforge.stage import TeacherInfo

TINY_EXPERTS = str(REPO / "tests" / "assets" / "recipes" / "tiny_experts.yaml")


def ids_for(tokenizer, n=4, length=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, len(tokenizer), (n, length), generator=g)


def block_inputs(model, ids, block):
    """The [T, H] tokens the MoE block sees in a plain forward of the model."""
    seen = []
    hook = block.block.register_forward_pre_hook(lambda _m, args: seen.append(args[0].reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        model(ids)
    hook.remove()
    return torch.cat(seen)


def by_hand(block, expert, x):
    """Expert ``expert``'s output from the fused tensors: down @ (act(gate @ x) * (up @ x))."""
    experts = block.experts
    inter = experts.down_proj.shape[-1]
    gate, up = experts.gate_up_proj[expert, :inter], experts.gate_up_proj[expert, inter:]
    return (experts.act_fn(x @ gate.T) * (x @ up.T)) @ experts.down_proj[expert].T


# --- REAP against a brute-force reference --------------------------------------------------------


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_reap_scores_match_a_by_hand_reference(arch, tokenizer):
    model = build_moe_model(arch, tokenizer, experts=4)
    ids = ids_for(tokenizer)
    block = moe.moe_blocks(model)[0]
    x = block_inputs(model, ids, block)
    with torch.no_grad():
        _, weights, indices = moe.route(block, x)
        outputs = torch.stack([by_hand(block, e, x) for e in range(4)])  # [E, T, H]: every expert on every token
        # The by-hand experts are the block's: their routed, weighted sum (plus the shared expert) is its output.
        mixed = sum(weights[:, s, None] * outputs[indices[:, s], torch.arange(len(x))] for s in range(indices.shape[1]))
        if block.shared_expert is not None:
            mixed = mixed + torch.sigmoid(block.shared_expert_gate(x)) * block.shared_expert(x)
        out = block.block(x[None])
        torch.testing.assert_close(mixed, (out[0] if isinstance(out, tuple) else out).reshape(x.shape),
                                   rtol=1e-5, atol=1e-6)
    reference, counts = torch.zeros(4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)
    for t in range(len(x)):
        for s in range(indices.shape[1]):
            e = int(indices[t, s])
            reference[e] += float(weights[t, s]) * float(outputs[e, t].norm())
            counts[e] += 1
    reference = reference / counts.clamp(min=1)
    assert (counts > 0).all() and counts.sum() == len(x) * indices.shape[1]

    # The pure functions, one batch at a time.
    stats = es.ExpertStats.zeros(4)
    for part in torch.arange(len(x)).chunk(3):
        norms = es.slot_output_norms(x[part], indices[part], lambda e, h: by_hand(block, e, h))
        es.accumulate_stats(stats, indices[part], weights[part], norms)
    torch.testing.assert_close(es.reap_scores(stats), reference, rtol=1e-5, atol=1e-9)
    assert torch.equal(es.frequency_scores(stats), counts)

    # And the stage's walk: layer 0 sees exactly these tokens (in batches of 2 sequences), routed by the model.
    layers = prune_experts(copy.deepcopy(model), ids, keep=4, score="reap", batch_size=2)
    assert len(layers) == 4 and layers[0].removed == []
    assert layers[0].scores == pytest.approx(reference.tolist(), rel=1e-4)
    assert layers[0].tokens == counts.long().tolist()
    freq = prune_experts(copy.deepcopy(model), ids, keep=4, score="frequency", batch_size=3)
    assert freq[0].scores == counts.tolist()


def test_choice_and_counts():
    assert es.choose_kept(torch.tensor([0.3, 0.1, 0.3, 0.0, 0.9]), 3) == [0, 2, 4]
    assert es.choose_kept(torch.tensor([0.0, 0.0, 0.0]), 2) == [0, 1]  # ties: lower index stays
    assert es.kept_count(60, None, 0.5) == 30 and es.kept_count(8, 3, None) == 3 and es.kept_count(8, None, None) == 8
    assert es.kept_count(4, None, 0.3) == 3  # round(1.2) = 1 removed
    with pytest.raises(ValueError):
        es.choose_kept(torch.zeros(3), 4)


# --- removing experts no token routes to -----------------------------------------------------------


def never_routed(model, ids, experts):
    """Set each layer's router rows of ``experts`` (in order) so they get logit -100 on every token of ``ids``."""
    tokens = ids.numel()
    with torch.no_grad():
        for block in moe.moe_blocks(model):
            x = block_inputs(model, ids, block)
            assert len(x) == tokens < x.shape[1], "an exact solve needs fewer tokens than the hidden size"
            row = torch.linalg.lstsq(x.double(), torch.full((tokens, 1), -100.0, dtype=torch.float64)).solution
            for e in experts:
                block.router.weight[e] = row[:, 0].float()
            _, _, chosen = moe.route(block, x)
            assert not set(chosen.flatten().tolist()) & set(experts)


def stage_ctx(monkeypatch, model, tokenizer, cfg, ids=None):
    """What the stage reads of its context; its calibration windows are ``ids``."""
    def load(**_):
        return copy.deepcopy(model), tokenizer

    def windows(_ctx, _cfg):
        assert ids is not None, "this stage should not need calibration"
        return ids

    monkeypatch.setattr("slimforge.calibration.windows.calibration_windows", windows)
    return SimpleNamespace(config=cfg, load_parent=load, parent=SimpleNamespace(load=load),
                           device=torch.device("cpu"), dtype=torch.float32, seed=0)


@pytest.mark.parametrize("merge", [False, True], ids=["drop", "merge"])
@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_pruning_experts_no_token_routes_to_is_lossless(arch, merge, tokenizer, monkeypatch, tmp_path):
    model = build_moe_model(arch, tokenizer, experts=4)
    ids = ids_for(tokenizer, n=2, length=12)  # 24 tokens < hidden 32
    never_routed(model, ids, [1, 3])
    with torch.no_grad():
        ref = model(ids).logits
    cfg = ExpertsConfig(num_experts=2, merge=merge, num_samples=2, seq_len=12, batch_size=1)
    cfg.check()
    out = experts_stage(stage_ctx(monkeypatch, model, tokenizer, cfg, ids))
    assert [(layer["kept"], layer["removed"]) for layer in out.meta["layers"]] == [([0, 2], [1, 3])] * 4
    assert all(layer["tokens"][1] == layer["tokens"][3] == 0 for layer in out.meta["layers"])
    assert (out.meta["experts_before"], out.meta["experts_after"]) == (4, 2)
    assert out.meta["parameters_after"] < out.meta["parameters_before"]
    pruned = out.model
    assert moe.num_experts(pruned.config) == 2
    with torch.no_grad():
        torch.testing.assert_close(pruned(ids).logits, ref, rtol=1e-5, atol=1e-5)
    pruned.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, ref, rtol=1e-5, atol=1e-5)
    assert again.generate(ids[:1, :4], max_new_tokens=3, do_sample=False).shape == (1, 7)


# --- merging --------------------------------------------------------------------------------------


def test_frequency_weighted_average_of_known_weights():
    w = [torch.full((2, 3), 1.0), torch.full((2, 3), 5.0), torch.full((2, 3), -7.0)]
    torch.testing.assert_close(es.frequency_weighted_average(w, [3, 1, 0]), torch.full((2, 3), 2.0))
    torch.testing.assert_close(es.frequency_weighted_average(w, [0, 0, 0]), w[0])  # nobody chose any: the survivor
    assert es.merge_targets(torch.tensor([[0.1, 0.9, 0.2], [0.5, 0.5, 0.0]]), [4, 6, 7]) == [6, 4]
    assert es.merge_groups([0, 2, 5], [1, 3, 4], [2, 2, 0]) == {0: [0, 4], 2: [2, 1, 3]}


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_merge_averages_a_removed_expert_into_its_closest_survivor_by_token_counts(arch, tokenizer):
    model = build_moe_model(arch, tokenizer, experts=4)
    with torch.no_grad():  # in every layer, expert 3 is a faint copy of expert 0: same direction, 1% of the output
        for block in moe.moe_blocks(model):
            gate, up, down = moe.expert_weights(block, 0)
            moe.set_expert_weights(block, 3, gate, up, down * 0.01)
    original = copy.deepcopy(model)
    ids = ids_for(tokenizer)
    layers = prune_experts(model, ids, keep=3, score="reap", merge=True, batch_size=2)
    for layer, before, after in zip(layers, moe.moe_blocks(original), moe.moe_blocks(model), strict=True):
        assert layer.removed == [3] and layer.kept == [0, 1, 2], layer.scores  # the faint copy scores lowest
        assert layer.merged_into == {3: 0}  # cosine 1 with expert 0's output
        n0, n3 = layer.tokens[0], layer.tokens[3]
        assert n3 > 0
        for part, (w0, w3, merged) in enumerate(zip(moe.expert_weights(before, 0), moe.expert_weights(before, 3),
                                                    moe.expert_weights(after, 0), strict=True)):
            torch.testing.assert_close(merged, (n0 * w0 + n3 * w3) / (n0 + n3), rtol=1e-6, atol=1e-7, msg=str(part))
        for e in (1, 2):  # survivors nobody joined, and every router row kept, are unchanged
            for w_before, w_after in zip(moe.expert_weights(before, e), moe.expert_weights(after, e), strict=True):
                assert torch.equal(w_before, w_after)
        assert torch.equal(after.router.weight, before.router.weight[:3])


# --- top-k, and what the schema refuses -------------------------------------------------------------


def test_top_k_alone_needs_no_calibration(tokenizer, monkeypatch, tmp_path):
    model = build_moe_model("qwen3_moe", tokenizer, experts=4, top_k=2)
    cfg = ExpertsConfig(top_k=1)
    cfg.check()
    assert not cfg.uses_data()
    out = experts_stage(stage_ctx(monkeypatch, model, tokenizer, cfg))
    assert (out.meta["top_k_before"], out.meta["top_k_after"], out.meta["layers"]) == (2, 1, [])
    assert out.meta["active_parameters_after"] < out.meta["active_parameters_before"]
    assert out.meta["parameters_after"] == out.meta["parameters_before"]
    out.model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert again.config.num_experts_per_tok == 1
    _, weights, indices = moe.route(moe.moe_blocks(again)[0], torch.randn(5, 32))
    assert indices.shape == weights.shape == (5, 1)


def test_active_parameters_count_the_experts_a_token_uses(tokenizer):
    model = build_moe_model("qwen2_moe", tokenizer, experts=4, top_k=2)
    total = sum(p.numel() for p in model.parameters())
    per_expert = 3 * 48 * 32
    assert moe.active_parameters(model) == total - 4 * 2 * per_expert  # 4 layers, 2 idle experts each


@pytest.mark.parametrize(("settings", "message"), [
    ({"num_experts": 0}, "num_experts=0 is invalid: every layer must keep at least one expert"),
    ({"ratio": 1.0}, "ratio=1.0 is invalid: would remove every expert"),
    ({"num_experts": 2, "ratio": 0.5}, "not both"),
    ({}, "give num_experts or ratio"),
    ({"top_k": 2, "merge": True}, "merging needs experts to remove"),
    ({"ratio": 0.5, "score": "loudest"}, "score='loudest' is invalid"),
])
def test_schema_refuses_bad_settings(settings, message):
    with pytest.raises(FieldError, match=message):
        ExpertsConfig(**settings).check()


@pytest.mark.parametrize(("arch", "settings", "message"), [
    ("mixtral", {"num_experts": 8}, "has only 4 experts per layer"),
    ("mixtral", {"num_experts": 2, "top_k": 3}, "routed to 3 experts but only 2 of 4 would remain"),
    ("qwen3_moe", {"ratio": 0.75}, "routed to 2 experts but only 1 of 4 would remain"),
    ("mixtral", {"ratio": 0.9}, "would remove all 4 experts"),
    ("phimoe", {"top_k": 1}, "sparsemixer.*always routes each token to 2 experts"),
    ("mixtral", {"ratio": 0.1}, "ratio=0.1 is invalid: changes nothing: all 4 experts per layer stay"),
    ("qwen2_moe", {"top_k": 2}, "top_k=2 is invalid: changes nothing"),
])
def test_plan_refuses_what_the_model_cannot_do(arch, settings, message, tokenizer):
    from conftest import tiny_moe_config

    cfg = ExpertsConfig(**settings)
    cfg.check()
    with pytest.raises(FieldError, match=message):
        cfg.preflight(TeacherInfo(tiny_moe_config(arch, len(tokenizer)), tokenizer))


def test_dense_model_is_refused(tokenizer):
    from conftest import tiny_config

    cfg = ExpertsConfig(ratio=0.5)
    with pytest.raises(ConfigError, match="'llama' is not a mixture of experts"):
        cfg.preflight(TeacherInfo(tiny_config("llama", len(tokenizer)), tokenizer))


def test_planned_config_has_the_new_counts(tokenizer):
    from conftest import tiny_moe_config

    parent = tiny_moe_config("mixtral", len(tokenizer), experts=8, top_k=2)
    planned = ExpertsConfig(ratio=0.5, top_k=1).planned_config(TeacherInfo(parent, tokenizer))
    assert (planned.num_local_experts, planned.num_experts_per_tok) == (4, 1)
    assert (parent.num_local_experts, parent.num_experts_per_tok) == (8, 2)


# --- the CLI round trip, per family ------------------------------------------------------------------

ROUND_TRIPS = {  # each family with other settings, so every option runs through the pipeline once
    "mixtral": ["stages.prune.ratio=0.5"],
    "phimoe": ["stages.prune.score=frequency", "stages.prune.ratio=null", "stages.prune.num_experts=3"],
    "qwen2_moe": ["stages.prune.merge=true", "stages.prune.ratio=0.25", "stages.prune.top_k=1"],
    "qwen3_moe": ["stages.prune.ratio=0.5", "pipeline=[prune,heal]"],
}


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_round_trip_through_the_cli(arch, tokenizer, corpus_dir, tmp_path):
    teacher = tmp_path / "teacher"
    build_moe_model(arch, tokenizer, experts=4, top_k=2).save_pretrained(teacher)
    tokenizer.save_pretrained(teacher)
    run_dir = tmp_path / "run"
    args = ["run", TINY_EXPERTS, f"teacher.path={teacher}", f"data.path={corpus_dir}", f"run_dir={run_dir}",
            *ROUND_TRIPS[arch]]
    assert cli.main(args) == 0
    meta = json.loads((run_dir / "stages" / "prune" / "slimforge.json").read_text())
    final = "heal" if "pipeline=[prune,heal]" in ROUND_TRIPS[arch] else "prune"
    model = AutoModelForCausalLM.from_pretrained(run_dir / "stages" / final).eval()
    assert moe.num_experts(model.config) == meta["experts_after"] < 4
    assert moe.top_k(model.config) == meta["top_k_after"]
    assert len(meta["layers"]) == 4 and all(len(layer["kept"]) == meta["experts_after"] for layer in meta["layers"])
    assert sum(p.numel() for p in model.parameters()) == meta["parameters_after"] < meta["parameters_before"]
    ids = torch.tensor([tokenizer("Now is the winter of our discontent")["input_ids"]])
    out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 4)
    report = json.loads((run_dir / "report.json").read_text())
    for label in ("teacher", final):
        assert report["models"][label]["tasks"]["perplexity"]["perplexity"] > 0
    card = (run_dir / "stages" / "prune" / "README.md").read_text()
    assert f"experts per layer 4 → {meta['experts_after']}" in card
