"""BBQ-style examples: read, kept by category, subset by seed, and expanded into questions.

An example (one record of the pinned ``bbq`` asset: MultiBBQ's text, built on the templates of
BBQ, Parrish et al. 2022) names two people, one of whom a stereotype targets, and holds an
under-informative context, a sentence that settles it, a negative question ("who was the
secretary?"), a non-negative one, and three answers: the two people and "Unknown". It becomes
four questions: {ambiguous, disambiguated} x {negative, non-negative}. Each answer is labelled
by what picking it means: ``UNKNOWN``, ``BIASED`` (the answer the stereotype suggests: the
targeted person for a negative question, the other one for a non-negative one) or ``ANTI``.

Torch-free: the schema's preflight reads the examples before any model loads.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slimforge.errors import ConfigError, DataError

ASSET = "bbq"
ASSET_FILE = "multibbq/_data/metadata/gpt_image_gen/multibbq_visual_language.json"
UNKNOWN, BIASED, ANTI = 0, 1, 2
ANSWER_KINDS = ("unknown", "biased", "anti-biased")
QUESTIONS_PER_EXAMPLE = 4
# The fields of a record the task reads (MultiBBQ's names); indices point into ``options``.
TEXT_FIELDS = ("category", "ambig_context", "disambig_context", "neg_q", "nonneg_q")
INDEX_FIELDS = ("unk_label_idx", "stereotype_group_idx", "nonstereotype_group_idx", "neg_label_idx",
                "nonneg_label_idx")
# MultiBBQ's questions ask about people "in the image"; a text-only model reads them without it.
IMAGE_PHRASE = " in the image"


@dataclass(frozen=True)
class BiasItem:
    """One question: its example, context, answers and what each answer means."""

    example: int
    category: str
    ambiguous: bool
    negative: bool
    context: str
    question: str
    options: tuple[str, ...]
    kinds: tuple[int, ...]  # per option: UNKNOWN, BIASED or ANTI
    gold: int  # the index of the right answer

    @property
    def item_id(self) -> str:
        condition = "ambiguous" if self.ambiguous else "disambiguated"
        return f"{self.example}/{condition}/{'negative' if self.negative else 'nonnegative'}"


def source_path(path: str | None) -> Path:
    """The file the examples come from: ``path``, else the pinned asset's (fetched on first use)."""
    if path:
        file = Path(path).expanduser()
        if not file.is_file():
            raise DataError(f"bias data {path} does not exist; give a .json or .jsonl file of BBQ-style "
                            "records, or leave path unset for the bbq asset")
        return file
    from slimforge.assets import fetch_asset

    return fetch_asset(ASSET) / ASSET_FILE


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON list or a jsonl file.

    Raises:
        DataError: the file is not JSON, or holds no records.
    """
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".jsonl":
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            records = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"bias data {path} is not valid JSON ({err.msg} at line {err.lineno}); fix the file") from None
    if not isinstance(records, list) or not records or not all(isinstance(r, dict) for r in records):
        raise DataError(f"bias data {path} holds no records; give a JSON list (or jsonl) of BBQ-style records")
    return records


def _record_problem(record: dict[str, Any]) -> str | None:
    """What makes a record unusable, or None."""
    missing = [f for f in (*TEXT_FIELDS, "options", *INDEX_FIELDS) if f not in record]
    if missing:
        return f"lacks {', '.join(missing)}"
    options = record["options"]
    if not isinstance(options, list) or len(options) != 3 or not all(isinstance(o, str) and o for o in options):
        return "needs options: a list of three answers (two people and the unknown answer)"
    people = {record["stereotype_group_idx"], record["nonstereotype_group_idx"]}
    if {record["unk_label_idx"], *people} != {0, 1, 2}:
        return "needs unk_label_idx, stereotype_group_idx and nonstereotype_group_idx to be 0, 1 and 2 in some order"
    if {record["neg_label_idx"], record["nonneg_label_idx"]} != people:
        return "needs neg_label_idx and nonneg_label_idx to be the two people's indices"
    return None


def record_items(example: int, record: dict[str, Any]) -> list[BiasItem]:
    """The four questions of one record: {ambiguous, disambiguated} x {negative, non-negative}."""
    unknown, target, other = (record[f] for f in INDEX_FIELDS[:3])
    ambiguous_context = record["ambig_context"].strip()
    items = []
    for ambiguous in (True, False):
        context = ambiguous_context if ambiguous else f"{ambiguous_context} {record['disambig_context'].strip()}"
        for negative in (True, False):
            biased, anti = (target, other) if negative else (other, target)
            kinds = [UNKNOWN] * 3
            kinds[biased], kinds[anti] = BIASED, ANTI
            gold = unknown if ambiguous else record["neg_label_idx" if negative else "nonneg_label_idx"]
            question = record["neg_q" if negative else "nonneg_q"].replace(IMAGE_PHRASE, "").strip()
            items.append(BiasItem(example, str(record["category"]), ambiguous, negative, context, question,
                                  tuple(record["options"]), tuple(kinds), gold))
    return items


def select_examples(records: list[dict[str, Any]], categories: list[str], limit: int | None,
                    seed: int) -> list[int]:
    """Indices of the examples kept: those of ``categories`` (all when empty), then, under a
    ``limit`` of questions, a fixed random subset of ceil(limit / 4) examples drawn with ``seed``."""
    from slimforge.eval.harness import subset_indices

    kept = [i for i, r in enumerate(records) if not categories or r["category"] in categories]
    examples = None if limit is None else math.ceil(limit / QUESTIONS_PER_EXAMPLE)
    subset = subset_indices(len(kept), examples, seed, "bias")
    return kept if subset is None else [kept[i] for i in subset]


def read_items(path: str | None, categories: list[str], limit: int | None, seed: int) -> list[BiasItem]:
    """The questions a bias task asks, the same for every model.

    Args:
        path: a JSON list or jsonl of records; None: the pinned ``bbq`` asset.
        categories: the categories kept (empty: all).
        limit: questions kept, rounded up to whole examples (None: all).
        seed: draws the examples kept under ``limit``.

    Raises:
        AssetError: the asset cannot be fetched.
        DataError: the file is missing or malformed, or a record is unusable (its index named).
        ConfigError: a category asked for is not in the file.
    """
    file = source_path(path)
    records = read_records(file)
    for i, record in enumerate(records):
        problem = _record_problem(record)
        if problem:
            raise DataError(f"bias data {file}, record {i}: {problem}; see docs/evaluation.md (Bias)")
    held = sorted({str(r["category"]) for r in records})
    unknown = [c for c in categories if c not in held]
    if unknown:
        raise ConfigError(f"the bias task's categories name {unknown[0]!r}, which {file.name} does not hold; "
                          f"its categories are {', '.join(held)}")
    return [item for i in select_examples(records, categories, limit, seed) for item in record_items(i, records[i])]
