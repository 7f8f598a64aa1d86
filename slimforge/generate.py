"""Teacher-generated text: the teacher answers prompts, and its answers become training data.

Sequence-level KD data (Kim & Rush 2016; the way the Phi models were taught) that needs no
outside corpus. Prompts come from :mod:`slimforge.prompts`; the teacher answers them in
left-padded batches with the KV cache, stopping at EOS.

**Seeded per sample.** Sample ``i`` answers prompt ``i`` of a seeded sequence and draws its
tokens from its own random stream (:mod:`slimforge.sampling`), so a sample does not depend on
the batch it was in (up to float rounding across padding lengths), on ``batch_size``, or on
where an interrupted run resumed.

**Cached like the teacher cache.** An entry in ``<cache>/generated/<key>`` is keyed by the
teacher, the prompts' content and the sampling settings (:func:`generation_key`), not by the
number of samples: it holds samples ``0 .. n - 1`` and a run that asks for more appends only
the new ones. Each batch is one file (``batch-<start>-<stop>.json``, written atomically), so a
kill loses at most the batch in flight and a re-run continues; one process at a time writes an
entry (an ``flock`` beside it), the others wait and then find it written.
``corpus-<n>-min<m>.jsonl`` is the deduplicated corpus of the first ``n`` samples (answers of
fewer than ``m`` tokens dropped); ``meta.json`` records the settings, counts, tokens, time and
tokens/s.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from slimforge.config import GenerateConfig
from slimforge.errors import DataError
from slimforge.fsutil import (
    atomic_write_json,
    atomic_write_text,
    entry_lock,
    read_json,
    sha256_file,
    stable_hash,
)
from slimforge.progress import progress_bar
from slimforge.prompts import Prompt, draw_prompts, is_prompt_file, load_prompts
from slimforge.sampling import generate_batch

log = logging.getLogger(__name__)

# Bump when what a sample holds or how it is drawn changes, so stale entries are not reused.
GENERATION_VERSION = 1
_BATCH_FILE = re.compile(r"batch-(\d+)-(\d+)\.json$")


@dataclass
class GeneratedCorpus:
    """The deduplicated corpus of an entry's first ``num_samples`` samples.

    Attributes:
        folder: the entry.
        records: kept samples in index order (``index``, ``prompt``, ``response``, ``new_tokens``, ``finished``).
        summary: what the data stats and the artifact record (key, counts, tokens, settings).
        generated_now: samples this call generated (0 when everything was cached).
    """

    folder: Path
    records: list[dict[str, Any]]
    summary: dict[str, Any]
    generated_now: int = 0


# --- what an entry depends on ---------------------------------------------------------------


def prompts_fingerprint(source: str) -> str:
    """The prompt source's content: a file's bytes, or a shipped set's prompts."""
    if is_prompt_file(source):
        path = Path(source).expanduser()
        if not path.is_file():
            load_prompts(source)  # the one error for a missing file
        return stable_hash(["file", sha256_file(path)])
    return stable_hash(["set", source, load_prompts(source)])


def uses_chat_template(cfg: GenerateConfig, tokenizer: Any) -> bool:
    """Whether prompts are rendered with the chat template (``chat_template: null``: when there is one)."""
    has = bool(getattr(tokenizer, "chat_template", None))
    if cfg.chat_template and not has:
        raise DataError("data.generate.chat_template=true but the teacher's tokenizer has no chat template; "
                        "set it to false (plain-text prompts) or null")
    return has if cfg.chat_template is None else bool(cfg.chat_template)


def checked_prompts(source: str, chat: bool) -> list[Prompt]:
    """The prompts of ``source``, refused here when they are chat ``messages`` and no template renders them."""
    pool = load_prompts(source)
    if not chat and any(not isinstance(p, str) for p in pool):
        raise DataError(f"{source} holds chat 'messages' prompts, which need the chat template; set "
                        "data.generate.chat_template to true or null, or give plain 'prompt' strings")
    return pool


def generation_key(teacher_fingerprint: str, prompts_fp: str, cfg: GenerateConfig, chat: bool) -> str:
    """What an entry's samples depend on; neither the number of samples nor the batch size is part of it."""
    return stable_hash([GENERATION_VERSION, teacher_fingerprint, prompts_fp, cfg.sampling(), chat])


def entry_folder(key: str) -> Path:
    from slimforge.assets import cache_root

    return cache_root() / "generated" / key


# --- deduplication ----------------------------------------------------------------------------


def normalise(text: str) -> str:
    """Text as duplicates are compared: case-folded, whitespace runs as one space, trimmed."""
    return " ".join(text.casefold().split())


def deduplicate(records: list[dict[str, Any]], min_tokens: int) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Drop near-empty answers (fewer than ``min_tokens`` tokens, or only whitespace) and repeats.

    The first of equal answers (after :func:`normalise`) is kept, in index order.

    Returns:
        (kept records, {"near_empty": n, "duplicates": n}).
    """
    seen: set[str] = set()
    kept, near_empty, duplicates = [], 0, 0
    for record in records:
        key = normalise(record["response"])
        if not key or record["new_tokens"] < min_tokens:
            near_empty += 1
        elif key in seen:
            duplicates += 1
        else:
            seen.add(key)
            kept.append(record)
    return kept, {"near_empty": near_empty, "duplicates": duplicates}


# --- the cache entry ----------------------------------------------------------------------------


def batch_files(folder: Path) -> dict[tuple[int, int], Path]:
    """(start, stop) -> file, for every finished batch of an entry."""
    if not folder.is_dir():
        return {}
    found = {}
    for path in folder.iterdir():
        match = _BATCH_FILE.match(path.name)
        if match:
            found[(int(match.group(1)), int(match.group(2)))] = path
    return found


def missing_batches(done: list[tuple[int, int]], num_samples: int, batch_size: int) -> list[tuple[int, int]]:
    """The [start, stop) runs of samples below ``num_samples`` that no finished batch holds, cut to ``batch_size``."""
    have = np.zeros(num_samples, dtype=bool)
    for start, stop in done:
        have[start: min(stop, num_samples)] = True
    runs = []
    index = 0
    while index < num_samples:
        if have[index]:
            index += 1
            continue
        stop = index
        while stop < num_samples and not have[stop] and stop - index < batch_size:
            stop += 1
        runs.append((index, stop))
        index = stop
    return runs


def _generate_missing(folder: Path, load_teacher: Any, tokenizer: Any, cfg: GenerateConfig, chat: bool,
                      pool: list[Prompt], todo: list[tuple[int, int]]) -> dict[str, Any]:
    """Generate every batch in ``todo``, each written to its own file as soon as it is done."""
    total = sum(stop - start for start, stop in todo)
    log.info("data: generating %d samples from the teacher (prompts %s, up to %d new tokens, batches of %d) into %s",
             total, cfg.prompts, cfg.max_new_tokens, cfg.batch_size, folder)
    model = load_teacher()
    was_training = model.training
    model.eval()
    bar = progress_bar(total=total, desc="teacher generation", unit="sample")
    tokens, seconds = 0, 0.0
    try:
        for start, stop in todo:
            began = time.perf_counter()
            records = generate_batch(model, tokenizer, draw_prompts(pool, start, stop, cfg.seed),
                                     list(range(start, stop)), cfg, chat)
            elapsed = time.perf_counter() - began
            new = sum(r["new_tokens"] for r in records)
            atomic_write_json(folder / f"batch-{start:09d}-{stop:09d}.json",
                              {"start": start, "stop": stop, "seconds": elapsed, "new_tokens": new, "records": records})
            tokens, seconds = tokens + new, seconds + elapsed
            bar.set_postfix_str(f"{tokens / max(seconds, 1e-9):.1f} tok/s", refresh=False)
            bar.update(stop - start)
    finally:
        bar.close()
        model.train(was_training)
    param = next(model.parameters())
    return {"device": str(param.device), "dtype": str(param.dtype).replace("torch.", "")}


def _read_samples(folder: Path, num_samples: int) -> tuple[list[dict[str, Any]], int, float]:
    """Samples ``0 .. num_samples - 1`` from the batch files, with their answer tokens and generation time."""
    records: dict[int, dict[str, Any]] = {}
    tokens, seconds = 0, 0.0
    for (start, _), path in sorted(batch_files(folder).items()):
        if start >= num_samples:
            continue
        batch = read_json(path)
        for record in batch["records"]:
            if record["index"] < num_samples:
                records[record["index"]] = record
        tokens, seconds = tokens + int(batch["new_tokens"]), seconds + float(batch["seconds"])
    if len(records) != num_samples:
        raise DataError(f"the generated data in {folder} lacks samples; delete the folder and run again")
    return [records[i] for i in range(num_samples)], tokens, seconds


def _write_corpus(folder: Path, meta: dict[str, Any], cfg: GenerateConfig) -> dict[str, Any]:
    """Deduplicate the first ``num_samples`` samples into ``corpus-<n>.jsonl``; returns its summary."""
    import json

    records, tokens, seconds = _read_samples(folder, cfg.num_samples)
    kept, dropped = deduplicate(records, cfg.min_response_tokens)
    name = _corpus_name(cfg)
    atomic_write_text(folder / name, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept))
    summary = {"file": name, "samples": cfg.num_samples, "kept": len(kept), **dropped,
               "response_tokens": sum(r["new_tokens"] for r in kept),
               "finished": sum(1 for r in records if r["finished"]),
               "generated_tokens": tokens, "generation_seconds": round(seconds, 3),
               "tokens_per_s": round(tokens / seconds, 1) if seconds else None}
    meta.setdefault("corpora", {})[name] = summary
    atomic_write_json(folder / "meta.json", meta)
    log.info("data: %d teacher-generated samples, %d kept (%d duplicates, %d near-empty dropped), %d answer "
             "tokens; generation ran at %s tokens/s", cfg.num_samples, len(kept), dropped["duplicates"],
             dropped["near_empty"], summary["response_tokens"], summary["tokens_per_s"])
    return summary


def _corpus_name(cfg: GenerateConfig) -> str:
    return f"corpus-{cfg.num_samples}-min{cfg.min_response_tokens}.jsonl"


def _ready(folder: Path, key: str, cfg: GenerateConfig) -> dict[str, Any] | None:
    """The committed summary of this corpus, or None when it is still to be made."""
    if not (folder / "meta.json").is_file():
        return None
    meta = read_json(folder / "meta.json")
    if meta.get("key") != key:
        raise DataError(f"{folder} holds generated data for other inputs; delete it and run again")
    summary = meta.get("corpora", {}).get(_corpus_name(cfg))
    return summary if summary and (folder / summary["file"]).is_file() else None


def ensure_generated(cfg: GenerateConfig, tokenizer: Any, teacher_fingerprint: str, load_teacher: Any,
                     provenance: dict[str, Any] | None = None) -> GeneratedCorpus:
    """The deduplicated corpus of ``cfg.num_samples`` teacher answers: reused, extended or generated.

    Args:
        cfg: the generation settings.
        tokenizer: the teacher's tokenizer.
        teacher_fingerprint: identifies the teacher's weights (part of the key).
        load_teacher: returns the teacher model; called only when samples are missing.
        provenance: extra facts for ``meta.json`` (the teacher's path).

    Raises:
        DataError: the prompts are missing, empty or malformed, or chat prompts meet a tokenizer without a template.
    """
    import json

    chat = uses_chat_template(cfg, tokenizer)
    prompts_fp = prompts_fingerprint(cfg.prompts)
    key = generation_key(teacher_fingerprint, prompts_fp, cfg, chat)
    folder = entry_folder(key)
    generated_now = 0
    summary = _ready(folder, key, cfg)
    if summary is None:
        pool = checked_prompts(cfg.prompts, chat)  # a bad prompt file fails before the teacher loads
        with entry_lock(folder, "the teacher-generated data"):
            summary = _ready(folder, key, cfg)  # another process may have made it while we waited
            if summary is None:
                folder.mkdir(parents=True, exist_ok=True)
                meta = read_json(folder / "meta.json") if (folder / "meta.json").is_file() else {
                    "version": GENERATION_VERSION, "key": key, "teacher": teacher_fingerprint,
                    "prompts": {"source": cfg.prompts, "fingerprint": prompts_fp},
                    "sampling": cfg.sampling(), "chat_template": chat, **(provenance or {})}
                todo = missing_batches(list(batch_files(folder)), cfg.num_samples, cfg.batch_size)
                if todo:
                    meta.update(_generate_missing(folder, load_teacher, tokenizer, cfg, chat, pool, todo))
                    generated_now = sum(stop - start for start, stop in todo)
                summary = _write_corpus(folder, meta, cfg)
    with open(folder / summary["file"], encoding="utf-8") as fh:
        records = [json.loads(line) for line in fh if line.strip()]
    described = {"key": key, "entry": str(folder), "prompts": cfg.prompts, "sampling": cfg.sampling(),
                 "chat_template": chat, **{k: v for k, v in summary.items() if k != "file"}}
    return GeneratedCorpus(folder, records, described, generated_now)
