"""Log files, and the boundary that turns a crash inside a stage or an evaluation into one line.

A run logs to its ``run.log``, ``slimforge eval`` to ``<out>/eval.log``. When a stage or
an evaluation fails with an unexpected exception (a bug, not bad input), the traceback
goes to that file only, and the console gets one line: what crashed, why, where the
traceback is, and that the same command resumes. User errors
(:class:`~slimforge.errors.SlimforgeError`), a refused write (``PermissionError``) and
interrupts pass through unchanged.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger("slimforge")

# A LogRecord attribute: the console handler leaves records carrying it out (log files keep them).
FILE_ONLY = "slimforge_file_only"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# A crash's one line quotes at most this much of the exception's message.
MAX_REASON = 300


@contextlib.contextmanager
def file_logging(path: Path) -> Iterator[None]:
    """Also log (appending) to ``path`` while the block runs: slimforge's records and the root logger's."""
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    ours = logging.getLogger("slimforge")
    # The CLI stops slimforge's records at its own logger; otherwise they reach the root's handlers,
    # and attaching to both would write each record twice.
    loggers = [logging.getLogger()] + ([] if ours.propagate else [ours])
    for logger in loggers:
        logger.addHandler(handler)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
        handler.close()


def not_file_only(record: logging.LogRecord) -> bool:
    """A logging filter for console handlers: drop the records meant for log files only."""
    return not getattr(record, FILE_ONLY, False)


def crash_reason(err: BaseException) -> str:
    """``Type: first line of the message``, shortened to fit one console line."""
    first = (str(err).strip().splitlines() or [""])[0]
    reason = f"{type(err).__name__}: {first}" if first else type(err).__name__
    return reason if len(reason) <= MAX_REASON else reason[:MAX_REASON - 3] + "..."


@contextlib.contextmanager
def crash_boundary(what: str, log_file: Path) -> Iterator[None]:
    """Turn an unexpected exception raised in the block into a one-line :class:`StageCrash`.

    Args:
        what: names what runs in the block, e.g. ``"stage 'heal'"`` or ``"evaluating 'nf4'"``.
        log_file: the file that is being logged to (see :func:`file_logging`); the
            traceback is written there and the one line names it.
    """
    from slimforge.errors import SlimforgeError, StageCrash

    try:
        yield
    except (SlimforgeError, PermissionError):
        raise  # a user error already says what to do; a refused write is the user's to fix
    except Exception as err:
        log.error("%s crashed", what, exc_info=err, extra={FILE_ONLY: True})
        raise StageCrash(f"{what} crashed ({crash_reason(err)}); the traceback is in {log_file}. "
                         "Finished work is kept; the same command resumes from it") from err
