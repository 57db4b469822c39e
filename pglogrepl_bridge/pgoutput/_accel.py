"""The optional C hot paths (``_fastrow.c``), or None where they are not built: the walks
over a row's TupleData (to JSON, to typed values) and the assembler's row-change branch.

pip builds the extension when a C compiler is at hand; without one the package is pure
Python, and every caller has a Python path that gives the same results (the tests hold the
two to each other). ``PGLOGREPL_BRIDGE_PURE_PYTHON=1`` runs without it, to compare or to
rule it out.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

if TYPE_CHECKING:  # values imports loaders, which imports this module
    from pglogrepl_bridge.pgoutput.values import LoadRow

RowRender = Callable[[bytes, int], "str | None"]
RowRenderUtf8 = Callable[[bytes, int], "bytes | None"]


class JsonRowWalk(Protocol):
    """``_fastrow.JsonRow``: a row's JSON as str (called) or as UTF-8 bytes (``utf8``)."""

    def __call__(self, buf: bytes, pos: int, /) -> str | None: ...

    def utf8(self, buf: bytes, pos: int, /) -> bytes | None:
        """The same JSON as calling the walk, as UTF-8 (None where the call gives None)."""


ColumnPlan = tuple[str | None, int, Callable[[bytes], str] | None, Callable[[bytes], str]]
TypedRow = Callable[[dict[str, None], "LoadRow", "LoadRow", bytes, int], "dict[str, Any] | None"]

T = TypeVar("T")

# JsonRow column modes: how a text value becomes JSON. From DATE on, the text renderer's own
# result written in C for the texts it can (render.textjson's edits, jsonl's renderers for
# bool, floats, json, integer and text arrays), anything else through the text renderer.
QUOTE, RAW, CALL = 0, 1, 2
DATE, TIME, TIMESTAMP, TIMESTAMPTZ = 3, 4, 5, 6
BOOL, FLOAT, JSON, INT_ARRAY, TEXT_ARRAY = 7, 8, 9, 10, 11

typed_row: TypedRow | None = None
# driver_row's modes: how a text value becomes the SQL sink's driver value in C (str, int,
# float, SQLAlchemy's 1/0 for a bool, bytes of bytea's hex, then ``sinks.sqlitetext``'s edits)
DRIVER_TEXT, DRIVER_INT, DRIVER_FLOAT, DRIVER_BOOL, DRIVER_BYTEA = 0, 1, 2, 3, 4
DRIVER_TIMESTAMP, DRIVER_TIMESTAMPTZ, DRIVER_DATE, DRIVER_TIME, DRIVER_TIMETZ = 5, 6, 7, 8, 9
DRIVER_UUID, DRIVER_INT_ARRAY, DRIVER_TEXT_ARRAY = 10, 11, 12
#: a column's plan entry: a mode, or a callable(bytes) -> value
DriverStep = int | Callable[[bytes], Any]
#: (plan, buf, pos) → a text TupleData's driver values in column order (None: declined)
driver_row: Callable[[tuple[DriverStep, ...], bytes, int], tuple[Any, ...] | None] | None = None
#: (template, plan, buf, pos) → the same as {column: value}
driver_dict: (
    Callable[[dict[str, None], tuple[DriverStep, ...], bytes, int], dict[str, Any] | None] | None
) = None
#: a row's key as raw bytes and whether every column was sent (``relcache.row_key``)
row_key: Callable[[tuple[int, ...], int, bytes, int], tuple[Any, bool] | None] | None = None
#: a TupleData of text values and NULLs → one line of COPY text (None: declined)
copy_text: Callable[[int, bytes, int], bytes | None] | None = None
#: one row of COPY TO text → its values (None: irregular, take ``copytext.split_row``)
copy_row: Callable[[bytes, int], list[bytes | None] | None] | None = None
#: a one-dimensional array's text → a JSON array (None: declined, take ``textarray``)
text_array_json: Callable[[str, bool, str], str | None] | None = None
#: an integer array's text → JSON with ", " (ValueError: not one; ``sqlitetext`` in Python)
int_array_json: Callable[[str], str] | None = None
#: whether a str/bytes-like value holds N ASCII digits in a row (``loaders``' JSON test)
digit_run: Callable[[str | bytes | bytearray | memoryview, int], bool] | None = None
#: inet/cidr text (bytes-like) → a plain dotted quad's integer, or None (``loaders``)
ipv4_int: Callable[[bytes | memoryview], int | None] | None = None
json_row: Callable[[Sequence[ColumnPlan]], JsonRowWalk] | None = None
_row_change: Callable[[dict[int, Any], bytes, int], Any] | None = None
PutRow = Callable[[dict[int, Any], list[Any], Any], bool]
_put_row: PutRow | None = None

if os.environ.get("PGLOGREPL_BRIDGE_PURE_PYTHON", "") in ("", "0"):
    try:
        from pglogrepl_bridge.pgoutput import _fastrow
    except ImportError:  # not built: the pure-Python paths
        pass
    else:
        typed_row = _fastrow.typed_row
        driver_row = _fastrow.driver_row
        driver_dict = _fastrow.driver_dict
        row_key = _fastrow.row_key
        copy_text = _fastrow.copy_text
        copy_row = _fastrow.copy_row
        text_array_json = _fastrow.text_array_json
        int_array_json = _fastrow.int_array_json
        ipv4_int = _fastrow.ipv4_int
        digit_run = _fastrow.digit_run
        json_row = _fastrow.JsonRow
        _row_change = _fastrow.row_change
        _put_row = _fastrow.put_row


def row_change_maker(cls: type[T]) -> Callable[[dict[int, Any], bytes, int], T | None] | None:
    """``(relations by id, payload, pos) -> cls | None``: one Insert/Update/Delete as ``cls``
    (RowChange) without running its ``__init__`` (the C side writes its slots), None where
    the Python path must look; or None without the accelerator."""
    if _row_change is None:
        return None
    fields = ("op", "relation", "raw", "new_at", "old_at", "old_kind")
    _fastrow.bind_row_change(cls, fields)
    return _row_change


#: (targets, held, tables, transitions, merge, changes, start, room) → (index, new rows)
HoldRows = Callable[
    [dict[Any, Any], dict[str, Any], dict[str, Any], dict[Any, Any], Any, Any, int, int],
    tuple[int, int],
]


def row_holder(held_cls: type, row_cls: type) -> HoldRows | None:
    """``_fastrow.hold_rows`` with ``held_cls`` (``sinks.reduce.Held``) and ``row_cls``
    (RowChange, as the row maker binds it) bound: the SQL sink's holding of a run of row
    changes for its reduction; None without the accelerator."""
    if row_change_maker(row_cls) is None:
        return None
    _fastrow.bind_held(held_cls, ("state", "new", "key", "last"))
    return _fastrow.hold_rows


#: (get_copy_data, relations by id, changes, limit) → (rows taken, the last one's message,
#: what get_copy_data returned for the first message not taken, or None at the limit)
PumpRows = Callable[[Callable[[int], Any], dict[int, Any], list[Any], int], tuple[int, Any, Any]]


def row_pump(cls: type[T]) -> PumpRows | None:
    """``_fastrow.pump_rows``: the stream's read loop over a run of row changes, each put as
    ``row_putter``'s function puts one; None without the accelerator."""
    if row_putter(cls) is None:
        return None
    return _fastrow.pump_rows


def row_putter(cls: type[T]) -> PutRow | None:
    """``(relations by id, changes, CopyData message) -> bool``: the row maker for a whole
    XLogData message, appending the ``cls`` it makes to ``changes``; False where the message
    must take the general path (it is not a row change, or the row maker declines it)."""
    if row_change_maker(cls) is None:
        return None
    return _put_row
