"""The project's error types.

A :class:`SlimforgeError` is a user mistake or an unmet precondition: the CLI
prints its message as one line and exits with status 2, with no stack trace.
Anything else is a bug and keeps its traceback, except inside a stage or an
evaluation: there it becomes a :class:`StageCrash` (one line, exit status 1) and
the traceback goes to the run's log.
"""

from __future__ import annotations


class SlimforgeError(Exception):
    """A problem the user can fix; its message says what was wrong and what to do."""

    exit_code = 2

    def __init__(self, message: str) -> None:
        # One line, always: multi-line library messages are folded.
        super().__init__(" ".join(str(message).split()))


class ConfigError(SlimforgeError):
    """An invalid recipe, override or value, caught before any model loads."""


class AssetError(SlimforgeError):
    """A pinned asset could not be fetched, verified or unpacked."""


class ModelLoadError(SlimforgeError):
    """A model could not be found or loaded safely."""


class DataError(SlimforgeError):
    """A data source is missing, empty or malformed."""


class RunDirError(SlimforgeError):
    """The run directory holds results this run would overwrite."""


class OutputError(SlimforgeError):
    """An output folder (run directory, ``--out``, the cache) cannot be written there."""


class RuntimeMissingError(SlimforgeError):
    """A runtime slimforge checks against (vLLM, llama.cpp) is not installed or could not be built."""


class RuntimeCheckError(SlimforgeError):
    """A runtime cannot take the artifact it was given (a format or scheme it does not run)."""


class StageCrash(SlimforgeError):
    """A stage or an evaluation failed unexpectedly: a bug, not bad input.

    The message names what crashed and the log file that holds the traceback; the
    finished work is kept, so the same command resumes. Exit status 1, as for any bug.
    """

    exit_code = 1
