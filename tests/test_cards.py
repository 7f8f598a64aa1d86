"""Model cards: one in every artifact, naming its lineage, size, results and how to load it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO
from transformers import AutoModelForCausalLM

import slimforge
from slimforge import cli
from slimforge.cards import CardInput, render_card
from slimforge.eval.fingerprint import content_fingerprint
from slimforge.models import write_model_card

TINY = str(REPO / "tests" / "assets" / "recipes" / "tiny.yaml")
STAGES = ("sp", "heal", "q")


def front_matter(card: str) -> dict:
    match = re.match(r"^---\n(.*?)\n---\n", card, re.S)
    assert match, card[:200]
    return yaml.safe_load(match.group(1))


def python_snippet(card: str) -> str:
    return re.search(r"## How to load.*?```python\n(.*?)```", card, re.S).group(1)


def row(card: str, first_cell: str) -> list[str]:
    """The cells of the table row whose first cell is ``first_cell``."""
    for line in card.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and cells[0] == first_cell:
            return cells
    raise AssertionError(f"no row {first_cell!r} in:\n{card}")


@pytest.fixture(scope="module")
def run_dir(teacher_dir, corpus_dir, tmp_path_factory):
    """prune (magnitude) -> distill -> quantize (rtn) with the eval stage, on the tiny teacher."""
    run = tmp_path_factory.mktemp("cards") / "run"
    args = ["run", TINY, f"teacher.path={teacher_dir}", f"data.path={corpus_dir}", f"run_dir={run}",
            "+prune@stages.sp=magnitude", "+distill@stages.heal=kd", "+quantize@stages.q=rtn",
            "pipeline=[sp,heal,q]", "stages.sp.sparsity=0.5", "stages.heal.steps=2", "stages.heal.batch_size=2",
            "stages.heal.eval_blocks=2", "stages.heal.keep_sparsity=true", "stages.q.group_size=32",
            "eval.tasks.perplexity.max_blocks=2", "eval.batch_size=4",
            "dtype=float32"]  # the card's "Weights stored as float32"; auto is bf16 on native-bf16 CPUs
    assert cli.main(args) == 0
    return run


def cards(run_dir):
    return {name: (run_dir / "stages" / name / "README.md").read_text() for name in STAGES}


def test_every_stage_folder_has_a_card_with_front_matter(run_dir, teacher_dir):
    for name, card in cards(run_dir).items():
        matter = front_matter(card)
        assert matter["library_name"] == "transformers" and matter["pipeline_tag"] == "text-generation"
        assert matter["base_model"] == str(teacher_dir) and "slimforge" in matter["tags"]
        assert card.startswith("---\n") and f"\n# {name}\n" in card
    assert front_matter(cards(run_dir)["q"])["tags"][:7] == ["slimforge", "pruned", "magnitude", "distilled", "kd",
                                                             "quantized", "rtn"]
    assert front_matter(cards(run_dir)["q"])["base_model_relation"] == "quantized"
    assert not list((run_dir / "stages").rglob(".README.md*"))  # written atomically, no temp files left


def test_the_card_names_the_lineage_with_key_settings_and_tokens_seen(run_dir, teacher_dir):
    card = cards(run_dir)["q"]
    assert f"`{teacher_dir}` → sp (prune: magnitude) → heal (distill: kd) → q (quantize: rtn)" in card
    sp, heal, q = row(card, "1"), row(card, "2"), row(card, "3")
    assert sp[1:4] == ["sp", "prune: magnitude", "sparsity 0.5, per layer"] and "50.0%" in sp[4]
    assert sp[5] == "–"  # magnitude reads no data
    tokens = json.loads((run_dir / "stages" / "heal" / "slimforge.json").read_text())["metrics"]["tokens"]
    assert "2 steps × batch 2" in heal[3] and "lr 0.0001" in heal[3] and "loss forward_kl" in heal[3]
    assert heal[5] == f"trained on {REPO / 'tests' / 'assets' / 'corpus'} (blocks of 32 tokens): {tokens:,} tokens seen"
    bits = json.loads((run_dir / "stages" / "q" / "slimforge.json").read_text())["bits_per_weight"]
    assert q[3] == "int4, groups of 32" and q[4] == f"{bits:.2f} bits/weight"
    assert "after stage sp; since then: heal kept the mask" in card
    # the first stage's card knows only its own past
    assert "heal" not in cards(run_dir)["sp"].split("## Size")[0]


def test_size_comes_from_the_artifacts_metadata(run_dir):
    card = cards(run_dir)["q"]
    meta = json.loads((run_dir / "stages" / "q" / "slimforge.json").read_text())
    size = row(card, "size on disk (weights)")
    assert size[1] == f"{meta['size_on_disk_bytes'] / 1e3:.1f} kB"
    assert f"Bits per weight: {meta['bits_per_weight']:.2f}" in card
    assert row(card, "parameters")[1] == f"{meta['num_parameters']:,}"
    assert "Weights stored as float32" in cards(run_dir)["sp"]


def test_cards_carry_the_retention_numbers_of_report_json(run_dir):
    report = json.loads((run_dir / "report.json").read_text())
    for name, card in cards(run_dir).items():
        cells = row(card, "perplexity.perplexity ↓")
        teacher = report["models"]["teacher"]["tasks"]["perplexity"]["perplexity"]
        mine = report["models"][name]["tasks"]["perplexity"]["perplexity"]
        kept = report["retained"][name]["perplexity.perplexity"]
        ci = report["retained_ci"][name]["perplexity.perplexity"]
        assert cells[1:] == [f"{teacher:.3f}", f"{mine:.3f}", f"{kept:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"]
        kl = report["fidelity"][name]["perplexity"]["kl_mean"]
        assert row(card, "perplexity: mean KL(teacher ‖ model)")[1] == f"{kl:.4g}"
        assert str(run_dir / "report.json") in card


def test_folders_still_load_and_the_cards_snippet_runs(run_dir):
    for name in STAGES:
        folder = run_dir / "stages" / name
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        assert model.config.num_hidden_layers == 4
    card = cards(run_dir)["q"]
    assert "pip install transformers compressed-tensors" in card
    namespace: dict = {}
    exec(python_snippet(card), namespace)  # noqa: S102 - our own card's code, on our own model
    assert namespace["model"].hf_quantizer is not None


def test_rewriting_a_card_changes_no_fingerprint_and_a_rerun_reuses_everything(run_dir, teacher_dir, corpus_dir, capsys):
    folder = run_dir / "stages" / "heal"
    before = content_fingerprint(str(folder))
    card = folder / "README.md"
    card.write_text("edited by hand\n")
    assert content_fingerprint(str(folder)) == before
    args = ["run", TINY, f"teacher.path={teacher_dir}", f"data.path={corpus_dir}", f"run_dir={run_dir}",
            "+prune@stages.sp=magnitude", "+distill@stages.heal=kd", "+quantize@stages.q=rtn",
            "pipeline=[sp,heal,q]", "stages.sp.sparsity=0.5", "stages.heal.steps=2", "stages.heal.batch_size=2",
            "stages.heal.eval_blocks=2", "stages.heal.keep_sparsity=true", "stages.q.group_size=32",
            "eval.tasks.perplexity.max_blocks=2", "eval.batch_size=4", "dtype=float32"]  # as run_dir made it
    assert cli.main(args) == 0
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert {s["status"] for s in manifest["stages"].values()} == {"skipped"}
    assert "eval heal: unchanged, reusing" in capsys.readouterr().err
    assert "## Evaluation" in card.read_text() and "edited by hand" not in card.read_text()
    (run_dir / "stages" / "sp" / "README.md").unlink()  # an artifact from before cards: a rerun adds one
    assert cli.main([*args, "eval.models=[teacher]"]) == 0
    assert "Not evaluated yet" in (run_dir / "stages" / "sp" / "README.md").read_text()


@pytest.fixture(scope="module")
def formats(teacher_dir, corpus_dir, tmp_path_factory):
    """A GGUF file, a bitsandbytes NF4 folder, a QLoRA adapter over it (in another run directory), and
    that adapter merged (dequantized; re-quantized), through the Python API."""
    root = tmp_path_factory.mktemp("formats")
    data = {"path": str(corpus_dir), "block_size": 32}
    gguf = slimforge.quantize(teacher_dir, root / "gguf", method="gguf", type="Q8_0", data=data, name="gg")
    nf4 = slimforge.quantize(teacher_dir, root / "nf4", method="bnb_nf4", data=data, name="nf4")
    lora = slimforge.distill(nf4, teacher=teacher_dir, out_dir=root / "qlora", data=data, name="qlora", steps=1,
                             batch_size=2, eval_blocks=2, lora={"enabled": True, "r": 4})
    merged = slimforge.run_stage("distill", lora, root / "merged", method="merge_lora", data=data, name="merged")
    requantized = slimforge.run_stage("distill", lora, root / "requant", method="merge_lora", requantize=True,
                                      data=data, name="requant")
    return {"gguf": gguf, "bitsandbytes": nf4, "lora": lora, "merged": merged, "requantized": requantized}


@pytest.mark.parametrize("kind, needs", [("gguf", "gguf"), ("bitsandbytes", "bitsandbytes"),
                                         ("lora", "peft bitsandbytes")])
def test_each_format_gets_the_snippet_that_loads_it(formats, kind, needs):
    folder = formats[kind]
    card = (folder / "README.md").read_text()
    assert f"pip install transformers {needs}`" in card
    if kind == "gguf":
        gguf_file = json.loads((folder / "slimforge.json").read_text())["gguf_file"]
        assert f'gguf_file="{gguf_file}"' in card and f"llama-cli -m {folder}/{gguf_file}" in card
        assert front_matter(card)["library_name"] == "transformers" and "gguf" in front_matter(card)["tags"]
    if kind == "lora":
        assert front_matter(card)["library_name"] == "peft"
        assert front_matter(card)["base_model_relation"] == "adapter"
        assert f"over the quantized base `{formats['bitsandbytes']}`" in card
    namespace: dict = {}
    exec(python_snippet(card), namespace)  # noqa: S102 - our own card's code, on our own model
    with torch.no_grad():
        logits = namespace["model"](input_ids=torch.tensor([[1, 5, 9, 33]])).logits
    assert torch.isfinite(logits).all()


# Runs each card's snippet in a fresh interpreter, as a user would (no slimforge), and records the
# optional packages each load imported and the logits it gives.
LOAD_SNIPPETS = """
import json, sys
import torch
OPTIONAL = ("peft", "bitsandbytes", "gguf", "compressed_tensors", "slimforge")
snippets, results = json.loads(open(sys.argv[1]).read()), {}
for name, snippet in snippets.items():
    before = {m for m in OPTIONAL if m in sys.modules}
    space = {}
    exec(snippet, space)
    with torch.no_grad():
        logits = space["model"](input_ids=torch.tensor([[1, 5, 9, 33, 70, 100]])).logits.float()
    results[name] = {"new": sorted({m for m in OPTIONAL if m in sys.modules} - before),
                     "before": sorted(before), "logits": logits.tolist()}
open(sys.argv[2], "w").write(json.dumps(results))
"""


def stored_dtype(folder) -> str:
    """The dtype a folder's config says its unquantized weights have (an adapter's: its base's; GGUF: float32)."""
    from slimforge.models import adapter_base

    config = folder / "config.json"
    if not config.is_file():
        base = adapter_base(folder)
        return stored_dtype(Path(base)) if base else "float32"  # GGUF dequantizes to float32
    return json.loads(config.read_text()).get("dtype", "float32")


def card_needs(card: str) -> set[str]:
    """The modules the card's "Needs `pip install transformers ...`" line names besides transformers."""
    packages = re.search(r"Needs `pip install transformers ?([^`]*)`", card).group(1).split()
    return {p.replace("-", "_") for p in packages}


def test_every_format_loads_in_plain_transformers_with_the_packages_its_card_names(run_dir, formats, tmp_path):
    """The README's promise, format by format: the card's snippet loads the folder in a process without
    slimforge, importing exactly the packages the card (and the README) names, into the model slimforge evaluates."""
    import subprocess
    import sys

    from slimforge.models import load_model

    folders = {"hf": run_dir / "stages" / "heal", "merged": formats["merged"],
               "compressed-tensors": run_dir / "stages" / "q", "gguf": formats["gguf"],
               "bitsandbytes": formats["bitsandbytes"], "requantized": formats["requantized"], "lora": formats["lora"]}
    cards = {name: (folder / "README.md").read_text() for name, folder in folders.items()}
    script = tmp_path / "load.py"
    script.write_text(LOAD_SNIPPETS)
    results = {}
    # the adapter in its own process: its base's bitsandbytes must show up as its own need
    for group in (["hf", "merged", "compressed-tensors", "gguf", "bitsandbytes", "requantized"], ["lora"]):
        (tmp_path / "in.json").write_text(json.dumps({name: python_snippet(cards[name]) for name in group}))
        done = subprocess.run([sys.executable, str(script), str(tmp_path / "in.json"), str(tmp_path / "out.json")],
                              capture_output=True, text=True, cwd=tmp_path, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        results.update(json.loads((tmp_path / "out.json").read_text()))
    assert card_needs(cards["hf"]) == card_needs(cards["merged"]) == set()
    assert card_needs(cards["lora"]) == {"peft", "bitsandbytes"}
    for name, folder in folders.items():
        new, before = set(results[name]["new"]), set(results[name]["before"])
        assert "slimforge" not in new | before, name
        assert new <= card_needs(cards[name]) <= new | before, (name, new, before)
        model = load_model(str(folder), dtype=torch.float32, with_tokenizer=False,
                           gguf_file=json.loads((folder / "slimforge.json").read_text()).get("gguf_file"))
        with torch.no_grad():
            ours = model(input_ids=torch.tensor([[1, 5, 9, 33, 70, 100]])).logits
        theirs = torch.tensor(results[name]["logits"])
        # weights stored in bf16 (the bnb_*, rtn and merge_lora defaults) run in bf16 under plain
        # transformers, where slimforge's loader computes in float32
        tolerance = 2e-2 if stored_dtype(folder) == "bfloat16" else 1e-5
        assert float((theirs - ours).abs().max()) <= tolerance * max(1.0, float(ours.abs().max())), name


# --- rendering alone ------------------------------------------------------------------------


def stage_meta(stage, kind, method, parent, config, **extra):
    return {"stage": stage, "kind": kind, "method": method, "slimforge_version": "0.1.0",
            "parent": {"label": "x", "path": parent}, "teacher": {"path": "/models/teacher"},
            "config": {"kind": kind, "method": method, **config}, "fingerprint": f"fp-{stage}", **extra}


def test_render_names_the_asset_teachers_hub_id_and_marks_a_failed_gate():
    prune = stage_meta("sp", "prune", "wanda", "/cache/smollm", {"sparsity": 0.5, "per": "row", "n": 2, "m": 4},
                       sparsity={"overall": 0.5}, pattern="2:4", calibration={"samples": 8, "seq_len": 64})
    report = {"teacher": "teacher", "settings": {"device": "cpu", "dtype": "float32", "batch_size": 8, "seed": 1},
              "models": {"teacher": {"path": "/cache/smollm", "tasks": {"arc_easy": {"acc": 0.5}}},
                         "sp": {"path": "/run/stages/sp", "tasks": {"arc_easy": {"acc": 0.4}}}},
              "higher_is_better": {"arc_easy": {"acc": True}}, "retained": {"sp": {"arc_easy.acc": 0.8, "size": 1.0}},
              "retained_ci": {"sp": {}}, "fidelity": {"sp": {"arc_easy": {"flips": {"flip_rate": 0.25}}}},
              "tasks": {"arc_easy": {"items": 20}},
              "gate": {"status": "fail", "failures": ["sp: arc_easy.acc retained 0.8000 < 0.9"]}}
    card = render_card(CardInput(meta=prune, location="/run/stages/sp",
                                 lineage=[{"meta": prune, "data": {"asset": "shakespeare", "block_size": 256}}],
                                 base={"path": "/cache/smollm", "asset": "smollm2-135m",
                                       "hub_id": "HuggingFaceTB/SmolLM2-135M-Instruct", "num_parameters": 134515008},
                                 files={"format": "hf", "dtype": "float32"}, report=report, label="sp"))
    assert front_matter(card)["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "`HuggingFaceTB/SmolLM2-135M-Instruct` (embedded asset smollm2-135m) → sp (prune: wanda)" in card
    assert row(card, "1")[3] == "2:4 sparsity, per row"
    assert row(card, "1")[5] == "calibrated on 8 windows of 64 tokens from asset shakespeare (blocks of 256 tokens)"
    assert row(card, "arc_easy.acc ↑")[1:] == ["0.5", "0.4", "0.800"]
    assert row(card, "arc_easy: answers flipped")[1] == "0.25"
    assert "CI gate: FAIL for this model — arc_easy.acc retained 0.8000 < 0.9." in card
    assert "Tasks: arc_easy (20 items)." in card


def test_render_without_results_says_how_to_get_them_and_survives_odd_paths():
    meta = stage_meta("q", "quantize", "gptq", "/odd: path|x", {"bits": 4, "group_size": -1, "act_order": True},
                      bits_per_weight=4.25, bits_per_param=5.5, quantization={"bits": 4})
    card = render_card(CardInput(meta=meta, location="/out/q", lineage=[{"meta": meta, "data": None}],
                                 base={"path": "/odd: path|x"}, files={"format": "compressed-tensors"}))
    assert front_matter(card)["base_model"] == "/odd: path|x" and "4-bit" in front_matter(card)["tags"]
    assert "Not evaluated yet" in card and "--students /out/q" in card
    assert row(card, "1")[3] == "int4, per channel, act_order True"
    assert "calibrated on" in row(card, "1")[5]  # GPTQ reads data even when the meta does not say how much
    assert "vllm serve /out/q" in card


def test_write_model_card_on_a_folder_without_metadata(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "dtype": "bfloat16"}))
    card = write_model_card(tmp_path).read_text()
    assert card.startswith("---\n") and "## How to load" in card and "Weights stored as bfloat16" in card
    assert "recipe.yaml" not in card  # there is none beside these weights


def test_eval_command_writes_cards_only_into_slimforge_artifacts(formats, teacher_dir, model_dirs, corpus_dir, tmp_path,
                                                                  capsys):
    folder = formats["bitsandbytes"]
    assert "Not evaluated yet" in (folder / "README.md").read_text()
    plain = model_dirs["qwen2"]  # an HF folder slimforge did not make: never written into
    args = ["eval", "--teacher", str(teacher_dir), "--students", str(folder), str(plain), "--labels", "nf4", "other",
            "--tasks", "perplexity", "--data", str(corpus_dir), "--block-size", "32", "--max-blocks", "2",
            "--out", str(tmp_path / "eval"), "--write-cards"]
    assert cli.main(args) == 0
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    card = (folder / "README.md").read_text()
    kept = report["retained"]["nf4"]["perplexity.perplexity"]
    assert "Not evaluated yet" not in card and row(card, "perplexity.perplexity ↓")[3].startswith(f"{kept:.3f}")
    assert not (plain / "README.md").exists()


def test_a_moved_teacher_is_not_mistaken_for_a_hub_id(tmp_path):
    from slimforge.models import base_facts

    assert base_facts("runs/gone/stages/sp") == {"path": "runs/gone/stages/sp"}
    assert base_facts("HuggingFaceTB/SmolLM2-135M-Instruct")["hub_id"] == "HuggingFaceTB/SmolLM2-135M-Instruct"


# --- what each method's schema says about itself -----------------------------------------------

GOLDEN = json.loads((REPO / "tests" / "assets" / "card_lines_golden.json").read_text())["cases"]


@pytest.mark.parametrize("case", GOLDEN, ids=[c["name"] for c in GOLDEN])
def test_each_schema_describes_its_stage_as_the_old_if_chain_did(case):
    """Every preset (and variants) renders the settings and data cells cards.py's per-method chain rendered."""
    from slimforge.cards import stage_data, stage_settings

    assert stage_settings(case["meta"]) == case["settings"]
    assert stage_data({"meta": case["meta"], "data": case["data"]}) == case["data_line"]


def registered_methods():
    from slimforge.config import STAGE_KINDS
    from slimforge.registry import registry

    return [(kind, method) for kind in STAGE_KINDS for method in registry(kind).names()]


@pytest.mark.parametrize("kind, method", registered_methods())
def test_every_registered_method_answers_the_card_and_format_hooks(kind, method):
    """A new method is covered without touching this file: its defaults render, and its answers agree."""
    import dataclasses

    from slimforge.cards import stage_data, stage_settings
    from slimforge.config import stage_config_from_meta
    from slimforge.registry import registry

    config = registry(kind).get(method).load_schema()(kind=kind, method=method)  # bnb_fp4 shares bnb_nf4's schema
    meta = {"stage": "s", "kind": kind, "method": method, "config": dataclasses.asdict(config)}
    rebuilt = stage_config_from_meta(meta)
    assert rebuilt == config  # the recorded config rebuilds the very object that ran
    assert isinstance(stage_settings(meta), str)
    data = stage_data({"meta": meta, "data": {"path": "/data/x.txt"}})
    assert isinstance(rebuilt.uses_data(), bool)
    assert data is None or rebuilt.uses_data()  # a card names data only for a stage that reads it
    assert rebuilt.artifact_format(meta) in (None, "hf", "bitsandbytes", "compressed-tensors", "gguf", "lora")


def test_an_old_artifacts_config_still_renders():
    """Fields a newer schema added take their defaults; fields it dropped are ignored; odd shapes too."""
    from slimforge.cards import stage_data, stage_settings

    meta = {"kind": "distill", "method": "kd", "metrics": {"tokens": 64},
            "config": {"loss": "jsd", "steps": 5, "retired_knob": 3, "lora": "r=8", "on_policy": None}}
    assert stage_settings(meta) == "loss jsd at T=1.0, 5 steps × batch 8, lr 0.0001 (cosine, 10 warm-up)"
    assert stage_data({"meta": meta, "data": None}) == "trained on the run's data: 64 tokens seen"
    gguf = {"kind": "quantize", "method": "gguf", "config": {"type": "Q4_0"}}  # no output type recorded
    assert stage_settings(gguf) == "type Q4_0, output Q8_0"
    assert stage_settings({"kind": "prune", "method": "depth"}) == "criterion block_influence"
    assert stage_settings({"kind": "prune", "method": "retired_method", "config": {}}) == ""


def test_the_format_a_stage_declares_is_the_format_its_files_show(run_dir, formats):
    """Each schema's artifact_format agrees with reading the folder, for every format the tests make."""
    from slimforge.eval.fingerprint import model_kind
    from slimforge.models import artifact_format

    folders = {name: run_dir / "stages" / name for name in STAGES} | formats
    seen = {}
    for name, folder in folders.items():
        meta = json.loads((folder / "slimforge.json").read_text())
        declared = artifact_format(folder, meta.get("gguf_file"), meta)
        assert declared == artifact_format(folder, meta.get("gguf_file")), name
        kind = model_kind(str(folder), meta.get("gguf_file"))
        assert kind == (declared if declared != "compressed-tensors" else "quantized"), name
        seen[name] = declared
    assert seen == {"sp": "hf", "heal": "hf", "q": "compressed-tensors", "gguf": "gguf",
                    "bitsandbytes": "bitsandbytes", "lora": "lora", "merged": "hf", "requantized": "bitsandbytes"}


def test_a_folder_slimforge_did_not_make_is_read_from_its_files(tmp_path):
    from slimforge.models import artifact_format

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama",
                                                      "quantization_config": {"quant_method": "awq"}}))
    assert artifact_format(tmp_path) == "awq"
    assert artifact_format(tmp_path, meta={"kind": "fetch", "method": "gguf_to_hf"}) == "awq"  # not a stage
    assert artifact_format(tmp_path / "model.gguf") == "gguf" and artifact_format(tmp_path, "m.gguf") == "gguf"
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert artifact_format(tmp_path) == "hf"
    (tmp_path / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/base"}))
    assert artifact_format(tmp_path) == "lora"


def test_the_result_cell_comes_from_what_the_stage_recorded():
    from slimforge.cards import stage_outcome

    heal = {"kind": "distill", "metrics": {"eval_kl": 0.25}, "distill": {"before": {"eval_kl": 1.5}}}
    assert stage_outcome(heal) == "held-out KL to teacher 1.500 → 0.25"
    assert stage_outcome({"kind": "distill", "metrics": {"eval_kl": 0.25}}) == "held-out KL to teacher 0.25"
    q = {"kind": "quantize", "bits_per_weight": 4.5, "parameters_before": 2_000_000, "parameters_after": 2_000_000}
    assert stage_outcome(q) == "4.50 bits/weight"
    sp = {"kind": "prune", "sparsity": {"overall": 0.5}, "pattern": "2:4", "parameters_before": 3e6,
          "parameters_after": 2e6, "removed_layers": [1]}
    assert stage_outcome(sp) == "50.0% of linear weights zero (2:4); removed layers [1]; 3.0M → 2.0M parameters"
