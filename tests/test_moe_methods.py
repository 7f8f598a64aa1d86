"""Every existing method on mixture-of-experts models (slimforge/moe.py), on tiny random models of each family.

Depth pruning keeps Qwen2/3-MoE's dense/sparse layout; Wanda and SparseGPT prune each expert on the tokens
routed to it (magnitude for an expert with none) and never the routers; GPTQ quantizes every expert under
either calibration policy; KD adds the student's router load-balancing loss; the methods not built for
MoE refuse in one line (tests/bad_inputs/moe.py); the CLI takes an MoE teacher folder end to end.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import ASSETS, MOE_ARCHS, build_moe_model, tiny_moe_config

from slimforge import moe
from slimforge.prune.unstructured import magnitude_scores, prune_mask, wanda_scores

IDS_SHAPE = (2, 12)  # 24 calibration tokens: fewer than hidden 32, so router logits can be set exactly


def calibration_ids(tokenizer, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, len(tokenizer), IDS_SHAPE, generator=generator)


def router_inputs(model, block, ids) -> torch.Tensor:
    """What ``block``'s router (and so each expert) is given on ``ids``: [tokens, hidden]."""
    seen = []
    hook = block.router.register_forward_pre_hook(lambda _m, args: seen.append(args[0].reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        model(ids)
    hook.remove()
    return seen[0]


def starve_expert(model, block, ids, expert: int) -> None:
    """Make ``block``'s router give ``expert`` logit -100 on every token of ``ids`` (no token routes to it)."""
    x = router_inputs(model, block, ids).double()
    row = torch.linalg.lstsq(x, torch.full((x.shape[0], 1), -100.0, dtype=torch.float64)).solution
    with torch.no_grad():
        block.router.weight[expert] = row[:, 0].to(block.router.weight.dtype)
    assert expert not in moe.route(block, x.float())[2].flatten().tolist()


def untouched(model) -> dict[str, torch.Tensor]:
    """Copies of what no method may change: routers and shared-expert gates."""
    return {n: p.detach().clone() for n, p in model.named_parameters()
            if ".mlp." in n and moe.is_router_name(n.rsplit(".", 1)[0])}


# --- depth pruning ---------------------------------------------------------------------------


def _with_layout(arch: str, tokenizer, layout: dict):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = tiny_moe_config(arch, len(tokenizer), layers=4)
    for key, value in layout.items():
        setattr(config, key, value)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


DEPTH_CASES = [(arch, {}) for arch in MOE_ARCHS] + [
    ("qwen2_moe", {"mlp_only_layers": [1]}),  # dense by index: layer 1
    ("qwen3_moe", {"decoder_sparse_step": 2}),  # sparse by step: layers 1 and 3
]


@pytest.mark.parametrize(("arch", "layout"), DEPTH_CASES, ids=[f"{a}-{'-'.join(lay) or 'all'}" for a, lay in DEPTH_CASES])
def test_depth_pruning_keeps_the_dense_and_sparse_layers_and_reloads(arch, layout, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    from slimforge.prune.depth import drop_layers

    model = _with_layout(arch, tokenizer, layout)
    sparse_before = [moe.moe_block(layer) is not None for layer in model.model.layers]
    assert sparse_before == moe.sparse_layers(model.config)
    drop_layers(model, [0])
    assert [moe.moe_block(layer) is not None for layer in model.model.layers] == sparse_before[1:]
    ids = calibration_ids(tokenizer)
    with torch.no_grad():
        ref = model(ids).logits
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert [moe.moe_block(layer) is not None for layer in again.model.layers] == sparse_before[1:]
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, ref, rtol=1e-5, atol=1e-5)
    assert again.generate(ids[:1, :4], max_new_tokens=3, do_sample=False).shape == (1, 7)


# --- Wanda and SparseGPT -----------------------------------------------------------------------


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_wanda_scores_each_expert_on_its_routed_tokens_and_falls_back_to_magnitude(arch, tokenizer):
    from slimforge.prune.sparsify import sparsity_report, wanda_prune_model

    model = build_moe_model(arch, tokenizer, layers=2, experts=4)
    ids = calibration_ids(tokenizer)
    first = moe.moe_blocks(model)[0]
    starve_expert(model, first, ids, 3)
    x = router_inputs(model, first, ids)
    _, _, chosen = moe.route(first, x)
    originals = {e: [w.detach().clone() for w in moe.expert_weights(first, e)] for e in range(4)}
    frozen = untouched(model)
    shared = model.model.layers[0].mlp.shared_expert.up_proj.weight.detach().clone() if arch == "qwen2_moe" else None
    coverage = moe.ExpertCoverage()

    wanda_prune_model(model, ids, 0.5, per="row", n=2, m=4, batch_size=2, coverage=coverage)

    # Expert e's gate/up scores use the norms of the tokens routed to it (layer 0 sees the unpruned inputs).
    for e in range(3):
        tokens = (chosen == e).any(-1)
        norm = x[tokens].float().pow(2).sum(0).sqrt()
        gate, up, _ = moe.expert_weights(moe.moe_blocks(model)[0], e)
        expected = prune_mask(wanda_scores(originals[e][0], norm), 0.5, "row", 2, 4)
        assert torch.equal(gate != 0, expected)
        assert torch.equal(up != 0, prune_mask(wanda_scores(originals[e][1], norm), 0.5, "row", 2, 4))
    # Expert 3 was routed nothing: pruned by magnitude, and counted.
    gate, _, down = moe.expert_weights(moe.moe_blocks(model)[0], 3)
    assert torch.equal(gate != 0, prune_mask(magnitude_scores(originals[3][0]), 0.5, "row", 2, 4))
    assert torch.equal(down != 0, prune_mask(magnitude_scores(originals[3][2]), 0.5, "row", 2, 4))
    report = coverage.report()
    assert report["experts"] == 8 and report["experts_without_tokens"] >= 1
    assert coverage.counts["layers.0.mlp.experts.3"] == 0
    assert sum(v for k, v in coverage.counts.items() if k.startswith("layers.0.")) == ids.numel() * 2  # top-2
    # Routers and the shared-expert gate are never pruned; the shared expert is, like any MLP.
    for name, before in frozen.items():
        assert torch.equal(dict(model.named_parameters())[name], before), name
    if shared is not None:
        after = model.model.layers[0].mlp.shared_expert.up_proj.weight
        assert ((after == 0).reshape(after.shape[0], -1, 4).sum(-1) == 2).all() and not torch.equal(after, shared)
    sparsity = sparsity_report(model)
    assert sparsity["overall"] == pytest.approx(0.5)
    assert "layers.1.mlp.experts.2.down_proj" in sparsity["per_module"]
    assert not any(moe.is_router_name(name) for name in sparsity["per_module"])


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_sparsegpt_prunes_every_expert_to_the_target(arch, tokenizer):
    from slimforge.prune.sparsify import sparsegpt_prune_model

    model = build_moe_model(arch, tokenizer, layers=2, experts=4)
    ids = calibration_ids(tokenizer)
    starve_expert(model, moe.moe_blocks(model)[1], ids, 0)  # layer 1's expert 0: no tokens (identity Hessian)
    frozen = untouched(model)
    coverage = moe.ExpertCoverage()
    loss = sparsegpt_prune_model(model, ids, 0.5, per="layer", block_size=16, batch_size=2, coverage=coverage)
    assert loss > 0
    for block in moe.moe_blocks(model):
        for e in range(block.num_experts):
            for weight in moe.expert_weights(block, e):
                assert float((weight == 0).float().mean()) == pytest.approx(0.5)
    assert coverage.counts["layers.1.mlp.experts.0"] == 0
    for name, before in frozen.items():
        assert torch.equal(dict(model.named_parameters())[name], before), name
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


# --- GPTQ --------------------------------------------------------------------------------------


def _gptq(model, ids, monkeypatch, **kwargs):
    """GPTQ int4 per channel on ``model``; returns its result and the Hessians each [48 x 32] expert linear got."""
    from slimforge.quantize import gptq

    seen = []
    real = gptq.gptq_quantize_weight

    def recording(weight, hessian, *args, **kw):
        seen.append((tuple(weight.shape), hessian.clone()))
        return real(weight, hessian, *args, **kw)

    monkeypatch.setattr(gptq, "gptq_quantize_weight", recording)
    result = gptq.gptq_quantize_model(model, ids, 4, -1, True, 0.01, 32, 2, torch.device("cpu"), torch.float32,
                                      scale_search="minmax", **kwargs)
    return result, seen


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_every_expert_sees_every_token_but_the_output_follows_the_routing(arch, tokenizer):
    from slimforge.calibration.activations import record_linear_inputs

    model = build_moe_model(arch, tokenizer, layers=2)
    ids = calibration_ids(tokenizer)
    with torch.no_grad():
        ref = model(ids).logits
        with moe.unfused_experts(model):
            expert = model.model.layers[1].mlp.experts[0]
            with moe.every_expert_sees_every_token(model), moe.routed_tokens(model) as routed, \
                    record_linear_inputs({"up": expert.up_proj}) as stats:
                logits = model(ids).logits
            assert stats["up"].tokens == ids.numel()  # every token, not only the routed ones
            assert 0 < routed["model.layers.1.mlp.experts.0"] < ids.numel()
    torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_gptq_quantizes_every_expert_on_a_hessian_of_all_tokens_by_default(arch, tokenizer, monkeypatch):
    model = build_moe_model(arch, tokenizer, layers=2, experts=4)
    ids = calibration_ids(tokenizer)
    frozen = untouched(model)
    result, seen = _gptq(model, ids, monkeypatch)
    # "all": in layer 0, the 4 experts' gate and up projections all got the same Hessian, of every token.
    first = [h for shape, h in seen if shape == (48, 32)][:8]
    assert all(torch.equal(h, first[0]) for h in first)
    assert result["moe"]["policy"] == "all" and result["moe"]["experts"] == 8
    assert "model.layers.1.mlp.experts.3.down_proj" in result["scales"]
    assert not any(moe.is_router_name(name) for name in result["scales"])
    for name, before in frozen.items():
        assert torch.equal(dict(model.named_parameters())[name], before), name
    # every expert's rows lie on a symmetric int4 grid: at most 16 distinct values per row
    for block in moe.moe_blocks(model):
        for e in range(block.num_experts):
            for weight in moe.expert_weights(block, e):
                assert max(len(torch.unique(row)) for row in weight) <= 16
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_gptq_routed_policy_uses_routed_tokens_and_rounds_experts_with_too_few(arch, tokenizer, monkeypatch):
    model = build_moe_model(arch, tokenizer, layers=2, experts=4)
    ids = calibration_ids(tokenizer)
    result, seen = _gptq(model, ids, monkeypatch, moe_calibration="routed", moe_min_tokens=1)
    first = [h for shape, h in seen if shape == (48, 32)][:8]
    assert not all(torch.equal(h, first[0]) for h in first)  # each expert its own tokens
    assert result["moe"]["experts_rounded_to_nearest"] == 0
    model = build_moe_model(arch, tokenizer, layers=2, experts=4)
    result, seen = _gptq(model, ids, monkeypatch, moe_calibration="routed", moe_min_tokens=10_000)
    assert result["moe"]["experts_rounded_to_nearest"] == 8  # every expert below the floor: round to nearest
    assert result["moe"]["experts_below_min_tokens"] == 8
    eye = torch.eye(32)
    assert all(torch.equal(h, eye) for shape, h in seen if shape == (48, 32))


# --- distillation keeps the router's auxiliary loss -------------------------------------------


def _objective(backend: str, teacher):
    from slimforge.distill.config import DistillConfig
    from slimforge.distill.wiring import KDObjective

    cfg = DistillConfig(kd_backend=backend, chunk_size=8, precision="fp32")
    return KDObjective(cfg, teacher=teacher)


def _step(objective, student, ids, mask):
    teacher_side = objective.teacher_targets("train", [0], ids)
    student.zero_grad()
    torch.manual_seed(0)  # PhiMoE's router samples its experts in training mode: the same draws each time
    loss, stats = objective(student, None, input_ids=ids, loss_mask=None, attention_mask=mask,
                            targets_from_teacher=teacher_side)
    loss.backward()
    router = moe.moe_blocks(student)[0].router.weight.grad.clone()
    return loss.detach(), stats, router


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_kd_adds_the_router_load_balancing_loss(arch, tokenizer):
    teacher = build_moe_model(arch, tokenizer, layers=2, seed=1)
    student = build_moe_model(arch, tokenizer, layers=2, seed=2).train()
    student.config.router_aux_loss_coef = 0.5  # large, so its share of the router's gradient is plain to see
    ids = calibration_ids(tokenizer)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    torch.manual_seed(0)
    reference = student(input_ids=ids, attention_mask=mask, output_router_logits=True).aux_loss.detach()

    results = {backend: _step(_objective(backend, teacher), student, ids, mask) for backend in ("naive", "chunked")}
    loss, stats, router_grad = results["naive"]
    assert stats["router_aux"] == pytest.approx(float(reference), rel=1e-5)
    assert float(loss) == pytest.approx(stats["kd"] + 0.5 * float(reference), rel=1e-5)
    # The chunked path gives the same loss and gradients as the naive one for an MoE student.
    c_loss, c_stats, c_grad = results["chunked"]
    assert float(c_loss) == pytest.approx(float(loss), rel=1e-5)
    assert c_stats["router_aux"] == pytest.approx(stats["router_aux"], rel=1e-6)
    torch.testing.assert_close(c_grad, router_grad, rtol=1e-4, atol=1e-7)
    # The router's gradient is the KD term's plus coef x the aux loss's.
    student.config.router_aux_loss_coef = 0.0
    kd_loss, kd_stats, kd_grad = _step(_objective("naive", teacher), student, ids, mask)
    assert "router_aux" not in kd_stats and float(kd_loss) == pytest.approx(stats["kd"], rel=1e-6)
    student.zero_grad()
    torch.manual_seed(0)
    student(input_ids=ids, attention_mask=mask, output_router_logits=True).aux_loss.backward()
    aux_grad = moe.moe_blocks(student)[0].router.weight.grad
    assert float(aux_grad.abs().sum()) > 0
    torch.testing.assert_close(router_grad, kd_grad + 0.5 * aux_grad, rtol=1e-4, atol=1e-7)


# --- parameters, refusals and the CLI ------------------------------------------------------------


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_active_parameters_leave_out_the_unrouted_experts(arch, tokenizer):
    from slimforge.arch import count_parameters
    from slimforge.moe_layout import inactive_parameters_from_config

    model = build_moe_model(arch, tokenizer, layers=2, experts=4, top_k=2)
    total = count_parameters(model)
    per_expert = 3 * 32 * 48
    assert moe.active_parameters(model, total) == total - 2 * (4 - 2) * per_expert
    assert inactive_parameters_from_config(model.config) == 2 * (4 - 2) * per_expert


NO_GATE = ["eval.gate.min_retained=null", "eval.gate.max_kl=null", "eval.gate.min_top1_agreement=null",
           "eval.gate.min_retained_tasks={}"]


@pytest.fixture(scope="module")
def moe_teacher(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("moe-teacher")
    build_moe_model("qwen2_moe", tokenizer, layers=2).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_cli_runs_gptq_on_an_moe_teacher_and_the_folder_reloads(moe_teacher, tmp_path):
    from transformers import AutoModelForCausalLM

    from slimforge import cli

    run = tmp_path / "run"
    code = cli.main(["run", "gptq_w4", "teacher=local", f"teacher.path={moe_teacher}", "data=text",
                     f"data.path={ASSETS / 'corpus'}", "data.block_size=32", f"run_dir={run}",
                     "stages.quant.group_size=-1", "stages.quant.num_samples=4", "stages.quant.seq_len=16",
                     "stages.quant.batch_size=2", "stages.quant.block_size=32", "stages.quant.storage_dtype=float32",
                     "eval.tasks.perplexity.max_blocks=2", "eval.batch_size=2", *NO_GATE])
    assert code == 0
    folder = run / "stages" / "quant"
    meta = json.loads((folder / "slimforge.json").read_text())
    assert meta["quantization"]["format"] == "dequantized" and meta["quantization"]["moe"]["policy"] == "all"
    assert meta["active_parameters"] < meta["num_parameters"]
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert "quantization_config" not in model.config.to_dict()
    gate, _, _ = moe.expert_weights(moe.moe_blocks(model)[1], 2)
    assert max(len(torch.unique(row)) for row in gate) <= 16
    report = json.loads((run / "report.json").read_text())
    assert report["models"]["teacher"]["active_parameters"] == meta["active_parameters"]
    assert report["models"]["quant"]["tasks"]["perplexity"]["perplexity"] > 0  # evaluated like any model
    assert 0 <= report["fidelity"]["quant"]["perplexity"]["kl_mean"] < 0.1  # int4 of a random model: close
    assert "active)" in (run / "report.md").read_text()


def test_masked_kd_keeps_the_experts_2_of_4_pattern(moe_teacher, tmp_path):
    """wanda_2of4_heal on an MoE teacher: the heal trains the fused experts and keeps their zeros."""
    from transformers import AutoModelForCausalLM

    from slimforge import cli

    run = tmp_path / "run"
    code = cli.main(["run", "wanda_2of4_heal", "teacher=local", f"teacher.path={moe_teacher}", "data=text",
                     f"data.path={ASSETS / 'corpus'}", "data.block_size=32", f"run_dir={run}",
                     "stages.prune.num_samples=4", "stages.prune.seq_len=16", "stages.prune.batch_size=2",
                     "stages.heal.steps=2", "stages.heal.batch_size=2", "stages.heal.warmup_steps=0",
                     "stages.heal.eval_every=2", "stages.heal.eval_blocks=2", "stages.heal.lr=1e-2",
                     "eval.tasks.perplexity.max_blocks=2", "eval.batch_size=2", *NO_GATE])
    assert code == 0
    pruned, healed = (AutoModelForCausalLM.from_pretrained(run / "stages" / s) for s in ("prune", "heal"))
    for before, after in zip(moe.moe_blocks(pruned), moe.moe_blocks(healed), strict=True):
        for name in ("gate_up_proj", "down_proj"):
            b, a = getattr(before.experts, name), getattr(after.experts, name)
            assert ((b == 0).reshape(*b.shape[:2], -1, 4).sum(-1) == 2).all()
            assert torch.equal(b == 0, a == 0) and not torch.equal(a, b), name


def test_lora_kd_on_an_moe_student_adapts_attention_and_the_shared_expert_only(moe_teacher, tmp_path):
    """LoRA's target_modules name linear layers: an MoE student's attention and Qwen2-MoE's shared expert get
    adapters, merged at the end; the fused routed experts and the router are not linears and stay bit-identical."""
    from transformers import AutoModelForCausalLM

    from slimforge import cli

    run = tmp_path / "run"
    code = cli.main(["run", str(ASSETS / "recipes" / "student.yaml"), "teacher=local", f"teacher.path={moe_teacher}",
                     "data=text", f"data.path={ASSETS / 'corpus'}", "data.block_size=32", f"run_dir={run}",
                     "stages.student.num_layers=1", "+distill@stages.kd=kd", "pipeline=[student,kd]",
                     "stages.kd.lora.enabled=true", "stages.kd.lora.r=4", "stages.kd.steps=3", "stages.kd.batch_size=2",
                     "stages.kd.warmup_steps=0", "stages.kd.lr=1e-2", "eval.tasks.perplexity.max_blocks=2",
                     "eval.batch_size=2", *NO_GATE])
    assert code == 0
    assert json.loads((run / "stages" / "kd" / "slimforge.json").read_text())["distill"]["lora"] == "merged"
    before, after = (dict(AutoModelForCausalLM.from_pretrained(run / "stages" / s).named_parameters())
                     for s in ("student", "kd"))
    changed = {name for name, p in before.items() if not torch.equal(p, after[name])}
    assert {n for n in changed if n.endswith("_proj.weight") and "self_attn" in n}
    assert any("shared_expert." in n for n in changed)
    assert not {n for n in changed if ".experts." in n or n.endswith("mlp.gate.weight") or "shared_expert_gate" in n}
