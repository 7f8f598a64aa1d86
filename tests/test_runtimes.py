"""llama.cpp as a runtime for slimforge's GGUF files: the tool wrappers, the check, the command.

The tests marked ``runtime`` run llama.cpp's tools on tiny models; they skip, saying why, where the
tools are not built (``make test-slow`` builds them and runs these).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import build_model, corpus_text

from slimforge.errors import RuntimeCheckError, RuntimeMissingError
from slimforge.runtimes import install, llamacpp
from slimforge.runtimes.command import runtime_for, stage_folders


def needs_llamacpp():
    if install.find_llamacpp() is None:
        pytest.skip("llama.cpp is not built: slimforge runtime install llama.cpp")


# --- finding and building -------------------------------------------------------------------


def test_a_build_is_found_only_with_its_marker(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMFORGE_CACHE", str(tmp_path))
    monkeypatch.delenv("SLIMFORGE_LLAMACPP_BIN", raising=False)
    (install.llamacpp_dir() / "bin").mkdir(parents=True)
    assert install.find_llamacpp() is None  # an interrupted build
    with pytest.raises(RuntimeMissingError, match="slimforge runtime install llama.cpp"):
        install.require_llamacpp()
    (install.llamacpp_dir() / install.MARKER).write_text(json.dumps({"build_seconds": 1.0}))
    assert install.require_llamacpp() == install.llamacpp_dir() / "bin"


def test_an_interrupted_build_is_removed_before_the_next(tmp_path):
    folder = tmp_path / "llama.cpp-x"
    (folder / "bin").mkdir(parents=True)
    (folder / "bin" / "half-written").write_text("x")
    install._fresh(folder)
    assert folder.is_dir() and not any(folder.iterdir())


def test_a_user_build_must_hold_every_tool(tmp_path, monkeypatch):
    for tool in install.LLAMACPP_TOOLS[:-1]:
        (tmp_path / tool).write_text("")
    monkeypatch.setenv("SLIMFORGE_LLAMACPP_BIN", str(tmp_path))
    with pytest.raises(RuntimeMissingError, match=install.LLAMACPP_TOOLS[-1]):
        install.find_llamacpp()
    (tmp_path / install.LLAMACPP_TOOLS[-1]).write_text("")
    assert install.require_llamacpp() == tmp_path


# --- llama-perplexity's saved log-probs -------------------------------------------------------


def encode_like_llamacpp(logits: np.ndarray) -> np.ndarray:
    """One position as llama-perplexity stores it (tools/perplexity/perplexity.cpp, log_softmax)."""
    top, low = logits.max(), max(logits.min(), logits.max() - 16)
    log_sum = math.log(np.exp(logits - top).sum())
    scale = np.float32((top - low) / 65535)
    head = np.array([scale, low - top - log_sum], dtype=np.float32).view(np.uint16)
    q = np.where(logits > low, np.rint((logits - low) / scale), 0).astype(np.uint16)
    pad = np.zeros(2 * ((len(logits) + 1) // 2) - len(logits), dtype=np.uint16)
    return np.concatenate([head, q, pad])


def test_saved_log_probs_decode_to_the_log_softmax(tmp_path):
    rng = np.random.default_rng(0)
    n_ctx, vocab, chunks = 8, 11, 2
    positions = n_ctx - 1 - n_ctx // 2
    logits = rng.normal(0, 4, size=(chunks, positions, vocab)).astype(np.float32)
    logits[0, 0, 3] = -40  # far below the top: clipped to 16 nats under it
    tokens = rng.integers(0, vocab, size=(chunks, n_ctx)).astype(np.int32)
    body = np.stack([encode_like_llamacpp(row) for row in logits.reshape(-1, vocab)])
    path = tmp_path / "logits.bin"
    path.write_bytes(b"_logits_" + np.array([n_ctx, vocab, chunks], np.int32).tobytes() + tokens.tobytes()
                     + body.tobytes())
    decoded = llamacpp.read_logits_file(path)
    assert decoded.tokens.tolist() == tokens.tolist() and decoded.n_ctx == n_ctx
    expected = torch.from_numpy(logits).log_softmax(-1)
    clipped = expected < expected.amax(-1, keepdim=True) - 16
    step = 16 / 65535
    assert torch.allclose(decoded.logprobs[~clipped], expected[~clipped], atol=step)
    assert (decoded.logprobs[clipped] <= expected.amax(-1, keepdim=True).expand_as(expected)[clipped] - 16 + step).all()


def test_a_file_of_something_else_is_refused(tmp_path):
    (tmp_path / "x.bin").write_bytes(b"not logits at all")
    with pytest.raises(RuntimeCheckError, match="not a llama-perplexity logits file"):
        llamacpp.read_logits_file(tmp_path / "x.bin")
    with pytest.raises(RuntimeCheckError, match="not a llama-perplexity logits file"):
        llamacpp.read_logits_file(tmp_path / "never-written.bin")
    (tmp_path / "short.bin").write_bytes(b"_logits_" + np.array([8, 11, 2], np.int32).tobytes() + bytes(10))
    with pytest.raises(RuntimeCheckError, match="truncated"):
        llamacpp.read_logits_file(tmp_path / "short.bin")


def test_half_window_protocol_scores_the_second_half_of_each_window():
    """Reference: a model whose logits put all mass on one known token, so each term is 0 or large."""
    vocab, n_ctx = 5, 6
    tokens = [1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1, 2, 3]  # two windows of 6, one token left over
    seen = []

    def logits_fn(ids):
        seen.append(ids[0].tolist())
        out = torch.full((1, ids.shape[1], vocab), -30.0)
        out[0, torch.arange(ids.shape[1]), (ids[0] + 1) % vocab] = 30.0  # predicts "next in the cycle"
        return out

    nll, count = llamacpp.half_window_nll(logits_fn, tokens, n_ctx, bos_id=None)
    assert count == 2 * (n_ctx - 1 - n_ctx // 2) and nll < 1e-6
    nll_bos, _ = llamacpp.half_window_nll(logits_fn, tokens, n_ctx, bos_id=4)
    assert seen[-1][0] == 4 and seen[-2][0] == 4  # each window starts with BOS
    assert nll_bos == pytest.approx(nll)  # position 0 is context, never scored
    assert llamacpp.half_window_nll(logits_fn, tokens, n_ctx, None, chunks=1)[1] == count // 2


# --- the command ---------------------------------------------------------------------------------


def test_a_run_directory_expands_to_its_artifacts(tmp_path):
    run = tmp_path / "run"
    (run / "stages" / "student").mkdir(parents=True)
    (run / "stages" / "student" / "config.json").write_text("{}")
    (run / "stages" / "gguf").mkdir()
    (run / "stages" / "gguf" / "model-Q8_0.gguf").write_bytes(b"")
    (run / "stages" / "eval").mkdir()
    folders = stage_folders(run)
    assert [f.name for f in folders] == ["gguf", "student"]
    assert [runtime_for(f, "auto") for f in folders] == ["llama.cpp", "vllm"]
    assert stage_folders(run / "stages" / "student") == [run / "stages" / "student"]


# --- llama.cpp on tiny models --------------------------------------------------------------------


def peaked(model):
    """Scale the weights so the tiny random model is confident: a wrong graph then shows in the log-probs."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.mul_(15.0 if "lm_head" in name else 3.0)
    return model


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, tokenizer):
    """A confident tiny Llama written at three types; folder per type, as the gguf stage writes it."""
    from slimforge.quantize.gguf_export import write_gguf

    root = tmp_path_factory.mktemp("tiny-gguf")
    model = peaked(build_model("llama", tokenizer, layers=2))
    paths = {}
    for qtype in ("F16", "Q8_0", "Q4_0"):
        folder = root / qtype
        folder.mkdir()
        paths[qtype] = folder / f"model-{qtype}.gguf"
        write_gguf(model, tokenizer, paths[qtype], qtype, "F16" if qtype == "F16" else "Q8_0", "tiny")
        tokenizer.save_pretrained(folder)
    return model, paths


def text() -> str:
    return corpus_text()[:6000]


@pytest.mark.runtime
def test_llamacpp_perplexity_matches_the_half_window_protocol(tokenizer, tiny_gguf, tmp_path):
    needs_llamacpp()
    model, paths = tiny_gguf
    (tmp_path / "t.txt").write_text(text())
    theirs = llamacpp.perplexity(paths["F16"], tmp_path / "t.txt", n_ctx=64, chunks=4)
    tokens = llamacpp.tokenize(paths["F16"], text())
    nll, count = llamacpp.half_window_nll(lambda ids: model(input_ids=ids).logits, tokens, 64, None, chunks=4)
    assert count == theirs.scored_tokens
    assert math.exp(nll / count) == pytest.approx(theirs.ppl, rel=0.01)


@pytest.mark.runtime
@pytest.mark.parametrize("qtype", ["F16", "Q8_0", "Q4_0"])
def test_llamacpp_runs_each_type_as_transformers_does(qtype, tiny_gguf):
    from slimforge.runtimes.gguf_check import check_gguf

    needs_llamacpp()
    _, paths = tiny_gguf
    result = check_gguf(paths[qtype].parent, text=text(), n_ctx=64, chunks=4, max_tokens=8)
    assert result["ok"], result
    assert result["format"] == f"gguf {qtype}" and result["greedy"]["all_agree"]
    assert abs(result["perplexity"]["ratio"] - 1) < (0.002 if qtype == "F16" else 0.01)
    assert result["top1_agreement"] >= 0.95 and result["kl_mean"] < 1e-2


@pytest.mark.runtime
@pytest.mark.parametrize("change", ["other weights", "one layer off"])
def test_the_check_fails_when_the_runtimes_compute_different_things(change, tiny_gguf, tokenizer, monkeypatch):
    """transformers gets a different model than llama.cpp runs: the comparison must say so.

    (A file with mis-ordered Q/K rows is no such case: transformers' loader and llama.cpp read the
    rows the same way, so they agree on it; the gguf stage's verification against the source catches it.)
    """
    from slimforge.runtimes import gguf_check

    needs_llamacpp()
    model, paths = tiny_gguf
    other = peaked(build_model("llama", tokenizer, layers=2, seed=1))
    if change == "one layer off":
        other.load_state_dict(model.state_dict())
        with torch.no_grad():
            other.model.layers[1].mlp.down_proj.weight.mul_(1.5)
    monkeypatch.setattr(gguf_check, "_transformers_model", lambda path: other)
    result = gguf_check.check_gguf(paths["F16"], text=text(), n_ctx=64, chunks=4, max_tokens=8)
    assert not result["ok"] and not result["perplexity"]["ok"], result["perplexity"]


@pytest.mark.runtime
def test_runtime_check_command(tiny_gguf, tmp_path, capsys):
    from slimforge import cli

    needs_llamacpp()
    _, paths = tiny_gguf
    (tmp_path / "heldout.txt").write_text(text() * 2)
    code = cli.main(["runtime", "check", str(paths["Q8_0"]), "--text", str(tmp_path / "heldout.txt"),
                     "--max-tokens", "4", "--ctx", "64", "--chunks", "4", "--json", str(tmp_path / "out.json")])
    out = capsys.readouterr().out
    assert code == 0, out
    assert out.startswith("agrees  llama.cpp  model-Q8_0.gguf  gguf Q8_0  greedy "), out
    assert "ppl ours" in out and "top-1" in out
    saved = json.loads((tmp_path / "out.json").read_text())
    assert saved[0]["ok"] and saved[0]["perplexity"]["chunks"] == 4


@pytest.mark.runtime
def test_a_run_directory_is_checked_stage_by_stage(tiny_gguf, model_dirs, tmp_path, capsys):
    """A stage its runtime cannot take is listed with the reason; the others are checked."""
    import shutil

    from slimforge import cli

    needs_llamacpp()
    _, paths = tiny_gguf
    stages = tmp_path / "run" / "stages"
    shutil.copytree(paths["F16"].parent, stages / "gguf")
    nf4 = shutil.copytree(model_dirs["llama"], stages / "nf4")
    config = json.loads((nf4 / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (nf4 / "config.json").write_text(json.dumps(config))
    (tmp_path / "heldout.txt").write_text(text())
    code = cli.main(["runtime", "check", str(tmp_path / "run"), "--text", str(tmp_path / "heldout.txt"),
                     "--ctx", "64", "--chunks", "4", "--json", str(tmp_path / "out.json")])
    lines = capsys.readouterr().out.splitlines()
    assert code == 0, lines
    assert lines[0].startswith("agrees  llama.cpp  model-F16.gguf")
    assert lines[1].startswith("cannot  vllm  nf4  ") and "bitsandbytes" in lines[1]
    saved = json.loads((tmp_path / "out.json").read_text())
    assert [r["ok"] for r in saved] == [True, None]
