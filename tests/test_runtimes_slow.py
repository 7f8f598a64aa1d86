"""llama.cpp on the real SmolLM2-135M teacher's GGUF files, as the gguf stage writes them.

Marked ``slow``: the teacher from the user's cache, the check's default held-out text (the
``wikipedia`` corpus asset), llama.cpp's tools from ``slimforge runtime install llama.cpp`` (which
``make test-slow`` runs first). A few minutes on 2 cores.
"""

from __future__ import annotations

import json

import pytest
from conftest import user_cache

from slimforge import cli
from slimforge.runtimes.install import find_llamacpp

pytestmark = pytest.mark.slow

TYPES = ("F16", "Q8_0", "Q4_0")


@pytest.fixture(scope="module")
def gguf_folders(tmp_path_factory):
    import slimforge

    if find_llamacpp() is None:
        pytest.fail("llama.cpp is not built; the slow tier needs it: slimforge runtime install llama.cpp")
    root = tmp_path_factory.mktemp("teacher-gguf")
    with user_cache():
        return {qtype: slimforge.quantize("smollm2-135m", root / qtype, method="gguf", type=qtype, verify=False)
                for qtype in TYPES}


def test_llamacpp_runs_the_teachers_gguf_files_as_transformers_does(gguf_folders, tmp_path, capsys):
    results = {}
    for qtype in TYPES:
        out = tmp_path / f"{qtype}.json"
        with user_cache():
            code = cli.main(["runtime", "check", str(gguf_folders[qtype]), "--json", str(out)])
        assert code == 0, capsys.readouterr()
        results[qtype] = json.loads(out.read_text())[0]
    f16, q8, q4 = (results[t] for t in TYPES)
    assert f16["greedy"]["all_agree"] and f16["top1_agreement"] > 0.99
    # The bars: within 1% for F16 and Q8_0; for 4-bit, well inside the quantization error
    # itself (Q4_0 costs SmolLM2 ~20% perplexity; llama.cpp and transformers differ by <2% on the same weights).
    for result in (f16, q8):
        assert abs(result["perplexity"]["ratio"] - 1) <= 0.01, result["perplexity"]
    quantization_error = q4["perplexity"]["ours"] / f16["perplexity"]["ours"] - 1
    assert abs(q4["perplexity"]["ratio"] - 1) < min(0.02, quantization_error / 5), (q4["perplexity"], quantization_error)
    print(json.dumps({t: {k: r[k] for k in ("format", "size_bytes", "kl_mean", "top1_agreement", "perplexity")}
                      for t, r in results.items()}, indent=1))
