"""llama.cpp's command-line tools, driven from Python.

Each function runs one tool of the cached build (:func:`slimforge.runtimes.install.require_llamacpp`)
as a subprocess and parses what it prints. A tool that cannot load a file exits non-zero;
that becomes a one-line :class:`RuntimeCheckError` carrying llama.cpp's own error line.

Perplexity follows ``llama-perplexity``'s protocol, which :func:`half_window_nll` reproduces for
a transformers model: the text is tokenized once (a BOS first where the vocabulary adds one)
and cut into windows of ``n_ctx`` tokens; each window's first token becomes BOS when the
vocabulary adds one, and only the second half of each window is scored, so that every scored
token sees at least ``n_ctx / 2`` tokens of context.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slimforge.errors import RuntimeCheckError
from slimforge.runtimes.install import require_llamacpp

log = logging.getLogger(__name__)

# A tool that runs longer than this is stuck (the largest job here, an imatrix pass, takes a minute).
TOOL_TIMEOUT_S = 3600


def threads() -> int:
    return max(1, int(os.environ.get("SLIMFORGE_LLAMACPP_THREADS", os.cpu_count() or 1)))


def _error_line(output: str) -> str:
    """llama.cpp's most telling line: the last one that says error/failed, else the last line."""
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    errors = [ln for ln in lines if re.search(r"error|failed|unknown|invalid|not supported", ln, re.I)]
    return (errors or lines or ["no output"])[-1][:300]


def run_tool(tool: str, args: list[str], what: str, timeout: float = TOOL_TIMEOUT_S,
             binary: bool = False, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run one of llama.cpp's tools; returns the finished process (stdout as bytes if ``binary``).

    Raises:
        RuntimeMissingError: the tools are not built.
        RuntimeCheckError: the tool failed; the message quotes llama.cpp's error.
    """
    cmd = [str(require_llamacpp() / tool), *args]
    log.debug("llama.cpp: %s", " ".join(cmd))
    try:
        proc = subprocess.run(cmd, capture_output=True, timeout=timeout, cwd=cwd)
    except subprocess.TimeoutExpired as err:
        raise RuntimeCheckError(f"llama.cpp's {tool} did not finish {what} within {timeout:.0f} s") from err
    stderr = proc.stderr.decode("utf-8", errors="replace")
    if proc.returncode != 0:
        stdout = proc.stdout.decode("utf-8", errors="replace")
        raise RuntimeCheckError(f"llama.cpp cannot {what}: {_error_line(stderr + stdout)}")
    stdout = proc.stdout if binary else proc.stdout.decode("utf-8", errors="replace")
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


# --- tokenize and generate ---------------------------------------------------------------------


def tokenize(gguf: Path, text: str) -> list[int]:
    """The token ids llama.cpp gives ``text`` (with the BOS its vocabulary adds, if any)."""
    with tempfile.NamedTemporaryFile("w", suffix=".txt", encoding="utf-8", delete=False) as fh:
        fh.write(text)
    try:
        proc = run_tool("llama-tokenize", ["-m", str(gguf), "-f", fh.name, "--ids", "--log-disable"],
                        f"tokenize with {Path(gguf).name}")
    finally:
        os.unlink(fh.name)
    found = re.findall(r"\[([\d,\s]*)\]", proc.stdout)
    if not found:
        raise RuntimeCheckError(f"llama-tokenize printed no token ids for {Path(gguf).name}")
    return [int(t) for t in found[-1].replace(",", " ").split()]


def generate(gguf: Path, prompt: str, max_tokens: int) -> bytes:
    """llama.cpp's greedy continuation of ``prompt`` (``llama-simple``) as raw bytes, the prompt removed.

    Bytes, not text: a token may be part of a UTF-8 character, and a text decode (or newline
    translation) would blur exactly the differences this output is compared for.
    """
    proc = run_tool("llama-simple", ["-m", str(gguf), "-n", str(max_tokens), prompt],
                    f"load and generate with {Path(gguf).name}", binary=True)
    # llama-simple echoes the prompt's pieces, then the new ones.
    out, echoed = proc.stdout, prompt.encode("utf-8")
    return out[len(echoed):] if out.startswith(echoed) else out


# --- perplexity ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Perplexity:
    """A perplexity as ``llama-perplexity`` reports it."""

    ppl: float
    stderr: float  # its +/- (standard error of the mean NLL, times ppl)
    chunks: int
    n_ctx: int
    seconds: float

    @property
    def scored_tokens(self) -> int:
        return self.chunks * (self.n_ctx - 1 - self.n_ctx // 2)


def perplexity(gguf: Path, text_file: Path, n_ctx: int, chunks: int | None = None) -> Perplexity:
    """``llama-perplexity`` of ``gguf`` on ``text_file`` (windows of ``n_ctx``; at most ``chunks``)."""
    args = ["-m", str(gguf), "-f", str(text_file), "-c", str(n_ctx), "-b", str(n_ctx), "-t", str(threads())]
    if chunks:
        args += ["--chunks", str(chunks)]
    start = time.perf_counter()
    proc = run_tool("llama-perplexity", args, f"compute perplexity with {Path(gguf).name}")
    return _parse_perplexity(proc.stderr + proc.stdout, gguf, n_ctx, time.perf_counter() - start)


def _parse_perplexity(output: str, gguf: Path, n_ctx: int, seconds: float) -> Perplexity:
    final = re.search(r"Final estimate: PPL = ([\d.]+) \+/- ([\d.]+)", output)
    counted = re.search(r"over (\d+) chunks, n_ctx=(\d+)", output)
    if not final or not counted:
        raise RuntimeCheckError(f"llama-perplexity gave no estimate for {Path(gguf).name}: {_error_line(output)} "
                                f"(the text needs at least {2 * n_ctx} tokens)")
    return Perplexity(float(final.group(1)), float(final.group(2)), int(counted.group(1)), int(counted.group(2)),
                      seconds)


def half_window_nll(logits_fn: Any, tokens: list[int], n_ctx: int, bos_id: int | None,
                    chunks: int | None = None) -> tuple[float, int]:
    """Summed NLL and token count of ``llama-perplexity``'s protocol, for any model.

    Args:
        logits_fn: maps a [1, n_ctx] LongTensor of ids to [1, n_ctx, vocab] logits.
        tokens: the whole text's ids as llama.cpp tokenized it (:func:`tokenize`).
        n_ctx: window length.
        bos_id: the BOS id when the vocabulary adds one (each window then starts with it); else None.
        chunks: at most this many windows.

    Returns:
        ``(nll_sum, count)``; the perplexity is ``exp(nll_sum / count)``.
    """
    import torch

    n_chunk = len(tokens) // n_ctx
    if chunks:
        n_chunk = min(n_chunk, chunks)
    first = n_ctx // 2
    nll, count = 0.0, 0
    for i in range(n_chunk):
        window = list(tokens[i * n_ctx:(i + 1) * n_ctx])
        targets = torch.tensor(window[first + 1:])
        if bos_id is not None:
            window[0] = bos_id
        with torch.no_grad():
            logits = logits_fn(torch.tensor([window]))[0, first:n_ctx - 1].double()
        nll += float(-(logits.log_softmax(-1).gather(-1, targets[:, None])).sum())
        count += len(targets)
    return nll, count


@dataclass
class LogProbs:
    """What ``llama-perplexity --kl-divergence-base`` saves: the tokens and the scored positions' log-probs."""

    tokens: Any  # LongTensor [chunks, n_ctx], as tokenized (before the BOS substitution)
    logprobs: Any  # FloatTensor [chunks, n_ctx - 1 - n_ctx // 2, n_vocab], positions n_ctx // 2 .. n_ctx - 2
    n_ctx: int
    # The perplexity llama.cpp printed for the same pass, from its unclipped fp32 logits (the
    # saved log-probs are clipped 16 nats under the top: too coarse for a perplexity).
    perplexity: Perplexity | None = None


def read_logits_file(path: Path) -> LogProbs:
    """Decode llama-perplexity's saved log-probs (16-bit, per position: a scale and the minimum log-prob).

    Each value is ``min_log_prob + scale * q``; ``q == 0`` marks a log-prob at or below the
    minimum, which llama.cpp clips to 16 nats under the maximum.
    """
    import numpy as np
    import torch

    raw = Path(path).read_bytes() if Path(path).is_file() else b""
    if raw[:8] != b"_logits_" or len(raw) < 20:
        raise RuntimeCheckError(f"{path} is not a llama-perplexity logits file (llama-perplexity saves one only "
                                f"when the text holds at least two windows of tokens)")
    n_ctx, n_vocab, n_chunk = (int(v) for v in np.frombuffer(raw, dtype=np.int32, count=3, offset=8))
    offset = 8 + 12
    nv = 2 * ((n_vocab + 1) // 2) + 4
    positions = n_ctx - 1 - n_ctx // 2
    if len(raw) != offset + 4 * n_chunk * n_ctx + 2 * n_chunk * positions * nv:
        raise RuntimeCheckError(f"{path} is a truncated llama-perplexity logits file ({len(raw)} bytes)")
    tokens = np.frombuffer(raw, dtype=np.int32, count=n_chunk * n_ctx, offset=offset)
    offset += tokens.nbytes
    body = np.frombuffer(raw, dtype=np.uint16, count=n_chunk * positions * nv, offset=offset)
    body = body.reshape(n_chunk, positions, nv)
    header = body[..., :4].copy().view(np.float32)  # [chunks, positions, 2]: scale, min_log_prob
    q = body[..., 4:4 + n_vocab].astype(np.float32)
    values = header[..., 1:2] + header[..., 0:1] * q
    return LogProbs(torch.from_numpy(tokens.reshape(n_chunk, n_ctx).astype(np.int64)), torch.from_numpy(values), n_ctx)


def logprobs(gguf: Path, text_file: Path, n_ctx: int, chunks: int) -> LogProbs:
    """llama.cpp's log-probs over ``llama-perplexity``'s scored positions of ``text_file``, and its perplexity."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "logits.bin"
        args = ["-m", str(gguf), "-f", str(text_file), "-c", str(n_ctx), "-b", str(n_ctx), "-t", str(threads()),
                "--chunks", str(chunks), "--kl-divergence-base", str(out)]
        start = time.perf_counter()
        proc = run_tool("llama-perplexity", args, f"compute log-probs with {Path(gguf).name}")
        saved = read_logits_file(out)
    saved.perplexity = _parse_perplexity(proc.stderr + proc.stdout, gguf, n_ctx, time.perf_counter() - start)
    return saved


# --- importance matrix and quantization -----------------------------------------------------------


def imatrix(gguf: Path, text_file: Path, out: Path, n_ctx: int, chunks: int | None = None) -> dict[str, Any]:
    """``llama-imatrix``: the activation statistics of ``gguf`` over ``text_file``, written to ``out`` (GGUF)."""
    # Run beside the text and name it plainly: the matrix records the dataset's path as given,
    # and llama-quantize copies it into the quantized file (no temporary paths in artifacts).
    text_file, gguf, out = Path(text_file), Path(gguf).resolve(), Path(out).resolve()
    args = ["-m", str(gguf), "-f", text_file.name, "-o", str(out), "-c", str(n_ctx), "-b", str(n_ctx),
            "-t", str(threads()), "--no-ppl", "--output-frequency", "1000000", "--save-frequency", "0"]
    if chunks:
        args += ["--chunks", str(chunks)]
    start = time.perf_counter()
    run_tool("llama-imatrix", args, f"compute an importance matrix with {gguf.name}", cwd=text_file.parent)
    if not out.is_file():
        raise RuntimeCheckError(f"llama-imatrix wrote no importance matrix to {out}")
    return {"seconds": round(time.perf_counter() - start, 2), "n_ctx": n_ctx, "chunks": chunks}


def quantize(src: Path, dst: Path, qtype: str, imatrix_file: Path | None = None,
             extra: list[str] | None = None) -> dict[str, Any]:
    """``llama-quantize`` ``src`` (an F32/F16/BF16 GGUF) to ``qtype`` (e.g. Q4_K_M, IQ4_NL) at ``dst``."""
    args = [*(extra or [])]
    cwd = None
    if imatrix_file is not None:  # named plainly, from its folder: the file records the name it was given
        args += ["--imatrix", Path(imatrix_file).name]
        cwd = Path(imatrix_file).parent
    args += [str(Path(src).resolve()), str(Path(dst).resolve()), qtype, str(threads())]
    start = time.perf_counter()
    proc = run_tool("llama-quantize", args, f"quantize {Path(src).name} to {qtype}", cwd=cwd)
    output = proc.stderr + proc.stdout
    sizes = {k: float(v) for k, v in re.findall(r"(model|quant) size\s*=\s*([\d.]+) MiB", output)}
    # llama-quantize sums up the tensors whose rows do not fit the type's blocks (each got another type).
    fallback = re.search(r"(\d+) of \d+ tensor\(s\) required fallback", output)
    fallbacks = int(fallback.group(1)) if fallback else 0
    return {"seconds": round(time.perf_counter() - start, 2), "source_mib": sizes.get("model"),
            "quant_mib": sizes.get("quant"), "fallback_tensors": fallbacks}
