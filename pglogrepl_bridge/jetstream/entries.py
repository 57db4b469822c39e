"""Stream messages back into Transactions, for consumers that apply them; pure.

Rules (``publisher`` writes what ``EntryReader`` reads; ``docs/nats.md`` has them for others):

5. Every message carries the header ``Pglb-Relations``: the relations its transaction
   touches, as pgoutput's Relation messages described them, in compact JSON (ASCII only). A
   list: first the relations of its row changes, in the order of the bincode payload's
   ``relations`` (a Row's ``relation`` index points into both), then relations that are only
   truncated. Each is ``[relid, schema, table, replica identity, columns]``, each column
   ``[name, type oid, type modifier, is key]``, plus ``namespace, name`` of the stream's
   Type message for a custom type (an enum, a domain: what loads it like the source does).
   The bincode payload has no room for modifiers, replica identity or custom type names, and
   its Rust definitions are fixed; the header adds them without changing the payload.
6. A consumer rebuilds a transaction from the bincode body and that header alone, into the
   objects the stream's own decoder makes: RowChange with the TupleData bytes untouched (the
   old row is 'O' under REPLICA IDENTITY FULL, else the key, 'K'), TruncateChange and
   Message (whose LSN is the transaction's commit LSN: the payload does not carry its own).
   So the SQL sink applies a message exactly as ``replicate`` applies the transaction.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable
from typing import Any

from pglogrepl_bridge.errors import ProtocolError
from pglogrepl_bridge.lsn import Lsn
from pglogrepl_bridge.pgoutput.messages import Column, Message, Relation, Type
from pglogrepl_bridge.pgoutput.relcache import RelationCache, RelationInfo
from pglogrepl_bridge.pgoutput.transaction import Change, RowChange, Transaction, TruncateChange
from pglogrepl_bridge.pgoutput.values import ValueLoaders
from pglogrepl_bridge.pgoutput.walsender import unix_us_to_pg_time
from pglogrepl_bridge.wire.payload import CHANGE_MESSAGE, CHANGE_ROW, CHANGE_TRUNCATE, OP_INDEX
from pglogrepl_bridge.wire.protocol import WalEntry, from_bincode

_HEAD = struct.Struct("<IQQq")
_U32 = struct.Struct("<I").unpack_from
_U64 = struct.Struct("<Q").unpack_from
_U16_BE = struct.Struct(">H").unpack_from
_OPS = tuple(sorted(OP_INDEX, key=OP_INDEX.__getitem__))
#: header-string caches larger than this start again (distinct relation sets are few)
_MAX_CACHED = 4096


def relations_of(txn: Transaction) -> list[RelationInfo]:
    """Rule 5's order: row relations by first appearance (the bincode indexes), then the
    relations only truncated."""
    order: dict[RelationInfo, None] = {}
    truncated: list[RelationInfo] = []
    for change in txn.changes:
        if type(change) is RowChange:
            if change.relation not in order:
                order[change.relation] = None
        elif type(change) is TruncateChange:
            truncated.extend(change.relations)
    for rel in truncated:
        order.setdefault(rel, None)
    return list(order)


class RelationsHeader:
    """Rule 5, writing: the header value of a transaction (each relation's JSON kept)."""

    def __init__(self) -> None:
        self._entries: dict[RelationInfo, str] = {}

    def _entry(self, rel: RelationInfo) -> str:
        entry = self._entries.get(rel)
        if entry is None:
            columns: list[list[Any]] = []
            for c in rel.columns:
                column: list[Any] = [c.name, c.type_oid, c.type_modifier, c.is_key]
                noted = rel.loaders.noted_type(c.type_oid)
                if noted is not None:
                    column.extend(noted)
                columns.append(column)
            doc = [rel.relid, rel.namespace, rel.name, rel.replica_identity, columns]
            entry = self._entries[rel] = json.dumps(doc, separators=(",", ":"))
        return entry

    def __call__(self, relations: Iterable[RelationInfo]) -> str:
        return "[" + ",".join(map(self._entry, relations)) + "]"


class EntryReader:
    """Rule 6: message bodies and ``Pglb-Relations`` headers → Transactions.

    One RelationInfo per distinct relation description, shared by every message that has
    it, so a sink prepares each target table once.
    """

    def __init__(self, loaders: ValueLoaders | None = None) -> None:
        self._cache = RelationCache(loaders)
        self._by_entry: dict[tuple[Any, ...], RelationInfo] = {}
        self._by_header: dict[str, tuple[RelationInfo, ...]] = {}

    def relations(self, header: str) -> tuple[RelationInfo, ...]:
        """The relations a ``Pglb-Relations`` value describes."""
        found = self._by_header.get(header)
        if found is not None:
            return found
        try:
            docs = json.loads(header)
            found = tuple(self._relation(doc) for doc in docs)
        except (ValueError, TypeError, IndexError) as exc:
            raise ProtocolError(
                f"malformed Pglb-Relations header ({exc}): {header[:200]!r}"
            ) from None
        if len(self._by_header) >= _MAX_CACHED:
            self._by_header.clear()
        self._by_header[header] = found
        return found

    def _relation(self, doc: list[Any]) -> RelationInfo:
        relid, schema, table, identity, columns = doc
        key = (relid, schema, table, identity, tuple(tuple(c) for c in columns))
        info = self._by_entry.get(key)
        if info is None:
            cols = []
            for column in columns:
                name, oid, modifier, is_key = column[:4]
                if len(column) == 6:
                    self._cache.add_type(Type(None, int(oid), str(column[4]), str(column[5])))
                cols.append(Column(str(name), int(oid), int(modifier), bool(is_key)))
            relation = Relation(
                None, int(relid), str(schema), str(table), str(identity), tuple(cols)
            )
            info = self._by_entry[key] = self._cache.add_relation(relation)
        return info

    def transaction(self, body: bytes, header: str | None) -> Transaction:
        """The transaction in a ``--payload bincode`` message (a bincode WalEntry)."""
        if header is None:
            raise ProtocolError(
                "a message without the Pglb-Relations header: it was not published by "
                "pglogrepl-bridge publish (of this version)"
            )
        try:
            entry = from_bincode(body)
        except Exception as exc:
            raise ProtocolError(
                f"the message body is not a bincode WalEntry ({exc}): was the stream "
                "published with --payload bincode?"
            ) from None
        if not isinstance(entry, WalEntry):
            raise ProtocolError(f"the message holds a {type(entry).__name__}, not a WalEntry")
        txn = read_payload(entry.data, self.relations(header))
        if txn.end_lsn != entry.lsn:
            raise ProtocolError(
                f"the WalEntry's lsn {entry.lsn} is not its transaction's end LSN "
                f"{int(txn.end_lsn)}"
            )
        return txn


def read_payload(data: bytes, relations: tuple[RelationInfo, ...]) -> Transaction:
    """A bincode ``Transaction`` payload (docs/replication-message.md), with ``relations``
    from its ``Pglb-Relations`` header (rule 5)."""
    try:
        return _read(data, relations)
    except ProtocolError:
        raise
    except (
        struct.error,
        IndexError,
        KeyError,
        UnicodeDecodeError,
        ValueError,
        OverflowError,
    ) as exc:
        raise ProtocolError(
            f"malformed bincode transaction payload ({type(exc).__name__}: {exc})"
        ) from None


def _string(data: bytes, pos: int) -> tuple[str, int]:
    (n,) = _U64(data, pos)
    end = pos + 8 + n
    if end > len(data):
        raise ValueError("a string runs past the end")
    return data[pos + 8 : end].decode(), end


def _bad(what: str) -> ProtocolError:
    return ProtocolError(f"bincode transaction payload: {what}")


def _read(data: bytes, relations: tuple[RelationInfo, ...]) -> Transaction:
    xid, commit_lsn, end_lsn, time_us = _HEAD.unpack_from(data, 0)
    pos = _HEAD.size
    origin: str | None = None
    if data[pos] == 1:
        origin, pos = _string(data, pos + 1)
    elif data[pos] != 0:
        raise _bad("the origin is neither None nor Some")
    else:
        pos += 1
    (count,) = _U64(data, pos)
    pos += 8
    if count > len(relations):
        raise _bad(f"{count} relations, the Pglb-Relations header describes {len(relations)}")
    for rel in relations[:count]:  # names checked, columns skipped: the header has them
        schema, pos = _string(data, pos)
        table, pos = _string(data, pos)
        if (schema, table) != (rel.namespace or "pg_catalog", rel.name):
            raise _bad(f"relation {schema}.{table} where the header says {rel.qualified_name}")
        (ncols,) = _U64(data, pos)
        pos += 8
        if ncols != rel.ncols:
            raise _bad(f"{schema}.{table} has {ncols} columns, the header says {rel.ncols}")
        for _ in range(ncols):
            (n,) = _U64(data, pos)
            pos += 8 + n + 5  # name, type oid, is_key
    by_name = {rel.qualified_name: rel for rel in relations}
    (nchanges,) = _U64(data, pos)
    pos += 8
    changes: list[Change] = []
    append = changes.append
    for _ in range(nchanges):
        (variant,) = _U32(data, pos)
        pos += 4
        if variant == CHANGE_ROW:
            ((op,), (index,)) = _U32(data, pos), _U32(data, pos + 4)
            pos += 8
            if index >= count:
                raise _bad(f"a row of relation #{index}, of {count}")
            rel = relations[index]
            new: tuple[int, int] | None = None
            old: tuple[int, int] | None = None
            if data[pos]:
                (n,) = _U64(data, pos + 1)
                new = (pos + 9, pos + 9 + n)
                pos += 9 + n
            else:
                pos += 1
            if data[pos]:
                (n,) = _U64(data, pos + 1)
                old = (pos + 9, pos + 9 + n)
                pos += 9 + n
            else:
                pos += 1
            if pos > len(data):
                raise _bad("a row runs past the end")
            append(_row(_OPS[op], rel, data, new, old))
        elif variant == CHANGE_TRUNCATE:
            (n,) = _U64(data, pos)
            pos += 8
            names = []
            for _ in range(n):
                name, pos = _string(data, pos)
                names.append(name)
            unknown = [name for name in names if name not in by_name]
            if unknown:
                raise _bad(f"TRUNCATE of {', '.join(unknown)}, not in the Pglb-Relations header")
            rels = tuple(by_name[n] for n in names)
            append(TruncateChange(rels, bool(data[pos]), bool(data[pos + 1])))
            pos += 2
        elif variant == CHANGE_MESSAGE:
            prefix, pos = _string(data, pos)
            (n,) = _U64(data, pos)
            content = data[pos + 8 : pos + 8 + n]
            pos += 8 + n
            transactional = bool(data[pos])
            pos += 1
            append(Message(xid, transactional, commit_lsn, prefix, content))
        else:
            raise _bad(f"unknown change variant {variant}")
    if pos != len(data):
        raise _bad(f"{len(data) - pos} bytes after the last change")
    return Transaction(
        xid, Lsn(commit_lsn), Lsn(end_lsn), unix_us_to_pg_time(time_us), origin, tuple(changes)
    )


def _row(
    op: str,
    rel: RelationInfo,
    data: bytes,
    new: tuple[int, int] | None,
    old: tuple[int, int] | None,
) -> RowChange:
    """Rule 6: a RowChange over the TupleData bytes, laid out as pgoutput's message would
    (an update's old tuple, 'N', then the new one)."""
    for span in (new, old):
        if span is not None and (span[1] - span[0] < 2 or _U16_BE(data, span[0])[0] != rel.ncols):
            raise _bad(f"a {op} on {rel.qualified_name} whose tuple does not have its columns")
    kind = "O" if rel.replica_identity == "f" else "K"
    if old is None:
        if new is None:
            raise _bad(f"a {op} on {rel.qualified_name} with neither a new nor an old row")
        return RowChange(op, rel, data[new[0] : new[1]], 0, -1, None)  # type: ignore[arg-type]
    if new is None:
        return RowChange(op, rel, data[old[0] : old[1]], -1, 0, kind)  # type: ignore[arg-type]
    raw = data[old[0] : old[1]] + b"N" + data[new[0] : new[1]]
    return RowChange(op, rel, raw, old[1] - old[0] + 1, 0, kind)  # type: ignore[arg-type]
