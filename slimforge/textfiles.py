"""Reading the user's text files: UTF-8 checks and jsonl rows, with one-line errors that name the file.

A leaf module (it imports only :mod:`slimforge.errors`), shared by the data sources and the
prompt files of teacher-generated data.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from slimforge.errors import DataError


def not_utf8_error(name: str, offset: int, reason: str) -> DataError:
    """The one message for a data file that is not UTF-8 text."""
    return DataError(f"{name} is not UTF-8 text (byte {offset}: {reason}); data files must be UTF-8: re-encode "
                     "it (e.g. iconv -f latin1 -t utf-8) or move it out of data.path")


def first_non_utf8(files: list[str]) -> tuple[str, int, str] | None:
    """(file, byte offset, reason) of the first byte in ``files`` that is not UTF-8, or None.

    Reads in 1 MiB chunks through an incremental decoder, so a large corpus is never held whole.
    """
    import codecs

    for name in files:
        decoder, offset = codecs.getincrementaldecoder("utf-8")(), 0
        with open(name, "rb") as fh:
            while True:
                chunk = fh.read(1 << 20)
                try:
                    decoder.decode(chunk, final=not chunk)
                except UnicodeDecodeError as err:
                    return name, max(0, offset + err.start - len(err.object) + len(chunk)), err.reason
                if not chunk:
                    break
                offset += len(chunk)
    return None


def jsonl_rows(files: list[str]) -> Iterator[tuple[str, int, Any]]:
    """(file, line, row) for every row of jsonl files, or of .json files holding one array (line 0)."""
    for name in files:
        try:
            with open(name, encoding="utf-8") as fh:
                text = fh.read()
        except UnicodeDecodeError as err:
            raise not_utf8_error(name, err.start, err.reason) from None
        if name.endswith(".json") and text.lstrip().startswith("["):
            try:
                rows = json.loads(text)
            except json.JSONDecodeError as err:
                raise DataError(f"{name}:{err.lineno} is not valid JSON ({err.msg}); fix the file") from None
            yield from ((name, 0, row) for row in rows)
            continue
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    yield name, lineno, json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{name}:{lineno} is not valid JSON ({err.msg}); fix the line") from None
