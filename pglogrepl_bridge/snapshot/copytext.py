"""COPY's text format, read back into the values pgoutput would have sent (pure bytes work).

COPY TO's text format is each value's output-function text, the same text pgoutput sends,
with tabs between columns, a newline after each row, ``\\N`` for NULL, and backslash escapes
for backslash, newline, carriage return, tab, backspace, form feed and vertical tab. Undoing
those escapes gives back pgoutput's bytes, so one loader per type serves both.
"""

from __future__ import annotations

import re

NULL = b"\\N"
_ESCAPE = re.compile(rb"\\(.)", re.DOTALL)
_UNESCAPED = {
    ord("b"): b"\b",
    ord("f"): b"\f",
    ord("n"): b"\n",
    ord("r"): b"\r",
    ord("t"): b"\t",
    ord("v"): b"\v",
}


def _unescape_one(match: re.Match[bytes]) -> bytes:
    char = match.group(1)
    return _UNESCAPED.get(char[0], char)  # "\\\\" is a backslash; others stand for themselves


def unescape(field: bytes) -> bytes:
    """One field's text with COPY's backslash escapes undone (the field is not NULL)."""
    if b"\\" not in field:
        return field
    return _ESCAPE.sub(_unescape_one, field)


def split_row(line: bytes | bytearray | memoryview, ncols: int) -> list[bytes | None]:
    """One row of COPY TO text output as its values (None for NULL), newline optional.

    The common row has no backslash at all and costs one ``split``. Raises ValueError when
    the row does not have ``ncols`` columns.
    """
    data = bytes(line)
    if ncols == 0:
        return []
    if data.endswith(b"\n"):
        data = data[:-1]
    split = data.split(b"\t")
    if len(split) != ncols:
        raise ValueError(f"COPY row has {len(split)} columns, expected {ncols}")
    if b"\\" not in data:
        return split  # type: ignore[return-value]
    sub, one = _ESCAPE.sub, _unescape_one
    return [None if f == NULL else sub(one, f) if b"\\" in f else f for f in split]
