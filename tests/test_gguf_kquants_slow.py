"""Q4_K_M with an importance matrix on the real SmolLM2-135M teacher, scored by llama.cpp itself.

A smaller version of ``bench/gguf_quality.py``: the gguf stage writes F16 and Q4_K_M (its
importance matrix from 32 windows of Shakespeare, the recipe's training split), then
``llama-perplexity`` scores both on Wikipedia paragraphs no matrix saw. Marked ``slow``; skips,
saying why, where llama.cpp is not built.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import user_cache

from slimforge import cli
from slimforge.runtimes import install

STUDENT = str(Path(__file__).resolve().parent / "assets" / "recipes" / "student.yaml")
pytestmark = [pytest.mark.slow, pytest.mark.runtime]
N_CTX, CHUNKS = 512, 8


def gguf_stage(root: Path, *overrides: str) -> Path:
    """Run the gguf stage on the teacher with ``overrides``; returns its artifact folder."""
    name = "-".join(o.split("=")[1] for o in overrides[:1])
    with user_cache():
        code = cli.main(["run", STUDENT, f"run_dir={root / name}", "~eval.tasks.perplexity",
                         "+quantize@stages.quant=gguf", "pipeline=[quant]", *overrides])
    assert code == 0, overrides
    return root / name / "stages" / "quant"


def test_q4_k_m_with_an_importance_matrix_stays_within_5_percent_of_f16(tmp_path):
    from slimforge.config import DataConfig
    from slimforge.data import corpus_documents, resolve_source
    from slimforge.runtimes import llamacpp

    if install.find_llamacpp() is None:
        pytest.skip("llama.cpp is not built: slimforge runtime install llama.cpp")
    f16 = gguf_stage(tmp_path, "stages.quant.type=F16")
    q4km = gguf_stage(tmp_path, "stages.quant.type=Q4_K_M", "stages.quant.imatrix_samples=32")
    meta = json.loads((q4km / "slimforge.json").read_text())
    quant = meta["quantization"]
    assert quant["imatrix"] == {"windows": 32, "seq_len": 512, "seconds": quant["imatrix"]["seconds"]}
    # SmolLM2's 576-wide rows do not fit K-quants' 256-value super-blocks: the attention and the
    # FFN gate/up matrices fall back (to Q5_0); only the 1536-wide FFN-down rows take K-quants.
    assert quant["fallback_tensors"] == 30 * 6
    assert quant["tensor_types"]["Q5_0"] + quant["tensor_types"].get("Q8_0", 0) >= 30 * 6
    assert quant["verify"]["max_abs_diff_to_expected"] < 1e-2 and quant["verify"]["tokenizer_roundtrip"]
    with user_cache():
        wiki = DataConfig(asset="wikipedia")
        text = "\n\n".join(corpus_documents(resolve_source(wiki), wiki)["text"][:400])
    (tmp_path / "wikipedia.txt").write_text(text)
    base = llamacpp.perplexity(f16 / "model-F16.gguf", tmp_path / "wikipedia.txt", N_CTX, CHUNKS)
    quantized = llamacpp.perplexity(q4km / "model-Q4_K_M.gguf", tmp_path / "wikipedia.txt", N_CTX, CHUNKS)
    ratio = quantized.ppl / base.ppl
    assert base.chunks == quantized.chunks == CHUNKS
    assert ratio <= 1.05, (base, quantized)
