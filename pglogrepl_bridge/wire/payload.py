"""The ``data`` of a WalEntry: one transaction, as JSON (default) or as compact bincode.

The JSON form is ``tail``'s line plus a ``relations`` member (``wire.relations``), which
``wire.jsonread`` reads back.

The bincode form is ``bincode::deserialize``-able as the Rust types in
docs/replication-message.md. Each transaction carries the definitions of the relations it
touches once, and each row as PostgreSQL's own TupleData bytes, exactly as pgoutput sent
them: the Rust ``Row`` type turns them into values while deserializing (``#[serde(try_from)]``).
Nothing is parsed or converted here, so the bridge pays nothing per column: that is what
lets it keep up with the walsender.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Literal

from pglogrepl_bridge.errors import DecodeError
from pglogrepl_bridge.pgoutput.messages import Message
from pglogrepl_bridge.pgoutput.relcache import RelationInfo
from pglogrepl_bridge.pgoutput.transaction import RowChange, Transaction, TruncateChange
from pglogrepl_bridge.render.jsonl import JsonRenderer
from pglogrepl_bridge.wire.relations import RelationWriter, relations_of

PayloadFormat = Literal["json", "bincode"]

_U32 = struct.Struct("<I").pack
_U64 = struct.Struct("<Q").pack
_TXN_HEAD = struct.Struct("<IQQq")
# Change::Row, its Op, the relation's index, then Option<Row>: Some and the byte count
_ROW_NEW = struct.Struct("<IIIBQ").pack  # with a new row
_ROW_NO_NEW = struct.Struct("<IIIB").pack  # new: None (deletes)
_SOME_ROW = struct.Struct("<BQ").pack

# enum variant indexes (declaration order in the Rust definitions)
CHANGE_ROW, CHANGE_TRUNCATE, CHANGE_MESSAGE = 0, 1, 2
OP_INDEX = {"insert": 0, "update": 1, "delete": 2}
_NONE, _SOME = b"\x00", b"\x01"


def _string(text: str) -> bytes:
    raw = text.encode()
    return _U64(len(raw)) + raw


def _bytes(raw: bytes) -> bytes:
    return _U64(len(raw)) + raw


def relation_def(rel: RelationInfo) -> bytes:
    """``Relation { schema, table, columns: Vec<ColumnDef { name, type_oid, is_key }> }``"""
    columns = b"".join(_string(c.name) + _U32(c.type_oid) + bytes((c.is_key,)) for c in rel.columns)
    return (
        _string(rel.namespace or "pg_catalog")
        + _string(rel.name)
        + _U64(len(rel.columns))
        + columns
    )


def _checked(change: RowChange, at: int) -> None:
    """The one check a pass-through row gets: its column count is the relation's."""
    raw = change.raw
    if at + 2 > len(raw) or (raw[at] << 8) | raw[at + 1] != change.relation.ncols:
        raise DecodeError(
            f"{change.op} on {change.relation.qualified_name}: tuple column count does not "
            f"match the relation's {change.relation.ncols}",
            msg_type="TupleData",
        )


class BincodeEncoder:
    """Transactions → bincode bytes of ``Transaction``."""

    def __init__(self) -> None:
        self._defs: dict[RelationInfo, bytes] = {}

    def _def(self, rel: RelationInfo) -> bytes:
        encoded = self._defs.get(rel)
        if encoded is None:
            encoded = self._defs[rel] = relation_def(rel)
        return encoded

    @staticmethod
    def row(change: RowChange, relation: int) -> bytes:
        """``Change::Row { op, relation, new: Option<Row>, old: Option<Row> }``: the rows are
        slices of the message (a tuple runs to the end of the message, or for an update's old
        row up to the 'N' that starts the new one)."""
        raw, new_at, old_at = change.raw, change.new_at, change.old_at
        op = OP_INDEX[change.op]
        if new_at >= 0:
            _checked(change, new_at)
            if old_at < 0:  # insert, or update with no old row: the hot path
                return (
                    _ROW_NEW(CHANGE_ROW, op, relation, 1, len(raw) - new_at) + raw[new_at:] + _NONE
                )
            _checked(change, old_at)
            new = raw[new_at:]
            old = raw[old_at : new_at - 1]
            return b"".join(
                (
                    _ROW_NEW(CHANGE_ROW, op, relation, 1, len(new)),
                    new,
                    _SOME_ROW(1, len(old)),
                    old,
                )
            )
        _checked(change, old_at)
        old = raw[old_at:]
        return _ROW_NO_NEW(CHANGE_ROW, op, relation, 0) + _SOME_ROW(1, len(old)) + old

    def change(self, change: RowChange | TruncateChange | Message, relation: int = 0) -> bytes:
        """One ``Change``; ``relation`` is the index of a Row's relation in ``relations``."""
        if isinstance(change, RowChange):
            return self.row(change, relation)
        if isinstance(change, TruncateChange):
            return b"".join(
                (
                    _U32(CHANGE_TRUNCATE),
                    _U64(len(change.relations)),
                    *(_string(r.qualified_name) for r in change.relations),
                    bytes((change.cascade, change.restart_identity)),
                )
            )
        return (
            _U32(CHANGE_MESSAGE)
            + _string(change.prefix)
            + _bytes(change.content)
            + bytes((change.transactional,))
        )

    def transaction(self, txn: Transaction) -> bytes:
        """One transaction as the bincode payload (docs/replication-message.md)."""
        index: dict[RelationInfo, int] = {}
        parts: list[bytes] = []
        append = parts.append
        row = self.row
        for change in txn.changes:
            if type(change) is RowChange:
                rel = change.relation
                i = index.get(rel)
                if i is None:
                    i = index[rel] = len(index)
                append(row(change, i))
            else:
                append(self.change(change))
        origin = _NONE if txn.origin is None else _SOME + _string(txn.origin)
        return b"".join(
            (
                _TXN_HEAD.pack(txn.xid, txn.commit_lsn, txn.end_lsn, txn.timestamp_us),
                origin,
                _U64(len(index)),
                *map(self._def, index),
                _U64(len(parts)),
                *parts,
            )
        )


def encoder(fmt: PayloadFormat) -> Callable[[Transaction], bytes]:
    """The WalEntry ``data`` encoder for ``fmt``: the JSON line or the compact bincode payload."""
    if fmt == "bincode":
        return BincodeEncoder().transaction
    renderer = JsonRenderer("typed")
    described = RelationWriter()

    def json_line(txn: Transaction) -> bytes:
        # tail's line, plus what a replica needs to apply it (wire.jsonread)
        line = renderer.line(txn)
        return b"".join((line[:-1], b',"relations":', described(relations_of(txn)).encode(), b"}"))

    return json_line
