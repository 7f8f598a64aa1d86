"""Where W8A8's error comes from on the real SmolLM2-135M teacher: weights, activations, and each layer type.

Rounds, in the bf16 teacher, only the weights (per output channel, min-max, round to nearest), only
the inputs of every decoder linear (per token, dynamic), or both, on the int8 and the FP8 E4M3
grids, with slimforge's own W8A8 math (:mod:`slimforge.quantize.w8a8`), no smoothing and no GPTQ;
then, with ``--per-type``, the inputs of one layer type at a time. Scored like
bench/quant_quality.py: perplexity on 16 held-out Shakespeare blocks of 512 tokens, as a ratio to
the bf16 teacher's (the baseline, from the same run), KL to the fp32 teacher and top-1 agreement.

The activation-only rows are a floor for any method that changes the weights only (GPTQ, AWQ,
SmoothQuant's weight side): they are what rounding the inputs alone costs.

    .venv/bin/python bench/w8a8_error_split.py [--kinds fp8,int8] [--per-type]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from quant_quality import Scorer  # noqa: E402

from slimforge.config import DataConfig  # noqa: E402
from slimforge.data import blocks_tensor, build_data  # noqa: E402
from slimforge.models import asset_model_folder, load_model  # noqa: E402
from slimforge.quantize.w8a8 import fake_quantize, fake_quantize_activation, weight_scales  # noqa: E402

TYPES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kinds", default="fp8,int8")
    parser.add_argument("--per-type", action="store_true", help="also round one layer type's inputs at a time")
    parser.add_argument("--eval-blocks", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    folder = asset_model_folder("smollm2-135m")
    teacher, tokenizer = load_model(str(folder), dtype=torch.float32)
    bundle = build_data(DataConfig(asset="shakespeare", block_size=512), tokenizer)
    scorer = Scorer(teacher, blocks_tensor(bundle.heldout, args.eval_blocks), 4)
    model = load_model(str(folder), dtype=torch.float32, with_tokenizer=False)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    base = scorer.score(model)["perplexity"]
    print(f"bf16 baseline: perplexity {base:.3f}")
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}
    original = {n: m.weight.detach().clone() for n, m in linears.items()}

    def run(label: str, kind: str, weight_types: set[str], input_types: set[str]) -> None:
        hooks = []
        with torch.no_grad():
            for name, linear in linears.items():
                linear.weight.copy_(original[name])
                kind_of = name.rsplit(".", 1)[-1]
                if kind_of in weight_types:
                    scales = weight_scales(linear.weight, kind, True, torch.bfloat16)
                    linear.weight.copy_(fake_quantize(linear.weight.float(), scales, kind))
                if kind_of in input_types:
                    hooks.append(linear.register_forward_pre_hook(
                        lambda module, inputs, k=kind: (fake_quantize_activation(inputs[0], k), *inputs[1:])))
        started = time.perf_counter()
        result = scorer.score(model)
        for hook in hooks:
            hook.remove()
        print(f"{label:<34} ratio {result['perplexity'] / base:.4f}  KL {result['kl']:.4f}  "
              f"top-1 {result['top1']:.3f}  ({time.perf_counter() - started:.0f} s)", flush=True)

    every = set(TYPES)
    for kind in args.kinds.split(","):
        run(f"{kind} weights only", kind, every, set())
        run(f"{kind} activations only", kind, set(), every)
        run(f"{kind} weights and activations", kind, every, every)
        if args.per_type:
            for layer_type in TYPES:
                run(f"{kind} activations of {layer_type} only", kind, set(), {layer_type})


if __name__ == "__main__":
    main()
