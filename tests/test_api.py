"""The Python API: each stage function makes the artifact the recipe route makes, and fails the same way."""

from __future__ import annotations

import inspect
import json
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from conftest import REPO, cli_env
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import slimforge
from slimforge import cli
from slimforge.errors import ConfigError, ModelLoadError, RunDirError

TINY = str(REPO / "tests" / "assets" / "recipes" / "tiny.yaml")
CALIB = {"num_samples": 4, "seq_len": 16}
KD = {"steps": 3, "batch_size": 2, "eval_blocks": 2}
LABELS = ("sp", "heal", "q")


def data_of(corpus_dir):
    return {"path": str(corpus_dir), "block_size": 32}


def recipe_args(teacher_dir, corpus_dir, run_dir, *extra):
    """The same chain as ``api_chain``, as one recipe on the command line."""
    return ["run", TINY, f"teacher.path={teacher_dir}", f"data.path={corpus_dir}", f"run_dir={run_dir}",
            "+prune@stages.sp=wanda", "+distill@stages.heal=kd", "+quantize@stages.q=rtn", "pipeline=[sp,heal,q]",
            "stages.sp.sparsity=0.5", "stages.sp.num_samples=4", "stages.sp.seq_len=16",
            "stages.heal.steps=3", "stages.heal.batch_size=2", "stages.heal.eval_blocks=2",
            "stages.q.group_size=32", "eval.tasks.perplexity.max_blocks=2", "eval.batch_size=4", *extra]


@pytest.fixture(scope="module")
def api_chain(teacher_dir, corpus_dir, tmp_path_factory):
    """prune -> distill -> quantize -> evaluate through the API, each into its own run directory."""
    root = tmp_path_factory.mktemp("api")
    data = data_of(corpus_dir)
    sp = slimforge.prune(teacher_dir, root / "prune", method="wanda", sparsity=0.5, data=data, name="sp", **CALIB)
    heal = slimforge.distill(sp, teacher=teacher_dir, out_dir=root / "distill", data=data, name="heal", **KD)
    q = slimforge.quantize(heal, root / "quant", method="rtn", group_size=32, data=data, name="q")
    result = slimforge.evaluate(teacher_dir, [sp, heal, q], tasks="perplexity", labels=LABELS, data=str(corpus_dir),
                                block_size=32, max_blocks=2, batch_size=4, out_dir=root / "eval", cache=False,
                                write_cards=True)
    return SimpleNamespace(root=root, sp=sp, heal=heal, q=q, result=result)


@pytest.fixture(scope="module")
def recipe_chain(teacher_dir, corpus_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("recipe") / "run"
    assert cli.main(recipe_args(teacher_dir, corpus_dir, run_dir)) == 0
    return run_dir


def test_each_function_returns_its_artifact_folder_in_a_run_directory(api_chain, teacher_dir):
    for name, folder, out in (("sp", api_chain.sp, "prune"), ("heal", api_chain.heal, "distill"),
                              ("q", api_chain.q, "quant")):
        assert folder == api_chain.root / out / "stages" / name
        manifest = json.loads((api_chain.root / out / "manifest.json").read_text())
        assert manifest["stages"][name]["status"] == "done"
    heal_meta = json.loads((api_chain.heal / "slimforge.json").read_text())
    assert heal_meta["parent"]["path"] == str(api_chain.sp)  # distilled the pruned student ...
    assert heal_meta["teacher"]["path"] == str(teacher_dir.resolve())  # ... from the teacher
    q_meta = json.loads((api_chain.q / "slimforge.json").read_text())
    assert q_meta["parent"]["path"] == str(api_chain.heal) and q_meta["quantization"]["group_size"] == 32


def test_outputs_load_with_plain_transformers(api_chain):
    ids = torch.tensor([[1, 5, 9, 33, 7, 2]])
    for folder in (api_chain.sp, api_chain.heal, api_chain.q):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        with torch.no_grad():
            assert torch.isfinite(model(ids).logits).all()
    sp = AutoModelForCausalLM.from_pretrained(api_chain.sp, dtype=torch.float32)
    weight = sp.model.layers[0].mlp.up_proj.weight
    assert (weight == 0).float().mean().item() == pytest.approx(0.5)


@pytest.mark.parametrize("label", LABELS)
def test_api_artifacts_equal_the_recipe_route(api_chain, recipe_chain, label):
    """Same settings, same weights: the API is the recipe's code path, not a second implementation."""
    api_folder = getattr(api_chain, label)
    recipe_folder = recipe_chain / "stages" / label
    ours, theirs = load_file(api_folder / "model.safetensors"), load_file(recipe_folder / "model.safetensors")
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    api_cfg = json.loads((api_folder / "slimforge.json").read_text())["config"]
    assert api_cfg == json.loads((recipe_folder / "slimforge.json").read_text())["config"]


def test_evaluate_equals_the_recipes_eval(api_chain, recipe_chain):
    ours, theirs = api_chain.result.report, json.loads((recipe_chain / "report.json").read_text())
    for label in ("teacher", *LABELS):
        assert ours["models"][label]["tasks"]["perplexity"] == pytest.approx(theirs["models"][label]["tasks"]["perplexity"])
        if label != "heal":  # a distill artifact also holds TensorBoard events, named by time and host
            assert ours["models"][label]["content_fingerprint"] == theirs["models"][label]["content_fingerprint"]
    for label in LABELS:
        assert ours["retained"][label] == pytest.approx(theirs["retained"][label])
    assert api_chain.result.passed and api_chain.result.exit_code == 0
    assert (api_chain.result.out_dir / "report.html").is_file()


def test_evaluate_writes_the_results_into_each_students_card(api_chain):
    card = (api_chain.q / "README.md").read_text()
    report = api_chain.result.report
    kept = report["retained"]["q"]["perplexity.perplexity"]
    row = re.search(r"^\| perplexity\.perplexity ↓ \| (\S+) \| (\S+) \| (\S+)", card, re.M)
    assert row is not None, card
    assert float(row.group(1)) == pytest.approx(report["models"]["teacher"]["tasks"]["perplexity"]["perplexity"], abs=1e-3)
    assert float(row.group(2)) == pytest.approx(report["models"]["q"]["tasks"]["perplexity"]["perplexity"], abs=1e-3)
    assert row.group(3) == f"{kept:.3f}"
    assert str(api_chain.result.out_dir / "report.json") in card
    assert "sp (prune: wanda) → heal (distill: kd) → q (quantize: rtn)" in card


def test_calling_again_reuses_and_a_changed_setting_is_refused(api_chain, corpus_dir, teacher_dir):
    before = (api_chain.sp / "model.safetensors").stat().st_mtime_ns
    again = slimforge.prune(teacher_dir, api_chain.root / "prune", method="wanda", sparsity=0.5,
                            data=data_of(corpus_dir), name="sp", **CALIB)
    assert again == api_chain.sp and (again / "model.safetensors").stat().st_mtime_ns == before
    manifest = json.loads((api_chain.root / "prune" / "manifest.json").read_text())
    assert manifest["stages"]["sp"]["status"] == "skipped"
    with pytest.raises(RunDirError, match="different config"):
        slimforge.prune(teacher_dir, api_chain.root / "prune", method="wanda", sparsity=0.25,
                        data=data_of(corpus_dir), name="sp", **CALIB)


def test_distill_records_its_teacher_in_the_fingerprint(api_chain, corpus_dir, model_dirs, tmp_path):
    """A student distilled from another teacher is a different artifact, never a reused one."""
    out = api_chain.root / "distill"
    with pytest.raises(RunDirError, match="different config or input"):
        slimforge.distill(api_chain.sp, teacher=model_dirs["mistral"], out_dir=out, data=data_of(corpus_dir),
                          name="heal", **KD)


@pytest.mark.parametrize("option, value", [("sparsity", 1.5), ("sparsity", "lots"), ("per", "column")])
def test_bad_values_give_the_clis_one_line_error(teacher_dir, corpus_dir, tmp_path, capsys, option, value):
    run_dir = tmp_path / "cli"
    assert cli.main(recipe_args(teacher_dir, corpus_dir, run_dir, f"stages.sp.{option}={value}")) == 2
    cli_message = capsys.readouterr().err.strip().removeprefix("slimforge: error: ")
    with pytest.raises(ConfigError) as err:
        slimforge.prune(teacher_dir, tmp_path / "api", method="wanda", data=data_of(corpus_dir), name="sp",
                        **{option: value})
    assert str(err.value) == cli_message and "\n" not in cli_message
    assert not (tmp_path / "api").exists() and not run_dir.exists()


def test_unknown_names_list_the_valid_ones(teacher_dir, corpus_dir, tmp_path):
    data = data_of(corpus_dir)
    with pytest.raises(ConfigError, match="unknown prune method 'wandaa'. Did you mean 'wanda'"):
        slimforge.prune(teacher_dir, tmp_path, method="wandaa", data=data)
    with pytest.raises(ConfigError, match="unknown option.*sparsty.*Did you mean 'sparsity'"):
        slimforge.prune(teacher_dir, tmp_path, method="wanda", data=data, sparsty=0.5)
    with pytest.raises(ConfigError, match="unknown quantize method 'int4'.*Valid quantize methods: .*gptq"):
        slimforge.quantize(teacher_dir, tmp_path, method="int4", data=data)
    with pytest.raises(ModelLoadError, match="does not exist"):
        slimforge.prune(tmp_path / "missing", tmp_path / "out", method="magnitude", data=data)
    with pytest.raises(ConfigError, match="stage name"):
        slimforge.prune(teacher_dir, tmp_path, method="magnitude", data=data, name="my stage")


def test_evaluate_bad_input_matches_the_eval_command(teacher_dir, tmp_path, capsys):
    assert cli.main(["eval", "--teacher", str(teacher_dir), "--students", str(teacher_dir), "--batch-size", "0",
                     "--out", str(tmp_path / "cli")]) == 2
    cli_message = capsys.readouterr().err.strip().removeprefix("slimforge: error: ")
    with pytest.raises(ConfigError) as err:
        slimforge.evaluate(teacher_dir, teacher_dir, batch_size=0, out_dir=tmp_path / "api")
    assert str(err.value) == cli_message
    with pytest.raises(ConfigError, match="device='tpu' is invalid"):
        slimforge.evaluate(teacher_dir, teacher_dir, device="tpu")


def test_stage_names_are_both_functions_and_subpackages():
    import slimforge.prune.config as prune_config
    from slimforge import distill as distill_package

    assert callable(slimforge.prune) and slimforge.prune.config is prune_config
    assert slimforge.prune is sys.modules["slimforge.prune"] and callable(distill_package)
    assert list(inspect.signature(slimforge.distill).parameters)[:3] == ["student", "teacher", "out_dir"]


def test_the_version_has_one_source(capsys):
    """``slimforge._version`` is what the package, the CLI and the artifacts say; pyproject.toml's static
    version (read by the build without importing anything) must agree with it."""
    import tomllib

    from slimforge._version import __version__

    assert slimforge.__version__ == __version__
    assert tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"] == __version__
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"slimforge {__version__}"


def test_import_stays_cheap():
    code = ("import sys, slimforge; slimforge.prune, slimforge.distill, slimforge.quantize, slimforge.evaluate; "
            "print(sorted(m for m in ('torch', 'transformers', 'hydra', 'datasets') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=cli_env(), timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_the_documented_example_runs(teacher_dir, corpus_dir, tmp_path, monkeypatch):
    """docs/api.md's example, with the tiny teacher and corpus swapped in for the embedded ones."""
    doc = (REPO / "docs" / "api.md").read_text()
    code = re.search(r"```python\n(.*?)```", doc, re.S).group(1)
    assert 'teacher = "smollm2-135m"' in code and "slimforge.evaluate(" in code
    code = code.replace('teacher = "smollm2-135m"', f"teacher = {str(teacher_dir)!r}")
    code = re.sub(r"^data = .*$", f"data = {{'path': {str(corpus_dir)!r}, 'block_size': 32}}", code, flags=re.M)
    code = code.replace('eval_data = "shakespeare"', f"eval_data = {str(corpus_dir)!r}")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "docs/api.md", "exec"), namespace)
    result = namespace["result"]
    assert set(result.retained) == {"pruned", "healed", "nf4"}
    for folder in (namespace["pruned"], namespace["healed"]):
        AutoModelForCausalLM.from_pretrained(folder)
        assert "## How to load" in (folder / "README.md").read_text()
