"""What a decoder block's linear layers saw during calibration: per-linear input statistics.

:func:`record_linear_inputs` ``(linears, hessian=False)``: a context manager yielding an
:class:`InputRecorder`; while a block runs (:meth:`slimforge.calibration.layerwise.LayerStep.run`)
it accumulates, per linear layer, an :class:`InputStats`: ``act_sq`` (mean squared input per
column), ``act_abs`` (mean magnitude per column, AWQ's), ``act_max`` (largest magnitude per
column, SmoothQuant's and static activation scales'), ``act_norm`` (Wanda's ``||X_j||``),
``tokens`` and, with ``hessian=True``, ``hessian`` (running mean of ``x x^T``,
:class:`slimforge.calibration.hessian.HessianAccumulator`). ``recorder[name]`` reads them.
Linears fed the same tensor (q/k/v, gate/up) share one accumulator, so each Hessian is
computed once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn as nn

from slimforge.calibration.hessian import HessianAccumulator


class InputStats:
    """Statistics of the inputs one linear layer (or a group fed the same tensor) saw."""

    def __init__(self, columns: int, hessian: bool, device: torch.device, sample_stride: int = 0) -> None:
        self.sample_stride = sample_stride  # > 0: also keep every sample_stride-th input row (``rows``)
        self._rows: list[torch.Tensor] = []
        self.act_sq = torch.zeros(columns, device=device, dtype=torch.float32)
        self.act_abs = torch.zeros(columns, device=device, dtype=torch.float32)  # mean |x| (AWQ's salience)
        self.act_max = torch.zeros(columns, device=device, dtype=torch.float32)  # max |x| (SmoothQuant's)
        self.tokens = 0
        self.hessian_acc = HessianAccumulator(columns, device=device) if hessian else None

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        n = x.shape[0]
        total = self.tokens + n
        self.act_sq.mul_(self.tokens / total).add_(x.pow(2).sum(0), alpha=1.0 / total)
        magnitude = x.abs()
        self.act_abs.mul_(self.tokens / total).add_(magnitude.sum(0), alpha=1.0 / total)
        torch.maximum(self.act_max, magnitude.amax(0), out=self.act_max)
        self.tokens = total
        if self.hessian_acc is not None:
            self.hessian_acc.add(x)
        if self.sample_stride:
            self._rows.append(x[::self.sample_stride].clone())

    @property
    def rows(self) -> torch.Tensor:
        """The kept input rows [n, columns] fp32 (every ``sample_stride``-th of each batch)."""
        if not self.sample_stride:
            raise RuntimeError("no input rows were kept: use record_linear_inputs(..., sample_stride=n)")
        return torch.cat(self._rows)

    @property
    def hessian(self) -> torch.Tensor:
        if self.hessian_acc is None:
            raise RuntimeError("the Hessian was not recorded: use record_linear_inputs(..., hessian=True)")
        return self.hessian_acc.hessian

    @property
    def act_norm(self) -> torch.Tensor:
        """The L2 norm of each input column over all tokens (Wanda's ``||X_j||``)."""
        return (self.act_sq * self.tokens).sqrt()


class InputRecorder:
    """Hooks on some linear layers that fold their inputs into :class:`InputStats`.

    The hooks only keep references; statistics are computed once per distinct input tensor
    when a forward is complete (a linear seeing its next input marks the next batch), so
    linears fed the same tensor (q/k/v, gate/up) share one accumulator and at most one
    batch's inputs are held.
    """

    def __init__(self, linears: dict[str, nn.Linear], hessian: bool, sample_stride: int = 0) -> None:
        self._hessian = hessian
        self._sample_stride = sample_stride
        self._stats: dict[str, InputStats] = {}
        self._pending: list[tuple[str, torch.Tensor]] = []
        self._handles = [linear.register_forward_pre_hook(self._hook(name)) for name, linear in linears.items()]

    def _hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            if any(seen == name for seen, _ in self._pending):
                self.flush()
            self._pending.append((name, args[0]))  # the very object: identity marks shared inputs

        return hook

    def flush(self) -> None:
        """Fold the inputs seen since the last flush into the statistics."""
        groups: list[tuple[torch.Tensor, list[str]]] = []
        for name, tensor in self._pending:
            for seen, names in groups:
                if seen is tensor:
                    names.append(name)
                    break
            else:
                groups.append((tensor, [name]))
        self._pending.clear()
        for tensor, names in groups:
            acc = next((self._stats[n] for n in names if n in self._stats), None)
            if acc is None:
                acc = InputStats(tensor.shape[-1], self._hessian, tensor.device, self._sample_stride)
            for n in names:
                self._stats[n] = acc
            acc.add(tensor)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.flush()

    def __getitem__(self, name: str) -> InputStats:
        self.flush()
        return self._stats[name]

    def __contains__(self, name: object) -> bool:
        self.flush()
        return name in self._stats

    def names(self) -> list[str]:
        self.flush()
        return list(self._stats)


@contextlib.contextmanager
def record_linear_inputs(linears: dict[str, nn.Linear], hessian: bool = False,
                         sample_stride: int = 0) -> Iterator[InputRecorder]:
    """Accumulate :class:`InputStats` for each of ``linears`` while a block runs; see :class:`InputRecorder`."""
    recorder = InputRecorder(linears, hessian, sample_stride)
    try:
        yield recorder
    finally:
        recorder.remove()
