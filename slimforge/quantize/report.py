"""What a quantized artifact costs: bits per weight, size on disk, memory footprint.

Bits per weight are measured from the files, not from the method's nominal width: every
tensor saved under a quantized module (packed codes, scales, zero points, bitsandbytes'
quantization maps and state) is counted, divided by the number of weights the module had
in full precision. ``bits_per_param`` does the same for the whole file over every
parameter of the original model, so unquantized embeddings count too.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

WEIGHT_SUFFIXES = (".safetensors", ".gguf")


def safetensors_sizes(path: str | Path) -> dict[str, int]:
    """Bytes of each tensor in a safetensors file, read from its header alone."""
    with open(path, "rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(length))
    return {key: info["data_offsets"][1] - info["data_offsets"][0]
            for key, info in header.items() if key != "__metadata__"}


def folder_tensor_sizes(folder: str | Path) -> dict[str, int]:
    """Bytes of every tensor in every safetensors file of a model folder."""
    sizes: dict[str, int] = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        sizes.update(safetensors_sizes(path))
    return sizes


def weight_files_size(folder: str | Path) -> int:
    """Bytes on disk of a folder's weight files (safetensors, gguf)."""
    return sum(p.stat().st_size for p in Path(folder).iterdir() if p.suffix in WEIGHT_SUFFIXES)


def bits_per_weight(tensor_bytes: dict[str, int], quantized_numel: dict[str, int]) -> float:
    """Stored bits of the quantized modules over their full-precision weight count.

    Args:
        tensor_bytes: saved tensor name -> bytes (see :func:`folder_tensor_sizes`).
        quantized_numel: quantized module name -> weights it had before quantization.
    """
    prefixes = tuple(f"{name}." for name in quantized_numel)
    stored = sum(size for key, size in tensor_bytes.items() if key.startswith(prefixes))
    total = sum(quantized_numel.values())
    return 8.0 * stored / total if total else float("nan")


def linear_numel(model: Any, names: list[str]) -> dict[str, int]:
    """Full-precision weight count of the named linear modules (from their in/out features)."""
    modules = dict(model.named_modules())
    return {name: int(modules[name].in_features) * int(modules[name].out_features) for name in names}


def artifact_report(folder: str | Path, quantized_numel: dict[str, int], num_parameters: int,
                    memory_footprint: int, seconds: float, tensor_bytes: dict[str, int] | None = None,
                    **extra: Any) -> dict[str, Any]:
    """The ``meta`` every quantization stage reports (see the module docstring).

    Args:
        tensor_bytes: stored bytes per (transformers-named) tensor; default: read from the
            folder's safetensors files.
    """
    sizes = tensor_bytes if tensor_bytes is not None else folder_tensor_sizes(folder)
    on_disk = weight_files_size(folder)
    report = {
        "bits_per_weight": round(bits_per_weight(sizes, quantized_numel), 4),
        "bits_per_param": round(8.0 * sum(sizes.values()) / num_parameters, 4),
        "quantized_weights": int(sum(quantized_numel.values())),
        "num_parameters": int(num_parameters),
        "size_on_disk_bytes": int(on_disk),
        "memory_footprint_bytes": int(memory_footprint),
        "quantize_seconds": round(seconds, 3),
    }
    report.update(extra)
    return report
