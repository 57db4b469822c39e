"""Relation metadata, fed only from Relation and Type messages of the stream.

Never from the catalog: the catalog shows the schema of *now*, the stream the schema of the
change. Each entry precomputes its column names and loaders, so turning a row into a dict is
one pass over the bytes.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from psycopg.pq import Format

from pglogrepl_bridge.errors import DecodeError
from pglogrepl_bridge.pgoutput import _accel as accel
from pglogrepl_bridge.pgoutput.decoder import read_tuple
from pglogrepl_bridge.pgoutput.messages import (
    KIND_BINARY,
    KIND_NULL,
    KIND_TEXT,
    Column,
    Relation,
    TupleData,
    Type,
)
from pglogrepl_bridge.pgoutput.values import Load, ValueLoaders, ValueProblem

_u32 = struct.Struct("!I").unpack_from
Fused = tuple[tuple[str, Load, Load], ...]
FastRow = Callable[[bytes, int], "dict[str, Any] | None"]


def _no_fast_row(buf: bytes, pos: int) -> None:
    return None  # no C accelerator: row_at's loop does the work


@dataclass(frozen=True, slots=True, eq=False)
class RelationInfo:
    """One relation as the stream last described it (never from the catalog): names, key, and the
    loaders chosen once for its columns by the type registry.
    """

    relid: int
    namespace: str
    name: str
    replica_identity: str
    columns: tuple[Column, ...]
    names: tuple[str, ...]
    key_names: tuple[str, ...]
    loaders: ValueLoaders
    ncols: int
    fused: Fused  # (name, text loader, binary loader) per column
    # (buf, pos) -> {column: value}, or None where row_at's loop must do it: the C walk
    # with psycopg's loaders for the whole row in one call (see accel)
    fast_row: FastRow

    @property
    def qualified_name(self) -> str:
        # pgoutput sends an empty namespace for pg_catalog
        """``schema.name``, with pg_catalog for pgoutput's empty namespace."""
        return f"{self.namespace or 'pg_catalog'}.{self.name}"

    def row_at(
        self, buf: bytes, pos: int, *, key_only: bool = False, fused: Fused | None = None
    ) -> dict[str, Any]:
        """The TupleData at ``buf[pos:]`` as {column: value}, parsed and converted in one pass.

        Unchanged-TOAST columns are left out. ``fused`` replaces the per-column loaders (the
        JSON renderer passes loaders that produce JSON text). The hot path of the whole
        package: any irregularity (a bad value, malformed bytes) drops to the careful path.
        """
        out = None
        if fused is None:
            out = self.fast_row(buf, pos)
            fused = self.fused
        if out is None:
            out = self._row_loop(buf, pos, fused)
        if key_only:
            return {k: out[k] for k in self.key_names if k in out}
        return out

    def _row_loop(self, buf: bytes, pos: int, fused: Fused) -> dict[str, Any]:
        start, end = pos, len(buf)
        out: dict[str, Any] = {}
        try:
            if (buf[pos] << 8) | buf[pos + 1] != self.ncols:
                raise ValueError
            pos += 2
            for name, tload, bload in fused:
                kind = buf[pos]
                if kind == 0x74:  # 't'
                    stop = pos + 5 + _u32(buf, pos + 1)[0]
                    out[name] = tload(buf[pos + 5 : stop])
                    pos = stop
                elif kind == 0x6E:  # 'n'
                    out[name] = None
                    pos += 1
                elif kind == 0x75:  # 'u'
                    pos += 1
                elif kind == 0x62:  # 'b'
                    stop = pos + 5 + _u32(buf, pos + 1)[0]
                    out[name] = bload(buf[pos + 5 : stop])
                    pos = stop
                else:
                    raise ValueError
            # Lengths are unsigned: a bogus one overshoots, and the next column's kind byte
            # (IndexError) or this check sends us to the careful path.
            if pos > end:
                raise ValueError
        except Exception:
            out = self.row(read_tuple(buf, start)[0], fused)
        return out

    def row(self, tup: TupleData, fused: Fused | None = None) -> dict[str, Any]:
        """A parsed tuple as {column: value}; a bad value keeps its text and is reported."""
        if len(tup.kinds) != len(self.names):
            raise DecodeError(
                f"tuple has {len(tup.kinds)} columns, relation {self.qualified_name} has "
                f"{len(self.names)}",
                msg_type="TupleData",
            )
        out: dict[str, Any] = {}
        for col, kind, value, (_, tload, bload) in zip(
            self.columns, tup.kinds, tup.values, fused or self.fused, strict=True
        ):
            if kind == KIND_NULL:
                out[col.name] = None
            elif kind in (KIND_TEXT, KIND_BINARY):
                assert value is not None
                try:
                    out[col.name] = (tload if kind == KIND_TEXT else bload)(value)
                except Exception as exc:
                    text = bytes(value).decode(errors="replace")
                    if kind == KIND_BINARY:
                        text = "\\x" + bytes(value).hex()
                    self.loaders.on_problem(
                        ValueProblem(self.qualified_name, col.name, col.type_oid, text, str(exc))
                    )
                    out[col.name] = text
        return out

    def left_out(self, values: dict[str, Any]) -> tuple[str, ...]:
        """Columns missing from a full row from ``row_at``: those are the unchanged TOAST ones
        (a NULL is present, as None). Free when nothing is missing, the common case."""
        if len(values) == self.ncols:
            return ()
        return tuple(n for n in self.names if n not in values)

    def unchanged_toast(self, tup: TupleData) -> tuple[str, ...]:
        """Names of the columns a tuple marks as unchanged TOAST ('u')."""
        if b"u" not in tup.kinds:
            return ()
        return tuple(n for n, k in zip(self.names, tup.kinds, strict=False) if k == 0x75)


#: (buf, pos) -> (the row's key as raw bytes, whether every column was sent) | None
RowKey = Callable[[bytes, int], "tuple[Any, bool] | None"]


def row_key(indexes: tuple[int, ...], ncols: int, buf: bytes, pos: int) -> tuple[Any, bool] | None:
    """A row's identity without converting it: the raw bytes of the columns at ``indexes``
    (ascending) of the TupleData at ``buf[pos:]`` (one bytes object for one column, else a
    tuple), and whether no column is unchanged TOAST. None when a key column is NULL or not
    sent, or the bytes are irregular. The server prints a value one way, so equal keys have
    equal bytes within a stream. The C ``_fastrow.row_key`` is this function's twin."""
    end = len(buf)
    if not indexes or list(indexes) != sorted(set(indexes)) or pos < 0 or end - pos < 2:
        return None
    if (buf[pos] << 8) | buf[pos + 1] != ncols:
        return None
    pos += 2
    key: list[bytes] = []
    complete = True
    wanted = set(indexes)
    for i in range(ncols):
        if pos >= end:
            return None
        kind = buf[pos]
        value = None
        if kind in (0x74, 0x62):  # 't', 'b'
            if end - pos < 5:
                return None
            size = _u32(buf, pos + 1)[0]
            if size > end - pos - 5:
                return None
            value = bytes(buf[pos + 5 : pos + 5 + size])
            pos += 5 + size
        elif kind in (0x6E, 0x75):  # 'n', 'u'
            complete = complete and kind != 0x75
            pos += 1
        else:
            return None
        if i in wanted:
            if value is None:
                return None
            key.append(value)
    if len(key) != len(indexes):
        return None
    return (key[0] if len(key) == 1 else tuple(key)), complete


def key_indexes(rel: RelationInfo, keys: tuple[str, ...]) -> tuple[int, ...]:
    """The positions of the columns ``keys`` in ``rel``, ascending: what ``row_key`` reads."""
    return tuple(i for i, name in enumerate(rel.names) if name in keys)


def key_reader(rel: RelationInfo, keys: tuple[str, ...]) -> RowKey:
    """``row_key`` bound to ``rel`` and the columns ``keys`` (in column order), in C where
    built."""
    return partial(accel.row_key or row_key, key_indexes(rel, keys), rel.ncols)


def _fast_row(loaders: ValueLoaders, cols: tuple[Column, ...]) -> FastRow:
    if accel.typed_row is None:
        return _no_fast_row
    oids = [c.type_oid for c in cols]
    return partial(
        accel.typed_row,
        dict.fromkeys(c.name for c in cols),
        loaders.row_loader(oids, Format.TEXT),
        loaders.row_loader(oids, Format.BINARY),
    )


class RelationCache:
    """relid → RelationInfo. A re-sent Relation (after a schema change) replaces the entry."""

    def __init__(self, loaders: ValueLoaders | None = None) -> None:
        self.loaders = loaders if loaders is not None else ValueLoaders()
        # updated in place, never replaced: the C row maker holds on to it
        self.by_id: dict[int, RelationInfo] = {}

    def add_relation(self, msg: Relation) -> RelationInfo:
        """Record (or replace, after a schema change) a Relation message."""
        cols = msg.columns
        loaders = self.loaders
        info = RelationInfo(
            relid=msg.relid,
            namespace=msg.namespace,
            name=msg.name,
            replica_identity=msg.replica_identity,
            columns=cols,
            names=tuple(c.name for c in cols),
            key_names=tuple(c.name for c in cols if c.is_key),
            loaders=loaders,
            ncols=len(cols),
            fused=tuple(
                (c.name, loaders.text_loader(c.type_oid), loaders.binary_loader(c.type_oid))
                for c in cols
            ),
            fast_row=_fast_row(loaders, cols),
        )
        self.by_id[msg.relid] = info
        return info

    def copy(self) -> RelationCache:
        """A cache with the same entries, to move on independently (entries are immutable)."""
        other = RelationCache(self.loaders)
        other.by_id.update(self.by_id)
        return other

    def add_type(self, msg: Type) -> None:
        """Record a Type message: a custom type's OID by name (a domain names its base type)."""
        self.loaders.note_type(msg.oid, msg.namespace, msg.name)

    def get(self, relid: int) -> RelationInfo:
        """The relation ``relid``, or a DecodeError: a change never comes before its Relation."""
        try:
            return self.by_id[relid]
        except KeyError:
            raise DecodeError(
                f"change for relation id {relid} before any Relation message describing it; "
                "the stream must be consumed from the start of a transaction",
                msg_type="DML",
            ) from None

    def __contains__(self, relid: int) -> bool:
        return relid in self.by_id

    def __len__(self) -> int:
        return len(self.by_id)
