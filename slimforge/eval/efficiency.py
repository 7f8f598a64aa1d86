"""Size and speed of a model on the current device.

Parameter count (logical: a 4-bit bitsandbytes weight counts its unpacked
shape), size of the weight files on disk, bytes in memory, peak memory while
generating, prefill and decode throughput and end-to-end latency for one fixed
prompt at batch 1. Peak memory is exact on CUDA (``max_memory_allocated``); on
CPU it is the weights in memory plus the largest growth of the process's
resident memory, sampled every millisecond, while the benchmark runs.

Timings depend on the machine and on whatever else runs on it: compare models
measured in the same invocation, and read them as the device's, not the model's.
"""

from __future__ import annotations

import math
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import torch

from slimforge.eval.config import EfficiencyTaskConfig
from slimforge.models import device_name

# Public domain (Shakespeare, Sonnet 18), repeated to the prompt length.
FIXED_TEXT = (
    "Shall I compare thee to a summer's day? Thou art more lovely and more temperate: "
    "Rough winds do shake the darling buds of May, And summer's lease hath all too short a date; "
    "Sometime too hot the eye of heaven shines, And often is his gold complexion dimm'd; "
    "And every fair from fair sometime declines, By chance or nature's changing course untrimm'd; "
)
WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt", ".pth")


# Parameters compressed-tensors (GPTQ, RTN, W8A8) leaves beside each weight: quantization metadata, not model parameters.
QUANT_METADATA = ("weight_scale", "weight_zero_point", "weight_g_idx", "weight_shape", "weight_global_scale",
                  "input_scale", "input_zero_point")


def logical_parameters(model: Any) -> int:
    """Parameters counted once each, with packed quantized weights at their original shape and
    quantization metadata (scales, zero points, group indices) left out."""
    total = 0
    for name, param in model.named_parameters():  # tied weights once
        if name.rsplit(".", 1)[-1] in QUANT_METADATA:
            continue
        state = getattr(param, "quant_state", None)
        total += math.prod(state.shape) if state is not None and getattr(state, "shape", None) else param.numel()
    return total


def memory_bytes(model: Any) -> int:
    """Bytes the weights and buffers occupy in memory, in their storage dtypes."""
    tensors = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def disk_bytes(path: str | Path, gguf_file: str | None = None) -> int | None:
    """Bytes of the weight files a model loads from (None for a hub id).

    A LoRA adapter folder counts its base model too: both must be shipped.
    """
    from slimforge.models import adapter_base

    location = Path(path).expanduser()
    if location.is_file():
        return location.stat().st_size
    if not location.is_dir():
        return None
    if gguf_file:
        return (location / gguf_file).stat().st_size
    total = sum(p.stat().st_size for p in location.iterdir() if p.suffix in WEIGHT_SUFFIXES)
    base = adapter_base(location)
    if base:
        base_size = disk_bytes(base) if Path(base).expanduser().is_dir() else None
        total += base_size or 0
    return total


def fixed_prompt(tokenizer: Any, tokens: int) -> torch.Tensor:
    """[1, tokens] ids of :data:`FIXED_TEXT`, repeated and cut to length."""
    ids: list[int] = []
    piece = tokenizer(FIXED_TEXT, add_special_tokens=False)["input_ids"]
    while len(ids) < tokens:
        ids.extend(piece)
    return torch.tensor([ids[:tokens]], dtype=torch.long)


class PeakRss:
    """Samples this process's resident memory in a thread; ``peak_growth`` after the block."""

    def __init__(self, interval: float = 0.001) -> None:
        import psutil

        self._process = psutil.Process()
        self._interval = interval
        self._stop = threading.Event()
        self.start_rss = self.peak_rss = 0

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_rss = max(self.peak_rss, self._process.memory_info().rss)
            time.sleep(self._interval)

    def __enter__(self) -> PeakRss:
        self.start_rss = self.peak_rss = self._process.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_rss = max(self.peak_rss, self._process.memory_info().rss)

    @property
    def peak_growth(self) -> int:
        return self.peak_rss - self.start_rss


def _timed(fn: Any, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


@torch.no_grad()
def measure_speed(model: Any, ids: torch.Tensor, new_tokens: int, repeats: int, pad_token_id: int | None) -> dict[str, float]:
    """Median prefill time, generation time and the throughputs they imply (batch 1, greedy)."""
    device = model.device
    ids = ids.to(device)

    def prefill() -> None:
        model(input_ids=ids, use_cache=True)

    def generate() -> None:
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False, num_beams=1, temperature=None, top_p=None,
                       top_k=None, pad_token_id=pad_token_id)

    generate()  # warm-up: first-call allocations and kernel selection
    prefill_s = statistics.median(_timed(prefill, device) for _ in range(repeats))
    total_s = statistics.median(_timed(generate, device) for _ in range(repeats))
    decode_s = max(total_s - prefill_s, 1e-9)
    return {
        "prefill_tokens_per_s": ids.shape[1] / prefill_s,
        "decode_tokens_per_s": (new_tokens - 1) / decode_s,  # the first new token comes from the prefill
        "time_to_first_token_s": prefill_s,
        "latency_s": total_s,
    }


def efficiency_task(model: Any, tokenizer: Any, cfg: EfficiencyTaskConfig, ctx: Any) -> dict[str, Any]:
    """Registered as ``efficiency``: size, memory and speed on ``ctx.device``."""
    ids = fixed_prompt(tokenizer, cfg.prompt_tokens)
    device = model.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        speed = measure_speed(model, ids, cfg.new_tokens, cfg.repeats, tokenizer.pad_token_id)
        peak, method = torch.cuda.max_memory_allocated(device), "cuda max_memory_allocated"
    else:
        with PeakRss() as rss:
            speed = measure_speed(model, ids, cfg.new_tokens, cfg.repeats, tokenizer.pad_token_id)
        peak, method = memory_bytes(model) + rss.peak_growth, "weights + sampled RSS growth"
    ref = getattr(ctx, "ref", None)
    return {
        "num_parameters": logical_parameters(model),
        "disk_bytes": disk_bytes(ref.path, ref.gguf_file) if ref is not None else None,
        "memory_bytes": memory_bytes(model),
        "peak_memory_bytes": peak,
        **speed,
        "info": {"device": device_name(device), "peak_memory_method": method, "prompt_tokens": cfg.prompt_tokens,
                 "new_tokens": cfg.new_tokens, "repeats": cfg.repeats, "batch_size": 1},
        "higher_is_better": {"prefill_tokens_per_s": True, "decode_tokens_per_s": True, "latency_s": False,
                             "time_to_first_token_s": False, "peak_memory_bytes": False, "disk_bytes": False,
                             "memory_bytes": False, "num_parameters": False},
    }
