"""Data: every source kind becomes packed blocks with an honest, seeded held-out split."""

from __future__ import annotations

import json

import datasets
import numpy as np
import pytest
import torch

from slimforge import data as data_mod
from slimforge.config import DataConfig
from slimforge.data import (
    blocks_tensor,
    build_data,
    calibration_samples,
    chat_ids_and_mask,
    split_documents,
)
from slimforge.errors import DataError


def cfg(**kw) -> DataConfig:
    base = {"block_size": 32, "heldout_fraction": 0.2}
    base.update(kw)
    return DataConfig(**base)


def _stream(ds) -> list[int]:
    return blocks_tensor(ds).reshape(-1).tolist()


def test_text_folder_blocks_and_document_split(corpus_dir, tokenizer, tmp_path):
    bundle = build_data(cfg(path=str(corpus_dir)), tokenizer, cache_dir=tmp_path)
    assert bundle.stats["documents"] == 4 and bundle.stats["split"] == "documents"
    train, held = blocks_tensor(bundle.train), blocks_tensor(bundle.heldout)
    assert train.shape[1] == held.shape[1] == 32
    assert len(train) == bundle.stats["train_blocks"] > len(held) > 0
    # Held-out text comes from documents never seen in training: its first
    # block's tokens do not occur as a run anywhere in the training stream.
    train_stream = _stream(bundle.train)
    probe = held[0, :16].tolist()
    assert not any(train_stream[i:i + 16] == probe for i in range(len(train_stream) - 15))
    assert bundle.train[0]["loss_mask"] == [1] * 32


def test_split_is_deterministic_by_seed(corpus_dir, tokenizer, tmp_path):
    a = build_data(cfg(path=str(corpus_dir), seed=1), tokenizer, cache_dir=tmp_path / "a")
    b = build_data(cfg(path=str(corpus_dir), seed=1), tokenizer, cache_dir=tmp_path / "b")
    assert torch.equal(blocks_tensor(a.heldout), blocks_tensor(b.heldout))
    assert a.fingerprint == b.fingerprint
    held_by_seed = {tuple(_stream(build_data(cfg(path=str(corpus_dir), seed=s), tokenizer,
                                             cache_dir=tmp_path / str(s)).heldout)[:8]) for s in range(6)}
    assert len(held_by_seed) > 1


def test_split_documents_math():
    train, held = split_documents([100] * 20, 0.1, seed=0)
    assert len(held) == 2 and len(train) == 18 and not set(train) & set(held)
    train, held = split_documents([1000, 1], 0.5, seed=0)
    assert len(held) == 1 and len(train) == 1  # always one document on each side


def test_single_document_holds_out_its_tail(corpus_dir, tokenizer, tmp_path):
    bundle = build_data(cfg(path=str(corpus_dir / "hamlet.txt")), tokenizer, cache_dir=tmp_path)
    assert bundle.stats["split"] == "tail"
    full = tokenizer((corpus_dir / "hamlet.txt").read_text().replace(" \n", "\n"))["input_ids"]
    assert _stream(bundle.train) == full[: len(_stream(bundle.train))]


def test_cache_is_reused(corpus_dir, tokenizer, tmp_path, monkeypatch):
    first = build_data(cfg(path=str(corpus_dir)), tokenizer, cache_dir=tmp_path)

    def boom(*a, **k):
        raise AssertionError("re-tokenized despite an unchanged source")

    monkeypatch.setattr(data_mod, "tokenize_documents", boom)
    second = build_data(cfg(path=str(corpus_dir)), tokenizer, cache_dir=tmp_path)
    assert torch.equal(blocks_tensor(first.train), blocks_tensor(second.train))
    with pytest.raises(AssertionError, match="re-tokenized"):
        build_data(cfg(path=str(corpus_dir), block_size=16), tokenizer, cache_dir=tmp_path)


def test_jsonl_parquet_and_saved_dataset_with_field_selection(corpus_dir, tokenizer, tmp_path):
    texts = [p.read_text() for p in sorted(corpus_dir.iterdir())]
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("\n".join(json.dumps({"body": t, "id": i}) for i, t in enumerate(texts)))
    ds = datasets.Dataset.from_dict({"body": texts})
    ds.to_parquet(str(tmp_path / "docs.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    streams = []
    for path in (jsonl, tmp_path / "docs.parquet", tmp_path / "saved"):
        bundle = build_data(cfg(path=str(path), text_field="body"), tokenizer, cache_dir=tmp_path / "c")
        streams.append(_stream(bundle.train) + _stream(bundle.heldout))
    assert streams[0] == streams[1] == streams[2]
    with pytest.raises(DataError, match=r"no field 'text'.*\['body', 'id'\].*data\.text_field"):
        build_data(cfg(path=str(jsonl)), tokenizer, cache_dir=tmp_path / "c")


def test_chat_jsonl_masks_everything_but_assistant_turns(chat_file, tokenizer, tmp_path):
    messages = json.loads(chat_file.read_text().splitlines()[1])["messages"]
    ids, mask = chat_ids_and_mask(tokenizer, messages)
    kept = tokenizer.decode([t for t, m in zip(ids, mask) if m])
    assert kept == "Lear.</s>Goneril, Regan and Cordelia.</s>"
    bundle = build_data(cfg(path=str(chat_file)), tokenizer, cache_dir=tmp_path)
    mask_all = np.asarray(bundle.train.with_format("numpy")["loss_mask"])
    assert 0 < mask_all.mean() < 0.7


def test_bad_sources_fail_with_one_line(tmp_path, tokenizer, corpus_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("")
    with pytest.raises(DataError, match="no text after tokenization"):
        build_data(cfg(path=str(empty)), tokenizer, cache_dir=tmp_path / "c")
    (tmp_path / "nothing").mkdir()
    with pytest.raises(DataError, match="holds no .txt, .md, .jsonl or .parquet files"):
        build_data(cfg(path=str(tmp_path / "nothing")), tokenizer, cache_dir=tmp_path / "c")
    with pytest.raises(DataError, match="does not exist"):
        build_data(cfg(path=str(tmp_path / "missing")), tokenizer, cache_dir=tmp_path / "c")
    with pytest.raises(DataError, match="too few for block_size=100000"):
        build_data(cfg(path=str(corpus_dir), block_size=100000), tokenizer, cache_dir=tmp_path / "c")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{broken\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2 is not valid JSON"):
        build_data(cfg(path=str(bad)), tokenizer, cache_dir=tmp_path / "c")


@pytest.mark.parametrize("content", [("Caf\u00e9 cr\u00e8me " * 50).encode("latin-1"), bytes(range(256)) * 8])
def test_a_text_file_that_is_not_utf8_is_named(tmp_path, tokenizer, corpus_dir, content):
    """A Latin-1 or binary .txt beside good ones: datasets' UnicodeDecodeError becomes one line naming it."""
    import shutil

    folder = tmp_path / "corpus"
    shutil.copytree(corpus_dir, folder)
    (folder / "zz_notes.txt").write_bytes(content)
    offset = 3 if content.startswith(b"Caf") else 128
    with pytest.raises(DataError, match=rf"^{folder / 'zz_notes.txt'} is not UTF-8 text \(byte {offset}: .+\); "
                                        r"data files must be UTF-8: re-encode it"):
        build_data(cfg(path=str(folder)), tokenizer, cache_dir=tmp_path / "c")
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=rf"^{jsonl} is not UTF-8 text \(byte 28: "):
        build_data(cfg(path=str(jsonl)), tokenizer, cache_dir=tmp_path / "c")


def test_first_non_utf8_reads_in_chunks_and_counts_bytes_exactly(tmp_path):
    """A two-byte character split across the 1 MiB read boundary is valid; the bad byte after it is found."""
    path = tmp_path / "big.txt"
    path.write_bytes(b"a" * ((1 << 20) - 1) + "\u00e9".encode() + b"\xff")
    assert data_mod.first_non_utf8([str(path)]) == (str(path), (1 << 20) + 1, "invalid start byte")
    path.write_bytes(b"a" * 10 + "\u00e9".encode()[:1])  # cut inside the last character
    assert data_mod.first_non_utf8([str(path)])[1] == 10
    path.write_bytes("fine \u00e9".encode())
    assert data_mod.first_non_utf8([str(path)]) is None


@pytest.mark.parametrize("odd", [[{"type": "text", "text": "hi"}], 5, {"text": "hi"}])
def test_chat_rows_of_mixed_types_name_the_first_clashing_row(tmp_path, tokenizer, odd):
    """Arrow cannot hold a field that is text in one row and a list, number or object in another."""
    good = {"messages": [{"role": "user", "content": "Who wrote it?"}, {"role": "assistant", "content": "He did."}]}
    bad = {"messages": [{"role": "user", "content": odd}, {"role": "assistant", "content": "Yes."}]}
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in [good] * 7 + [bad] + [good] * 3) + "\n")
    with pytest.raises(DataError, match=rf"^{path}:8: a field here has another type than elsewhere in the data "
                                        r"\(.+\); give each field one type throughout"):
        build_data(cfg(path=str(path)), tokenizer, cache_dir=tmp_path / "c")


def test_calibration_samples_are_seeded_windows_of_the_stream(corpus_dir, tokenizer, tmp_path):
    bundle = build_data(cfg(path=str(corpus_dir)), tokenizer, cache_dir=tmp_path)
    a = calibration_samples(bundle, num_samples=8, seq_len=50, seed=3)
    b = calibration_samples(bundle, num_samples=8, seq_len=50, seed=3)
    c = calibration_samples(bundle, num_samples=8, seq_len=50, seed=4)
    assert a.shape == (8, 50) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    stream = _stream(bundle.train)
    for row in a.tolist():  # each sample is a contiguous window, possibly spanning blocks
        starts = [i for i in range(len(stream) - 49) if stream[i] == row[0]]
        assert any(stream[i:i + 50] == row for i in starts)
    with pytest.raises(DataError, match="calibration needs"):
        calibration_samples(bundle, 1, 10**7)
