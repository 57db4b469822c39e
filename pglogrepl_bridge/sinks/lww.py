"""Last-writer-wins for the SQL sink: every write carries a version, and a write applies only
over an older one. The argument that this converges is in docs/last-writer-wins.md.

The version of a change is ``(commit time µs, node id, commit end LSN, position in its
transaction)``, compared as a tuple: a total order over every change of every source.

Rules (enforced here, one function each):

1. A row keeps the version of its last write; a deleted row leaves a tombstone with the
   version of the delete (table ``pglogrepl_bridge_tombstone``).
2. A change to key K applies only if its version is newer than K's stored version, whether
   that is a row's or a tombstone's. Later changes of one transaction are newer than earlier
   ones (position), so a transaction's own insert-then-update ends as its update.
3. An update that changes the key is a delete of the old key (tombstone) and a write of the
   new key with *all* the row's columns: those the change did not carry (unchanged TOAST)
   are taken from the old row.
4. An update without a key change writes only the columns it carries; unchanged TOAST
   columns keep their value.

Within one source, versions of changes to the same row grow in stream order (a transaction
that changes a row waits for the previous writer's commit, so its commit time is not
earlier; equal times fall back to the LSN, then to the position), so LWW applies exactly what
``--conflict source`` applies.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

#: version columns each target row carries in LWW mode
TS_COL = "_pglb_commit_ts"  # commit time (µs since the Unix epoch) of the row's last write
NODE_COL = "_pglb_node"  # node id of the source of the row's last write
LSN_COL = "_pglb_lsn"  # commit end LSN of the row's last write (its source's)
POS_COL = "_pglb_pos"  # position of the last write in its transaction
VERSION_COLS = (TS_COL, NODE_COL, LSN_COL, POS_COL)

Version = tuple[int, int, int, int]


def version_columns() -> list[sa.Column[Any]]:
    """The version columns, for a target table or the tombstone table."""
    return [sa.Column(name, sa.BigInteger) for name in VERSION_COLS]


def as_version(row: Any) -> Version | None:
    """A stored version (NULLs, from rows written before LSN and position were kept, count as
    0), or None when there is no row."""
    if row is None or row[0] is None:
        return None
    ts, node, lsn, pos = (int(v) if v is not None else 0 for v in row)
    return ts, node, lsn, pos


def version_values(version: Version) -> dict[str, int]:
    """A version as column values (the LSN as a signed 64-bit value, as BIGINT holds it)."""
    ts, node, lsn, pos = version
    return {TS_COL: ts, NODE_COL: node, LSN_COL: _signed(lsn), POS_COL: pos}


def _signed(lsn: int) -> int:
    return lsn - (1 << 64) if lsn >= 1 << 63 else lsn


def stored_version(
    conn: sa.Connection, table: sa.Table, tombstones: sa.Table, key: dict[str, Any]
) -> tuple[Version | None, dict[str, Any] | None]:
    """K's stored version (rule 2) and, when a row holds it, the row's values."""
    where = [table.c[k] == v for k, v in key.items()]
    row = conn.execute(sa.select(table).where(*where)).mappings().first()
    if row is not None:
        return as_version([row.get(c) for c in VERSION_COLS]), dict(row)
    tomb = conn.execute(
        sa.select(*[tombstones.c[c] for c in VERSION_COLS]).where(
            tombstones.c.tbl == table.name, tombstones.c.row_key == key_text(key)
        )
    ).first()
    return as_version(tomb), None


def write_row(
    conn: sa.Connection,
    table: sa.Table,
    tombstones: sa.Table,
    key: dict[str, Any],
    values: dict[str, Any],
    version: Version,
    *,
    exists: bool,
) -> None:
    """Write ``values`` (with the version) at ``key``, and clear its tombstone."""
    values = {**values, **version_values(version)}
    if exists:
        conn.execute(
            sa.update(table).where(*[table.c[k] == v for k, v in key.items()]).values(values)
        )
    else:
        conn.execute(sa.insert(table).values({**key, **values}))
    clear_tombstone(conn, tombstones, table.name, key)


def delete_row(
    conn: sa.Connection,
    table: sa.Table,
    tombstones: sa.Table,
    key: dict[str, Any],
    version: Version,
) -> None:
    """Delete the row at ``key`` and leave a tombstone with ``version`` (rule 1)."""
    conn.execute(sa.delete(table).where(*[table.c[k] == v for k, v in key.items()]))
    clear_tombstone(conn, tombstones, table.name, key)
    conn.execute(
        sa.insert(tombstones).values(
            tbl=table.name, row_key=key_text(key), **version_values(version)
        )
    )


def clear_tombstone(
    conn: sa.Connection, tombstones: sa.Table, name: str, key: dict[str, Any]
) -> None:
    """Forget the tombstone of ``key`` (a newer write replaced it)."""
    conn.execute(
        sa.delete(tombstones).where(tombstones.c.tbl == name, tombstones.c.row_key == key_text(key))
    )


def key_text(key: dict[str, Any]) -> str:
    """A key as the tombstone table's text (column=value, sorted by column)."""
    return "|".join(f"{k}={v}" for k, v in sorted(key.items()))[:255]
