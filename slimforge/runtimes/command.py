"""``slimforge runtime``: install the runtimes, and check an artifact in them.

    slimforge runtime install llama.cpp|vllm|all   build once into the slimforge cache
    slimforge runtime status                       what is installed, and what it cost
    slimforge runtime check PATH                   run PATH in its runtime, compare with transformers

PATH is a ``.gguf`` file or a folder holding one (llama.cpp), an HF folder (vLLM), or a run
directory (every stage folder in it, each in its runtime; a stage its runtime cannot take is
listed with the reason and skipped). Exit status: 0 every check agrees, 1 one disagrees, 2 bad
input (a runtime that cannot take the artifact, one not installed).
Only argparse is imported here, so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

EPILOG = """\
examples:
  slimforge runtime install llama.cpp        llama.cpp's tools, built from pinned source (~10 min)
  slimforge runtime install vllm             vLLM's CPU build in its own environment (2-20 min)
  slimforge runtime check runs/default/x/stages/nf4_gguf
  slimforge runtime check model-Q4_K_M.gguf --text heldout.txt
  slimforge runtime check runs/default/x --json checks.json     every stage of a run
"""


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """The ``runtime`` subcommand's arguments."""
    p = sub.add_parser("runtime", help="vLLM and llama.cpp: install them, check artifacts in them",
                       description="Check that real runtimes load what slimforge writes and compute what "
                                   "transformers computes.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    rsub = p.add_subparsers(dest="runtime_command", metavar="ACTION", required=True)
    install = rsub.add_parser("install", help="build a runtime into the slimforge cache (once)")
    install.add_argument("name", choices=("llama.cpp", "vllm", "all"))
    rsub.add_parser("status", help="which runtimes are installed, their versions and build cost")
    check = rsub.add_parser("check", help="run an artifact in its runtime and compare with transformers")
    check.add_argument("path", help=".gguf file, model folder, or run directory")
    check.add_argument("--runtime", choices=("auto", "llama.cpp", "vllm"), default="auto",
                       help="default: llama.cpp for GGUF, vLLM for folders")
    check.add_argument("--text", metavar="FILE", help="held-out text for the perplexity comparison "
                                                      "(default: the wikipedia corpus asset)")
    check.add_argument("--ctx", type=int, default=512, help="llama.cpp: perplexity window (default 512)")
    check.add_argument("--chunks", type=int, default=8, help="llama.cpp: windows scored (default 8)")
    check.add_argument("--max-tokens", type=int, default=16, help="greedy tokens per prompt (default 16)")
    check.add_argument("--json", metavar="FILE", help="also write the results here")
    return p


def stage_folders(path: Path) -> list[Path]:
    """The artifacts under a run directory (its stage folders that hold a model), or ``[path]``."""
    stages = path / "stages"
    if path.is_dir() and stages.is_dir() and not (path / "config.json").exists():
        return sorted(p for p in stages.iterdir() if p.is_dir() and
                      ((p / "config.json").is_file() or any(p.glob("*.gguf"))))
    return [path]


def runtime_for(path: Path, requested: str) -> str:
    if requested != "auto":
        return requested
    return "llama.cpp" if path.suffix == ".gguf" or (path.is_dir() and any(path.glob("*.gguf"))) else "vllm"


def check_all(folders: list[Path], ns: argparse.Namespace, text: str | None, many: bool) -> list[dict[str, Any]]:
    """Check each artifact in its runtime; the vLLM ones share one vLLM process.

    With ``many`` (a run directory), an artifact its runtime cannot take is recorded as refused,
    with the reason, and the rest go on; a single artifact's refusal is the command's error.
    """
    from slimforge.errors import RuntimeCheckError

    results: dict[Path, dict[str, Any]] = {}
    plans = []
    for folder in folders:
        runtime = runtime_for(folder, ns.runtime)
        try:
            if runtime == "llama.cpp":
                from slimforge.runtimes.gguf_check import check_gguf

                results[folder] = check_gguf(folder, text=text, n_ctx=ns.ctx, chunks=ns.chunks,
                                             max_tokens=ns.max_tokens)
                print(summary_line(results[folder]), flush=True)
            else:
                from slimforge.runtimes.vllm import plan_check

                plans.append((folder, plan_check(folder, max_tokens=ns.max_tokens)))
        except RuntimeCheckError as err:
            if not many:
                raise
            results[folder] = {"runtime": runtime, "artifact": str(folder), "ok": None, "refused": str(err)}
            print(summary_line(results[folder]), flush=True)
    if plans:
        from slimforge.runtimes.vllm import check_plans

        for (folder, _), result in zip(plans, check_plans([plan for _, plan in plans])):
            results[folder] = result
            print(summary_line(result), flush=True)
    return [results[f] for f in folders]


def summary_line(result: dict[str, Any]) -> str:
    """One line per artifact: verdict, format, greedy agreement, perplexity or log-prob figures, cost."""
    name = Path(result.get("artifact", "")).name
    if "refused" in result:
        return f"cannot  {result.get('runtime')}  {name}  {result['refused']}"
    greedy = result.get("greedy", {})
    agree = greedy.get("agreeing_prefix", [])
    parts = [("agrees" if result.get("ok") else "DISAGREES"), result.get("runtime", "?"), name,
             result.get("format", "")]
    if result.get("error"):
        parts.append(f"error: {result['error']}")
    if agree:
        parts.append(f"greedy {min(agree)}-{max(agree)}/{greedy.get('tokens')} tokens")
    if ppl := result.get("perplexity"):
        parts.append(f"ppl ours {ppl['ours']:.3f} theirs {ppl['theirs']:.3f} "
                     f"(x{ppl['ratio']:.4f}, tolerance {ppl['tolerance']:.0%})")
    if "top1_agreement" in result:
        parts.append(f"top-1 {result['top1_agreement']:.3f} KL {result['kl_mean']:.2g}")
    if lp := result.get("logprob"):
        parts.append(f"max |dlogprob| {lp['max_abs_diff']:.3g} (tolerance {lp['tolerance']:.3g})")
    parts.append(f"{result.get('seconds', 0):.0f} s")
    return "  ".join(str(p) for p in parts if p)


def cmd_runtime(ns: argparse.Namespace) -> int:
    from slimforge.errors import ConfigError
    from slimforge.runtimes.install import RUNTIMES, find_runtime, install_runtime

    if ns.runtime_command == "install":
        for name in RUNTIMES if ns.name == "all" else (ns.name,):
            start = time.perf_counter()
            info = install_runtime(name)
            print(f"{name}: ready at {info.path} ({time.perf_counter() - start:.0f} s now; "
                  f"build record: {json.dumps(info.record)})")
        return 0
    if ns.runtime_command == "status":
        for name in RUNTIMES:
            info = find_runtime(name)
            print(f"{name}: " + (f"{info.path}  {json.dumps(info.record)}" if info else
                                 f"not installed (slimforge runtime install {name})"))
        return 0
    path = Path(ns.path).expanduser()
    if not path.exists():
        raise ConfigError(f"{path} does not exist; give a .gguf file, a model folder or a run directory")
    text = None
    if ns.text:
        text_path = Path(ns.text).expanduser()
        if not text_path.is_file():
            raise ConfigError(f"--text {text_path} is not a file; give a UTF-8 text file of held-out text")
        text = text_path.read_text(encoding="utf-8")
    for flag, value, least in (("--max-tokens", ns.max_tokens, 1), ("--ctx", ns.ctx, 8), ("--chunks", ns.chunks, 1)):
        if value < least:
            raise ConfigError(f"{flag} must be at least {least}, got {value}")
    folders = stage_folders(path)
    if not folders:
        raise ConfigError(f"{path} is a run directory with no finished stage folders to check")
    results = check_all(folders, ns, text, many=folders != [path])
    if ns.json:
        from slimforge.fsutil import atomic_write_json

        atomic_write_json(ns.json, results)
    checked = [r for r in results if "refused" not in r]
    if not checked:
        raise ConfigError(f"no artifact under {path} runs in vLLM or llama.cpp: "
                          + "; ".join(f"{Path(r['artifact']).name}: {r['refused']}" for r in results))
    return 0 if all(r.get("ok") for r in checked) else 1
