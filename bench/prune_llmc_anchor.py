"""The llm-compressor anchor of bench/prune_quality.py; runs inside bench/.venv-llmc.

Prunes a model folder with llm-compressor's Wanda or SparseGPT on the calibration token ids
it is given, times ``oneshot`` alone, and writes the pruned decoder weights (safetensors)
plus the timing (JSON), so the caller evaluates both tools with the same code.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--calib", required=True, help="int64 tensor [n, seq_len] saved with torch.save")
    parser.add_argument("--method", choices=("wanda", "sparsegpt"), required=True)
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--mask", default="0:0", help="N:M mask structure, 0:0 for unstructured")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", required=True)
    parser.add_argument("--report", required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    ids = torch.load(args.calib)
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    common = {"sparsity": args.sparsity, "mask_structure": args.mask, "targets": ["Linear"], "ignore": ["lm_head"]}
    modifier = WandaPruningModifier(**common) if args.method == "wanda" else SparseGPTModifier(
        block_size=128, dampening_frac=0.01, **common)
    start = time.perf_counter()
    oneshot(model=model, dataset=ds, recipe=[modifier], num_calibration_samples=len(ids),
            max_seq_length=ids.shape[1], shuffle_calibration_samples=False, batch_size=args.batch_size)
    seconds = time.perf_counter() - start
    weights = {name: p.detach().contiguous().clone() for name, p in model.named_parameters()
               if ".layers." in name and name.endswith("proj.weight")}
    save_file(weights, args.out)
    import llmcompressor
    import transformers

    with open(args.report, "w") as fh:
        json.dump({"seconds": seconds, "llmcompressor": llmcompressor.__version__,
                   "transformers": transformers.__version__, "torch": torch.__version__}, fh)


if __name__ == "__main__":
    main()
