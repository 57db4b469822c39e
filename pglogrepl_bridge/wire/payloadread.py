"""The bincode transaction payload (``docs/replication-message.md``) read back; pure.

The writer is ``payload.BincodeEncoder``. A reader gets the relations either from elsewhere
(``jetstream``'s ``Pglb-Relations`` header, which has what the payload has no room for) or
from the payload's own definitions (``PayloadRelations``: names, type OIDs and key flags;
no type modifiers, so ``varchar(20)`` reads as ``varchar``; the replica identity is FULL
when every column is a key column, else the key). Rows become the RowChange objects the
stream's decoder makes, over the TupleData bytes as PostgreSQL sent them: an update's old
tuple, 'N', then the new one, as in pgoutput's message. Malformed bytes are a
ProtocolError, nothing else.
"""

from __future__ import annotations

import struct

from pglogrepl_bridge.errors import ProtocolError
from pglogrepl_bridge.lsn import Lsn
from pglogrepl_bridge.pgoutput.messages import Column, Message, Relation
from pglogrepl_bridge.pgoutput.relcache import RelationCache, RelationInfo
from pglogrepl_bridge.pgoutput.transaction import Change, RowChange, Transaction, TruncateChange
from pglogrepl_bridge.pgoutput.values import ValueLoaders
from pglogrepl_bridge.pgoutput.walsender import unix_us_to_pg_time
from pglogrepl_bridge.wire.payload import CHANGE_MESSAGE, CHANGE_ROW, CHANGE_TRUNCATE, OP_INDEX

_HEAD = struct.Struct("<IQQq")
_U32 = struct.Struct("<I").unpack_from
_U64 = struct.Struct("<Q").unpack_from
_U16_BE = struct.Struct(">H").unpack_from
_OPS = tuple(sorted(OP_INDEX, key=OP_INDEX.__getitem__))


class PayloadRelations:
    """Relations from the payload's own definitions, one RelationInfo per distinct
    definition (a sink prepares each target table once)."""

    def __init__(self, loaders: ValueLoaders | None = None) -> None:
        self._cache = RelationCache(loaders)
        self._by_def: dict[bytes, RelationInfo] = {}
        self._by_name: dict[str, RelationInfo] = {}
        self._next_id = 1

    def relation(
        self, definition: bytes, schema: str, table: str, columns: list[Column]
    ) -> RelationInfo:
        """The RelationInfo of one ``Relation`` definition (its bytes, already read)."""
        info = self._by_def.get(definition)
        if info is None:
            identity = "f" if columns and all(c.is_key for c in columns) else "d"
            relation = Relation(None, self._next_id, schema, table, identity, tuple(columns))
            self._next_id += 1
            info = self._by_def[definition] = self._cache.add_relation(relation)
        self._by_name[info.qualified_name] = info
        return info

    def named(self, qualified: str) -> RelationInfo:
        """A relation only truncated in this payload: its last definition seen, else one
        known by name only (no columns: a sink truncates the table if it has it)."""
        info = self._by_name.get(qualified)
        if info is None:
            schema, _, table = qualified.partition(".")
            relation = Relation(None, self._next_id, schema, table, "d", ())
            self._next_id += 1
            info = self._by_name[qualified] = self._cache.add_relation(relation)
        return info


def read_payload(
    data: bytes, relations: tuple[RelationInfo, ...] | PayloadRelations
) -> Transaction:
    """A bincode ``Transaction`` payload, with ``relations`` described elsewhere (in the
    payload's order), or read from its own definitions through ``PayloadRelations``."""
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


def _read(data: bytes, described: tuple[RelationInfo, ...] | PayloadRelations) -> Transaction:
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
    if isinstance(described, PayloadRelations):
        relations, pos = _definitions(data, pos, count, described)
    else:
        relations = described
        pos = _checked_definitions(data, pos, count, relations)
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
            if unknown and isinstance(described, PayloadRelations):
                by_name.update((name, described.named(name)) for name in unknown)
            elif unknown:
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


def _definitions(
    data: bytes, pos: int, count: int, described: PayloadRelations
) -> tuple[tuple[RelationInfo, ...], int]:
    """The payload's own relation definitions."""
    if count > len(data):
        raise _bad(f"{count} relations in {len(data)} bytes")
    found = []
    for _ in range(count):
        start = pos
        schema, pos = _string(data, pos)
        table, pos = _string(data, pos)
        (ncols,) = _U64(data, pos)
        pos += 8
        if ncols > len(data):
            raise _bad(f"{schema}.{table} with {ncols} columns in {len(data)} bytes")
        columns = []
        for _ in range(ncols):
            name, pos = _string(data, pos)
            (oid,) = _U32(data, pos)
            columns.append(Column(name, oid, -1, data[pos + 4] == 1))
            pos += 5
        found.append(described.relation(data[start:pos], schema, table, columns))
    return tuple(found), pos


def _checked_definitions(
    data: bytes, pos: int, count: int, relations: tuple[RelationInfo, ...]
) -> int:
    """Definitions described elsewhere: names checked, columns skipped."""
    if count > len(relations):
        raise _bad(f"{count} relations, the Pglb-Relations header describes {len(relations)}")
    for rel in relations[:count]:
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
    return pos


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
