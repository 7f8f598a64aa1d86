"""Atomic output: a crash never leaves a finished-looking folder, and never damages the old one."""

from __future__ import annotations

import os
import time

import pytest

from slimforge.fsutil import (
    atomic_dir,
    atomic_write_json,
    partial_path,
    read_json,
    stable_hash,
    tree_fingerprint,
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
