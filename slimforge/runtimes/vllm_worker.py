"""Greedy generation in vLLM, run by vLLM's own Python as a subprocess of :mod:`slimforge.runtimes.vllm`.

This file imports only vLLM and the standard library: slimforge is not installed in vLLM's
environment, so the parent runs it by its path::

    <vLLM's python> vllm_worker.py REQUEST.json RESULT.json

The request lists models: a folder, the dtype to run it in, its context length, its prompts
as token ids (so both runtimes read the very same tokens) and how many tokens to generate. The models load one after another in this one process, which pays vLLM's start-up
(imports, platform detection, ~15 s) once. For each model the result holds, per prompt, the
greedy token ids and the log-probability of each, or the one-line reason it did not load or
run. vLLM logs to stdout and stderr, which the parent keeps for its error messages; the result
goes to its own file.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

# Python puts this script's folder first on sys.path, and that folder holds slimforge's own
# ``vllm.py``, which would shadow the vllm package.
HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]

# Before vLLM (or huggingface_hub) is imported: they read these once. Nothing may reach the
# network, and nothing is written outside the scratch folder the parent hands over.
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    # The engine runs in this process: one process to start and clean up, and a model that
    # fails arrives here as an exception, leaving the engine free for the next model.
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
}
CACHE_ENV = {"VLLM_CACHE_ROOT": "vllm", "HF_HOME": "hf", "TORCHINDUCTOR_CACHE_DIR": "inductor",
             "TRITON_CACHE_DIR": "triton", "XDG_CACHE_HOME": "xdg"}
# Lines of an exception message that say nothing about the cause.
NOISE = ("For further information visit",)


def prepare_environment(scratch: Path, kv_cache_gib: int) -> None:
    """Offline, with every cache vLLM and torch write under ``scratch``."""
    os.environ.update(OFFLINE_ENV)
    os.environ.update({key: str(scratch / sub) for key, sub in CACHE_ENV.items()})
    # vLLM's CPU backend reserves this much memory for its KV cache (its default is 4 GiB);
    # a few short prompts need a sliver of it.
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(kv_cache_gib)


def one_line(err: BaseException) -> str:
    """The exception's most telling line: its last one that is not boilerplate, cut to 400 characters."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip() and not ln.strip().startswith(NOISE)]
    return f"{type(err).__name__}: {lines[-1] if lines else ''}"[:400]


def greedy(llm: Any, prompts: list[list[int]], max_tokens: int) -> list[dict[str, Any]]:
    """Per prompt, the greedy token ids and each one's log-probability."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    # temperature 0 is greedy. ignore_eos: both runtimes generate exactly max_tokens tokens.
    # logprobs=1 returns the chosen token's log-probability among others; vLLM's default
    # logprobs mode takes them from the raw logits, before any sampling processor.
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=1, ignore_eos=True, detokenize=False)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompts], params, use_tqdm=False)
    results = []
    for out in outputs:
        completion = out.outputs[0]
        ids = [int(t) for t in completion.token_ids]
        results.append({"token_ids": ids,
                        "logprobs": [float(step[t].logprob) for t, step in zip(ids, completion.logprobs)]})
    return results


def run_model(model: dict[str, Any]) -> dict[str, Any]:
    """Load one model and decode its prompts; a failure is returned as its one-line reason, not raised."""
    from vllm import LLM

    start = time.perf_counter()
    record: dict[str, Any] = {"folder": model["folder"], "loads": False}
    llm = None
    try:
        # enforce_eager: no torch.compile (minutes on CPU, and nothing it changes is under test).
        # generation_config="vllm": the folder's sampling defaults must not apply.
        llm = LLM(model=model["folder"], dtype=model["dtype"], max_model_len=model["max_model_len"],
                  enforce_eager=True, seed=0, generation_config="vllm", trust_remote_code=False)
        record["loads"] = True
        record["load_seconds"] = round(time.perf_counter() - start, 2)
        start = time.perf_counter()
        record["prompts"] = greedy(llm, model["prompts"], int(model["max_tokens"]))
        record["generate_seconds"] = round(time.perf_counter() - start, 2)
    except Exception as err:  # noqa: BLE001 - whatever stops this model is the answer for it
        traceback.print_exc(file=sys.stderr)
        record["error"] = one_line(err)
        record["failed_at"] = "generate" if record["loads"] else "load"
    finally:
        del llm
        gc.collect()
    return record


def versions() -> dict[str, str]:
    """The versions in vLLM's environment that decide what it reads and computes."""
    import compressed_tensors
    import torch
    import transformers
    import vllm

    return {"vllm": vllm.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "compressed_tensors": compressed_tensors.__version__}


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: vllm_worker.py REQUEST.json RESULT.json", file=sys.stderr)
        return 2
    request = json.loads(Path(argv[1]).read_text(encoding="utf-8"))
    prepare_environment(Path(request["scratch"]), int(request["kv_cache_gib"]))
    start = time.perf_counter()
    info = versions()
    startup = round(time.perf_counter() - start, 2)
    models = [run_model(model) for model in request["models"]]
    result = {"versions": info, "import_seconds": startup, "models": models}
    Path(argv[2]).write_text(json.dumps(result), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
