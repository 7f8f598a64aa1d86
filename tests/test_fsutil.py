"""Atomic output: a crash never leaves a finished-looking folder, and never damages the old one."""

from __future__ import annotations

import os
import time

import pytest

from slimforge.errors import OutputError
from slimforge.fsutil import (
    atomic_dir,
    atomic_write_json,
    checksum_problem,
    ensure_writable_dir,
    partial_path,
    path_component_problem,
    read_json,
    read_json_or_none,
    stable_hash,
    tree_fingerprint,
    write_checksums,
)


def test_atomic_dir_publishes_only_on_success(tmp_path):
    dest = tmp_path / "artifact"
    with atomic_dir(dest) as tmp:
        (tmp / "weights").write_text("w")
        assert not dest.exists()
    assert (dest / "weights").read_text() == "w"
    assert not partial_path(dest).exists()


def test_atomic_dir_failure_keeps_previous_and_cleans_up(tmp_path):
    dest = tmp_path / "artifact"
    dest.mkdir()
    (dest / "weights").write_text("old")
    with pytest.raises(RuntimeError), atomic_dir(dest, replace=True) as tmp:
        (tmp / "weights").write_text("half")
        raise RuntimeError("crash mid-write")
    assert (dest / "weights").read_text() == "old"
    assert not partial_path(dest).exists()


def test_atomic_dir_refuses_existing_unless_replace(tmp_path):
    dest = tmp_path / "artifact"
    dest.mkdir()
    with pytest.raises(FileExistsError), atomic_dir(dest):
        pass
    with atomic_dir(dest, replace=True) as tmp:
        (tmp / "new").write_text("n")
    assert sorted(p.name for p in dest.iterdir()) == ["new"]
    assert [p.name for p in tmp_path.iterdir()] == ["artifact"]  # no .old-* or .partial leftovers


def test_atomic_dir_clears_a_stale_partial(tmp_path):
    dest = tmp_path / "artifact"
    stale = partial_path(dest)
    stale.mkdir()
    (stale / "junk").write_text("from a killed run")
    with atomic_dir(dest) as tmp:
        assert not (tmp / "junk").exists()


def test_atomic_json_roundtrip_and_mode(tmp_path):
    path = tmp_path / "x.json"
    atomic_write_json(path, {"b": 1, "a": [1, 2]})
    assert read_json(path) == {"b": 1, "a": [1, 2]}
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask


def test_stable_hash_ignores_key_order():
    assert stable_hash({"a": 1, "b": [1, 2]}) == stable_hash({"b": [1, 2], "a": 1})
    assert stable_hash({"a": 1}) != stable_hash({"a": 2})


def test_tree_fingerprint_tracks_content_changes(tmp_path):
    (tmp_path / "f").write_text("one")
    first = tree_fingerprint(tmp_path)
    assert tree_fingerprint(tmp_path) == first
    time.sleep(0.01)
    (tmp_path / "f").write_text("two!")
    assert tree_fingerprint(tmp_path) != first


def _artifact(folder):
    """A model-like folder: content files, descriptions, a training log and a dotfile."""
    (folder / "tensorboard").mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(bytes(range(256)) * 64)
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "slimforge.json").write_text('{"created": "now"}')
    (folder / "README.md").write_text("card")
    (folder / "tensorboard" / "events").write_text("log")
    (folder / ".lock").write_text("")
    return folder


def test_checksums_cover_content_files_only(tmp_path):
    folder = _artifact(tmp_path / "a")
    digests = write_checksums(folder)
    assert sorted(digests) == ["config.json", "model.safetensors"]
    assert read_json(folder / "checksums.json") == {"algorithm": "sha256", "files": digests}
    # What the evaluation rewrites, provenance and logs may change freely.
    for name in ("README.md", "slimforge.json", "tensorboard/events"):
        (folder / name).write_text("rewritten")
    assert checksum_problem(folder) is None
    # Deterministic: the same content gives the same file, byte for byte.
    twin = _artifact(tmp_path / "b")
    write_checksums(twin)
    assert (twin / "checksums.json").read_bytes() == (folder / "checksums.json").read_bytes()


def test_checksum_problem_sees_changed_bytes_behind_an_old_mtime(tmp_path):
    folder = _artifact(tmp_path / "a")
    write_checksums(folder)
    weights = folder / "model.safetensors"
    stat = weights.stat()
    data = bytearray(weights.read_bytes())
    data[100] ^= 1
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same size, same mtime
    assert checksum_problem(folder) == "model.safetensors differs from the sha256 recorded when it was written"
    weights.unlink()
    assert checksum_problem(folder) == "model.safetensors is missing"
    (folder / "checksums.json").write_text('{"algorithm": "sha2')
    assert checksum_problem(folder) == "checksums.json is missing or unreadable"


def test_read_json_or_none_warns_about_garbled_files(tmp_path, caplog):
    assert read_json_or_none(tmp_path / "missing.json") is None
    assert not caplog.records
    (tmp_path / "cut.json").write_text('{"key": "ab')
    assert read_json_or_none(tmp_path / "cut.json", instead="recomputing") is None
    assert "cut.json is unreadable (JSONDecodeError" in caplog.text and caplog.text.rstrip().endswith("recomputing")
    (tmp_path / "list.json").write_text("[1, 2]")
    assert read_json_or_none(tmp_path / "list.json") is None
    assert "holds a JSON list, not an object" in caplog.text
    (tmp_path / "ok.json").write_text('{"a": 1}')
    assert read_json_or_none(tmp_path / "ok.json") == {"a": 1}


@pytest.mark.parametrize("name", ["../..", "../../etc", "/abs", ".", "..", "", " ", "a/b", "a\\b", "C:", ".hidden",
                                  "~", "a\nb"])
def test_path_component_problem_refuses_names_that_leave_their_folder(name):
    assert path_component_problem(name)


@pytest.mark.parametrize("name", ["exp1", "sweep 2", "2026-11-28_run", "qlora.kd"])
def test_path_component_problem_accepts_plain_names(name):
    assert path_component_problem(name) is None


def test_ensure_writable_dir_names_the_path(tmp_path):
    assert ensure_writable_dir(tmp_path / "new" / "out", "--out folder") == tmp_path / "new" / "out"
    assert [p.name for p in (tmp_path / "new" / "out").iterdir()] == []  # the write check leaves nothing
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match=r"cannot write to .*file/out \(Not a directory\); choose a writable --out"):
        ensure_writable_dir(tmp_path / "file" / "out", "--out folder")


def test_content_fingerprint_rehashes_bytes_rewritten_behind_an_old_mtime(tmp_path):
    """The eval cache's file-hash memo is keyed by ctime too, which ``touch -r`` cannot set back."""
    from slimforge.eval.fingerprint import content_fingerprint

    folder = _artifact(tmp_path / "a")
    first = content_fingerprint(str(folder))
    weights = folder / "model.safetensors"
    stat = weights.stat()
    time.sleep(0.01)
    data = bytearray(weights.read_bytes())
    data[100] ^= 1
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert content_fingerprint(str(folder)) != first
