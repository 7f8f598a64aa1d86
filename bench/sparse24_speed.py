"""2:4 semi-structured sparse matmul speed-up on a CUDA GPU, with torch's sparse tensors.

For the linear shapes of Llama-family models, a weight pruned to 2:4 is converted with
``torch.sparse.to_sparse_semi_structured`` (cuSPARSELt or CUTLASS kernels) and timed against
the same dense weight, at several token counts, in fp16 and bf16. Outputs are checked against
the dense product of the same (pruned) weight first. Prints a table of times and speed-ups.

Then a whole model: a random-init Llama config pruned 2:4 by magnitude in every decoder
linear (slimforge's mask), its linears swapped to semi-structured weights, prefill tokens/s
against the dense model.

    .venv/bin/python bench/sparse24_speed.py            # needs CUDA (Ampere or newer)

On a machine without CUDA it exits with a one-line message and status 2: the kernels are GPU-only.
"""

from __future__ import annotations

import argparse
import sys
import time

SHAPES = {  # (out, in) of q/o, gate/up and down in Llama-3.2-1B and Llama-3.1-8B
    "1B q/o 2048x2048": (2048, 2048), "1B up 8192x2048": (8192, 2048), "1B down 2048x8192": (2048, 8192),
    "8B q/o 4096x4096": (4096, 4096), "8B up 14336x4096": (14336, 4096), "8B down 4096x14336": (4096, 14336),
}


def timed(fn, repeats: int) -> float:
    import torch

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def two_four(weight):
    """``weight`` with the 2 smallest magnitudes of every 4 consecutive inputs zeroed (slimforge's N:M mask)."""
    from slimforge.prune.unstructured import apply_mask, magnitude_scores, prune_mask

    weight = weight.clone()
    apply_mask(weight, prune_mask(magnitude_scores(weight), 0.5, "row", 2, 4))
    return weight


def matmul_table(args) -> None:
    import torch
    from torch.sparse import to_sparse_semi_structured

    print(f"{'shape':<22}{'dtype':>6}{'tokens':>8}{'dense ms':>10}{'2:4 ms':>9}{'speed-up':>10}")
    for dtype in (getattr(torch, name) for name in args.dtypes):
        for name, (out, inp) in SHAPES.items():
            weight = two_four(torch.randn(out, inp, device="cuda", dtype=dtype))
            sparse = to_sparse_semi_structured(weight)
            for tokens in args.tokens:
                x = torch.randn(tokens, inp, device="cuda", dtype=dtype)
                want = torch.nn.functional.linear(x, weight)
                got = torch.nn.functional.linear(x, sparse)
                torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-1)
                dense_s = timed(lambda x=x, w=weight: torch.nn.functional.linear(x, w), args.repeats)
                sparse_s = timed(lambda x=x, w=sparse: torch.nn.functional.linear(x, w), args.repeats)
                print(f"{name:<22}{str(dtype)[6:]:>6}{tokens:>8}{dense_s * 1e3:>10.3f}{sparse_s * 1e3:>9.3f}"
                      f"{dense_s / sparse_s:>9.2f}x", flush=True)


def model_prefill(args) -> None:
    import torch
    from torch.sparse import to_sparse_semi_structured
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).to("cuda", torch.float16).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            for module in layer.modules():
                if isinstance(module, torch.nn.Linear):
                    module.weight.copy_(two_four(module.weight))
    ids = torch.randint(0, 49152, (args.batch, args.seq), device="cuda")
    with torch.no_grad():
        dense_logits = model(input_ids=ids).logits.float()
        dense_s = timed(lambda: model(input_ids=ids), args.repeats)
        for layer in model.model.layers:
            for module in layer.modules():
                if isinstance(module, torch.nn.Linear):
                    module.weight = torch.nn.Parameter(to_sparse_semi_structured(module.weight), requires_grad=False)
        sparse_logits = model(input_ids=ids).logits.float()
        sparse_s = timed(lambda: model(input_ids=ids), args.repeats)
    agree = (dense_logits.argmax(-1) == sparse_logits.argmax(-1)).float().mean().item()
    tokens = args.batch * args.seq
    print(f"\nLlama 16 x 2048 (2:4 in every decoder linear), fp16 prefill {args.batch} x {args.seq}: dense "
          f"{tokens / dense_s:,.0f} tok/s, 2:4 {tokens / sparse_s:,.0f} tok/s, speed-up {dense_s / sparse_s:.2f}x "
          f"(top-1 agreement of the two {agree:.4f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[16, 256, 2048, 8192])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--dtypes", nargs="+", default=["float16", "bfloat16"])
    parser.add_argument("--backend", choices=["auto", "cutlass"], default="auto",
                        help="auto: torch's choice (cuSPARSELt where it is built in); cutlass: force CUTLASS kernels")
    parser.add_argument("--no-model", action="store_true", help="the matmul table only")
    args = parser.parse_args()
    import torch
    from torch.sparse import SparseSemiStructuredTensor

    if not torch.cuda.is_available():
        print("sparse24_speed: 2:4 semi-structured kernels need a CUDA GPU (Ampere or newer); "
              "run this on one", file=sys.stderr)
        raise SystemExit(2)
    if args.backend == "cutlass" and torch.cuda.get_device_capability()[0] != 8:
        print("sparse24_speed: torch's CUTLASS 2:4 kernels run only on compute capability 8.x (Ampere, Ada); "
              "use --backend auto on this GPU", file=sys.stderr)
        raise SystemExit(2)
    SparseSemiStructuredTensor._FORCE_CUTLASS = args.backend == "cutlass"

    print(f"2:4 sparse matmul on {torch.cuda.get_device_name()}, torch {torch.__version__}, backend {args.backend}")
    matmul_table(args)
    if not args.no_model:
        model_prefill(args)


if __name__ == "__main__":
    main()
