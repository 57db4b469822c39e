"""What happens between connecting and START_REPLICATION, written once for both streams.

psycopg's own split is the model: the logic is a generator that yields each statement to run
and receives its rows, so the sync stream drives it with ``conn.execute`` and the async one
with ``await aconn.execute``; neither repeats a check. Every refusal says what to do.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass
from typing import Any, Literal

from psycopg import sql

from pglogrepl_bridge.errors import ConfigError, ReplicationError, SlotInUseError
from pglogrepl_bridge.lsn import Lsn, format_lsn
from pglogrepl_bridge.postgres import admin
from pglogrepl_bridge.postgres.connection import SystemInfo, system_info
from pglogrepl_bridge.postgres.options import StreamOptions, max_proto_version

Query = str | sql.Composed
Rows = list[tuple[Any, ...]]
Steps = Generator[Query, Rows, "StartPlan"]


@dataclass(frozen=True, slots=True)
class StartPlan:
    """What START_REPLICATION will ask for, and from where."""

    system: SystemInfo
    proto_version: int
    streaming: bool | Literal["parallel"]
    confirmed: Lsn  # the slot's confirmed position: the server holds it confirmed already
    query: sql.Composed


def start_steps(options: StreamOptions, server_version: int, backend_pid: int) -> Steps:
    """IDENTIFY_SYSTEM, the server and slot checks, the slot if asked, the start query."""
    opts = options
    system = system_info((yield "IDENTIFY_SYSTEM")[0], server_version)
    proto, streaming = check_server(opts, system, (yield "SHOW wal_level")[0][0])
    missing = admin.missing_from(opts.publications, (yield admin.PUBLICATIONS_QUERY))
    if missing:
        raise ConfigError(
            f"publication(s) {', '.join(missing)} do not exist in database "
            f"{system.dbname!r}: create with 'pglogrepl-bridge publication create' "
            "or CREATE PUBLICATION"
        )
    slot = admin.slot_from(opts.slot, (yield admin.slots_query(system.major)))
    if opts.create_slot and (opts.temporary or slot is None):
        yield admin.create_slot_query(
            opts.slot, system.major, temporary=opts.temporary, two_phase=opts.two_phase
        )
        slot = admin.slot_from(opts.slot, (yield admin.slots_query(system.major)))
    confirmed = check_slot(opts.slot, slot, backend_pid)
    # Ask from the slot's own position, never from the consumer's: a start above it makes
    # the server skip a PREPARE it already sent (two-phase), whose transaction is still to
    # come. What the consumer already holds is skipped by the session instead.
    query = start_query(opts, confirmed, proto, streaming)
    return StartPlan(system, proto, streaming, confirmed, query)


def check_server(
    opts: StreamOptions, system: SystemInfo, wal_level: str
) -> tuple[int, bool | Literal["parallel"]]:
    """Refuse what this server cannot do; return (proto_version, streaming)."""
    if wal_level != "logical":
        raise ConfigError(
            f"wal_level is {wal_level!r}, logical decoding needs "
            "'logical': ALTER SYSTEM SET wal_level = logical, then restart the server"
        )
    major = system.major
    best = max_proto_version(major)
    proto = opts.proto_version or best
    if proto > best:
        raise ConfigError(
            f"proto_version {proto} needs a newer server: PostgreSQL {major} supports up "
            f"to {best} (2 needs 14+, 3 needs 15+, 4 needs 16+)"
        )
    needs = [
        (opts.binary and major < 14, "binary needs PostgreSQL 14+"),
        (opts.messages and major < 14, "messages needs PostgreSQL 14+"),
        (bool(opts.streaming) and proto < 2, "streaming needs proto_version 2+ (PG 14+)"),
        (
            opts.streaming == "parallel" and proto < 4,
            "streaming=parallel needs proto_version 4 (PG 16+)",
        ),
        (opts.two_phase and proto < 3, "two_phase needs proto_version 3+ (PG 15+)"),
        (opts.origin is not None and major < 16, "origin needs PostgreSQL 16+"),
    ]
    for failed, why in needs:
        if failed:
            raise ConfigError(f"option not supported by PostgreSQL {major}: {why}")
    streaming = proto >= 2 if opts.streaming is None else opts.streaming
    return proto, streaming


def check_slot(name: str, slot: admin.SlotInfo | None, backend_pid: int) -> Lsn:
    """Refuse a missing, foreign, invalidated or busy slot; return its confirmed LSN."""
    if slot is None:
        raise ConfigError(
            f"replication slot {name!r} does not exist: create it with --create-slot or "
            f"'pglogrepl-bridge slot create {name}'"
        )
    if slot.slot_type != "logical" or slot.plugin != "pgoutput":
        raise ConfigError(f"slot {name!r} is not a pgoutput logical slot ({slot.plugin})")
    reason = slot.invalidation_reason or ("wal_removed" if slot.wal_status == "lost" else None)
    if reason is not None or slot.conflicting:
        why = reason or "conflict with recovery"
        hint = {
            "wal_removed": ": the WAL it needed was removed (max_slot_wal_keep_size)",
            "idle_timeout": ": idle longer than idle_replication_slot_timeout",
        }.get(why, "")
        raise ReplicationError(
            f"replication slot {name!r} is invalidated ({why}{hint}): drop and re-create it "
            f"('pglogrepl-bridge slot drop {name}', 'slot create {name}'), then resynchronise "
            "the consumer"
        )
    if slot.active and slot.active_pid is not None and slot.active_pid != backend_pid:
        raise SlotInUseError(
            f"replication slot {name!r} is in use by another process "
            f"(PID {slot.active_pid}): stop that consumer, or use another slot"
        )
    return slot.confirmed_flush_lsn or Lsn(0)


def start_query(
    opts: StreamOptions, start: int, proto: int, streaming: bool | Literal["parallel"]
) -> sql.Composed:
    """START_REPLICATION with every pgoutput option asked for."""
    params: list[tuple[str, str]] = [
        ("proto_version", str(proto)),
        ("publication_names", admin.publication_names_option(opts.publications)),
    ]
    if opts.binary:
        params.append(("binary", "true"))
    if opts.messages:
        params.append(("messages", "true"))
    if streaming:
        params.append(("streaming", "parallel" if streaming == "parallel" else "on"))
    if opts.two_phase:
        params.append(("two_phase", "on"))
    if opts.origin is not None:
        params.append(("origin", opts.origin))
    return sql.SQL("START_REPLICATION SLOT {} LOGICAL {} ({})").format(
        sql.Identifier(opts.slot),
        sql.SQL(format_lsn(start)),
        sql.SQL(", ").join(
            sql.SQL("{} {}").format(sql.Identifier(k), sql.Literal(v)) for k, v in params
        ),
    )
