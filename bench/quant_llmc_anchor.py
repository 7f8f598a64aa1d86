"""The llm-compressor anchor of bench/quant_quality.py; runs inside bench/.venv-llmc.

Quantizes a model folder with llm-compressor's GPTQ (W4A16: int4, symmetric, in groups of
``--group-size``; ``actorder=static``, dampening 0.01, block 128, as slimforge's defaults) on the calibration
token ids it is given, times ``oneshot`` alone, saves the compressed-tensors folder (size on
disk), and writes the quantized decoder weights it computed (safetensors) so that the caller
scores both tools with the same code.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--calib", required=True, help="int64 tensor [n, seq_len] saved with torch.save")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--actorder", default="static")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out-dir", required=True, help="the compressed-tensors folder to write")
    parser.add_argument("--weights", required=True, help="safetensors file for the quantized decoder weights")
    parser.add_argument("--report", required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = torch.load(args.calib)
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    scheme = {"targets": ["Linear"], "weights": {"num_bits": args.bits, "type": "int", "symmetric": True,
                                                 "strategy": "group", "group_size": args.group_size}}
    modifier = GPTQModifier(config_groups={"group_0": scheme}, ignore=["lm_head"], block_size=128,
                            dampening_frac=0.01, actorder=args.actorder)
    start = time.perf_counter()
    oneshot(model=model, dataset=ds, recipe=[modifier], num_calibration_samples=len(ids),
            max_seq_length=ids.shape[1], shuffle_calibration_samples=False, batch_size=args.batch_size)
    seconds = time.perf_counter() - start
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
        json.dump({"seconds": seconds, "size_on_disk_bytes": size, "llmcompressor": llmcompressor.__version__,
                   "compressed_tensors": compressed_tensors.__version__, "transformers": transformers.__version__,
                   "torch": torch.__version__}, fh)


if __name__ == "__main__":
    main()
