"""Does vLLM's CPU build run an artifact as transformers does?

The check, for one model folder or several (which then share one vLLM process):

1. **Inspect** the folder (no weights read): a GGUF file, a LoRA adapter, a bitsandbytes
   folder, or a compressed-tensors scheme vLLM's CPU build has no kernel for is refused in
   one line, naming the scheme and the reason (:func:`cpu_refusal`), before vLLM starts.
2. **Generate in vLLM**: ``vllm_worker.py`` runs in vLLM's own environment
   (:func:`slimforge.runtimes.install.require_vllm`), decoding fixed English prompts greedily,
   with the log-probability of every token it picks. The prompts are tokenized here by the
   artifact's tokenizer and handed over as ids, so both runtimes read the same tokens.
3. **Generate in transformers**, through slimforge's own loader, in float32 with the KV
   cache: the reference, the exact math of the weights the folder stores.
4. **Compare**: per prompt, the leading tokens that agree, and |log-prob difference| of
   vLLM's tokens under both runtimes (over the agreeing prefix and the step where they part,
   which both read from the same prefix). A prompt may part where transformers' own token and
   vLLM's lie within twice the tolerance (a tie that rounding decides); anywhere else, parting
   fails the check.

vLLM computes in float32 where its CPU kernels allow (plain folders): its log-probs then
agree with transformers' to :data:`FP32_TOLERANCE`. Its 4-bit weight-only kernel exists for
bfloat16 and float16 activations only, so compressed-tensors W4A16 runs in bfloat16; the
tolerance is then the artifact's own bfloat16 rounding (transformers in bfloat16 against
transformers in float32, on the same tokens: :func:`bf16_rounding`) times :data:`BF16_FACTOR`:
vLLM may be no further from float32 than bfloat16 arithmetic itself is. docs/runtimes.md has
the measurements behind both tolerances.

W8A8 folders (int8 or FP8 activations) run in float32 (vLLM's CPU kernels for them take it), but
rounding activations makes the model a step function of its inputs: a float32 difference of a
few ulps, which two runtimes summing in different orders always have, flips an activation across
a rounding boundary, a whole step, and the flip carries through every later layer and token. The
yardstick is the artifact's own sensitivity to that: transformers with every quantized linear's
input jittered by :data:`W8A8_NOISE` (relative, about 8 ulps) before its rounding, against the
reference, over each step's two likeliest tokens (:func:`rounding_sensitivity`; on SmolLM2-135M
W8A8 folders up to 1-2 nats, where the float32 teacher moves by ~1e-5). vLLM may be
:data:`W8A8_FACTOR` times that far. What vLLM 0.32's CPU build cannot run, or runs wrongly, is
refused in one line (:func:`w8a8_refusal`): int8 without VNNI, FP8 with static activation
scales, per-tensor FP8 weights without AVX512-BF16.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slimforge.errors import RuntimeCheckError
from slimforge.fsutil import read_json_or_none
from slimforge.runtimes.gguf_check import PROMPTS
from slimforge.runtimes.install import require_vllm

log = logging.getLogger(__name__)

WORKER = Path(__file__).with_name("vllm_worker.py")
DTYPES = ("auto", "float32", "bfloat16")
# vLLM computing in float32 against transformers in float32: different kernels and summation
# orders only. Measured max |dlogprob| (docs/runtimes.md): 5e-7 on a tiny Llama, 2.0e-5 on
# SmolLM2-135M (30 layers), 2.9e-5 on its depth-pruned student. 1e-3 leaves ~35x room for
# deeper models and stays ~100x below what bfloat16 rounding alone moves the same log-probs.
FP32_TOLERANCE = 1e-3
# vLLM in bfloat16 may be this many times further from transformers' float32 than transformers'
# own bfloat16 is over each step's BF16_TOP_K likeliest tokens. Measured on SmolLM2-135M and its
# depth-pruned student, three prompt sets each: 0.29x-0.83x (docs/runtimes.md).
BF16_FACTOR = 2.0
BF16_TOP_K = 16
# vLLM's CPU attention (v1/attention/backends/cpu_attn.py, vLLM 0.32) takes these head sizes.
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
# vLLM's CPU kernel for weight-only int (CPUWNA16LinearKernel): 4-bit codes, layer widths that
# are multiples of 32, bfloat16/float16 activations; built only into the AVX-512 extension on x86.
CPU_WNA16_BITS = (4,)
CPU_WNA16_MULTIPLE = 32
# A W8A8 folder in vLLM may be this many times further from transformers than transformers moves when
# every quantized input is jittered by W8A8_NOISE, over each step's W8A8_TOP_K likeliest tokens (the
# greedy token and the runner-up: the ones a comparison reads). Both runtimes carry such flips, so they
# may be twice as far apart. Measured, FP8 dynamic: 0.24x (tiny Llama) and 0.32x (SmolLM2-135M).
W8A8_FACTOR = 2.0
W8A8_TOP_K = 2
W8A8_NOISE = 2.0**-20
KV_CACHE_GIB = 1
WORKER_TIMEOUT_S = 900
WORKER_TIMEOUT_PER_MODEL_S = 300


@dataclass(frozen=True)
class Scheme:
    """What a folder's ``quantization_config`` declares, as far as vLLM's choice of kernel goes."""

    method: str                          # quant_method: compressed-tensors, bitsandbytes, ...
    name: str                            # W4A16, W8A8-int, ... or the method for other tools
    bits: int | None = None              # weight bits (integer schemes)
    group_size: int | None = None        # None: one scale per output channel
    activations: str | None = None       # None: weight-only; int8, float8 (W8A8)
    format: str | None = None            # compressed-tensors' format (pack-quantized, ...)
    weight_strategy: str | None = None   # channel, group, tensor
    dynamic: bool | None = None          # W8A8: activation scales per token at run time, or static

    def label(self) -> str:
        if self.method != "compressed-tensors":
            return self.method
        groups = f"g{self.group_size}" if self.group_size else f"per {self.weight_strategy or 'channel'}"
        if self.activations is not None:
            groups += ", dynamic activations" if self.dynamic else ", static activations"
        return f"compressed-tensors {self.name} {groups} ({self.format})"


@dataclass
class Plan:
    """One artifact, inspected and ready for both runtimes."""

    path: Path
    format: str
    dtype: str                          # what vLLM computes in
    prompts: tuple[str, ...]
    prompt_ids: list[list[int]]
    max_tokens: int
    max_model_len: int
    scheme: Scheme | None = None


@dataclass
class Greedy:
    """transformers' greedy continuation of one prompt: its tokens and every step's log-probs [n, vocab]."""

    token_ids: list[int]
    logprobs: Any  # torch.Tensor, float32

    def chosen(self) -> list[float]:
        return [float(self.logprobs[i, t]) for i, t in enumerate(self.token_ids)]


# --- inspecting the folder -----------------------------------------------------------------------


def read_config(path: Path) -> dict[str, Any]:
    """``config.json`` of a model folder vLLM could load.

    Raises:
        RuntimeCheckError: a GGUF file, a LoRA adapter folder, or no model folder at all.
    """
    path = Path(path)
    if path.suffix == ".gguf" or (path.is_dir() and any(path.glob("*.gguf"))):
        raise RuntimeCheckError(f"{path} is a GGUF artifact; vLLM's check takes model folders, so check it "
                                "with `--runtime llama.cpp`")
    if not path.is_dir():
        raise RuntimeCheckError(f"{path} is not a model folder; vLLM loads Hugging Face model folders")
    if (path / "adapter_config.json").is_file():
        raise RuntimeCheckError(f"{path} is a LoRA adapter, not a model; vLLM loads full model folders, so merge "
                                "the adapter into its base first and check the merged folder")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise RuntimeCheckError(f"{path} holds no config.json, so it is not a model folder vLLM can load")
    config = read_json_or_none(config_file, instead=None)
    if config is None:
        raise RuntimeCheckError(f"{config_file} is not a readable JSON object; write the folder again")
    return config


def quantization_scheme(config: dict[str, Any]) -> Scheme | None:
    """The folder's quantization as vLLM sees it (None for a full-precision folder)."""
    qc = config.get("quantization_config")
    if not isinstance(qc, dict) or not qc:
        return None
    method = str(qc.get("quant_method") or "unknown")
    if method != "compressed-tensors":
        return Scheme(method=method, name=method)
    groups = [g for g in (qc.get("config_groups") or {}).values() if isinstance(g, dict)]
    weights = [g.get("weights") or {} for g in groups]
    # slimforge writes one group; a folder with several is named after its first.
    first, group = (weights[0], groups[0]) if groups else ({}, {})
    inputs = group.get("input_activations") or None
    activations = None if inputs is None else f"{inputs.get('type', 'int')}{inputs.get('num_bits', '')}"
    bits = first.get("num_bits")
    name = f"W{bits}A16" if activations is None else f"W{bits}A{inputs.get('num_bits')}-{inputs.get('type', 'int')}"
    return Scheme(method=method, name=name, bits=bits,
                  group_size=first.get("group_size") if first.get("strategy") == "group" else None,
                  activations=activations, format=group.get("format") or qc.get("format"),
                  weight_strategy=first.get("strategy"),
                  dynamic=None if inputs is None else bool(inputs.get("dynamic")))


def head_size(config: dict[str, Any]) -> int | None:
    heads, hidden = config.get("num_attention_heads"), config.get("hidden_size")
    size = config.get("head_dim") or (hidden // heads if heads and hidden else None)
    return int(size) if size else None


def wna16_widths(config: dict[str, Any]) -> dict[str, int]:
    """A decoder's linear widths as vLLM's CPU kernel sees them: inputs, and outputs with q/k/v and gate/up fused."""
    hidden, inter = config.get("hidden_size"), config.get("intermediate_size")
    heads, kv = config.get("num_attention_heads"), config.get("num_key_value_heads") or config.get("num_attention_heads")
    size = head_size(config)
    widths = {"hidden_size": hidden, "intermediate_size": inter, "2*intermediate_size": inter and 2 * inter,
              "num_attention_heads*head_dim": heads and size and heads * size,
              "(heads+2*kv_heads)*head_dim": heads and size and (heads + 2 * kv) * size}
    return {name: int(width) for name, width in widths.items() if width}


def _x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")


def cpu_runs_wna16() -> bool:
    """Whether vLLM's CPU build has its weight-only int kernel on this CPU.

    On x86 vLLM loads its AVX-512 extension only where torch reports AVX-512 (the same torch
    2.13 test as here); its AVX2 extension lacks ``cpu_gemm_wna16``. Other architectures load
    one extension that has it.
    """
    if not _x86():
        return True
    import torch

    return bool(torch.cpu._is_avx512_supported())


def wna16_refusal(scheme: Scheme, config: dict[str, Any]) -> str | None:
    """Why vLLM's CPU build cannot run this weight-only int scheme, or None."""
    if scheme.bits not in CPU_WNA16_BITS:
        return (f"its weight-only int kernel (CPUWNA16) takes {'/'.join(map(str, CPU_WNA16_BITS))}-bit weights only, "
                f"and this folder's are {scheme.bits}-bit; vLLM runs {scheme.name} on GPUs, or write 4-bit "
                "weights to check them here")
    if not cpu_runs_wna16():
        return ("its weight-only int kernel (cpu_gemm_wna16) is built only into its AVX-512 extension, and this "
                "CPU has AVX2 only; check it on an AVX-512 CPU or a GPU")
    if scheme.group_size is not None and scheme.group_size % 2:
        return f"its W4A16 kernel takes even group sizes only, and this folder's is {scheme.group_size}"
    bad = [f"{name}={w}" for name, w in wna16_widths(config).items() if w % CPU_WNA16_MULTIPLE]
    if bad:
        return (f"its W4A16 kernel needs layer widths that are multiples of {CPU_WNA16_MULTIPLE}, and this model "
                f"has {', '.join(bad)}")
    return None


def w8a8_refusal(scheme: Scheme) -> str | None:
    """Why vLLM 0.32's CPU build cannot run this W8A8 folder as written, or None.

    Measured on an AVX2 CPU, and read from vLLM's kernels for the others:

    - int8: its oneDNN GEMM, on a CPU without VNNI, adds products in saturating 16-bit pairs: on
      random 576-wide layers 1.6-4.3% of the outputs came out wrong by up to 11% of their range;
    - FP8 with static activation scales: without AMX-FP8, FP8 runs on
      ``ChannelWiseTorchFP8ScaledMMLinearKernel``, which fails on a per-tensor activation scale
      (``narrow()`` of a 0-dim tensor, at the first forward);
    - per-tensor FP8 weights: they need ``static_scaled_fp8_quant``, which only the extension vLLM
      loads on AVX512-BF16 CPUs implements (elsewhere it is a stub that takes no arguments).
    """
    if scheme.activations == "int8" and not cpu_has_vnni():
        return ("its int8 GEMM (oneDNN) on a CPU without VNNI adds products in saturating 16-bit pairs, so some "
                "outputs come out wrong (measured: 1.6-4.3% of a layer's, off by up to 11% of their range); check "
                "int8 W8A8 on a CPU with AVX512-VNNI or AVX-VNNI, or a GPU")
    if scheme.activations != "float8":
        return None
    if not scheme.dynamic:
        return ("its CPU FP8 kernel (ChannelWiseTorchFP8ScaledMMLinearKernel, used without AMX-FP8) cannot take a "
                "static per-tensor activation scale (narrow() of a 0-dim tensor); check an FP8 folder with dynamic "
                "activations here, or this one on an Ada, Hopper or Blackwell GPU")
    if scheme.weight_strategy == "tensor" and not cpu_has_avx512_bf16():
        return ("per-tensor FP8 weights need its static_scaled_fp8_quant kernel, built only into the extension it "
                "loads on AVX512-BF16 CPUs, and this CPU lacks AVX512-BF16; write per-channel FP8 weights "
                "(weight_scales: channel) to check them here")
    return None


def cpu_has_vnni() -> bool:
    """Whether this CPU has VNNI (int8 dot products into 32-bit sums), which vLLM's int8 GEMM needs to be exact."""
    if not _x86():
        return True
    import torch

    return bool(torch.cpu._is_vnni_supported())


def cpu_has_avx512_bf16() -> bool:
    """Whether vLLM's x86 CPU build loads its full extension (``vllm._C``) here, not the AVX2/AVX-512 one."""
    if not _x86():
        return True
    import torch

    return bool(torch.cpu._is_avx512_bf16_supported())


def cpu_refusal(config: dict[str, Any], scheme: Scheme | None) -> str | None:
    """Why vLLM's CPU build (0.32) cannot run this folder, or None when it should.

    The format comes first (it is what the user chose), then the model's shapes.
    """
    if scheme is not None and scheme.method == "bitsandbytes":
        return ("vLLM 0.32 has no bitsandbytes support (it is not among its quantization methods); check the "
                "full-precision folder it was made from, or a compressed-tensors one (rtn or gptq stage)")
    if scheme is not None and scheme.method == "compressed-tensors" and scheme.activations is None:
        if scheme.format != "pack-quantized":
            return f"its weight-only int kernels read the pack-quantized format, and this folder is {scheme.format}"
        if reason := wna16_refusal(scheme, config):
            return reason
    w8a8 = scheme is not None and scheme.method == "compressed-tensors" and scheme.activations is not None
    if w8a8 and (reason := w8a8_refusal(scheme)):
        return reason
    size = head_size(config)
    if size is not None and size not in CPU_HEAD_SIZES:
        return (f"its attention takes head sizes {', '.join(map(str, CPU_HEAD_SIZES))}, and this model's "
                f"is {size}")
    return None  # other schemes and other tools' formats: vLLM itself says whether it runs them


def runtime_dtype(scheme: Scheme | None, requested: str) -> str:
    """The dtype vLLM computes in: ``auto`` takes float32 for full-precision and W8A8 folders (the
    tightest comparison; vLLM's CPU kernels for int8 and FP8 activations take it) and bfloat16 for
    the other quantized ones (the weight-only int kernel is built for bfloat16 and float16 only).

    Raises:
        RuntimeCheckError: an unknown dtype, or float32 asked of the weight-only int kernel.
    """
    if requested not in DTYPES:
        raise RuntimeCheckError(f"dtype {requested!r} is not one of {', '.join(DTYPES)}")
    weight_only_int = scheme is not None and scheme.method == "compressed-tensors" and scheme.activations is None
    if requested == "float32" and weight_only_int:
        raise RuntimeCheckError(f"vLLM's CPU kernel for {scheme.label()} computes in bfloat16 or float16 only; "
                                "check it with dtype auto or bfloat16")
    if requested == "auto":
        return "float32" if scheme is None or scheme.activations is not None else "bfloat16"
    return requested


def prompt_token_ids(path: Path, prompts: tuple[str, ...]) -> list[list[int]]:
    """The prompts as the artifact's tokenizer reads them (with the special tokens it adds)."""
    from slimforge.models import load_tokenizer

    tokenizer = load_tokenizer(str(path))
    return [list(tokenizer(p, add_special_tokens=True)["input_ids"]) for p in prompts]


def plan_check(path: Path, prompts: tuple[str, ...] = PROMPTS, max_tokens: int = 16, dtype: str = "auto") -> Plan:
    """Inspect one artifact and tokenize the prompts; refuses, in one line, what vLLM's CPU build cannot run.

    Raises:
        RuntimeCheckError: not a model folder vLLM takes, or a scheme it has no CPU kernel for.
    """
    if max_tokens < 1:
        raise RuntimeCheckError(f"max_tokens must be at least 1, got {max_tokens}")
    path = Path(path).expanduser()
    config = read_config(path)
    scheme = quantization_scheme(config)
    reason = cpu_refusal(config, scheme)
    if reason:
        what = scheme.label() if scheme else "this model"
        raise RuntimeCheckError(f"vLLM's CPU build cannot run {path} ({what}): {reason}")
    vllm_dtype = runtime_dtype(scheme, dtype)
    ids = prompt_token_ids(path, prompts)
    needed = max(len(p) for p in ids) + max_tokens
    limit = config.get("max_position_embeddings")
    if limit and needed > int(limit):
        raise RuntimeCheckError(f"the prompts and {max_tokens} new tokens need {needed} positions, but {path} "
                                f"takes {limit}; ask for fewer tokens")
    fmt = scheme.label() if scheme else "hf"
    return Plan(path=path, format=fmt, dtype=vllm_dtype, prompts=tuple(prompts), prompt_ids=ids,
                max_tokens=max_tokens, max_model_len=needed, scheme=scheme)


# --- running vLLM -----------------------------------------------------------------------------------


def worker_env(scratch: Path) -> dict[str, str]:
    """slimforge's environment minus what would make vLLM's Python import slimforge's packages."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["TMPDIR"] = str(scratch)  # vLLM's rendezvous file and any other temporary file stay in scratch
    return env


def _last_error_line(log_text: str) -> str:
    lines = [ln.strip() for ln in log_text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "Error" in ln or "error" in ln]
    return (errors or lines or ["no output"])[-1][:300]


def run_vllm(plans: list[Plan]) -> dict[str, Any]:
    """Run every plan's prompts in one vLLM process; returns the worker's result.

    Raises:
        RuntimeMissingError: vLLM is not installed.
        RuntimeCheckError: the worker itself failed (its log is kept and named).
    """
    python = require_vllm()
    models = [{"folder": str(p.path), "dtype": p.dtype, "max_model_len": p.max_model_len, "prompts": p.prompt_ids,
               "max_tokens": p.max_tokens} for p in plans]
    timeout = WORKER_TIMEOUT_S + WORKER_TIMEOUT_PER_MODEL_S * len(plans)
    with tempfile.TemporaryDirectory(prefix="slimforge-vllm-") as tmp:
        scratch = Path(tmp)
        request, result, log_file = scratch / "request.json", scratch / "result.json", scratch / "vllm.log"
        request.write_text(json.dumps({"scratch": str(scratch), "kv_cache_gib": KV_CACHE_GIB, "models": models}),
                           encoding="utf-8")
        log.info("vLLM: %d model(s) in %s", len(plans), python)
        with open(log_file, "w", encoding="utf-8") as out:
            try:
                proc = subprocess.run([str(python), str(WORKER), str(request), str(result)], stdout=out,
                                      stderr=subprocess.STDOUT, env=worker_env(scratch), cwd=scratch, timeout=timeout)
                code = proc.returncode
            except subprocess.TimeoutExpired:
                code = None
        if code == 0 and result.is_file():
            return json.loads(result.read_text(encoding="utf-8"))
        kept = Path(tempfile.mkstemp(prefix="slimforge-vllm-", suffix=".log")[1])
        shutil.copyfile(log_file, kept)
        why = f"did not finish within {timeout} s" if code is None else f"failed (exit {code})"
        raise RuntimeCheckError(f"vLLM's worker {why}: {_last_error_line(log_file.read_text(errors='replace'))}; "
                                f"its log: {kept}")


# --- running transformers ---------------------------------------------------------------------------


def transformers_greedy(path: Path, prompt_ids: list[list[int]], max_tokens: int) -> list[Greedy]:
    """transformers' greedy continuation of each prompt in float32, with the KV cache, every step's log-probs kept."""
    import torch

    from slimforge.models import load_model

    model = load_model(str(path), dtype=torch.float32, with_tokenizer=False)
    out = []
    with torch.no_grad():
        for ids in prompt_ids:
            x = torch.tensor([ids])
            # eos_token_id=None: never stop early (vLLM is told to ignore EOS as well); the
            # sampling settings are cleared so the folder's generation config cannot apply.
            gen = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, num_beams=1,
                                 max_new_tokens=max_tokens, eos_token_id=None, temperature=None, top_p=None,
                                 top_k=None, repetition_penalty=1.0, output_logits=True,
                                 return_dict_in_generate=True, use_cache=True)
            logprobs = torch.cat([step.float() for step in gen.logits]).log_softmax(-1)
            out.append(Greedy(gen.sequences[0, len(ids):].tolist(), logprobs))
    del model
    return out


def bf16_rounding(path: Path, prompt_ids: list[list[int]], reference: list[Greedy]) -> float:
    """How far bfloat16 arithmetic alone moves the artifact's log-probs: transformers in bfloat16
    against ``reference`` (transformers in float32) along the reference's own tokens, over each
    step's :data:`BF16_TOP_K` most likely tokens; the largest |difference|.

    Taking a step's top tokens, not only the chosen one, makes the yardstick a maximum over many
    samples of the same rounding noise, so it does not swing with which prompts were drawn.
    """
    import torch

    from slimforge.models import load_model

    return worst_top_difference(load_model(str(path), dtype=torch.bfloat16, with_tokenizer=False), prompt_ids,
                                reference, BF16_TOP_K)


def worst_top_difference(model: Any, prompt_ids: list[list[int]], reference: list[Greedy], top_k: int) -> float:
    """The largest |log-prob difference| between ``model``, run in one pass over each prompt and the
    reference's continuation, and ``reference`` (decoded step by step), over each step's ``top_k``
    most likely reference tokens (the yardsticks' shared measure)."""
    import torch

    worst = 0.0
    with torch.no_grad():
        for ids, ref in zip(prompt_ids, reference):
            seq = torch.tensor([ids + ref.token_ids])
            ours = model(input_ids=seq).logits[0, len(ids) - 1:-1].float().log_softmax(-1)
            top = ref.logprobs.topk(min(top_k, ref.logprobs.shape[-1]), dim=-1).indices
            worst = max(worst, float((ours.gather(-1, top) - ref.logprobs.gather(-1, top)).abs().max()))
    return worst


def rounding_sensitivity(path: Path, prompt_ids: list[list[int]], reference: list[Greedy]) -> float:
    """How far a W8A8 folder's log-probs move under float32-sized differences in its activations:
    transformers with every quantized linear's input multiplied by ``1 + W8A8_NOISE * N(0, 1)``
    (fixed seed) before compressed-tensors rounds it, in one pass over each sequence, against
    ``reference`` (its own step-by-step decoding), over each step's :data:`W8A8_TOP_K` likeliest
    tokens; the largest |difference|.
    """
    import torch

    from slimforge.models import load_model

    model = load_model(str(path), dtype=torch.float32, with_tokenizer=False)
    generator = torch.Generator().manual_seed(0)

    def jitter(module: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
        x = args[0]
        return (x * (1 + W8A8_NOISE * torch.randn(x.shape, generator=generator, dtype=x.dtype)), *args[1:])

    handles = [m.register_forward_pre_hook(jitter) for m in model.modules()
               if getattr(m, "quantization_scheme", None) is not None]
    try:
        return worst_top_difference(model, prompt_ids, reference, W8A8_TOP_K)
    finally:
        for handle in handles:
            handle.remove()


# --- comparing ---------------------------------------------------------------------------------------


def compare_prompt(vllm_ids: list[int], vllm_logprobs: list[float], ours: Greedy, tolerance: float) -> dict[str, Any]:
    """Compare vLLM's greedy tokens and log-probs with transformers' on one prompt.

    Log-probs are compared for vLLM's tokens under both runtimes, over the agreeing prefix and
    the step where the two part (both read it from the same prefix). Parting is allowed only
    where transformers' own token and vLLM's lie within ``2 * tolerance`` of each other: each
    runtime's log-probs may be off by ``tolerance``, so such a pair can swap places.

    Returns:
        ``agreeing_prefix``, ``compared`` (positions), ``max_abs_diff``, ``divergence`` (None, or
        the position, both tokens, transformers' gap between them and whether it is a tie), ``ok``.
    """
    n = min(len(vllm_ids), len(ours.token_ids))
    agree = next((i for i in range(n) if vllm_ids[i] != ours.token_ids[i]), n)
    compared = min(agree + 1, n)
    diffs = [abs(vllm_logprobs[i] - float(ours.logprobs[i, vllm_ids[i]])) for i in range(compared)]
    divergence = None
    if agree < n:
        gap = float(ours.logprobs[agree, ours.token_ids[agree]] - ours.logprobs[agree, vllm_ids[agree]])
        divergence = {"position": agree, "vllm_token": vllm_ids[agree], "transformers_token": ours.token_ids[agree],
                      "gap": gap, "tie": gap <= 2 * tolerance}
    max_diff = max(diffs, default=0.0)
    ok = max_diff <= tolerance and (divergence is None or divergence["tie"])
    return {"agreeing_prefix": agree, "compared": compared, "max_abs_diff": max_diff, "divergence": divergence,
            "ok": ok}


def tolerance_for(plan: Plan, reference: list[Greedy]) -> tuple[float, float | None, float | None]:
    """``(tolerance, bf16 yardstick, W8A8 yardstick)``: :data:`FP32_TOLERANCE` in float32; in
    bfloat16, :data:`BF16_FACTOR` times the artifact's own bfloat16 rounding; for a W8A8 folder, at
    least :data:`W8A8_FACTOR` times its own :func:`rounding_sensitivity`. Never below the float32 one."""
    tolerance, bf16, w8a8 = FP32_TOLERANCE, None, None
    if plan.dtype != "float32":
        bf16 = bf16_rounding(plan.path, plan.prompt_ids, reference)
        tolerance = max(tolerance, BF16_FACTOR * bf16)
    if plan.scheme is not None and plan.scheme.activations is not None:
        w8a8 = rounding_sensitivity(plan.path, plan.prompt_ids, reference)
        tolerance = max(tolerance, W8A8_FACTOR * w8a8)
    return tolerance, bf16, w8a8


def judge(plan: Plan, run: dict[str, Any]) -> dict[str, Any]:
    """The result record of one artifact, from vLLM's run and transformers' on the same prompt ids."""
    result: dict[str, Any] = {"runtime": "vllm", "artifact": str(plan.path), "format": plan.format,
                              "dtype": plan.dtype, "loads": run["loads"] and "error" not in run}
    cost = {k: run[k] for k in ("load_seconds", "generate_seconds") if k in run}
    if "error" in run:
        reason = run["error"]
        if "cpu_gemm_wna16" in reason:  # the kernel check above should have caught this first
            reason = f"this CPU lacks vLLM's weight-only int kernel (AVX-512 build only): {reason}"
        result.update({"error": f"vLLM failed at {run.get('failed_at', 'load')}: {reason}", "ok": False,
                       "cost": cost})
        return result
    start = time.perf_counter()
    ours = transformers_greedy(plan.path, plan.prompt_ids, plan.max_tokens)
    tolerance, yardstick, w8a8_yardstick = tolerance_for(plan, ours)
    cost["transformers_seconds"] = round(time.perf_counter() - start, 2)
    per_prompt = [compare_prompt(v["token_ids"], v["logprobs"], g, tolerance) for v, g in zip(run["prompts"], ours)]
    agree = [p["agreeing_prefix"] for p in per_prompt]
    result["greedy"] = {"prompts": len(per_prompt), "tokens": plan.max_tokens, "agreeing_prefix": agree,
                        "all_agree": min(agree) == plan.max_tokens,
                        "divergences": [p["divergence"] for p in per_prompt if p["divergence"]]}
    result["logprob"] = {"max_abs_diff": max(p["max_abs_diff"] for p in per_prompt), "tolerance": tolerance,
                         "bf16_rounding": yardstick, "rounding_sensitivity": w8a8_yardstick,
                         "compared_tokens": sum(p["compared"] for p in per_prompt),
                         "ok": all(p["max_abs_diff"] <= tolerance for p in per_prompt)}
    result["ok"] = all(p["ok"] for p in per_prompt)
    result["samples"] = [{"prompt": text, "prompt_ids": ids, "vllm": v, "transformers": g.token_ids}
                         for text, ids, v, g in zip(plan.prompts, plan.prompt_ids, run["prompts"], ours)]
    result["cost"] = cost
    return result


def reference_versions() -> dict[str, str]:
    """The versions on slimforge's side of the comparison."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for package in ("transformers", "torch", "compressed-tensors"):
        try:
            out[package.replace("-", "_")] = version(package)
        except PackageNotFoundError:
            continue
    return out


def check_plans(plans: list[Plan]) -> list[dict[str, Any]]:
    """Run inspected artifacts (:func:`plan_check`) in one vLLM process and judge each against transformers."""
    start = time.perf_counter()
    run = run_vllm(plans)
    startup = (time.perf_counter() - start - sum(m.get("load_seconds", 0) + m.get("generate_seconds", 0)
                                                  for m in run["models"])) / len(plans)
    results = []
    for plan, model_run in zip(plans, run["models"]):
        began = time.perf_counter()
        result = judge(plan, model_run)
        result["versions"] = {"vllm_env": run["versions"], "reference": reference_versions()}
        result["cost"]["vllm_startup_share_seconds"] = round(startup, 2)
        result["seconds"] = round(startup + model_run.get("load_seconds", 0) + model_run.get("generate_seconds", 0)
                                  + time.perf_counter() - began, 1)
        results.append(result)
        log.info("vLLM check of %s: %s", plan.path, "agrees" if result["ok"] else "DISAGREES")
    return results


def check_vllm_many(paths: list[Path], prompts: tuple[str, ...] = PROMPTS, max_tokens: int = 16,
                    dtype: str = "auto") -> list[dict[str, Any]]:
    """Check several artifacts in one vLLM process (its start-up, ~15 s, is paid once).

    Every folder is inspected before vLLM starts, so a folder it cannot take fails the call at
    once. See :func:`check_vllm` for the arguments and the record.
    """
    return check_plans([plan_check(Path(p), prompts, max_tokens, dtype) for p in paths])


def check_vllm(path: Path, prompts: tuple[str, ...] = PROMPTS, max_tokens: int = 16,
               dtype: str = "auto") -> dict[str, Any]:
    """Run ``path`` in vLLM's CPU build and compare its greedy generation with transformers'.

    Args:
        path: a model folder: full precision, or compressed-tensors (rtn / gptq / awq / w8a8 stages).
        prompts: English prompts, tokenized by the artifact's tokenizer; both runtimes get the ids.
        max_tokens: greedy tokens generated per prompt.
        dtype: what vLLM computes in: ``auto`` (float32 where its CPU kernels allow, else
            bfloat16), ``float32`` or ``bfloat16``. transformers, the reference, always runs in float32.

    Returns:
        ``{"runtime": "vllm", "artifact", "format", "dtype", "loads", "seconds", "cost",
        "greedy": {"prompts", "tokens", "agreeing_prefix", "all_agree", "divergences"},
        "logprob": {"max_abs_diff", "tolerance", "bf16_rounding", "rounding_sensitivity", "compared_tokens",
        "ok"},
        "samples", "ok", "versions"}``; a folder vLLM fails to load or run has ``loads`` False,
        ``error`` and ``ok`` False instead of the comparison.

    Raises:
        RuntimeCheckError: a folder vLLM's CPU build cannot take (one line: the scheme and why).
        RuntimeMissingError: vLLM is not installed (``slimforge runtime install vllm``).
    """
    return check_vllm_many([path], prompts, max_tokens, dtype)[0]


if __name__ == "__main__":  # pragma: no cover - python -m slimforge.runtimes.vllm FOLDER...
    logging.basicConfig(level=logging.INFO)
    for record in check_vllm_many([Path(a) for a in sys.argv[1:]]):
        print(json.dumps({k: v for k, v in record.items() if k != "samples"}))
