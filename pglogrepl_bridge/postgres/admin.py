"""Slots and publications: create, drop, list. Used by the CLI and by tests.

Statements are composed with psycopg.sql (identifiers quoted), never by string pasting.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql

from pglogrepl_bridge.errors import ConfigError
from pglogrepl_bridge.lsn import Lsn
from pglogrepl_bridge.postgres.connection import Conn, connect, server_error

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SlotInfo:
    """A row of pg_replication_slots, with the lag behind the current WAL position."""

    name: str
    plugin: str | None
    slot_type: str
    database: str | None
    temporary: bool
    active: bool
    active_pid: int | None
    restart_lsn: Lsn | None
    confirmed_flush_lsn: Lsn | None
    wal_status: str | None
    safe_wal_size: int | None
    two_phase: bool
    lag_bytes: int | None
    #: 16+: invalidated by a conflict with recovery (on a standby)
    conflicting: bool | None = None
    #: 17+: synchronised to standbys; a synced copy on a standby; why it was invalidated
    failover: bool | None = None
    synced: bool | None = None
    invalidation_reason: str | None = None
    #: 17+: when it last stopped being used
    inactive_since: datetime | None = None


def _lsn(value: Any) -> Lsn | None:
    return None if value is None else Lsn.parse(str(value))


def slots_query(major: int) -> str:
    """Every replication slot, with how far it lags behind the current WAL position, and the
    columns this major version has (NULL where it has not)."""
    newer = [
        ("conflicting", 16),
        ("failover", 17),
        ("synced", 17),
        ("invalidation_reason", 17),
        ("inactive_since", 17),
    ]
    extra = ", ".join(name if major >= since else f"NULL AS {name}" for name, since in newer)
    return (
        "SELECT slot_name, plugin, slot_type, database, temporary, active, active_pid, "
        "restart_lsn::text, confirmed_flush_lsn::text, wal_status, safe_wal_size, two_phase, "
        "pg_wal_lsn_diff(pg_current_wal_lsn(), coalesce(confirmed_flush_lsn, restart_lsn))"
        f"::bigint, {extra} FROM pg_replication_slots ORDER BY slot_name"
    )


PUBLICATIONS_QUERY = "SELECT pubname FROM pg_publication"


def list_slots(conn: Conn) -> list[SlotInfo]:
    """Every replication slot, with how far it lags behind the current WAL position."""
    return slots_from(conn.execute(slots_query(conn.info.server_version // 10000)).fetchall())


def slots_from(rows: list[tuple[Any, ...]]) -> list[SlotInfo]:
    """``slots_query``'s rows as SlotInfo."""
    return [
        SlotInfo(
            name=r[0],
            plugin=r[1],
            slot_type=r[2],
            database=r[3],
            temporary=r[4],
            active=r[5],
            active_pid=r[6],
            restart_lsn=_lsn(r[7]),
            confirmed_flush_lsn=_lsn(r[8]),
            wal_status=r[9],
            safe_wal_size=r[10],
            two_phase=r[11],
            lag_bytes=r[12],
            conflicting=r[13],
            failover=r[14],
            synced=r[15],
            invalidation_reason=r[16],
            inactive_since=r[17],
        )
        for r in rows
    ]


def get_slot(conn: Conn, name: str) -> SlotInfo | None:
    """The slot named ``name``, or None."""
    return slot_from(name, conn.execute(slots_query(conn.info.server_version // 10000)).fetchall())


def take_slot(dsn: str, name: str, stopping: Callable[[], bool], wait: float = 10.0) -> bool:
    """A bridge group's fence (``wire.election`` E8): terminate the walsender that holds
    slot ``name`` (a master of an older term, paused or cut off) until the slot is free.
    Only the elected master calls it, after winning. False: it stays taken, or stopped."""
    deadline = time.monotonic() + wait
    with connect(dsn, replication=False) as conn:
        while not stopping():
            row = conn.execute(
                "SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s", (name,)
            ).fetchone()
            pid = row[0] if row is not None else None
            if pid is None:
                return True
            log.warning("slot %s is held by walsender %d: terminating it", name, pid)
            conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
            if time.monotonic() > deadline:
                log.error("slot %s stays held", name)
                return False
            time.sleep(0.05)
    return False


def slot_from(name: str, rows: list[tuple[Any, ...]]) -> SlotInfo | None:
    """The slot named ``name`` among ``slots_query``'s rows, or None."""
    return next((s for s in slots_from(rows) if s.name == name), None)


def create_slot(
    conn: Conn,
    name: str,
    *,
    temporary: bool = False,
    two_phase: bool = False,
    failover: bool = False,
) -> Lsn:
    """Create a pgoutput slot over a replication connection; returns its consistent point.

    A TEMPORARY slot lives only as long as this connection: create it on the connection that
    will stream from it.
    """
    query = create_slot_query(
        name,
        conn.info.server_version // 10000,
        temporary=temporary,
        two_phase=two_phase,
        failover=failover,
    )
    try:
        row = conn.execute(query).fetchone()
    except psycopg.Error as exc:
        raise server_error(exc, slot=name, publications=()) from None
    assert row is not None
    return Lsn.parse(str(row[1]))


def create_slot_query(
    name: str,
    major: int,
    *,
    temporary: bool = False,
    two_phase: bool = False,
    failover: bool = False,
    snapshot: str = "nothing",
) -> sql.Composed:
    """CREATE_REPLICATION_SLOT for a pgoutput slot, in the syntax of this major version.

    ``snapshot="export"`` exports a snapshot of the slot's consistent point, for a copy that
    the slot's stream continues exactly (it lives until the connection's next command)."""
    if two_phase and major < 15:
        raise ConfigError(f"two_phase slots need PostgreSQL 15 or later (server: {major})")
    if failover and major < 17:
        raise ConfigError(f"failover slots need PostgreSQL 17 or later (server: {major})")
    options: list[sql.Composable] = (
        [sql.SQL("SNAPSHOT {}").format(sql.Literal(snapshot))] if major >= 15 else []
    )
    if two_phase:
        options.append(sql.SQL("TWO_PHASE true"))
    if failover:
        options.append(sql.SQL("FAILOVER true"))
    query = sql.SQL("CREATE_REPLICATION_SLOT {name} {temp} LOGICAL pgoutput").format(
        name=sql.Identifier(name), temp=sql.SQL("TEMPORARY" if temporary else "")
    )
    if options:
        query = sql.SQL("{} ({})").format(query, sql.SQL(", ").join(options))
    elif major < 15:
        word = "EXPORT_SNAPSHOT" if snapshot == "export" else "NOEXPORT_SNAPSHOT"
        query = sql.SQL("{} {}").format(query, sql.SQL(word))
    return query


def drop_slot(conn: Conn, name: str, *, wait: bool = False) -> None:
    """DROP_REPLICATION_SLOT (``wait``: until an active consumer lets go)."""
    query = sql.SQL("DROP_REPLICATION_SLOT {}{}").format(
        sql.Identifier(name), sql.SQL(" WAIT" if wait else "")
    )
    try:
        conn.execute(query)
    except psycopg.Error as exc:
        raise server_error(exc, slot=name, publications=()) from None


@dataclass(frozen=True, slots=True)
class PublicationInfo:
    """A publication and the tables it covers."""

    name: str
    all_tables: bool
    tables: tuple[str, ...]


def list_publications(conn: Conn) -> list[PublicationInfo]:
    """Every publication with its tables."""
    rows = conn.execute(
        "SELECT p.pubname, p.puballtables, "
        "coalesce(array_agg(t.schemaname || '.' || t.tablename ORDER BY 1) "
        "FILTER (WHERE t.tablename IS NOT NULL), '{}') "
        "FROM pg_publication p LEFT JOIN pg_publication_tables t ON t.pubname = p.pubname "
        "GROUP BY 1, 2 ORDER BY 1"
    ).fetchall()
    return [PublicationInfo(r[0], r[1], tuple(r[2])) for r in rows]


def missing_publications(conn: Conn, names: tuple[str, ...]) -> list[str]:
    """Those of ``names`` that are not publications of the connected database."""
    return missing_from(names, conn.execute(PUBLICATIONS_QUERY).fetchall())


def missing_from(names: tuple[str, ...], rows: list[tuple[Any, ...]]) -> list[str]:
    """Those of ``names`` not among ``PUBLICATIONS_QUERY``'s rows."""
    existing = {r[0] for r in rows}
    return [n for n in names if n not in existing]


def create_publication(conn: Conn, name: str, tables: tuple[str, ...] = ()) -> None:
    """FOR ALL TABLES when no tables are named; tables are ``schema.name`` or ``name``."""
    target: sql.Composable = sql.SQL("FOR ALL TABLES")
    if tables:
        idents = sql.SQL(", ").join(sql.Identifier(*t.split(".", 1)) for t in tables)
        target = sql.SQL("FOR TABLE {}").format(idents)
    try:
        conn.execute(sql.SQL("CREATE PUBLICATION {} {}").format(sql.Identifier(name), target))
    except psycopg.errors.DuplicateObject:
        raise ConfigError(f"publication {name!r} already exists") from None
    except psycopg.errors.UndefinedTable as exc:
        raise ConfigError(f"cannot create publication {name!r}: {exc}".strip()) from None


def drop_publication(conn: Conn, name: str) -> None:
    """DROP PUBLICATION, or a ConfigError when there is none."""
    try:
        conn.execute(sql.SQL("DROP PUBLICATION {}").format(sql.Identifier(name)))
    except psycopg.errors.UndefinedObject:
        raise ConfigError(f"publication {name!r} does not exist") from None


def publication_names_option(names: tuple[str, ...]) -> str:
    """pgoutput's ``publication_names``: a comma-separated list of quoted identifiers."""
    return ",".join('"' + n.replace('"', '""') + '"' for n in names)


def last_commit_lsn(conn: Conn, slot: str, publications: tuple[str, ...]) -> Lsn | None:
    """End LSN of the last transaction the slot would deliver now (peeked: nothing consumed).

    The value for --until-lsn to stop after everything committed so far; it decodes what the
    slot holds, so it costs what a pass over that WAL costs.
    """
    row = conn.execute(
        "SELECT max(lsn)::text FROM pg_logical_slot_peek_binary_changes(%s, NULL, NULL, "
        "'proto_version', '1', 'publication_names', %s) WHERE substr(data, 1, 1) = 'C'",
        (slot, publication_names_option(publications)),
    ).fetchone()
    return None if row is None or row[0] is None else Lsn.parse(row[0])


def request_snapshot(conn: Conn, slot: str, tables: tuple[str, ...]) -> Lsn:
    """Ask a running ``replicate`` on ``slot`` to copy ``tables`` again: a transactional
    logical decoding message, ordered with the changes and kept in the WAL until the slot
    has passed it. Returns the message's LSN. Tables are ``schema.name`` or ``name``."""
    names = [t if "." in t else f"public.{t}" for t in tables]
    for name in names:
        found = conn.execute(
            "SELECT to_regclass(%s) IS NOT NULL",
            (str(sql.Identifier(*name.split(".", 1)).as_string(conn)),),
        ).fetchone()
        if not found or not found[0]:
            raise ConfigError(f"table {name} does not exist: name it as schema.table")
    # here, not at the top: every stream's start-up imports this module, and snapshot.plan's
    # dataclasses cost it 3 ms
    from pglogrepl_bridge.snapshot.plan import SNAPSHOT_REQUEST_PREFIX

    content = json.dumps({"slot": slot, "tables": names})
    row = conn.execute(
        "SELECT pg_logical_emit_message(true, %s, %s)", (SNAPSHOT_REQUEST_PREFIX, content)
    ).fetchone()
    assert row is not None
    return Lsn.parse(str(row[0]))


#: the application_name of a snapshot's worker sessions: ``status`` finds them by it
SNAPSHOT_APPLICATION = "pglogrepl_bridge snapshot"


@dataclass(frozen=True, slots=True)
class SnapshotCopy:
    """A snapshot worker's COPY running now (``pg_stat_progress_copy``)."""

    pid: int
    table: str
    rows: int
    bytes: int


def snapshot_copies(conn: Conn) -> list[SnapshotCopy]:
    """The COPYs that snapshot workers run now, on any database of the server."""
    rows = conn.execute(
        "SELECT p.pid, coalesce(substring(a.query from ' FROM (?:ONLY )?(\\S+) WHERE'), ''), "
        "p.tuples_processed, p.bytes_processed "
        "FROM pg_stat_progress_copy p JOIN pg_stat_activity a USING (pid) "
        "WHERE a.application_name = %s ORDER BY p.pid",
        (SNAPSHOT_APPLICATION,),
    ).fetchall()
    return [SnapshotCopy(int(r[0]), str(r[1]).replace('"', ""), int(r[2]), int(r[3])) for r in rows]
