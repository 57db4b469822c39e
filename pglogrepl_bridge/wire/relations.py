"""Relation descriptions beside a payload, written and read; pure.

The bincode payload's relation definitions have no room for type modifiers, the replica
identity or custom type names (its Rust definitions are fixed), and the JSON payload has no
types at all. Where a reader must apply a transaction as ``replicate`` would, the writer adds
the relations the transaction touches, as pgoutput's Relation messages described them: the
``Pglb-Relations`` header of ``publish`` (``docs/nats.md``, rule 5) and the ``relations``
member of the bridge's JSON payload (``docs/replication-message.md``).

The description is compact JSON (ASCII only), a list: first the relations of the row
changes, by first appearance (the order of the bincode payload's ``relations``, so a Row's
``relation`` index points into both), then relations that are only truncated. Each is
``[relid, schema, table, replica identity, columns]``, each column ``[name, type oid, type
modifier, is key]``, plus ``namespace, name`` of the stream's Type message for a custom type
(an enum, a domain: what loads it as the source does).
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

#: description-text caches larger than this start again (distinct relation sets are few)
_MAX_CACHED = 4096


def relations_of(txn: Transaction) -> list[RelationInfo]:
    """The described order: row relations by first appearance (the bincode indexes), then the
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


class RelationWriter:
    """Relations → their description text (each relation's JSON worked out once)."""

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


class RelationReader:
    """Descriptions → RelationInfo, one per distinct relation description, shared by every
    transaction that has it, so a sink prepares each target table once."""

    def __init__(self, loaders: ValueLoaders | None = None) -> None:
        self._cache = RelationCache(loaders)
        self._by_entry: dict[tuple[Any, ...], RelationInfo] = {}
        self._by_text: dict[str, tuple[RelationInfo, ...]] = {}

    def read(self, text: str, where: str = "Pglb-Relations header") -> tuple[RelationInfo, ...]:
        """The relations a description text describes."""
        found = self._by_text.get(text)
        if found is not None:
            return found
        try:
            found = self.described(json.loads(text))
        except (ProtocolError, ValueError) as exc:
            raise ProtocolError(f"malformed {where} ({exc}): {text[:200]!r}") from None
        if len(self._by_text) >= _MAX_CACHED:
            self._by_text.clear()
        self._by_text[text] = found
        return found

    def described(self, docs: Any) -> tuple[RelationInfo, ...]:
        """The relations of an already parsed description (a list of relation lists)."""
        try:
            if not isinstance(docs, list):
                raise TypeError("not a list of relations")
            return tuple(self._relation(doc) for doc in docs)
        except (ValueError, TypeError, IndexError) as exc:
            raise ProtocolError(f"{type(exc).__name__}: {exc}") from None

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
