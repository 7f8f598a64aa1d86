"""Pinned assets: downloaded with pip, hash-checked, unpacked once, clear errors offline."""

from __future__ import annotations

import hashlib
import os
import zipfile

import pytest

from slimforge import assets
from slimforge.assets import Asset, fetch_asset, is_fetched
from slimforge.errors import AssetError


def make_wheel(folder, name="fakeasset", version="1.0.0", payload=b"hello"):
    """A minimal valid wheel holding ``fakeasset/data/member.txt``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}-{version}-py3-none-any.whl"
    dist = f"{name}-{version}.dist-info"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{name}/__init__.py", "")
        zf.writestr(f"{name}/data/member.txt", payload)
        zf.writestr(f"{name}/data/sub/other.txt", b"other")
        zf.writestr(f"{name}/ignored.txt", b"not an asset member")
        zf.writestr(f"{dist}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        zf.writestr(f"{dist}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr(f"{dist}/RECORD", "")
    return path


@pytest.fixture()
def fake_asset(tmp_path, monkeypatch):
    wheel = make_wheel(tmp_path / "index")
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    asset = Asset("fake", "fakeasset", "1.0.0", digest, ("fakeasset/data/",), "data", "test asset",
                  "use data.path=... instead")
    monkeypatch.setitem(assets.ASSETS, "fake", asset)
    monkeypatch.setenv("SLIMFORGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "index"))
    monkeypatch.setenv("SLIMFORGE_OFFLINE", "0")  # the local index above is the only one pip sees
    return asset, wheel


def test_offline_mode_downloads_nothing_and_says_how_to_fetch(fake_asset, monkeypatch):
    asset, wheel = fake_asset
    monkeypatch.setenv("SLIMFORGE_OFFLINE", "1")
    with pytest.raises(AssetError, match=r"SLIMFORGE_OFFLINE is set; run `slimforge fetch fake`"):
        fetch_asset("fake")
    assert not is_fetched(asset)
    # A wheel copied over is still accepted (checked against the pin): no index involved.
    assert (fetch_asset("fake", from_wheel=wheel) / "fakeasset/data/member.txt").is_file()


def test_fetch_downloads_checks_and_unpacks_members(fake_asset, tmp_path, monkeypatch):
    asset, _ = fake_asset
    folder = fetch_asset("fake")
    assert (folder / "fakeasset/data/member.txt").read_bytes() == b"hello"
    assert (folder / "fakeasset/data/sub/other.txt").is_file()
    assert not (folder / "fakeasset/ignored.txt").exists()
    assert is_fetched(asset)
    assert folder.is_relative_to(tmp_path / "cache")
    # Second use comes from the cache: pip is not called again.
    monkeypatch.setattr(assets, "_pip_download", lambda *a: pytest.fail("downloaded twice"))
    assert fetch_asset("fake") == folder


def test_hash_mismatch_is_refused(fake_asset, tmp_path, monkeypatch):
    asset, _ = fake_asset
    monkeypatch.setitem(assets.ASSETS, "fake", Asset(**{**asset.__dict__, "sha256": "0" * 64}))
    with pytest.raises(AssetError, match="sha256 differs from the pinned 0000000000000000"):
        fetch_asset("fake")
    assert not is_fetched(assets.ASSETS["fake"])


def test_from_wheel_checks_the_pin(fake_asset, tmp_path):
    _, wheel = fake_asset
    assert (fetch_asset("fake", from_wheel=wheel) / "fakeasset/data/member.txt").is_file()
    tampered = make_wheel(tmp_path / "other", payload=b"tampered")
    assets_dir = assets.asset_dir(assets.ASSETS["fake"])
    import shutil

    shutil.rmtree(assets_dir)
    with pytest.raises(AssetError, match=r"has sha256 .* pinned to .*refusing"):
        fetch_asset("fake", from_wheel=tampered)


def test_unreachable_index_says_what_to_do(fake_asset, monkeypatch):
    monkeypatch.delenv("PIP_NO_INDEX")
    monkeypatch.delenv("PIP_FIND_LINKS")
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    with pytest.raises(AssetError, match=r"could not download fakeasset==1\.0\.0 .*use data\.path=\.\.\. instead") as info:
        fetch_asset("fake")
    assert "\n" not in str(info.value)


def test_unknown_asset():
    with pytest.raises(AssetError, match=f"known assets: {', '.join(sorted(assets.ASSETS))}$"):
        fetch_asset("nope")


def test_cache_root_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("SLIMFORGE_CACHE", str(tmp_path / "x"))
    assert assets.cache_root() == tmp_path / "x"
    monkeypatch.delenv("SLIMFORGE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert assets.cache_root() == tmp_path / "xdg" / "slimforge"


def test_pins_are_well_formed():
    for asset in assets.ASSETS.values():
        assert len(asset.sha256) == 64 and int(asset.sha256, 16) >= 0
        assert asset.members and asset.kind in ("model", "data")
        assert "=" in asset.offline_hint or "wheel" in asset.offline_hint
