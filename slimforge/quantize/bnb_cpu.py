"""bitsandbytes' 4-bit layers on CPUs: which shapes its packed AVX512-BF16 kernel takes, and
how to keep the others on the plain path.

Apart from :mod:`slimforge.quantize.bnb` (the stage) because the loader, the trainer and the
model cards need this rule too, and none of them should import the stage; nothing here imports
bitsandbytes or torch.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

# bitsandbytes' AVX512-BF16 CPU kernel for 4-bit weights computes tiles of 32 output rows.
PACKED_CPU_TILE_ROWS = 32
# The same rule for model cards, whose readers load with plain transformers (no slimforge).
PLAIN_PATH_SNIPPET = [
    "# On CPUs with AVX512-BF16, bitsandbytes repacks 4-bit layers for a faster kernel and fails",
    "# on widths that kernel cannot tile: keep those layers on the plain path.",
    "for m in model.modules():",
    "    if getattr(m, \"support_avx512bf16_for_cpu\", False) and (",
    f"            m.out_features % {PACKED_CPU_TILE_ROWS} or m.in_features % m.weight.blocksize):",
    "        m.support_avx512bf16_for_cpu = False",
]


def fits_packed_cpu_layout(in_features: int, out_features: int, blocksize: int) -> bool:
    """Whether bitsandbytes can repack a 4-bit weight of this shape for its AVX512-BF16 CPU kernel.

    The repacking (``bitsandbytes.functional._convert_weight_packed_for_cpu``) tiles the output
    rows by 32 and reshapes the scales to whole quantization blocks per input row, so both must
    divide: SmolLM2's 576 fits, the default student's 432 (and tiny test widths) do not.
    """
    return out_features % PACKED_CPU_TILE_ROWS == 0 and in_features % blocksize == 0


def keep_4bit_layers_off_cpu_packing(model: Any, everywhere: bool = False) -> list[str]:
    """Keep bitsandbytes' 4-bit layers that cannot be repacked on the plain CPU path.

    On a CPU with AVX512-BF16, ``Linear4bit.forward`` in eval mode without gradients repacks its
    weight for a faster kernel on the first call, and a shape that does not fit raises there
    (``shape '[576, 6]' is invalid``). Clearing the layer's ``support_avx512bf16_for_cpu`` keeps it
    on dequantize-and-matmul, which every CPU runs; fitting layers keep the fast path. CPUs
    without the instruction never set the flag, so nothing changes there. Call it before the
    model's first forward pass: a weight already repacked stays repacked.

    Args:
        model: any model, possibly wrapped by peft; only bitsandbytes 4-bit layers are touched.
        everywhere: keep every 4-bit layer off the packed path, for a base that will be trained
            (QLoRA): the packed kernel has no backward, so an evaluation between training steps
            would leave later gradients silently wrong.

    Returns:
        The names of the layers this call moved off the packed path.
    """
    moved = []
    for name, module in model.named_modules():
        if not getattr(module, "support_avx512bf16_for_cpu", False):
            continue
        weight = module.weight
        state = getattr(weight, "quant_state", None)
        blocksize = state.blocksize if state is not None else weight.blocksize
        if everywhere or not fits_packed_cpu_layout(module.in_features, module.out_features, blocksize):
            module.support_avx512bf16_for_cpu = False
            moved.append(name)
    if moved and not everywhere:
        log.info("%d bitsandbytes 4-bit layers keep the plain CPU path (widths the AVX512-BF16 kernel "
                 "cannot tile)", len(moved))
    return moved
