"""Pruning stages through recipes on tiny models of every family: prune, save, reload, generate."""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import ARCHS, REPO
from transformers import AutoModelForCausalLM

from slimforge import arch, cli

# Each family gets a depth criterion, a head mode and an unstructured method, so that all
# combinations are covered across the eight runs.
PLANS = {
    "llama": ("block_influence", "query", "sparsegpt", (2, 4)),
    "mistral": ("angular", "group", "wanda", None),
    "qwen2": ("list", "query", "magnitude", (4, 8)),
    "qwen3": ("block_influence", "query", "sparsegpt", None),
    "phi3": ("angular", "query", "wanda", (2, 4)),
    "gemma": ("list", "group", "sparsegpt", (2, 4)),
    "gemma2": ("block_influence", "group", "wanda", None),
    "gemma3_text": ("angular", "query", "magnitude", None),
}


def base_args(teacher, corpus_dir, run_dir):
    return [f"teacher.path={teacher}", "data=text", f"data.path={corpus_dir}", "data.block_size=32",
            "eval.tasks.perplexity.max_blocks=2", "eval.batch_size=2", f"run_dir={run_dir}"]


def calib(stage):
    return [f"stages.{stage}.num_samples=4", f"stages.{stage}.seq_len=16", f"stages.{stage}.batch_size=2"]


def pipeline_args(arch_name, model_dirs, corpus_dir, run_dir):
    criterion, head_mode, method, nm = PLANS[arch_name]
    args = base_args(model_dirs[arch_name], corpus_dir, run_dir) + [
        "+prune@stages.width=width", f"+prune@stages.sparse={method}", "pipeline=[prune,width,sparse]",
        "eval.models=[teacher,sparse]", f"stages.prune.criterion={criterion}", "stages.prune.remove_ratio=null", *calib("prune"),
        "stages.width.param_ratio=null", "stages.width.mlp_ratio=0.5", "stages.width.heads_ratio=0.5",
        "stages.width.hidden_ratio=0.75", "stages.width.round_to=8", f"stages.width.head_mode={head_mode}",
        *calib("width"),
    ]
    args += ["stages.prune.layers=[1]"] if criterion == "list" else ["stages.prune.num_remove=1"]
    if method != "magnitude":
        args += calib("sparse")
    if method == "sparsegpt":
        args += ["stages.sparse.block_size=8"]
    if nm:
        args += [f"stages.sparse.n={nm[0]}", f"stages.sparse.m={nm[1]}"]
    return args


@pytest.mark.parametrize("arch_name", ARCHS)
def test_depth_width_and_sparse_stages_give_loadable_models(arch_name, model_dirs, corpus_dir, tmp_path, tokenizer):
    criterion, head_mode, method, nm = PLANS[arch_name]
    run_dir = tmp_path / "run"
    assert cli.main(["run", "prune_depth", *pipeline_args(arch_name, model_dirs, corpus_dir, run_dir)]) == 0
    stages = run_dir / "stages"

    depth_meta = json.loads((stages / "prune" / "slimforge.json").read_text())
    assert depth_meta["layers_before"] == 4 and depth_meta["layers_after"] == 3
    assert len(depth_meta["removed_layers"]) == 1
    if criterion == "list":
        assert depth_meta["removed_layers"] == [1]
    else:
        assert len(depth_meta["scores"]) == 4  # per layer, or per start of a span of one layer

    width_meta = json.loads((stages / "width" / "slimforge.json").read_text())
    kv_after = 1 if head_mode == "group" else 2
    assert width_meta["dims_after"] == {"intermediate_size": 32, "num_attention_heads": 2,
                                        "num_key_value_heads": kv_after, "hidden_size": 24}
    assert len(width_meta["removed_hidden_channels"]) == 8
    assert width_meta["parameters_after"] < width_meta["parameters_before"]
    layer0 = width_meta["removed"]["0"]
    assert len(layer0["removed_query_heads"]) == 2 and len(layer0["removed_mlp_channels"]) == 32
    if head_mode == "group":
        assert len(layer0["removed_kv_heads"]) == 1
        group = layer0["removed_kv_heads"][0]
        assert layer0["removed_query_heads"] == [2 * group, 2 * group + 1]
    else:
        assert layer0["removed_kv_heads"] == [] and {h // 2 for h in layer0["removed_query_heads"]} == {0, 1}

    final = stages / "sparse"
    meta = json.loads((final / "slimforge.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(final).eval()
    assert model.config.num_hidden_layers == 3 and model.config.hidden_size == 24
    assert model.config.intermediate_size == 32 and model.config.num_attention_heads == 2
    linears = [m for layer in arch.decoder_layers(model) for m in layer.modules() if isinstance(m, torch.nn.Linear)]
    zeros = sum(int((m.weight == 0).sum()) for m in linears)
    total = sum(m.weight.numel() for m in linears)
    assert meta["sparsity"]["overall"] == pytest.approx(zeros / total, abs=1e-6)
    if nm:
        n, m = nm
        for linear in linears:
            groups = (linear.weight == 0).reshape(linear.weight.shape[0], -1, m).sum(-1)
            assert (groups >= n).all() and meta["pattern"] == f"{n}:{m}"
        assert meta["sparsity"]["overall"] == pytest.approx(n / m, abs=0.01)
    else:
        assert meta["sparsity"]["overall"] == pytest.approx(0.5, abs=0.01)
        assert all(v >= 0.49 for v in meta["sparsity"]["per_module"].values())
    ids = torch.tensor([tokenizer("Now is the winter of our discontent")["input_ids"]])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert out.shape[1] == ids.shape[1] + 5
    report = json.loads((run_dir / "report.json").read_text())
    assert set(report["models"]) == {"teacher", "sparse"}


def test_shipped_recipes_are_valid():
    for name in ("sparsegpt_50", "wanda_2of4", "prune_depth", "prune_width"):
        assert cli.main(["run", name, "--dry-run"]) == 0
    assert (REPO / "recipes" / "prune" / "wanda.yaml").is_file()


def _one_line_error(capsys, pattern):
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("slimforge: error:")]
    assert len(err) == 1, err
    assert re.search(pattern, err[0]), err[0]


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory, tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path_factory.mktemp("gpt2")
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=16, n_layer=2, n_head=2)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_bad_inputs_are_one_line_errors_before_any_work(model_dirs, corpus_dir, tmp_path, capsys, gpt2_dir):
    base = base_args(model_dirs["llama"], corpus_dir, tmp_path / "run")
    cases = [
        ("sparsegpt_50", ["stages.prune.sparsity=1.0"], r"stages\.prune\.sparsity=1\.0: must be in \[0, 1\)"),
        ("sparsegpt_50", ["stages.prune.sparsity=-0.1"], r"must be in \[0, 1\)"),
        ("wanda_2of4", ["stages.prune.n=4"], r"stages\.prune\.n=4: N:M sparsity needs 1 <= N < M \(got 4:4\)"),
        ("wanda_2of4", ["stages.prune.m=null"], r"give both n and m"),
        ("wanda_2of4", ["stages.prune.n=2", "stages.prune.m=5"], r"stages\.prune\.m=5.*not multiples of M"),
        ("sparsegpt_50", ["stages.prune.n=2", "stages.prune.m=4", "stages.prune.block_size=6"],
         r"block_size=6: must be a multiple of m=4"),
        ("prune_depth", ["stages.prune.remove_ratio=null", "stages.prune.num_remove=4"],
         r"num_remove=4.*would remove 4 of the model's 4 layers"),
        ("prune_depth", ["stages.prune.criterion=list", "stages.prune.layers=[0,7]"],
         r"layers=\[0, 7\].*must be < 4"),
        ("prune_depth", ["stages.prune.criterion=sideways"], r"criterion='sideways'.*block_influence, angular, list"),
        ("prune_width", ["stages.prune.param_ratio=null", "stages.prune.num_attention_heads=3"],
         r"num_attention_heads=3.*each.*2 KV groups|multiple of 2"),
        ("prune_width", ["stages.prune.param_ratio=null", "stages.prune.num_attention_heads=3",
                         "stages.prune.head_mode=group"], r"whole KV groups of 2 query heads \(head_dim 8\)"),
        ("prune_width", ["stages.prune.param_ratio=null", "stages.prune.hidden_size=64"], r"cannot grow"),
        ("prune_width", ["stages.prune.param_ratio=null"], r"give a target"),
        ("prune_width", [f"teacher.path={gpt2_dir}"],
         r"model type 'gpt2' is not supported for pruning; supported model types: llama, mistral"),
    ]
    for recipe, extra, pattern in cases:
        assert cli.main(["run", recipe, *base, *extra]) == 2, (recipe, extra)
        _one_line_error(capsys, pattern)
        assert not (tmp_path / "run" / "stages").exists()
