"""The ``data`` of a WalEntry: one transaction, as JSON (default) or as compact bincode.

The bincode form is ``bincode::deserialize``-able as the Rust types in
docs/replication-message.md (``Transaction``, ``Change``, ``Column``, ``Value``). Values are
PostgreSQL's own text output (or its binary form with --binary), copied straight from the
wire: nothing is converted, so it is lossless and cheap.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Literal

from .jsonl import JsonRenderer
from .messages import Message
from .relcache import Fused, RelationInfo
from .transaction import RowChange, Transaction, TruncateChange

PayloadFormat = Literal["json", "bincode"]

_U32 = struct.Struct("<I").pack
_U64 = struct.Struct("<Q").pack
_TXN_HEAD = struct.Struct("<IQQq")

# enum variant indexes (declaration order in the Rust definitions)
CHANGE_ROW, CHANGE_TRUNCATE, CHANGE_MESSAGE = 0, 1, 2
OP_INDEX = {"insert": 0, "update": 1, "delete": 2}
VALUE_TEXT, VALUE_BINARY = 0, 1
_NONE, _SOME = b"\x00", b"\x01"


def _string(text: str) -> bytes:
    raw = text.encode()
    return _U64(len(raw)) + raw


def _bytes(raw: bytes) -> bytes:
    return _U64(len(raw)) + raw


def _text_value(data: bytes) -> bytes:  # Some(Value::Text(String))
    return b"\x01\x00\x00\x00\x00" + _U64(len(data)) + data


def _binary_value(data: bytes) -> bytes:  # Some(Value::Binary(Vec<u8>))
    return b"\x01\x01\x00\x00\x00" + _U64(len(data)) + data


class BincodeEncoder:
    """Transactions → bincode bytes of ``Transaction``; per-relation names encoded once."""

    def __init__(self) -> None:
        self._cache: dict[RelationInfo, tuple[Fused, dict[str, bytes], bytes]] = {}

    def _for(self, rel: RelationInfo) -> tuple[Fused, dict[str, bytes], bytes]:
        cached = self._cache.get(rel)
        if cached is None:
            fused = tuple((c.name, _text_value, _binary_value) for c in rel.columns)
            names = {c.name: _string(c.name) for c in rel.columns}
            head = _string(rel.namespace or "pg_catalog") + _string(rel.name)
            cached = self._cache[rel] = (fused, names, head)
        return cached

    def _values(
        self, rel: RelationInfo, raw: bytes, at: int, key_only: bool
    ) -> dict[str, bytes | None] | None:
        if at < 0:
            return None
        return rel.row_at(raw, at, key_only=key_only, fused=self._for(rel)[0])

    def _columns(self, rel: RelationInfo, values: dict[str, bytes | None] | None) -> bytes:
        if values is None:
            return _NONE
        names = self._for(rel)[1]
        parts = [_SOME, _U64(len(values))]
        for name, value in values.items():
            parts.append(names[name])
            parts.append(_NONE if value is None else value)
        return b"".join(parts)

    def change(self, change: RowChange | TruncateChange | Message) -> bytes:
        if isinstance(change, RowChange):
            rel = change.relation
            _, _, head = self._for(rel)
            new = self._values(rel, change.raw, change.new_at, False)
            old = self._values(rel, change.raw, change.old_at, change.old_kind == "K")
            toast = () if new is None else rel.left_out(new)
            return b"".join(
                (
                    _U32(CHANGE_ROW),
                    _U32(OP_INDEX[change.op]),
                    head,
                    self._columns(rel, new),
                    self._columns(rel, old),
                    _U64(len(toast)),
                    *map(_string, toast),
                )
            )
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
        origin = _NONE if txn.origin is None else _SOME + _string(txn.origin)
        changes = [self.change(c) for c in txn.changes]
        return b"".join(
            (
                _TXN_HEAD.pack(txn.xid, txn.commit_lsn, txn.end_lsn, txn.timestamp_us),
                origin,
                _U64(len(changes)),
                *changes,
            )
        )


def encoder(fmt: PayloadFormat) -> Callable[[Transaction], bytes]:
    if fmt == "bincode":
        return BincodeEncoder().transaction
    renderer = JsonRenderer("typed")
    return lambda txn: renderer.transaction(txn).encode()
