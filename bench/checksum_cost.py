"""What recording and checking artifact checksums costs on the default recipe's artifacts.

The default recipe (SmolLM2-135M teacher) publishes a depth-pruned student (24 of 30
layers, 113M parameters), a width-pruned one (hidden 432, MLP 1280: 77M), its healed copy
(same shapes) and an NF4 copy. This builds random-init models of those shapes, saves
each as the pipeline does (``save_pretrained``, fp32 safetensors), then times
``write_checksums`` (at publish) and ``checksum_problem`` (at every reuse) on the saved
folder, against the save itself as the baseline. Files are warm in the page cache, as they
are right after a save; a cold read from disk is bounded by the disk instead.

    .venv/bin/python bench/checksum_cost.py
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

# The default recipe's fp32 artifacts: name -> (layers, hidden, MLP); vocab, heads as SmolLM2-135M.
ARTIFACTS = {"depth": (24, 576, 1536), "width": (24, 432, 1280), "heal": (24, 432, 1280)}


def build(layers: int, hidden: int, mlp: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=49152, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
                         num_attention_heads=9, num_key_value_heads=3, head_dim=64, tie_word_embeddings=True)
    return LlamaForCausalLM(config).to(torch.float32)


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(shape: tuple[int, int, int], folder: Path) -> dict[str, float]:
    """Save one artifact's model, then time recording and (best of 3) verifying its checksums."""
    from slimforge.fsutil import checksum_problem, write_checksums

    model = build(*shape)
    out = {"params": sum(p.numel() for p in model.parameters()),
           "save": seconds(lambda: model.save_pretrained(folder, safe_serialization=True))}
    out["write"] = seconds(lambda: write_checksums(folder))
    out["verify"] = min(seconds(lambda: checksum_problem(folder)) for _ in range(3))
    out["bytes"] = sum(p.stat().st_size for p in folder.iterdir())
    return out


def main() -> None:
    totals = {"bytes": 0.0, "save": 0.0, "write": 0.0, "verify": 0.0}
    print(f"{'artifact':<8} {'params':>8} {'MB':>7} {'save s':>7} {'record s':>9} {'verify s':>9} {'verify/save':>12}")
    with tempfile.TemporaryDirectory(prefix="checksum-bench-") as tmp:
        for name, shape in ARTIFACTS.items():
            row = measure(shape, Path(tmp) / name)
            print(f"{name:<8} {row['params'] / 1e6:>7.1f}M {row['bytes'] / 1e6:>7.0f} {row['save']:>7.2f} "
                  f"{row['write']:>9.2f} {row['verify']:>9.2f} {row['verify'] / row['save']:>11.2f}x")
            for key in totals:
                totals[key] += row[key]
    rate = totals["bytes"] / 1e6 / totals["verify"]
    print(f"{'total':<8} {'':>8} {totals['bytes'] / 1e6:>7.0f} {totals['save']:>7.2f} {totals['write']:>9.2f} "
          f"{totals['verify']:>9.2f} {totals['verify'] / totals['save']:>11.2f}x   ({rate:.0f} MB/s)")


if __name__ == "__main__":
    main()
