"""W8A8 on real 8-bit GEMMs: does slimforge's CPU emulation compute what the kernels compute, and how fast are they?

slimforge makes and scores W8A8 models (``quantize`` method ``w8a8``) by quantize-dequantize in
float32 (:mod:`slimforge.quantize.w8a8`), because a CPU has no FP8 matmul. A GPU does: this
script rounds random activations (per token) and weights (per output channel) with slimforge's
own functions, then multiplies them three ways:

- **emulated**: the dequantized operands in float64 (what slimforge's scores assume, without
  float32's own rounding);
- **FP8 kernel**: ``torch._scaled_mm`` on E4M3 operands with row-wise scales, bf16 out (the
  cuBLASLt/CUTLASS path vLLM takes on Ada and Hopper);
- **int8 kernel**: ``torch._int_mm`` (int32 sums), then the two scales.

It prints each kernel's largest error against the emulation, relative to the output's RMS
(a bf16 output alone rounds at ~2^-9 relative), and the speed of each against bf16 ``F.linear``
at SmolLM2-135M's layer shapes and at a 7B model's (4096 / 14336).

    python bench/w8a8_gpu.py                 # CUDA: parity and speed
    python bench/w8a8_gpu.py --device cpu    # what a CPU can run: the int8 kernel's parity, small shapes
"""

from __future__ import annotations

import argparse
import sys
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from slimforge.quantize.w8a8 import dynamic_token_scales, round_to_grid, weight_scales  # noqa: E402

SHAPES = {"smollm2-135m": [(576, 576), (576, 1536), (1536, 576)],
          "7b": [(4096, 4096), (4096, 14336), (14336, 4096)]}


def operands(tokens: int, k: int, n: int, device: torch.device, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(tokens, k, generator=g)
    x[:, :: max(k // 16, 1)] *= 8.0  # a few outlier channels, as real activations have
    w = torch.randn(n, k, generator=g) * k**-0.5
    return x.to(device), w.to(device)


def quantized(x: torch.Tensor, w: torch.Tensor, kind: str):
    """Codes and fp32 scales of both operands, rounded by slimforge's functions."""
    sx = dynamic_token_scales(x.float(), kind)  # [M, 1]
    sw = weight_scales(w, kind, per_channel=True)  # [N, 1]
    qx = round_to_grid(x.float() / sx, kind)
    qw = round_to_grid(w.float() / sw, kind)
    return qx, sx.float(), qw, sw.float()


def emulated(qx, sx, qw, sw) -> torch.Tensor:
    return (qx.double() * sx.double()) @ (qw.double() * sw.double()).T


def fp8_kernel(qx, sx, qw, sw) -> torch.Tensor:
    a = qx.to(torch.float8_e4m3fn)
    b = qw.to(torch.float8_e4m3fn).T  # column-major [K, N], as _scaled_mm wants
    return torch._scaled_mm(a, b, scale_a=sx, scale_b=sw.T.contiguous(), out_dtype=torch.bfloat16)


def int8_kernel(qx, sx, qw, sw) -> torch.Tensor:
    acc = torch._int_mm(qx.to(torch.int8), qw.to(torch.int8).T)
    return acc.double() * sx.double() * sw.double().T


def rel_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref).abs().max() / ref.pow(2).mean().sqrt())


def timed(fn, device: torch.device, repeats: int) -> float:
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tokens", type=int, default=None, help="rows of the activation (default 4096 on CUDA, 64 on CPU)")
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: run with --device cpu for the int8 parity alone")
    tokens = args.tokens or (4096 if device.type == "cuda" else 64)
    shapes = SHAPES if device.type == "cuda" else {"smollm2-135m": SHAPES["smollm2-135m"]}
    # FP8 GEMMs: Ada (sm 8.9) and later; torch's CPU build also has a _scaled_mm (a reference, not fast).
    fp8 = device.type == "cpu" or torch.cuda.get_device_capability(device) >= (8, 9)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{name}, torch {torch.__version__}, {tokens} tokens; errors: max |kernel - emulation| / RMS(emulation)\n")
    print("| model | K x N | int8 error | FP8 error | bf16 output rounding | bf16 (ms) | int8 (ms) | int8 speed-up | FP8 (ms) | FP8 speed-up |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for model, dims in shapes.items():
        for k, n in dims:
            x, w = operands(tokens, k, n, device)
            q8 = quantized(x, w, "int8")
            int8_err = rel_error(int8_kernel(*q8), emulated(*q8))
            fp8_err, fp8_ms, bf16_round = float("nan"), float("nan"), float("nan")
            xb, wb = x.bfloat16(), w.bfloat16()
            repeats = args.repeats if device.type == "cuda" else 3
            bf16_ms = timed(partial(F.linear, xb, wb), device, repeats) * 1e3
            a8, b8 = q8[0].to(torch.int8), q8[2].to(torch.int8).T
            int8_ms = timed(partial(torch._int_mm, a8, b8), device, repeats) * 1e3
            if fp8:
                qf = quantized(x, w, "fp8")
                reference = emulated(*qf)
                fp8_err = rel_error(fp8_kernel(*qf), reference)
                bf16_round = rel_error(reference.bfloat16(), reference)
                af, bf = qf[0].to(torch.float8_e4m3fn), qf[2].to(torch.float8_e4m3fn).T
                sa, sb = qf[1], qf[3].T.contiguous()
                fp8_ms = timed(partial(torch._scaled_mm, af, bf, scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16),
                               device, repeats) * 1e3
            print(f"| {model} | {k} x {n} | {int8_err:.2e} | {fp8_err:.2e} | {bf16_round:.2e} | {bf16_ms:.3f} | {int8_ms:.3f} | "
                  f"{bf16_ms / int8_ms:.2f}x | {fp8_ms:.3f} | {bf16_ms / fp8_ms:.2f}x |", flush=True)
    print("\nint8 sums exactly in int32, so its error is the float64 scaling's alone (~1e-15). The FP8 kernel "
          "writes bf16, so its error should be about the emulation's own bf16 rounding (that column); far above it "
          "means the emulation and the kernel disagree.")


if __name__ == "__main__":
    main()
