"""What to copy, read from the source's catalog once, before any row is read.

Each published table is described the way pgoutput would describe it (a ``Relation`` with
the published columns in column order, key flags from the replica identity, and ``Type``
messages for non-built-in types, a domain naming its base type), so the sink creates the
same target table and converts the same text through the same loaders as for the stream.
The catalog is read here, at planning time, never while decoding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from uuid import UUID

import psycopg
from psycopg import sql

from pglogrepl_bridge.errors import ConfigError
from pglogrepl_bridge.pgoutput.messages import Column, Relation, Type
from pglogrepl_bridge.postgres.connection import Conn
from pglogrepl_bridge.snapshot import plan

#: pgoutput sends Type messages for OIDs from here on (PostgreSQL's FirstGenbkiObjectId)
FIRST_CUSTOM_OID = 10000

_TABLES = """
SELECT c.oid, pt.schemaname, pt.tablename, c.relkind, c.relreplident, pt.attnames,
       pt.rowfilter, c.reltuples
FROM pg_publication_tables pt
JOIN pg_namespace n ON n.nspname = pt.schemaname
JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = pt.tablename
WHERE pt.pubname = ANY(%s)
ORDER BY pt.schemaname, pt.tablename
"""

_COLUMNS = """
SELECT a.attname, a.atttypid, a.atttypmod, a.attgenerated
FROM pg_attribute a
WHERE a.attrelid = %s AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attnum
"""

# the replica identity's columns, in the index's order (the first leads its btree)
_IDENTITY = """
SELECT a.attname, a.atttypid
FROM pg_index i
CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord)
JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
WHERE i.indrelid = %s AND (CASE %s WHEN 'd' THEN i.indisprimary WHEN 'i' THEN i.indisreplident
                                   ELSE false END)
ORDER BY k.ord
"""

#: key types a table may be split by (rule 2 of ``plan``): int2, int4, int8 and uuid, whose
#: loaded Python values (int, UUID) order exactly as PostgreSQL's btree orders them
SPLIT_TYPES = {21: "int2", 23: "int4", 20: "int8", 2950: "uuid"}

# the planner's statistics of a column, when the table was analysed: how closely the physical
# order follows the column (1 or -1: exactly), and its histogram (evenly filled bounds)
_STATS = """
SELECT correlation,
       (SELECT array_agg(h.x::text ORDER BY h.i)
        FROM unnest(histogram_bounds::text::{typ}[]) WITH ORDINALITY AS h(x, i))
FROM pg_stats
WHERE schemaname = %s AND tablename = %s AND attname = %s
ORDER BY inherited DESC LIMIT 1
"""

#: a key split needs a key that follows the heap's order at least this closely: each key
#: range then reads its own pages. A random key (a uuid v4) would make every chunk read
#: pages all over the table, so such a table is split by ctid.
MIN_CORRELATION = 0.8

# the heap pages to cover: the table's own, or its largest leaf partition's (a ctid range on a
# partitioned table applies to each leaf)
_PAGES = """
SELECT greatest(pg_relation_size(%(oid)s::oid::regclass),
                (SELECT max(pg_relation_size(p.relid))
                 FROM pg_partition_tree(%(oid)s::oid::regclass) p WHERE p.isleaf))
       / current_setting('block_size')::int
"""

_TYPES = """
SELECT t.oid, t.typtype, t.typbasetype,
       CASE WHEN t.typnamespace = 'pg_catalog'::regnamespace THEN '' ELSE n.nspname END,
       t.typname
FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
WHERE t.oid = ANY(%s)
"""


@dataclass(frozen=True, slots=True)
class PublishedTable:
    """A table as the publications publish it: its Relation and Types, where to read it,
    the published columns and the row filter (None: every row), and its size."""

    relation: Relation
    types: tuple[Type, ...]
    ident: sql.Composable  # the table to read: ONLY the table, or a partitioned root
    row_filter: str | None
    pages: int
    estimate: int  # pg_class.reltuples: an estimate for progress, -1 when never analysed
    split_key: str | None = None  # the key column it may be split by (``plan`` rule 2)

    @property
    def name(self) -> str:
        """``schema.name``, as ``RelationInfo.qualified_name`` says it for the stream."""
        return f"{self.relation.namespace}.{self.relation.name}"

    def copy_query(self, chunk: plan.Chunk) -> sql.Composed:
        """COPY of the published columns and the rows of ``chunk`` (a ctid or key range)."""
        cond: list[sql.Composable] = []
        if chunk.ranges is None:
            low, high = plan.ctid_bounds(chunk)
            cond.append(sql.SQL("ctid >= {}::tid").format(sql.Literal(low)))
            if high is not None:
                cond.append(sql.SQL("ctid < {}::tid").format(sql.Literal(high)))
        else:
            key = sql.Identifier(chunk.ranges.column)
            low_key, high_key = chunk.ranges.range_of(chunk.index)
            if low_key is not None:
                cond.append(sql.SQL("{} >= {}").format(key, sql.Literal(low_key)))
            if high_key is not None:
                cond.append(sql.SQL("{} < {}").format(key, sql.Literal(high_key)))
            if not cond:
                cond.append(sql.SQL("true"))
        if self.row_filter is not None:
            cond.append(sql.SQL("({})").format(sql.SQL(self.row_filter)))
        cols = sql.SQL(", ").join(sql.Identifier(c.name) for c in self.relation.columns)
        return sql.SQL("COPY (SELECT {} FROM {} WHERE {}) TO STDOUT").format(
            cols, self.ident, sql.SQL(" AND ").join(cond)
        )


def published_tables(conn: Conn, publications: tuple[str, ...]) -> list[PublishedTable]:
    """Every table the publications publish (FOR ALL TABLES, FOR TABLES IN SCHEMA, column
    lists and row filters included), in the transaction ``conn`` is in."""
    try:
        rows = conn.execute(_TABLES, (list(publications),)).fetchall()
        merged: dict[int, list[Any]] = {}
        for oid, schema, name, kind, ident, attnames, rowfilter, reltuples in rows:
            entry = merged.setdefault(oid, [schema, name, kind, ident, set(), False, [], reltuples])
            entry[4].update(attnames or ())
            if rowfilter is None:
                entry[5] = True  # one publication without a filter publishes every row
            else:
                entry[6].append(rowfilter)
        return [_describe(conn, oid, *entry) for oid, entry in merged.items()]
    except psycopg.errors.InsufficientPrivilege as exc:
        raise ConfigError(
            f"cannot read the published tables: {str(exc).strip()}: GRANT SELECT on them to "
            "the replication role"
        ) from None


def _describe(
    conn: Conn,
    oid: int,
    schema: str,
    name: str,
    kind: str,
    ident: str,
    attnames: set[str],
    unfiltered: bool,
    filters: list[str],
    reltuples: float,
) -> PublishedTable:
    identity = conn.execute(_IDENTITY, (oid, ident)).fetchall()
    keys = {name for name, _ in identity}
    # generated columns: never published before 18 (pg_publication_tables lists them all
    # the same), STORED ones on 18 when the publication asks, virtual ones never
    unpublished = ("s", "v") if conn.info.server_version < 180000 else ("v",)
    columns = tuple(
        Column(attname, typid, typmod, ident == "f" or attname in keys)
        for attname, typid, typmod, generated in conn.execute(_COLUMNS, (oid,)).fetchall()
        if attname in attnames and generated not in unpublished
    )
    pages = conn.execute(_PAGES, {"oid": oid}).fetchone()
    table = sql.Identifier(schema, name)
    return PublishedTable(
        relation=Relation(None, oid, schema, name, ident, columns),
        types=_types(conn, {c.type_oid for c in columns if c.type_oid >= FIRST_CUSTOM_OID}),
        ident=table if kind == "p" else sql.SQL("ONLY {}").format(table),
        row_filter=None if unfiltered or not filters else " OR ".join(f"({f})" for f in filters),
        pages=int(pages[0]) if pages and pages[0] is not None else 0,
        estimate=int(reltuples),
        split_key=(
            identity[0][0]
            if identity and identity[0][1] in SPLIT_TYPES and identity[0][0] in attnames
            else None
        ),
    )


def _types(conn: Conn, oids: set[int]) -> tuple[Type, ...]:
    """The Type messages pgoutput would send: a domain names its base type (followed down)."""
    out = []
    for oid in sorted(oids):
        current = oid
        while True:
            row = conn.execute(_TYPES, ([current],)).fetchone()
            if row is None:
                break
            _, typtype, base, namespace, typname = row
            if typtype == "d" and base:
                current = int(base)
                continue
            out.append(Type(None, oid, namespace, typname))
            break
    return tuple(out)


def key_ranges(conn: Conn, table: PublishedTable, count: int) -> plan.KeyRanges | None:
    """Split ``table`` by its key into about ``count`` ranges (``plan`` rule 2), under the
    snapshot ``conn`` is in, when the key follows the heap's order (``MIN_CORRELATION``; a
    table never analysed: when the key is an integer, as serial and identity keys are).
    Bounds: the planner's histogram, else the key's lowest and highest values spread evenly.
    None: split by ctid."""
    column = table.split_key
    if column is None or count < 2:
        return None
    typ = next(SPLIT_TYPES[c.type_oid] for c in table.relation.columns if c.name == column)
    rel = table.relation
    query = sql.SQL(_STATS).format(typ=sql.SQL(typ))
    stats = conn.execute(query, (rel.namespace, rel.name, column)).fetchone()
    correlation, sample = stats if stats is not None else (None, None)
    if correlation is None and typ == "uuid":
        return None  # most likely random: read by ctid
    if correlation is not None and abs(correlation) < MIN_CORRELATION:
        return None
    bounds = plan.quantiles(sample or [], count)
    if not bounds:
        key = sql.Identifier(column)
        low, high = conn.execute(
            sql.SQL("SELECT min({k})::text, max({k})::text FROM {t}").format(k=key, t=table.ident)
        ).fetchone() or (None, None)
        if low is None or high is None:
            return None
        if typ == "uuid":
            ints = plan.split_bounds(UUID(low).int, UUID(high).int, count)
            bounds = [str(UUID(int=i)) for i in ints]
        else:
            bounds = [str(i) for i in plan.split_bounds(int(low), int(high), count)]
    return plan.KeyRanges(column, tuple(bounds)) if bounds else None
