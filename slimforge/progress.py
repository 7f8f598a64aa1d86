"""The one progress bar: every stage that loops over layers, tensors, steps or batches shows it.

A thin layer over tqdm, so every bar behaves alike: on stderr, with a rate and an ETA; on
the main rank only (other ranks of ``accelerate launch`` would print the same bar again);
off when ``SLIMFORGE_PROGRESS=0``. Like tqdm's own default, a bar also shows when stderr is
not a terminal (a log file then still tells how far a long stage got and how long is left),
but it refreshes there at most every :data:`LOG_INTERVAL_S` seconds, so a long stage adds a
few hundred characters to the log rather than thousands of redraws.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import Any

ENV = "SLIMFORGE_PROGRESS"
# Seconds between redraws when stderr is a file or a pipe (tqdm's 0.1 s suits a terminal only).
LOG_INTERVAL_S = 30.0


def progress_enabled() -> bool:
    """Whether bars show: on the main rank, unless ``SLIMFORGE_PROGRESS=0``."""
    from slimforge.dist import is_main

    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off") and is_main()


def progress_bar(iterable: Iterable[Any] | None = None, *, desc: str, total: int | None = None,
                 unit: str = "it", initial: int = 0, leave: bool = True, enabled: bool = True) -> Any:
    """A tqdm bar over ``iterable`` (or a manual one: call ``.update(n)`` and ``.close()``).

    Args:
        iterable: what to iterate; ``None`` for a bar advanced by hand.
        desc: what the bar counts, shown before it ("gptq", "gguf export").
        total: the number of units; without it tqdm can show no ETA.
        unit: the name of one unit ("layer", "tensor", "step").
        initial: units already done (a resumed run), so the rate and ETA count only new work.
        leave: keep the finished bar on screen (stages) or erase it (short inner loops).
        enabled: the caller's own switch (e.g. a ``progress=False`` argument); combined with
            :func:`progress_enabled`.

    Returns:
        The tqdm object: iterate it, or ``update`` and ``close`` it.
    """
    from tqdm.auto import tqdm

    tty = hasattr(sys.stderr, "isatty") and sys.stderr.isatty()
    return tqdm(iterable, desc=desc, total=total, unit=unit, initial=initial, leave=leave, file=sys.stderr,
                disable=not (enabled and progress_enabled()), mininterval=0.1 if tty else LOG_INTERVAL_S)
