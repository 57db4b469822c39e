"""Transactions as one-line JSON objects: what ``tail --format jsonl`` prints and what the
bridge's ``--payload json`` carries.

Values are rendered straight from PostgreSQL's text output where its text is already the JSON
we want (integers, json/jsonb, numeric as a string, bytea as ``\\x…``), and through psycopg's
loaders where it is not (timestamps become ISO-8601, arrays become JSON arrays). Per relation,
the renderers are chosen once.
"""

from __future__ import annotations

import base64
import json
import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import replace
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from typing import Any

from psycopg.pq import Format
from psycopg.types.range import Range

from pglogrepl_bridge.lsn import format_lsn
from pglogrepl_bridge.pgoutput import _accel as accel
from pglogrepl_bridge.pgoutput import bintext
from pglogrepl_bridge.pgoutput.loaders import transformer
from pglogrepl_bridge.pgoutput.messages import Message
from pglogrepl_bridge.pgoutput.relcache import Fused, RelationInfo
from pglogrepl_bridge.pgoutput.transaction import RowChange, Transaction, TruncateChange
from pglogrepl_bridge.pgoutput.values import (
    FLOAT_TYPES,
    INTEGER_TYPES,
    JSON_ARRAY_ELEMENTS,
    JSON_TYPES,
    TEMPORAL_TYPES,
    ValueMode,
    describe,
)
from pglogrepl_bridge.render import textjson
from pglogrepl_bridge.render._jsoncompile import ColumnRender, Render, compile_json_rows
from pglogrepl_bridge.render._jsoncompile import quote as _quote

log = logging.getLogger(__name__)

_NON_FINITE = {b"NaN", b"Infinity", b"-Infinity"}
_NO_OLD_NO_TOAST = b',"old":null,"unchanged_toast":[]}'


def py_json(value: Any) -> str:
    """A Python value (from a psycopg loader) as JSON text, following the tail rules."""
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else _quote(str(value))
    if isinstance(value, str):
        return _quote(value)
    if isinstance(value, Decimal):
        return _quote(str(value))
    if isinstance(value, bytes | bytearray | memoryview):
        return _quote("\\x" + bytes(value).hex())
    if isinstance(value, datetime | date | time):
        return _quote(value.isoformat())
    if isinstance(value, list):
        return "[" + ",".join(map(py_json, value)) + "]"
    if isinstance(value, dict):
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str)
    if isinstance(value, timedelta):
        return _quote(interval_text(value))
    if isinstance(value, Range):
        return _quote(range_text(value))
    return _quote(str(value))


def interval_text(value: timedelta) -> str:
    """A binary interval as PostgreSQL's text (``1 days 02:03:04.5``): what a text stream
    shows, so both read back the same (psycopg's binary loader has already folded months
    into 30 days)."""
    seconds, micro = value.seconds, value.microseconds
    clock = f"{seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
    if micro:
        clock += f".{micro:06d}".rstrip("0")
    return f"{value.days} days {clock}" if value.days else clock


def _bound_text(value: Any) -> str:
    if isinstance(value, datetime):
        return '"' + value.isoformat(sep=" ") + '"'
    if isinstance(value, date):
        return value.isoformat()
    return str(value)


def range_text(value: Range[Any]) -> str:
    """A binary range as PostgreSQL's text (``[1,5)``, ``["2024-01-01 00:00:00+00:00",)``,
    ``empty``), not psycopg's ``str`` (which writes an unbounded side as ``None``)."""
    if value.isempty:
        return "empty"
    lower = "" if value.lower is None else _bound_text(value.lower)
    upper = "" if value.upper is None else _bound_text(value.upper)
    return f"{value.bounds[0]}{lower},{upper}{value.bounds[1]}"


def _text(data: bytes) -> str:
    return _quote(data.decode())


def _int(data: bytes) -> str:
    return data.decode()


def _float(data: bytes) -> str:
    return _quote(data.decode()) if data in _NON_FINITE else data.decode()


def _bool(data: bytes) -> str:
    return "true" if data == b"t" else "false"


def _integer_array(load: Callable[[bytes], Any]) -> Render:
    """An integer array's text is its JSON but for the brackets and NULL: ``{1,NULL,{2}}`` is
    ``[1,null,[2]]``. An array with explicit bounds (``[0:1]={...}``) is loaded instead."""
    loaded = _loaded(load)

    def render(data: bytes) -> str:
        text = bytes(data).decode()
        if not text.startswith("{"):
            return loaded(data)
        return text.replace("{", "[").replace("}", "]").replace("NULL", "null")

    return render


def _json_text(data: bytes) -> str:
    text = data.decode()
    # json (not jsonb) keeps the input's whitespace; a newline would break JSON Lines
    if "\n" in text or "\r" in text:
        return json.dumps(json.loads(text), separators=(",", ":"), ensure_ascii=False)
    return text


def _kept_as_text(render: Render) -> Render:
    """A value that cannot be rendered (say, 'infinity' as a date) stays PostgreSQL's text."""

    def careful(data: bytes) -> str:
        try:
            return render(data)
        except Exception as exc:
            log.warning("keeping the text of a value that cannot be converted: %s", exc)
            return _quote(bytes(data).decode(errors="replace"))

    return careful


def _edited(edit: Callable[[str], str], loaded: Render) -> Render:
    """``edit`` of the text (``render.textjson``), or ``loaded`` where it declines."""

    def render(data: bytes) -> str:
        try:
            return edit(data.decode())
        except ValueError:
            return loaded(data)

    return render


def _loaded(load: Callable[[bytes], Any]) -> Render:
    return _kept_as_text(lambda data: py_json(load(data)))


#: temporal types whose ``textjson`` edit the C walk writes itself (timetz stays in Python)
_NATIVE_EDITS = {
    "date": accel.DATE,
    "time": accel.TIME,
    "timestamp": accel.TIMESTAMP,
    "timestamptz": accel.TIMESTAMPTZ,
}


class _Shape:
    """What rendering one relation needs, worked out once: compiled row renderers (all
    columns, and key columns only) and the fixed text around the values."""

    __slots__ = ("fused", "heads", "key_row", "key_row8", "keys", "row", "row8")

    def __init__(self, renderer: JsonRenderer, rel: RelationInfo) -> None:
        oids = [rel.loaders.base_oid(c.type_oid) for c in rel.columns]  # domains: their base
        plans = [renderer._text_plan(oid) for oid in oids]
        text = [render for render, _ in plans]
        binary = [renderer._binary_renderer(oid) for oid in oids]
        self.fused: Fused = tuple(
            (c.name, t, b) for c, t, b in zip(rel.columns, text, binary, strict=True)
        )
        self.keys = {c.name: _quote(c.name) + ":" for c in rel.columns}
        columns = [
            ColumnRender(self.keys[c.name], t, b, quote_text=t is _text, raw_text=t is _int, edit=e)
            for c, (t, e), b in zip(rel.columns, plans, binary, strict=True)
        ]
        self.row, self.row8 = compile_json_rows(columns)
        self.key_row, self.key_row8 = compile_json_rows(
            [replace(col, included=c.is_key) for c, col in zip(rel.columns, columns, strict=True)]
        )
        where = f'"schema":{_quote(rel.namespace or "pg_catalog")},"table":{_quote(rel.name)}'
        self.heads = {
            op: f'{{"op":"{op}",{where},"new":'.encode() for op in ("insert", "update", "delete")
        }


class JsonRenderer:
    """Renders transactions to JSON text; caches per-relation value renderers."""

    def __init__(self, values: ValueMode = "typed") -> None:
        self.values = values
        self._transformer = transformer()
        self._shapes: dict[RelationInfo, _Shape] = {}

    def _shape(self, rel: RelationInfo) -> _Shape:
        shape = self._shapes.get(rel)
        if shape is None:
            shape = self._shapes[rel] = _Shape(self, rel)
        return shape

    def _text_renderer(self, oid: int) -> Render:
        """``oid`` is a base type (the registry resolved domains); its facts choose."""
        return self._text_plan(oid)[0]

    def _text_plan(self, oid: int) -> tuple[Render, int]:
        """The text renderer, and the C walk's own mode for it (``accel.DATE`` ...; 0:
        none). A mode writes the renderer's result itself for the texts it recognises and
        calls the renderer for the rest, so the JSON is the same either way (the tests hold
        each mode to its renderer)."""
        if self.values == "text":
            return _text, 0
        facts = describe(oid)
        if facts.name in INTEGER_TYPES:
            return _int, 0
        if facts.name in FLOAT_TYPES:
            return _float, accel.FLOAT
        if facts.name == "bool":
            return _bool, accel.BOOL
        if facts.name in JSON_TYPES:
            return _kept_as_text(_json_text), accel.JSON
        if facts.element in INTEGER_TYPES:
            load = self._transformer.get_loader(oid, Format.TEXT).load
            return _kept_as_text(_integer_array(load)), accel.INT_ARRAY
        if facts.name in TEMPORAL_TYPES or facts.element in JSON_ARRAY_ELEMENTS:
            loaded = _loaded(self._transformer.get_loader(oid, Format.TEXT).load)
            edit = textjson.edit(facts.name, facts.element)
            if edit is None:
                return loaded, 0
            mode = accel.TEXT_ARRAY if edit is textjson.text_array else 0
            return _edited(edit, loaded), _NATIVE_EDITS.get(facts.name or "", mode)
        return _text, 0  # numeric, bytea (hex output), uuid, text, and anything else

    def _binary_renderer(self, oid: int) -> Render:
        """A binary value: PostgreSQL's text where ``bintext`` writes it from the bytes (so a
        binary stream prints inet, interval, macaddr, bit strings as a text stream does),
        else through psycopg's binary loader."""
        loaded = _loaded(self._transformer.get_loader(oid, Format.BINARY).load)
        write = bintext.writer(describe(oid).name)
        if write is None:
            return loaded

        def render(data: bytes) -> str:
            try:
                return _quote(write(bytes(data)))
            except ValueError:
                return loaded(data)

        return render

    def _careful(
        self, rel: RelationInfo, raw: bytes, at: int, key_only: bool
    ) -> tuple[str, list[str]]:
        """Through RelationInfo.row_at: reports bad values, raises DecodeError where due."""
        shape = self._shape(rel)
        values = rel.row_at(raw, at, key_only=key_only, fused=shape.fused)
        keys = shape.keys
        body = ",".join(keys[k] + ("null" if v is None else v) for k, v in values.items())
        toast = [] if key_only else list(rel.left_out(values))
        return "{" + body + "}", toast

    def row(self, rel: RelationInfo, raw: bytes, at: int, *, key_only: bool = False) -> str:
        """The TupleData at ``raw[at:]`` as a JSON object (``null`` when ``at`` < 0)."""
        if at < 0:
            return "null"
        shape = self._shape(rel)
        done = (shape.key_row if key_only else shape.row)(raw, at)
        return done if done is not None else self._careful(rel, raw, at, key_only)[0]

    def change(self, change: RowChange | TruncateChange | Message) -> str:
        """One change as a JSON object (text)."""
        if isinstance(change, RowChange):
            return self.change_utf8(change).decode()
        return self._other(change)

    def change_utf8(self, change: RowChange | TruncateChange | Message) -> bytes:
        """One change as a JSON object, UTF-8: what ``line`` joins, with no str between the
        C walk's bytes and the output."""
        if not isinstance(change, RowChange):
            return self._other(change).encode()
        rel = change.relation
        shape = self._shapes.get(rel) or self._shape(rel)
        raw = change.raw
        at = change.new_at
        toast: list[str] = []
        new = b"null"
        if at >= 0:
            row = shape.row8(raw, at)
            if row is not None:
                if change.old_at < 0:  # insert, or update of the same key: the hot path
                    return shape.heads[change.op] + row + _NO_OLD_NO_TOAST
                new = row
            else:
                text, toast = self._careful(rel, raw, at, False)
                new = text.encode()
        at = change.old_at
        old = b"null"
        if at >= 0:
            key_only = change.old_kind == "K"
            row = (shape.key_row8 if key_only else shape.row8)(raw, at)
            old = row if row is not None else self._careful(rel, raw, at, key_only)[0].encode()
        unchanged = ",".join(map(_quote, toast)).encode()
        head = shape.heads[change.op]
        return b"".join((head, new, b',"old":', old, b',"unchanged_toast":[', unchanged, b"]}"))

    def changes_utf8(self, changes: Iterable[RowChange | TruncateChange | Message]) -> list[bytes]:
        """``change_utf8`` of each change. The hot path (an insert, or an update without an
        old row, of a table already seen, whose row the C walk renders) repeats the first
        branch of ``change_utf8`` here, without its call frame: 5% of rendering the
        realistic benchmark (RESULTS.md, sixteenth session). The rest goes to ``change_utf8``."""
        out: list[bytes] = []
        append = out.append
        shapes = self._shapes
        tail = _NO_OLD_NO_TOAST
        for change in changes:
            if type(change) is RowChange and change.old_at < 0 <= change.new_at:
                shape = shapes.get(change.relation)
                if shape is not None:
                    row = shape.row8(change.raw, change.new_at)
                    if row is not None:
                        append(shape.heads[change.op] + row + tail)
                        continue
            append(self.change_utf8(change))
        return out

    def _other(self, change: TruncateChange | Message) -> str:
        """A truncate or a logical decoding message as a JSON object."""
        if isinstance(change, TruncateChange):
            names = ",".join(_quote(r.qualified_name) for r in change.relations)
            return (
                f'{{"op":"truncate","relations":[{names}],'
                f'"cascade":{py_json(change.cascade)},'
                f'"restart_identity":{py_json(change.restart_identity)}}}'
            )
        assert isinstance(change, Message)
        content = base64.b64encode(change.content).decode()
        return (
            f'{{"op":"message","prefix":{_quote(change.prefix)},"content":"{content}",'
            f'"transactional":{py_json(change.transactional)}}}'
        )

    def transaction(self, txn: Transaction, changes: Iterable[str] | None = None) -> str:
        """One line of JSON (no newline). ``changes`` overrides the rendered change list."""
        if changes is None:
            return self.line(txn).decode()
        return self._head(txn) + ",".join(changes) + "]}"

    def line(self, txn: Transaction, changes: Iterable[bytes] | None = None) -> bytes:
        """``transaction`` as UTF-8 bytes, from ``change_utf8``'s (or ``changes``)."""
        body = b",".join(self.changes_utf8(txn.changes) if changes is None else changes)
        return b"".join((self._head(txn).encode(), body, b"]}"))

    def _head(self, txn: Transaction) -> str:
        """A transaction's JSON up to its change list's first element."""
        gid = "" if txn.gid is None else f',"gid":{_quote(txn.gid)}'
        origin = "null" if txn.origin is None else _quote(txn.origin)
        return (
            f'{{"xid":{txn.xid},"lsn":"{format_lsn(txn.commit_lsn)}",'
            f'"end_lsn":"{format_lsn(txn.end_lsn)}",'
            f'"commit_time":"{txn.commit_time.isoformat()}","origin":{origin}{gid},'
            '"changes":['
        )
