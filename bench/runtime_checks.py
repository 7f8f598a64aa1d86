"""The runtime tables of docs/benchmarks.md: SmolLM2-135M's artifacts in llama.cpp and vLLM.

Writes the embedded teacher's artifacts with slimforge's own stages (GGUF at each type; a
depth-pruned student; compressed-tensors RTN W4A16), runs ``slimforge runtime check`` on each,
and prints one markdown table per runtime: format, loads, greedy agreement, perplexity (or
log-prob) ours vs theirs, size. The baseline is transformers on the same weights, in the same run.

    .venv/bin/python bench/runtime_checks.py [--out /tmp/rt] [--types F16 Q8_0 Q4_0 Q4_K_M IQ4_NL]

Needs both runtimes (``slimforge runtime install all``); a few minutes per artifact on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

TEACHER = "smollm2-135m"


def gguf_rows(out: Path, types: list[str]) -> list[dict]:
    import slimforge
    from slimforge.runtimes.gguf_check import check_gguf

    rows = []
    for qtype in types:
        start = time.perf_counter()
        folder = slimforge.quantize(TEACHER, out / f"gguf-{qtype}", method="gguf", type=qtype, verify=False,
                                    data={"asset": "shakespeare"})
        written = time.perf_counter() - start
        result = check_gguf(folder)
        result["write_seconds"] = round(written, 1)
        rows.append(result)
        print(json.dumps({k: v for k, v in result.items() if k != "greedy"}), flush=True)
    return rows


def vllm_rows(out: Path) -> list[dict]:
    import slimforge
    from slimforge.errors import RuntimeCheckError
    from slimforge.models import resolve_model
    from slimforge.runtimes.vllm import check_vllm

    folders = {
        "teacher (fp32 folder)": Path(resolve_model(TEACHER, "teacher").path),
        "depth-pruned, 26 of 30 layers": slimforge.prune(TEACHER, out / "depth", method="depth", num_remove=4,
                                                         remove_ratio=None, data={"asset": "shakespeare"}),
        "RTN W4A16 g64": slimforge.quantize(TEACHER, out / "rtn", method="rtn", bits=4, group_size=64),
    }
    rows = []
    for label, folder in folders.items():
        try:
            result = check_vllm(folder)
        except RuntimeCheckError as err:
            result = {"artifact": str(folder), "refused": str(err), "loads": False}
        result["label"] = label
        rows.append(result)
        print(json.dumps({k: v for k, v in result.items() if k not in ("samples", "greedy")}), flush=True)
    return rows


def size_mb(result: dict) -> str:
    return f"{result['size_bytes'] / 1e6:.0f} MB" if "size_bytes" in result else ""


def print_tables(gguf: list[dict], vllm: list[dict]) -> None:
    print("\n| GGUF | loads | greedy (tokens agreeing, of 16, per prompt) | perplexity ours / theirs (ratio) "
          "| KL / top-1, theirs vs ours | size | verdict |")
    print("|---|---|---|---|---|---|---|")
    for r in gguf:
        ppl = r["perplexity"]
        print(f"| {r['format'].split()[-1]} | yes | {', '.join(map(str, r['greedy']['agreeing_prefix']))} "
              f"| {ppl['ours']:.3f} / {ppl['theirs']:.3f} ({ppl['ratio']:.4f}) "
              f"| {r['kl_mean']:.2g} / {r['top1_agreement']:.3f} | {size_mb(r)} "
              f"| {'agrees' if r['ok'] else 'DISAGREES'} |")
    print("\n| folder | loads in vLLM | greedy (tokens agreeing, of 16, per prompt) | max abs log-prob difference "
          "(tolerance) | verdict |")
    print("|---|---|---|---|---|")
    for r in vllm:
        if "refused" in r:
            print(f"| {r['label']} | refused: {r['refused']} | | | |")
            continue
        lp = r["logprob"]
        print(f"| {r['label']} ({r.get('dtype')}) | {'yes' if r['loads'] else 'no'} "
              f"| {', '.join(map(str, r['greedy']['agreeing_prefix']))} "
              f"| {lp['max_abs_diff']:.2g} ({lp['tolerance']:.2g}) | {'agrees' if r['ok'] else 'DISAGREES'} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="/tmp/slimforge-runtime-bench", type=Path)
    parser.add_argument("--types", nargs="+", default=["F16", "Q8_0", "Q4_0", "Q4_K_M", "IQ4_NL"])
    parser.add_argument("--skip-vllm", action="store_true")
    parser.add_argument("--skip-gguf", action="store_true")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    gguf = [] if args.skip_gguf else gguf_rows(args.out, args.types)
    vllm = [] if args.skip_vllm else vllm_rows(args.out)
    (args.out / "results.json").write_text(json.dumps({"gguf": gguf, "vllm": vllm}, indent=1, default=str))
    print_tables(gguf, vllm)


if __name__ == "__main__":
    main()
