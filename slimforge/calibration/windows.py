"""What a calibrating stage starts from: its model, and calibration windows of training text.

Every calibrated method (Wanda, SparseGPT, depth and width pruning, GPTQ) takes the same
windows for the same ``(num_samples, seq_len, seed)``, so two methods calibrated alike saw
the same tokens.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from slimforge.stage import StageContext


def calibration_windows(ctx: StageContext, cfg: Any) -> torch.Tensor:
    """``cfg.num_samples`` windows of ``cfg.seq_len`` tokens from the run's training split.

    Returns:
        int64 tensor [num_samples, seq_len] (see :func:`slimforge.data.calibration_samples`).
    """
    from slimforge.data import calibration_samples

    return calibration_samples(ctx.data(), cfg.num_samples, cfg.seq_len, ctx.seed)


def load_for_calibration(ctx: StageContext, offload_model: bool = False) -> tuple[Any, Any]:
    """The stage's parent model and tokenizer; with ``offload_model``, kept on the CPU so
    that :func:`slimforge.calibration.layerwise.layerwise` moves one block at a time to the device."""
    if offload_model:
        return ctx.parent.load(device="cpu", dtype=ctx.dtype)
    return ctx.load_parent()
