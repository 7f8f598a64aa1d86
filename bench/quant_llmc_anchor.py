"""The llm-compressor anchors of bench/quant_quality.py; runs inside bench/.venv-llmc.

Quantizes a model folder with one llm-compressor scheme on the calibration token ids it is
given, times ``oneshot`` alone, and saves the compressed-tensors folder (its size on disk,
and what the caller scores: slimforge's own loader reads it back, so both tools' artifacts
are evaluated by the same code, activation quantization included). For the weight-only
schemes it also writes the dequantized decoder weights it computed (safetensors).

Schemes (``--scheme``), each llm-compressor's documented recipe at slimforge's settings:
- ``gptq``: GPTQ W4A16 (int4, symmetric, groups of ``--group-size``; ``actorder=static``,
  dampening 0.01, block 128, as slimforge's defaults);
- ``awq``: ``AWQModifier`` (duo scaling, 20-point grid) then round-to-nearest W4A16,
  symmetric like slimforge's format (llm-compressor's own AWQ default is asymmetric);
- ``w8a8``: ``SmoothQuantModifier`` (strength ``--alpha``) then GPTQ with the ``W8A8`` preset
  (int8 per-channel weights, int8 per-token dynamic activations);
- ``fp8_dynamic``: the ``FP8_DYNAMIC`` preset (E4M3 per-channel weights, per-token dynamic
  activations; no calibration);
- ``fp8``: the ``FP8`` preset (E4M3 per-tensor weights, static per-tensor activations from
  calibration).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

SCHEMES = ("gptq", "awq", "w8a8", "fp8_dynamic", "fp8")


def recipe(args: argparse.Namespace) -> list:
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier

    w4 = {"group_0": {"targets": ["Linear"],
                      "weights": {"num_bits": args.bits, "type": "int", "symmetric": True, "strategy": "group",
                                  "group_size": args.group_size}}}
    if args.scheme == "gptq":
        return [GPTQModifier(config_groups=w4, ignore=["lm_head"], block_size=128, dampening_frac=0.01,
                             actorder=args.actorder)]
    if args.scheme == "awq":
        from llmcompressor.modifiers.transform.awq import AWQModifier
        from llmcompressor.pipelines.cache import IntermediatesCache

        if not torch.cuda.is_available():
            # llm-compressor 0.14's AWQ pins its cached activations for faster GPU transfers,
            # unconditionally; pinning needs an accelerator and fails on a CPU-only machine.
            IntermediatesCache.pin_memory = lambda self, *a, **k: None

        return [AWQModifier(duo_scaling=True, n_grid=20), QuantizationModifier(config_groups=w4, ignore=["lm_head"])]
    if args.scheme == "w8a8":
        from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier

        return [SmoothQuantModifier(smoothing_strength=args.alpha),
                GPTQModifier(scheme="W8A8", targets=["Linear"], ignore=["lm_head"], dampening_frac=0.01)]
    preset = {"fp8_dynamic": "FP8_DYNAMIC", "fp8": "FP8"}[args.scheme]
    return [QuantizationModifier(scheme=preset, targets=["Linear"], ignore=["lm_head"])]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--calib", required=True, help="int64 tensor [n, seq_len] saved with torch.save")
    parser.add_argument("--scheme", choices=SCHEMES, default="gptq")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--actorder", default="static")
    parser.add_argument("--alpha", type=float, default=0.8, help="SmoothQuant strength (w8a8)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out-dir", required=True, help="the compressed-tensors folder to write")
    parser.add_argument("--weights", default=None, help="safetensors file for the dequantized decoder weights")
    parser.add_argument("--report", required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from datasets import Dataset
    from llmcompressor import oneshot
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = torch.load(args.calib)
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    start = time.perf_counter()
    oneshot(model=model, dataset=ds, recipe=recipe(args), num_calibration_samples=len(ids),
            max_seq_length=ids.shape[1], shuffle_calibration_samples=False, batch_size=args.batch_size)
    seconds = time.perf_counter() - start
    if args.weights:
        weights = {name: p.detach().float().contiguous().clone() for name, p in model.named_parameters()
                   if ".layers." in name and name.endswith("proj.weight")}
        save_file(weights, args.weights)
    model.to(torch.bfloat16)  # stored like slimforge's artifact: bf16 scales and unquantized tensors
    model.save_pretrained(args.out_dir, save_compressed=True)
    AutoTokenizer.from_pretrained(args.model).save_pretrained(args.out_dir)
    import compressed_tensors
    import llmcompressor
    import transformers

    size = sum(p.stat().st_size for p in Path(args.out_dir).glob("*.safetensors"))
    with open(args.report, "w") as fh:
        json.dump({"scheme": args.scheme, "seconds": seconds, "size_on_disk_bytes": size,
                   "llmcompressor": llmcompressor.__version__, "compressed_tensors": compressed_tensors.__version__,
                   "transformers": transformers.__version__, "torch": torch.__version__}, fh)


if __name__ == "__main__":
    main()
