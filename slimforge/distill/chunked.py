"""Memory-lean distillation: the vocabulary projection runs chunk by chunk.

The naive KD step materializes [tokens x vocab] logits for both models, their
fp32 log-softmaxes and the logits' gradient: for a 49k vocabulary and 8 x 1024
tokens that is several GB. Here the student's hidden states (and the teacher's,
or its cached top-k) go in; each chunk of tokens gets its logits, its fp32
softmax and its loss, and **the gradient is computed right there** (the lm_head
is linear, so d loss / d hidden = d loss / d logits @ W and d loss / d W =
(d loss / d logits)^T @ hidden). Only the chunk's logits ever exist, and the
backward pass has nothing to recompute: the stored gradients are scaled by the
incoming gradient and returned. This is activation checkpointing taken one step
further (the chunk is never re-run), the approach of fused linear-loss kernels,
written in plain torch so it runs on CPU and GPU alike.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from slimforge.distill.losses import upcast

ChunkLoss = Callable[[torch.Tensor, slice], torch.Tensor]


class _ChunkedHeadLoss(torch.autograd.Function):
    """sum over chunks of ``chunk_loss(head(hidden[chunk]), chunk)``, with gradients formed per chunk."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                chunk_loss: ChunkLoss, chunk_size: int, transform: Callable | None) -> torch.Tensor:
        needs = ctx.needs_input_grad
        grad_hidden = torch.zeros_like(hidden) if needs[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=upcast(weight).dtype, device=weight.device) if needs[1] else None
        grad_bias = torch.zeros(bias.shape, dtype=upcast(bias).dtype, device=bias.device) if bias is not None and needs[2] else None
        total = torch.zeros((), dtype=upcast(hidden).dtype, device=hidden.device)
        # A chunk loss that forms its own gradient (e.g. FusedForwardKL) skips autograd,
        # unless a logit transform must be differentiated through.
        fused = transform is None and hasattr(chunk_loss, "value_and_grad")
        for start in range(0, hidden.shape[0], chunk_size):
            rows = slice(start, min(start + chunk_size, hidden.shape[0]))
            h = hidden[rows]
            if fused:
                raw = upcast(torch.nn.functional.linear(h, weight, bias))
                loss, d_logits = chunk_loss.value_and_grad(raw, rows)
                logits = None
            else:
                with torch.enable_grad():
                    raw = upcast(torch.nn.functional.linear(h, weight, bias)).detach().requires_grad_(True)
                    logits = transform(raw) if transform is not None else raw
                    loss = chunk_loss(logits, rows)
                    (d_logits,) = torch.autograd.grad(loss, raw)
            total += loss.detach()
            if grad_hidden is not None:
                grad_hidden[rows] = (d_logits.to(weight.dtype) @ weight).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight.addmm_(d_logits.t().to(grad_weight.dtype), upcast(h).to(grad_weight.dtype))
            if grad_bias is not None:
                grad_bias += d_logits.sum(0).to(grad_bias.dtype)
            del raw, logits, loss, d_logits
        # The gradients are kept on ctx, not saved tensors: backward scales them in
        # place and hands them over, so no second copy of the head's gradient
        # (vocab x hidden, often the largest tensor of a small model) is made.
        ctx.grads = (grad_hidden, grad_weight, grad_bias)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor):
        if ctx.grads is None:
            raise RuntimeError("chunked_head_loss supports one backward pass; do not use retain_graph=True with it")
        grads, ctx.grads = ctx.grads, None
        g_hidden, g_weight, g_bias = (g.mul_(grad_out.to(g.dtype)) if g is not None else None for g in grads)
        return (
            g_hidden,
            g_weight.to(ctx.weight_dtype) if g_weight is not None else None,
            g_bias.to(ctx.weight_dtype) if g_bias is not None else None,
            None, None, None,
        )


def chunked_head_loss(hidden: torch.Tensor, head: torch.nn.Linear, chunk_loss: ChunkLoss,
                      chunk_size: int = 1024, transform: Callable | None = None) -> torch.Tensor:
    """Apply ``head`` and ``chunk_loss`` chunk by chunk, never holding all logits.

    Args:
        hidden: [N, D] final hidden states (the input of ``head``), with grad.
        head: the lm_head (``nn.Linear``; its weight may be tied to the embedding).
        chunk_loss: ``(logits_fp32 [n, V], rows) -> scalar`` summed loss of those
            rows; it may close over teacher hidden states, targets and masks and
            index them with ``rows``.
        chunk_size: rows per chunk; memory grows with chunk_size x vocab.
        transform: applied to the fp32 logits before the loss (e.g. Gemma's soft-capping).

    Returns:
        The summed loss (a scalar), differentiable w.r.t. ``hidden`` and the head.
    """
    return _ChunkedHeadLoss.apply(hidden, head.weight, head.bias, chunk_loss, chunk_size, transform)


def softcap_transform(config: Any) -> Callable | None:
    """The logit post-processing some families apply after the lm_head (Gemma 2/3 soft-capping)."""
    cap = getattr(config, "final_logit_softcapping", None)
    if not cap:
        return None

    def softcap(logits: torch.Tensor) -> torch.Tensor:
        return torch.tanh(logits / cap) * cap

    return softcap
