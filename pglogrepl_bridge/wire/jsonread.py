"""The bridge's JSON transaction payload read back into Transactions; pure.

The writer is ``payload.encoder("json")``: ``tail``'s JSON line plus a ``relations`` member
(``wire.relations``: names, type OIDs and modifiers, key columns, replica identity, custom
type names). With it a reader knows which columns are the key (an update that keeps its key
has ``"old": null``) and what each value's type is, and turns every value back into the
text PostgreSQL sent, so a replica applies a JSON entry through the very path ``replicate``
takes (``SqlSink`` over RowChange objects). The rules, inverse to ``render.jsonl``:

J1. Numbers keep the digits written (no float round trip); ``true``/``false`` are ``t``/``f``.
J2. A json/jsonb value is its text in the line, as written (json keeps its input's
    whitespace, unless it held a newline, which the line compacted). A JSON ``null`` in a
    json column is the one value the line cannot tell from SQL NULL: it reads as NULL.
J3. Dates and times in ISO-8601 (what psycopg's loaders gave) are written in PostgreSQL's
    output form (``2024-05-01 10:00:00.5+02``); values kept as text (``infinity``, BC dates)
    stay as they are.
J4. A JSON array of an array column becomes an array literal (elements quoted, NULL bare,
    each element by its element type's rules); a string is already PostgreSQL's text.
J5. A type with no binary loader (an enum, a composite) in a binary stream was written as
    ``\\x`` and the hex of its binary form: such a value is read back as that binary value,
    as the stream sent it. (inet, interval, macaddr, bit strings and pg_lsn were written as
    PostgreSQL's text, ``pgoutput.bintext``: they read back as text, as from a text stream.)
J6. A row lists every column, but for the key-only old row of a delete or key change (the
    other columns are NULL, as pgoutput sends them) and the columns in
    ``unchanged_toast`` (left unchanged). Anything else is a ProtocolError, as are malformed
    bytes. A payload with no ``relations`` member at all (an older writer) is a ConfigError:
    a setup to fix, not a message to skip.
"""

from __future__ import annotations

import base64
import json
import re
import struct
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from psycopg.pq import Format

from pglogrepl_bridge.errors import ConfigError, ProtocolError
from pglogrepl_bridge.lsn import Lsn
from pglogrepl_bridge.pgoutput.loaders import ADAPTERS
from pglogrepl_bridge.pgoutput.messages import Message
from pglogrepl_bridge.pgoutput.relcache import RelationInfo
from pglogrepl_bridge.pgoutput.transaction import Change, RowChange, Transaction, TruncateChange
from pglogrepl_bridge.pgoutput.values import (
    JSON_TYPES,
    TEMPORAL_TYPES,
    ValueLoaders,
    describe,
)
from pglogrepl_bridge.pgoutput.walsender import unix_us_to_pg_time
from pglogrepl_bridge.wire.relations import RelationReader

_LEN = struct.Struct(">I").pack
_UNIX_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
_NCOLS = struct.Struct(">H").pack


class _Number(str):
    """A JSON number's text, as written (J1)."""

    __slots__ = ()


class _Object(list[tuple[str, Any]]):
    """A JSON object's (key, value) pairs in order, and each member's text as written."""

    __slots__ = ("raw",)

    def __init__(self) -> None:
        super().__init__()
        self.raw: dict[str, str] = {}


class _Array(list[Any]):
    """A JSON array's values, and each element's text as written."""

    __slots__ = ("raw",)

    def __init__(self) -> None:
        super().__init__()
        self.raw: list[str] = []


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


_leaf = json.JSONDecoder(
    parse_int=_Number, parse_float=_Number, parse_constant=_no_constant
).raw_decode
#: json's own string scanner (C), not in typeshed
_scanstring: Callable[[str, int], tuple[str, int]] = json.decoder.scanstring  # type: ignore[attr-defined]
_SPACE = re.compile(r"[ \t\n\r]*")


def _skip(text: str, at: int) -> int:
    found = _SPACE.match(text, at)
    assert found is not None  # the pattern matches the empty string
    return found.end()


def _value(text: str, at: int) -> tuple[Any, int]:
    """The JSON value at ``text[at]`` and where it ends. Objects and arrays are walked here,
    to keep each member's text (J2); everything else is json's own ``raw_decode``."""
    first = text[at : at + 1]
    if first == "{":
        return _object(text, at + 1)
    if first == "[":
        return _array_value(text, at + 1)
    return _leaf(text, at)


def _object(text: str, at: int) -> tuple[_Object, int]:
    found = _Object()
    at = _skip(text, at)
    if text[at : at + 1] == "}":
        return found, at + 1
    while True:
        if text[at : at + 1] != '"':
            raise ValueError(f"a member name expected at {at}")
        key, at = _scanstring(text, at + 1)
        at = _skip(text, at)
        if text[at : at + 1] != ":":
            raise ValueError(f"':' expected at {at}")
        start = _skip(text, at + 1)
        value, at = _value(text, start)
        found.append((key, value))
        found.raw[key] = text[start:at]
        at = _skip(text, at)
        if text[at : at + 1] == "}":
            return found, at + 1
        if text[at : at + 1] != ",":
            raise ValueError(f"',' or '}}' expected at {at}")
        at = _skip(text, at + 1)


def _array_value(text: str, at: int) -> tuple[_Array, int]:
    found = _Array()
    at = _skip(text, at)
    if text[at : at + 1] == "]":
        return found, at + 1
    while True:
        start = at
        value, at = _value(text, start)
        found.append(value)
        found.raw.append(text[start:at])
        at = _skip(text, at)
        if text[at : at + 1] == "]":
            return found, at + 1
        if text[at : at + 1] != ",":
            raise ValueError(f"',' or ']' expected at {at}")
        at = _skip(text, at + 1)


def _decode(text: str) -> Any:
    value, end = _value(text, _skip(text, 0))
    if _skip(text, end) != len(text):
        raise ValueError(f"extra data at {end}")
    return value


_TextOf = Callable[[Any, str], str]


def _scalar(value: Any, raw: str) -> str:
    """Any other type: strings are PostgreSQL's text already; J1 for the rest."""
    if value is True:
        return "t"
    if value is False:
        return "f"
    if isinstance(value, str):  # a _Number too
        return str(value)
    return raw  # a structure in a column of no JSON type: its JSON text


def _json(value: Any, raw: str) -> str:
    """J2: the text as the line has it."""
    return raw


_FRACTION_ZEROS = re.compile(r"(\.\d*?)0+(?=[+-]|$)")
_WHOLE_HOUR_OFFSET = re.compile(r"([+-]\d\d):00$")


def _temporal(value: Any, raw: str) -> str:
    """J3: ISO-8601 from psycopg's loaders in PostgreSQL's output form."""
    if not isinstance(value, str):
        return _scalar(value, raw)
    text = value
    if text[10:11] == "T":
        text = text[:10] + " " + text[11:]
    if "." in text:
        text = _FRACTION_ZEROS.sub(r"\1", text).replace(".+", "+").replace(".-", "-")
        if text.endswith("."):
            text = text[:-1]
    return _WHOLE_HOUR_OFFSET.sub(r"\1", text)


def _array(text_of: _TextOf) -> _TextOf:
    """J4."""

    def element(value: Any, raw: str) -> str:
        if value is None:
            return "NULL"
        if isinstance(value, _Array):
            return "{" + ",".join(map(element, value, value.raw)) + "}"
        text = text_of(value, raw)
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'

    def array(value: Any, raw: str) -> str:
        if isinstance(value, _Array):
            return "{" + ",".join(map(element, value, value.raw)) + "}"
        return _scalar(value, raw)

    return array


def _by_name(name: str | None) -> _TextOf:
    if name in JSON_TYPES:
        return _json
    if name in TEMPORAL_TYPES:
        return _temporal
    return _scalar


_HEX = re.compile(r"^\\x(?:[0-9a-fA-F]{2})*$")
_Cell = Callable[[Any, str], bytes]


def _cell(oid: int, loaders: ValueLoaders) -> _Cell:
    """One column's value → its TupleData bytes (never NULL: the caller writes those)."""
    base = loaders.base_oid(oid)
    facts = describe(base)
    text_of = _array(_by_name(facts.element)) if facts.element else _by_name(facts.name)
    binary_kept = ADAPTERS.get_loader(base, Format.BINARY) is None

    def cell(value: Any, raw: str) -> bytes:
        if binary_kept and isinstance(value, str) and _HEX.match(value):  # J5
            binary = bytes.fromhex(value[2:])
            return b"b" + _LEN(len(binary)) + binary
        data = text_of(value, raw).encode()
        return b"t" + _LEN(len(data)) + data

    return cell


class _Shape:
    """One relation's column order and cell writers, worked out once."""

    __slots__ = ("cells", "names", "rel")

    def __init__(self, rel: RelationInfo) -> None:
        self.rel = rel
        self.names = rel.names
        self.cells = [_cell(c.type_oid, rel.loaders) for c in rel.columns]

    def tuple_data(self, row: Any, toast: frozenset[str], full: bool, what: str) -> bytes:
        """J6: a JSON row object as TupleData bytes."""
        if not isinstance(row, _Object):
            raise ProtocolError(f"{what} is not a JSON object")
        values = dict(row)
        if len(values) > len(self.names) or not values.keys() <= set(self.names):
            extra = sorted(set(values) - set(self.names))
            raise ProtocolError(f"{what} has columns {self.rel.qualified_name} does not: {extra}")
        parts = [_NCOLS(len(self.names))]
        for name, cell in zip(self.names, self.cells, strict=True):
            if name in values:
                value = values[name]
                parts.append(b"n" if value is None else cell(value, row.raw[name]))
            elif name in toast:
                parts.append(b"u")
            elif full:
                raise ProtocolError(f"{what} lacks column {name!r}")
            else:
                parts.append(b"n")
        return b"".join(parts)


def _lsn(text: Any) -> Lsn:
    try:
        return Lsn.parse(str(text))
    except ConfigError as exc:
        raise ProtocolError(str(exc)) from None


class JsonPayloadReader:
    """JSON payloads → Transactions (rules J1-J6); relations shared across payloads."""

    def __init__(self, loaders: ValueLoaders | None = None) -> None:
        self._relations = RelationReader(loaders)
        self._shapes: dict[RelationInfo, _Shape] = {}

    def transaction(self, data: bytes) -> Transaction:
        """One WalEntry's ``data`` of the bridge's ``--payload json``."""
        try:
            return self._read(data)
        except ProtocolError:
            raise
        except (
            ValueError,
            TypeError,
            KeyError,
            IndexError,
            UnicodeDecodeError,
            RecursionError,
        ) as exc:
            raise ProtocolError(
                f"malformed JSON transaction payload ({type(exc).__name__}: {exc})"
            ) from None

    def _shape(self, rel: RelationInfo) -> _Shape:
        shape = self._shapes.get(rel)
        if shape is None:
            if len(self._shapes) > 4096:
                self._shapes.clear()
            shape = self._shapes[rel] = _Shape(rel)
        return shape

    def _read(self, data: bytes) -> Transaction:
        doc = _decode(data.decode())
        if not isinstance(doc, _Object):
            raise ProtocolError("the JSON payload is not an object")
        top = dict(doc)
        if "relations" not in top:  # a setup to fix, not a peer's slip: stop and say so
            raise ConfigError(
                "the JSON payload has no relations member: it was written by an older "
                "pglogrepl-bridge (or is tail's line); run the writer from this version, or "
                "use --payload bincode"
            )
        relations = self._relations.described(top["relations"])
        by_name = {rel.qualified_name: rel for rel in relations}
        xid = int(top["xid"])
        commit_lsn = _lsn(top["lsn"])
        committed = datetime.fromisoformat(top["commit_time"])
        unix_us = (committed - _UNIX_EPOCH) // _MICROSECOND
        changes: list[Change] = []
        for item in top["changes"]:
            change = dict(item)
            op = change["op"]
            if op in ("insert", "update", "delete"):
                rel = by_name.get(f"{change['schema']}.{change['table']}")
                if rel is None:
                    raise ProtocolError(
                        f"a change of {change['schema']}.{change['table']}, not in relations"
                    )
                changes.append(self._row(op, rel, change))
            elif op == "truncate":
                names = change["relations"]
                unknown = [n for n in names if n not in by_name]
                if unknown:
                    raise ProtocolError(f"TRUNCATE of {', '.join(unknown)}, not in relations")
                rels = tuple(by_name[n] for n in names)
                changes.append(
                    TruncateChange(
                        rels, change["cascade"] is True, change["restart_identity"] is True
                    )
                )
            elif op == "message":
                content = base64.b64decode(change["content"], validate=True)
                changes.append(
                    Message(
                        xid, change["transactional"] is True, commit_lsn, change["prefix"], content
                    )
                )
            else:
                raise ProtocolError(f"unknown change op {op!r}")
        origin = top.get("origin")
        return Transaction(
            xid,
            commit_lsn,
            _lsn(top["end_lsn"]),
            unix_us_to_pg_time(unix_us),
            None if origin is None else str(origin),
            tuple(changes),
            top.get("gid"),
        )

    def _row(self, op: str, rel: RelationInfo, change: dict[str, Any]) -> RowChange:
        shape = self._shape(rel)
        toast = frozenset(change.get("unchanged_toast") or ())
        where = f"{op} on {rel.qualified_name}"
        new_row, old_row = change.get("new"), change.get("old")
        new = (
            None
            if new_row is None
            else shape.tuple_data(new_row, toast, True, f"the new row of an {where}")
        )
        kind = "O" if rel.replica_identity == "f" else "K"
        old = None
        if old_row is not None:
            old = shape.tuple_data(old_row, frozenset(), kind == "O", f"the old row of an {where}")
        if old is None:
            if new is None:
                raise ProtocolError(f"an {where} with neither a new nor an old row")
            return RowChange(op, rel, new, 0, -1, None)  # type: ignore[arg-type]
        if new is None:
            return RowChange(op, rel, old, -1, 0, kind)  # type: ignore[arg-type]
        return RowChange(op, rel, old + b"N" + new, len(old) + 1, 0, kind)  # type: ignore[arg-type]
