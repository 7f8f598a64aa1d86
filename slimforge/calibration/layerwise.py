"""Layer-by-layer calibration: run calibration tokens through a decoder one block at a time.

Pruning and quantization methods measure each decoder block on the inputs it sees in the
real model, after the blocks before it were already changed. Holding the whole model's
activations for N sequences is what makes research pruners run out of memory, so here only
one block's inputs (and, while they are produced, its outputs) are alive at once, on the
``offload`` device; each block visits the compute ``device`` during its turn, and
everything is sized by the calibration tensor, never by ``max_position_embeddings``.

API (stable; SparseGPT, Wanda, depth and width pruning and GPTQ build on it):

* :func:`layerwise` ``(model, input_ids, batch_size=8, device=None, offload="cpu", desc=None)``
  yields a :class:`LayerStep` per decoder block, in order (with ``desc``, under a progress bar
  of one tick per block). The first step comes after one cheap pass
  that records the inputs of block 0 and the keyword arguments the model gives each block
  (attention mask, rotary ``position_embeddings``, ``position_ids``: per block, so Gemma's
  sliding/global layers keep their own), taken from the model's own forward.

  - ``step.index``, ``step.layer`` (on ``device`` during the step), ``step.linears()``;
  - ``step.run(fn=None, keep_outputs=False)`` runs every calibration batch through the
    block; hooks the caller registered see them all; ``fn(inputs, outputs)`` is called per
    batch; ``keep_outputs=True`` stores the outputs as the next block's inputs (use it when
    the step does not change the block, to save a pass);
  - after the caller's loop body, unless the outputs were kept, the (changed) block runs
    once more to produce the next block's inputs, then moves back where it was.

What a block's linear layers saw is measured by
:func:`slimforge.calibration.activations.record_linear_inputs`. Example::

    for step in layerwise(model, ids, device=device):
        with record_linear_inputs(step.linears(), hessian=True) as stats:
            step.run()
        for name, linear in step.linears().items():
            ...  # prune or quantize linear with stats[name].hessian
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from slimforge import arch


class _StopForward(Exception):
    """Raised after the last block's inputs are recorded: the rest of the forward is not needed."""


@dataclass
class _Captured:
    hidden: list[torch.Tensor] = field(default_factory=list)  # per batch: block 0's input
    kwargs: list[list[dict[str, Any]]] = field(default_factory=list)  # per batch, per block


def _module_device(module: nn.Module) -> torch.device:
    for tensor in list(module.parameters()) + list(module.buffers()):
        return tensor.device
    return torch.device("cpu")


@contextlib.contextmanager
def _without_layers(model: nn.Module) -> Iterator[nn.ModuleList]:
    """Detach the decoder blocks for the duration, so ``model.to`` moves only the rest."""
    layers = arch.decoder_layers(model)
    arch.set_decoder_layers(model, nn.ModuleList())
    try:
        yield layers
    finally:
        arch.set_decoder_layers(model, layers)


@torch.no_grad()
def capture_block_inputs(model: nn.Module, input_ids: torch.Tensor, batch_size: int,
                         device: torch.device, offload: torch.device) -> _Captured:
    """Block 0's inputs and every block's keyword arguments, per batch, without running any block.

    Each block's ``forward`` is swapped for a recorder that returns its input unchanged; the
    final norm raises to cut the forward short, so the cost is the embedding lookup.
    """
    layers = arch.decoder_layers(model)
    home = _module_device(model.get_input_embeddings())
    with _without_layers(model):
        model.to(device)
    captured = _Captured()
    current: list[dict[str, Any]] = []

    def recorder(index: int) -> Callable[..., Any]:
        def record(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            if args:
                raise TypeError("decoder blocks are expected to take their extra inputs as keywords")
            if index == 0:
                captured.hidden.append(hidden_states.to(offload))
            current.append(dict(kwargs))
            if index == len(layers) - 1:
                raise _StopForward
            return hidden_states

        return record

    for i, layer in enumerate(layers):
        layer.forward = recorder(i)
    try:
        for start in range(0, len(input_ids), batch_size):
            current = []
            with contextlib.suppress(_StopForward):
                model(input_ids=input_ids[start:start + batch_size].to(device), use_cache=False)
            captured.kwargs.append(current)
    finally:
        for layer in layers:
            del layer.forward
        with _without_layers(model):
            model.to(home)
    return captured


def _first_output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple | list) else out


class LayerStep:
    """One decoder block's turn: its calibration inputs, and a way to run them through it."""

    def __init__(self, index: int, layer: nn.Module, hidden: list[torch.Tensor],
                 kwargs: list[dict[str, Any]], device: torch.device, offload: torch.device) -> None:
        self.index = index
        self.layer = layer
        self.inputs = hidden
        self._kwargs = kwargs
        self._device = device
        self._offload = offload
        self.outputs: list[torch.Tensor] | None = None

    def linears(self) -> dict[str, nn.Linear]:
        """The block's linear layers, by their name inside the block, without MoE routers (never pruned or
        quantized: :data:`slimforge.moe_layout.ROUTER_NAMES`). Inside :func:`slimforge.moe.unfused_experts` each
        expert's linears are here too (``mlp.experts.<e>.gate_proj``)."""
        from slimforge.moe_layout import is_router_name

        return {name: m for name, m in self.layer.named_modules()
                if isinstance(m, nn.Linear) and not is_router_name(name)}

    @torch.no_grad()
    def run(self, fn: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
            keep_outputs: bool = False) -> None:
        """Run every calibration batch through the block.

        Args:
            fn: called with (inputs, outputs) of each batch, both on the compute device.
            keep_outputs: store the outputs as the next block's inputs.
        """
        kept = []
        for hidden, kwargs in zip(self.inputs, self._kwargs):
            x = hidden.to(self._device)
            y = _first_output(self.layer(x, **kwargs))
            if fn is not None:
                fn(x, y)
            if keep_outputs:
                kept.append(y.to(self._offload))
        if keep_outputs:
            self.outputs = kept


def layerwise(model: nn.Module, input_ids: torch.Tensor, batch_size: int = 8,
              device: torch.device | str | None = None, offload: torch.device | str = "cpu",
              desc: str | None = None) -> Iterator[LayerStep]:
    """Yield each decoder block with its calibration inputs, propagating block by block.

    Args:
        model: a causal LM supported by :mod:`slimforge.arch`.
        input_ids: int64 [n, seq_len] calibration tokens.
        batch_size: sequences per block forward.
        device: where each block runs (default: where the model's embeddings are).
        offload: where the inputs wait between blocks.
        desc: show a progress bar (one tick per block, with an ETA) labelled ``desc``.
    """
    from slimforge.progress import progress_bar

    layers = arch.decoder_layers(model)
    device = torch.device(device) if device is not None else _module_device(model.get_input_embeddings())
    offload = torch.device(offload)
    captured = capture_block_inputs(model, input_ids, batch_size, device, offload)
    hidden = captured.hidden
    # A block's tick comes when the caller asks for the next one, i.e. once its work is done.
    blocks = enumerate(layers) if desc is None else progress_bar(enumerate(layers), desc=desc, total=len(layers),
                                                                 unit="layer")
    for index, layer in blocks:
        home = _module_device(layer)
        layer.to(device)
        step = LayerStep(index, layer, hidden, [kw[index] for kw in captured.kwargs], device, offload)
        try:
            yield step
            if step.outputs is None:
                step.run(keep_outputs=True)
        finally:
            layer.to(home)
        hidden = step.outputs
        step.inputs = []  # drop this block's inputs: only one block's activations live at once
        if device.type == "cuda":
            torch.cuda.empty_cache()
