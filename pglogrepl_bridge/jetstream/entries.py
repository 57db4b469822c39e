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
from collections.abc import Iterable
from typing import Any

from pglogrepl_bridge.errors import ProtocolError
from pglogrepl_bridge.pgoutput.messages import Column, Relation, Type
from pglogrepl_bridge.pgoutput.relcache import RelationCache, RelationInfo
from pglogrepl_bridge.pgoutput.transaction import RowChange, Transaction, TruncateChange
from pglogrepl_bridge.pgoutput.values import ValueLoaders
from pglogrepl_bridge.wire.payloadread import read_payload
from pglogrepl_bridge.wire.protocol import WalEntry, from_bincode

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
