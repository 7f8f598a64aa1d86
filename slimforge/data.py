"""Text sources -> tokenized, packed fixed-length blocks with a held-out split.

Sources: local .txt/.md/.jsonl/.parquet files or folders, Hugging Face datasets
(a hub name or a ``save_to_disk`` folder, with field selection), chat jsonl
(``messages``, rendered with the teacher's chat template, with a mask that keeps
only assistant tokens in the loss), pinned corpus assets (Shakespeare) and corpora
derived from them (``wikipedia``, :class:`slimforge.assets.DerivedCorpus`), and text
the teacher writes itself (``format: teacher_generated``, :mod:`slimforge.generate`).

The held-out split is made at the document level, so held-out text is never
seen in training; with a single document the tail of its token stream is held
out instead. Document order is shuffled by ``data.seed``. Packed blocks are
cached under the slimforge cache keyed by the source, the tokenizer and the
settings, and memory-mapped from there on later runs.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slimforge.errors import DataError
from slimforge.fsutil import atomic_dir, atomic_write_json, read_json, stable_hash, tree_fingerprint
from slimforge.textfiles import first_non_utf8, jsonl_rows, not_utf8_error

if TYPE_CHECKING:  # pragma: no cover
    import datasets
    import torch

    from slimforge.config import DataConfig

log = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".md")
JSON_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)
DATASET_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
# Bump when tokenization or packing changes, so stale caches are not reused.
PACKING_VERSION = 1


@dataclass
class DataBundle:
    """Packed blocks ready for training and evaluation.

    Attributes:
        train: a ``datasets.Dataset`` with ``input_ids`` and ``loss_mask`` (each of length ``block_size``).
        heldout: the same, from held-out documents.
        block_size: tokens per block.
        fingerprint: identifies source, tokenizer and settings.
        stats: document and token counts.
        source_fingerprint: identifies the source alone (the text, whatever the settings).
    """

    train: datasets.Dataset
    heldout: datasets.Dataset
    block_size: int
    fingerprint: str
    stats: dict[str, Any] = field(default_factory=dict)
    source_fingerprint: str = ""


@dataclass
class TeacherHandle:
    """The teacher as building data needs it: its fingerprint always, its weights only to generate text.

    Attributes:
        fingerprint: identifies the teacher's weights (part of generated data's key).
        load: returns the teacher model; called only when generated data is not cached yet.
        path: where the teacher lives, recorded with generated data.
    """

    fingerprint: str
    load: Callable[[], Any]
    path: str = ""


# --- finding the documents ---------------------------------------------------------------


@dataclass
class Source:
    """A resolved data source: what kind it is and where it lives."""

    format: str  # text | jsonl | chat | parquet | hf | hub | generated | corpus
    location: str
    files: list[str] = field(default_factory=list)
    fingerprint: str = ""


def _files_with(folder: Path, suffixes: tuple[str, ...]) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)


def _format_of_files(files: list[Path]) -> str:
    kinds = set()
    for path in files:
        suffix = path.suffix.lower()
        kinds.add("text" if suffix in TEXT_SUFFIXES else "jsonl" if suffix in JSON_SUFFIXES else "parquet")
    if len(kinds) > 1:
        raise DataError(f"the data folder mixes {sorted(kinds)} files; keep one kind per folder or set data.format")
    return kinds.pop()


def resolve_source(cfg: DataConfig) -> Source:
    """Decide what ``data.path`` / ``data.asset`` points at, without reading it yet."""
    if not cfg.path:
        from slimforge.assets import (
            ASSETS,
            CORPORA,
            asset_record,
            corpus_fingerprint,
            data_asset_names,
            fetch_asset,
            fetch_corpus,
            unknown_data_asset,
        )

        if cfg.asset in CORPORA:
            return Source("corpus", str(fetch_corpus(cfg.asset)), [], corpus_fingerprint(cfg.asset))
        if cfg.asset not in ASSETS:
            raise unknown_data_asset(cfg.asset)
        if ASSETS[cfg.asset].kind != "data":
            raise DataError(f"asset {cfg.asset!r} is not a data asset; data assets: {', '.join(data_asset_names())}")
        root = fetch_asset(cfg.asset)
        files = _files_with(root, TEXT_SUFFIXES)
        return Source("text", str(root), [str(p) for p in files], stable_hash(asset_record(cfg.asset)))
    path = Path(cfg.path).expanduser()
    if path.is_dir():
        if any((path / marker).is_file() for marker in DATASET_MARKERS):
            return Source("hf", str(path), [], tree_fingerprint(path))
        files = _files_with(path, TEXT_SUFFIXES + JSON_SUFFIXES + PARQUET_SUFFIXES)
        if not files:
            raise DataError(
                f"data folder {path} holds no .txt, .md, .jsonl or .parquet files; add some or fix data.path"
            )
        fmt = _format_of_files(files)
        return Source(fmt, str(path), [str(p) for p in files], tree_fingerprint(path))
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix not in TEXT_SUFFIXES + JSON_SUFFIXES + PARQUET_SUFFIXES:
            raise DataError(f"data file {path} is not .txt, .md, .jsonl, .json or .parquet; convert it or fix data.path")
        return Source(_format_of_files([path]), str(path), [str(path)], tree_fingerprint(path))
    if cfg.path.startswith(("/", ".", "~")) or cfg.path.count("/") > 1:
        raise DataError(f"data path {cfg.path} does not exist; fix data.path")
    return Source("hub", cfg.path, [], stable_hash([cfg.path, cfg.hf_config, cfg.split, cfg.revision]))


def _load_text_files(files: list[str]) -> datasets.Dataset:
    """Plain-text files as one document each.

    Raises:
        DataError: a file is not UTF-8 text (a binary or Latin-1 file), naming it.
    """
    import datasets
    from datasets.exceptions import DatasetGenerationError

    try:
        return datasets.load_dataset("text", data_files=files, sample_by="document", split="train")
    except DatasetGenerationError as err:
        if not isinstance(err.__cause__, UnicodeDecodeError):
            raise
        found = first_non_utf8(files)
        if found is None:  # the file changed under us: still say what the library saw
            raise DataError(f"a data file is not UTF-8 text ({err.__cause__.reason}); data files must be UTF-8: "
                            f"re-encode the files under {Path(files[0]).parent}") from None
        raise not_utf8_error(*found) from None


def _rows_to_dataset(files: list[str]) -> datasets.Dataset:
    """jsonl rows as a Dataset.

    Raises:
        DataError: rows give a field values of different types (text in one, a list or a
            number in another), which Arrow cannot hold in one column; names the first such row.
    """
    import datasets
    import pyarrow as pa

    rows = [row for _, _, row in jsonl_rows(files)]
    try:
        return datasets.Dataset.from_list(rows)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
        index = _first_clashing_row(rows)
        name, lineno, _ = next(r for i, r in enumerate(jsonl_rows(files)) if i == index)
        where = f"{name}:{lineno}" if lineno else f"{name} (item {index})"
        raise DataError(f"{where}: a field here has another type than elsewhere in the data "
                        f"({str(err).splitlines()[0]}); give each field one type throughout, e.g. every "
                        "message's content a string") from None


def _first_clashing_row(rows: list[Any]) -> int:
    """The index of the first row that Arrow cannot put in one table with the rows before it."""
    import datasets
    import pyarrow as pa

    good, bad = 0, len(rows)  # rows[:good] convert, rows[:bad] do not
    while bad - good > 1:
        middle = (good + bad) // 2
        try:
            datasets.Dataset.from_list(rows[:middle])
            good = middle
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            bad = middle
    return bad - 1


def corpus_documents(source: Source, cfg: DataConfig) -> datasets.Dataset:
    """A derived corpus's documents (``data.asset`` names one): its text field, each distinct text once.

    Repeats are dropped at their later rows, so the documents keep the dataset's order.

    Raises:
        DataError: ``data.format`` asks for conversations; a corpus is plain text.
    """
    import datasets

    from slimforge.assets import get_corpus

    if cfg.format not in ("auto", "text"):
        raise DataError(f"asset {cfg.asset} is plain text; set data.format to auto or text")
    corpus = get_corpus(str(cfg.asset))
    texts = list(datasets.load_from_disk(source.location)[corpus.text_field])
    if corpus.dedup:
        texts = list(dict.fromkeys(texts))
    if cfg.max_documents is not None:
        texts = texts[: cfg.max_documents]
    return datasets.Dataset.from_dict({"text": texts})


def load_documents(source: Source, cfg: DataConfig) -> datasets.Dataset:
    """The source's documents as a Dataset with a ``text`` or ``messages`` column."""
    import datasets

    fmt = cfg.format
    if source.format == "corpus":
        return corpus_documents(source, cfg)
    if source.format == "text":
        ds = _load_text_files(source.files)
    elif source.format == "jsonl":
        ds = _rows_to_dataset(source.files)
    elif source.format == "parquet":
        ds = datasets.load_dataset("parquet", data_files=source.files, split="train")
    elif source.format == "hf":
        ds = datasets.load_from_disk(source.location)
        if isinstance(ds, datasets.DatasetDict):
            if cfg.split not in ds:
                raise DataError(f"dataset {source.location} has no split {cfg.split!r}; choose one of {list(ds)} with data.split")
            ds = ds[cfg.split]
    else:
        try:
            ds = datasets.load_dataset(source.location, cfg.hf_config, split=cfg.split, revision=cfg.revision)
        except Exception as err:  # datasets raises many types for a missing or unreachable dataset
            raise DataError(
                f"could not load dataset {source.location!r} from the hub ({type(err).__name__}: "
                f"{str(err).splitlines()[0] if str(err) else ''}); if offline, give a local file or folder"
            ) from None
    if fmt == "auto":
        chat = cfg.messages_field in ds.column_names and cfg.text_field not in ds.column_names
        fmt = "chat" if chat else "text"
    wanted = cfg.messages_field if fmt == "chat" else cfg.text_field
    if wanted not in ds.column_names:
        raise DataError(
            f"the data has no field {wanted!r}; its fields are {ds.column_names}: "
            f"set data.{'messages_field' if fmt == 'chat' else 'text_field'}"
        )
    ds = ds.select_columns([wanted])
    if wanted != ("messages" if fmt == "chat" else "text"):
        ds = ds.rename_column(wanted, "messages" if fmt == "chat" else "text")
    if cfg.max_documents is not None:
        ds = ds.select(range(min(cfg.max_documents, len(ds))))
    return ds


# --- tokenizing --------------------------------------------------------------------------

_TRAILING_SPACE = re.compile(r"[ \t]+\n")


def chat_ids_and_mask(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """Render a conversation with the chat template; mask 1 marks assistant tokens.

    Each assistant turn's span is found by rendering the conversation up to the
    turn (with the generation prompt) and through it, and comparing lengths.
    """
    if not messages or not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
        raise DataError("each chat example needs a non-empty 'messages' list of {role, content} objects")

    def ids(msgs: list[dict[str, str]], gen_prompt: bool = False) -> list[int]:
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen_prompt)
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    full = ids(messages)
    mask = [0] * len(full)
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        start = len(ids(messages[:i], gen_prompt=True)) if i else 0
        end = len(ids(messages[: i + 1]))
        for j in range(start, min(end, len(full))):
            mask[j] = 1
    return full, mask


def tokenize_documents(docs: datasets.Dataset, tokenizer: Any, cfg: DataConfig) -> datasets.Dataset:
    """Add ``input_ids`` and ``loss_mask`` per document, with an EOS separator.

    Documents are ``text`` (all in the loss), ``messages`` (assistant turns in the loss) or
    ``prompt`` + ``completion`` (the completion in the loss).
    """
    chat = "messages" in docs.column_names
    if chat and not getattr(tokenizer, "chat_template", None):
        raise DataError("chat data needs a tokenizer with a chat template, and the teacher's has none")
    eos = tokenizer.eos_token_id if cfg.add_eos else None

    def encode(batch: dict[str, list[Any]]) -> dict[str, list[list[int]]]:
        out_ids, out_mask = [], []
        if chat:
            for messages in batch["messages"]:
                ids, mask = chat_ids_and_mask(tokenizer, messages)
                out_ids.append(ids + ([eos] if eos is not None else []))
                out_mask.append(mask + ([0] if eos is not None else []))
        elif "completion" in batch:  # prompt + answer, only the answer in the loss
            for prompt, completion in zip(batch["prompt"], batch["completion"]):
                head = tokenizer(prompt, add_special_tokens=True)["input_ids"]
                tail = tokenizer(completion, add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
                out_ids.append(list(head) + list(tail))
                out_mask.append([0] * len(head) + [1] * len(tail))
        else:
            texts = [_TRAILING_SPACE.sub("\n", t or "") for t in batch["text"]]
            for text, ids in zip(texts, tokenizer(texts, add_special_tokens=True)["input_ids"]):
                # A blank document is no document: no tokens, not even a separator.
                ids = list(ids) + [eos] if text.strip() and eos is not None else list(ids) if text.strip() else []
                out_ids.append(ids)
                out_mask.append([1] * len(ids))
        return {"input_ids": out_ids, "loss_mask": out_mask}

    return docs.map(encode, batched=True, batch_size=64, remove_columns=docs.column_names,
                    desc="tokenizing", load_from_cache_file=False)


# --- splitting and packing ---------------------------------------------------------------


def split_documents(lengths: list[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Pick held-out documents covering about ``fraction`` of the tokens.

    Documents are visited in a seeded random order; held-out ones are taken
    until their tokens reach the fraction, keeping at least one on each side.

    Returns:
        (train document indices, held-out document indices), each in shuffled order.
    """
    import numpy as np

    order = np.random.default_rng(seed).permutation(len(lengths)).tolist()
    target = fraction * sum(lengths)
    heldout, covered = [], 0
    for idx in order[:-1]:
        if covered >= target:
            break
        heldout.append(idx)
        covered += lengths[idx]
    taken = set(heldout)
    return [i for i in order if i not in taken], heldout


def pack_blocks(ids: Any, masks: Any, block_size: int) -> dict[str, Any]:
    """Cut a concatenated token stream into full blocks (the remainder is dropped).

    Args:
        ids: 1-D array of token ids, documents already concatenated with separators.
        masks: 1-D array of loss-mask values, aligned with ``ids``.
        block_size: tokens per block.
    """
    import numpy as np

    n_blocks = len(ids) // block_size
    usable = n_blocks * block_size
    return {
        "input_ids": np.asarray(ids[:usable], dtype=np.int32).reshape(n_blocks, block_size),
        "loss_mask": np.asarray(masks[:usable], dtype=np.int8).reshape(n_blocks, block_size),
    }


def _to_dataset(blocks: dict[str, Any]) -> datasets.Dataset:
    import datasets

    features = datasets.Features({
        "input_ids": datasets.Sequence(datasets.Value("int32")),
        "loss_mask": datasets.Sequence(datasets.Value("int8")),
    })
    return datasets.Dataset.from_dict(
        {"input_ids": list(blocks["input_ids"]), "loss_mask": list(blocks["loss_mask"])}, features=features
    )


def _flat_column(ds: datasets.Dataset, column: str) -> tuple[Any, Any]:
    """A list column as (flat values, offsets), straight from Arrow without Python lists."""
    col = ds.data.column(column).combine_chunks()
    return col.values.to_numpy(zero_copy_only=False), col.offsets.to_numpy()


def _split_and_pack(tokenized: datasets.Dataset, cfg: DataConfig) -> tuple[dict, dict, dict[str, Any]]:
    import numpy as np

    ids, offsets = _flat_column(tokenized, "input_ids")
    masks, _ = _flat_column(tokenized, "loss_mask")
    lengths = np.diff(offsets)
    docs = [i for i in range(len(lengths)) if lengths[i] > 0]
    total = int(lengths.sum())
    if total == 0:
        raise DataError("the data holds no text after tokenization; check data.path and data.text_field")

    def gather(doc_idx: list[int], array: Any) -> Any:
        return np.concatenate([array[offsets[i]: offsets[i + 1]] for i in doc_idx])

    if len(docs) >= 2:
        train_pos, held_pos = split_documents([int(lengths[i]) for i in docs], cfg.heldout_fraction, cfg.seed)
        train_docs, held_docs = [docs[i] for i in train_pos], [docs[i] for i in held_pos]
        train = pack_blocks(gather(train_docs, ids), gather(train_docs, masks), cfg.block_size)
        held = pack_blocks(gather(held_docs, ids), gather(held_docs, masks), cfg.block_size)
        split = "documents"
    else:
        stream, stream_mask = gather(docs, ids), gather(docs, masks)
        cut = int(round(len(stream) * (1 - cfg.heldout_fraction)))
        train = pack_blocks(stream[:cut], stream_mask[:cut], cfg.block_size)
        held = pack_blocks(stream[cut:], stream_mask[cut:], cfg.block_size)
        split = "tail"
    if len(train["input_ids"]) == 0 or len(held["input_ids"]) == 0:
        raise DataError(
            f"the data holds {total} tokens, too few for block_size={cfg.block_size} with a held-out "
            f"split of {cfg.heldout_fraction}; add text, lower data.block_size or raise data.heldout_fraction"
        )
    stats = {"documents": len(docs), "tokens": total, "split": split,
             "train_blocks": len(train["input_ids"]), "heldout_blocks": len(held["input_ids"])}
    return train, held, stats


# --- the entry points ---------------------------------------------------------------------


def data_fingerprint(cfg: DataConfig, source: Source, tokenizer: Any) -> str:
    from slimforge.models import tokenizer_fingerprint

    settings = {k: getattr(cfg, k) for k in ("format", "text_field", "messages_field", "hf_config", "split",
                                             "revision", "block_size", "heldout_fraction", "max_documents",
                                             "add_eos", "seed")}
    template = getattr(tokenizer, "chat_template", None)
    parts = [PACKING_VERSION, source.format, source.fingerprint, settings, tokenizer_fingerprint(tokenizer), template]
    if source.format == "generated":  # what turns an entry's samples into documents (the key has the rest)
        gen = cfg.generate
        parts.append({"num_samples": gen.num_samples, "min_response_tokens": gen.min_response_tokens,
                      "include_prompt": gen.include_prompt})
    return stable_hash(parts)


@contextlib.contextmanager
def _quiet_datasets():
    """Hide datasets' per-file bars for loading and saving; tokenizing keeps its own."""
    import datasets

    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def generated_source(cfg: DataConfig, tokenizer: Any, teacher: TeacherHandle | None) -> Source:
    """The teacher-generated corpus as a source: its entry and key, known before any text is generated."""
    if teacher is None:
        raise DataError("data.format=teacher_generated needs the teacher to write the text; build this data "
                        "through a run or a Session")
    from slimforge.generate import (
        entry_folder,
        generation_key,
        prompts_fingerprint,
        uses_chat_template,
    )

    gen = cfg.generate
    key = generation_key(teacher.fingerprint, prompts_fingerprint(gen.prompts), gen, uses_chat_template(gen, tokenizer))
    return Source("generated", str(entry_folder(key)), [], key)


def generated_documents(cfg: DataConfig, tokenizer: Any, teacher: TeacherHandle) -> tuple[datasets.Dataset, dict]:
    """The teacher's kept answers as documents (generated first where needed), and the generation's summary.

    Raises:
        DataError: every answer was dropped as a duplicate or near-empty.
    """
    import datasets

    from slimforge.generate import ensure_generated

    gen = cfg.generate
    corpus = ensure_generated(gen, tokenizer, teacher.fingerprint, teacher.load, {"teacher_path": teacher.path})
    if not corpus.records:
        s = corpus.summary
        raise DataError(f"all {s['samples']} teacher answers were dropped ({s['duplicates']} duplicates, "
                        f"{s['near_empty']} shorter than data.generate.min_response_tokens={gen.min_response_tokens}); "
                        "raise data.generate.num_samples or max_new_tokens, or sample (do_sample=true)")
    chat = corpus.summary["chat_template"]
    rows = []
    for record in corpus.records:
        prompt, response = record["prompt"], record["response"]
        if not gen.include_prompt:
            rows.append({"text": response})
        elif chat:
            turns = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
            rows.append({"messages": [*turns, {"role": "assistant", "content": response}]})
        else:
            rows.append({"prompt": prompt, "completion": response})
    docs = datasets.Dataset.from_list(rows)
    if cfg.max_documents is not None:
        docs = docs.select(range(min(cfg.max_documents, len(docs))))
    return docs, corpus.summary


def data_source(cfg: DataConfig, tokenizer: Any, teacher: TeacherHandle | None = None) -> Source:
    """Where ``cfg``'s text comes from, and the source's fingerprint, without reading or generating it."""
    if cfg.format == "teacher_generated":
        return generated_source(cfg, tokenizer, teacher)
    return resolve_source(cfg)


def build_data(cfg: DataConfig, tokenizer: Any, cache_dir: str | Path | None = None,
               teacher: TeacherHandle | None = None) -> DataBundle:
    """Tokenize and pack a data source, or reuse the cached result.

    ``teacher`` is needed by ``format: teacher_generated`` only; its weights load only when
    the generated text is not cached yet.

    Raises:
        DataError: the source is missing, empty, malformed or too small.
    """
    import datasets

    from slimforge.assets import cache_root

    generated = cfg.format == "teacher_generated"
    source = data_source(cfg, tokenizer, teacher)
    fingerprint = data_fingerprint(cfg, source, tokenizer)
    folder = Path(cache_dir or cache_root() / "data") / fingerprint
    if not (folder / "stats.json").is_file():
        generation = None
        if generated:
            docs, generation = generated_documents(cfg, tokenizer, teacher)
        else:
            with _quiet_datasets():
                docs = load_documents(source, cfg)
        if len(docs) == 0:
            raise DataError(f"the data source {cfg.path or cfg.asset} holds no documents; add data or fix data.path")
        train, held, stats = _split_and_pack(tokenize_documents(docs, tokenizer, cfg), cfg)
        stats["source"] = f"teacher_generated:{source.fingerprint}" if generated else cfg.path or f"asset:{cfg.asset}"
        if generation is not None:
            stats["generation"] = generation
        folder.parent.mkdir(parents=True, exist_ok=True)
        with _quiet_datasets(), atomic_dir(folder, replace=True) as tmp:
            _to_dataset(train).save_to_disk(str(tmp / "train"))
            _to_dataset(held).save_to_disk(str(tmp / "heldout"))
            atomic_write_json(tmp / "stats.json", stats)
        log.info("data: %s", stats)
    with _quiet_datasets():
        train = datasets.load_from_disk(str(folder / "train"))
        held = datasets.load_from_disk(str(folder / "heldout"))
    return DataBundle(train, held, cfg.block_size, fingerprint, read_json(folder / "stats.json"), source.fingerprint)


def blocks_tensor(ds: datasets.Dataset, limit: int | None = None, column: str = "input_ids") -> torch.Tensor:
    """The first ``limit`` blocks of a packed split as an int64 tensor [n, block_size]."""
    import numpy as np
    import torch

    n = len(ds) if limit is None else min(limit, len(ds))
    rows = ds.select(range(n)).with_format("numpy")[column]
    return torch.from_numpy(np.asarray(rows, dtype=np.int64))


def calibration_samples(bundle: DataBundle, num_samples: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """``num_samples`` random windows of ``seq_len`` tokens from the training stream.

    Windows start anywhere in the concatenated training blocks (the GPTQ and
    Wanda convention), chosen by ``seed``; only the blocks a window touches are read.

    Returns:
        int64 tensor [num_samples, seq_len].
    """
    import numpy as np
    import torch

    size = bundle.block_size
    total = len(bundle.train) * size
    if seq_len > total:
        raise DataError(f"calibration needs {seq_len} tokens per sample but the training split has {total}")
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, total - seq_len + 1, size=num_samples)
    out = torch.empty(num_samples, seq_len, dtype=torch.long)
    for row, start in enumerate(starts.tolist()):
        first, last = start // size, (start + seq_len - 1) // size
        window = blocks_tensor(bundle.train.select(range(first, last + 1)), None).reshape(-1)
        offset = start - first * size
        out[row] = window[offset: offset + seq_len]
    return out
