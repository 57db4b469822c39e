"""Connecting to PostgreSQL, and turning its failures into errors that say what to do.

Every message goes through ``redact_dsn``: no password, ever.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import socket
import time
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from pglogrepl_bridge.errors import (
    BridgeError,
    ConfigError,
    ReplicationError,
    ServerUnavailableError,
    SlotInUseError,
)
from pglogrepl_bridge.lsn import Lsn
from pglogrepl_bridge.postgres.dsn import redact_dsn, validate_dsn

#: GUCs for the walsender's session: value text output in the shapes psycopg's loaders parse,
#: and in UTF-8 (pgoutput converts text and names to the client encoding; the loaders read
#: UTF-8), whatever the DSN or PGCLIENTENCODING ask for. Aware timestamps in UTC: the same
#: instant whatever the server's TimeZone, and text the SQLite sink stores as it is.
SESSION_SETTINGS = {
    "client_encoding": "UTF8",
    "datestyle": "ISO",
    "timezone": "UTC",
    "intervalstyle": "postgres",
    "extra_float_digits": "3",
    "bytea_output": "hex",
}

Conn = psycopg.Connection[tuple[Any, ...]]

#: SO_RCVBUF for a connection to a server on this same host (Linux doubles it, to 128 KiB).
LOCAL_RECEIVE_BUFFER = 64 * 1024


@dataclass(frozen=True, slots=True)
class SystemInfo:
    """IDENTIFY_SYSTEM, plus the server's major version."""

    system_id: str
    timeline: int
    xlogpos: Lsn
    dbname: str | None
    server_version: int

    @property
    def major(self) -> int:
        """The server's major version (15, 16, ...)."""
        return self.server_version // 10000


def connect(dsn: str, *, replication: bool, settings: dict[str, str] | None = None) -> Conn:
    """A psycopg connection; ``replication`` makes it a walsender (replication=database)."""
    validate_dsn(dsn)
    kwargs: dict[str, Any] = {"autocommit": True, **connect_timeout(dsn)}
    if replication:
        kwargs["replication"] = "database"
    try:
        conn = psycopg.connect(dsn, **kwargs)
    except psycopg.Error as exc:
        raise connection_error(exc, dsn) from None
    try:
        for name, value in {**SESSION_SETTINGS, **(settings or {})}.items():
            conn.execute(sql.SQL("SET {} = {}").format(sql.Identifier(name), sql.Literal(value)))
    except psycopg.Error as exc:
        conn.close()
        raise connection_error(exc, dsn) from None
    return conn


#: Seconds a connection attempt may take when neither the DSN nor PGCONNECT_TIMEOUT says: a
#: host that is down must not hold the first connection for the kernel's two minutes.
DEFAULT_CONNECT_TIMEOUT = 10


def connect_timeout(dsn: str) -> dict[str, Any]:
    """``connect_timeout`` for psycopg, unless the DSN or the environment sets one."""
    if os.environ.get("PGCONNECT_TIMEOUT"):
        return {}
    try:
        given = psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.Error:
        return {}  # validate_dsn reports it
    return {} if "connect_timeout" in given else {"connect_timeout": DEFAULT_CONNECT_TIMEOUT}


def connect_waiting(dsn: str, *, replication: bool, wait: float) -> Conn:
    """``connect``, retried for up to ``wait`` seconds while the server is unavailable (not
    when the connection is refused for a reason waiting cannot cure: password, database)."""
    deadline = time.monotonic() + wait
    pause = 0.1
    while True:
        try:
            return connect(dsn, replication=replication)
        except ServerUnavailableError:
            if time.monotonic() + pause > deadline:
                raise
            time.sleep(pause)
            pause = min(pause * 2, 2.0)


def limit_receive_buffer(
    conn: Conn | psycopg.AsyncConnection[Any], size: int | None = None
) -> bool:
    """Fix the socket's receive buffer, and with it the TCP receive window; True if done.

    ``None``: LOCAL_RECEIVE_BUFFER, and only over TCP to this same host, where the walsender
    shares our CPUs. There a small window shuts while we work through a batch: the
    walsender's sends then just queue, and go out later in large segments, instead of each
    message taking the whole TCP path on its own (in A/B runs of the benchmark, the
    walsender's CPU time fell by about a tenth). Across a network the kernel's autotuning
    stays, since a fixed window caps throughput at window / round trip. 0 leaves the
    kernel's autotuning everywhere.
    """
    if size == 0:
        return False
    try:
        with socket.socket(fileno=os.dup(conn.pgconn.socket)) as sock:
            if sock.family not in (socket.AF_INET, socket.AF_INET6):
                return False
            if size is None:
                if not same_host(sock.getsockname()[0], sock.getpeername()[0]):
                    return False
                size = LOCAL_RECEIVE_BUFFER
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
    except OSError:  # a tuning, not a requirement: the connection's own errors come next
        return False
    return True


#: After a burst, the reader waits until this much is buffered on the socket (or its pause
#: ends): about half of LOCAL_RECEIVE_BUFFER's window, which the kernel doubles
GATHER_BYTES = 32 * 1024


class Gatherer:
    """How the reader waits for a batch after a burst: on a TCP socket, with its low-water mark
    (SO_RCVLOWAT) raised for that one wait; elsewhere, for the first byte.

    Why: after a burst the reader must not wake for every message (each message the walsender
    sends into an open receive window takes the whole TCP path in the walsender's process),
    but a fixed sleep is worse: under a bulk load the window shuts within a millisecond and
    the walsender then stands idle for the rest of it (benchmarks/RESULTS.md, fourteenth
    session: 0.4 s of a 1.1 s run). With the mark raised, the kernel wakes the reader as soon
    as ``GATHER_BYTES`` are there, and the wait's timeout ends a quiet one. The mark goes
    back to 1 before anything else waits on the socket: libpq's own waits must wake for any
    byte. A Unix-domain socket ignores the mark in poll, and holds only what fits in the
    walsender's send buffer, each message's overhead counted: any sleep there left the
    walsender idle (a 0.6 s stream took 5.3 s with the old sleep), so there the reader waits
    for the first byte.
    """

    __slots__ = ("_sock",)

    def __init__(self, sock: socket.socket | None) -> None:
        self._sock = sock

    @classmethod
    def open(cls, fd: int) -> Gatherer:
        """A Gatherer for the socket ``fd``: with a duplicate of it (closed by ``close``) where
        the mark works, TCP; without one (waits end at the first byte) anywhere else."""
        try:
            sock = socket.socket(fileno=os.dup(fd))
        except OSError:
            return cls(None)
        try:
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
                return cls(sock)
        except OSError:
            pass
        sock.close()
        return cls(None)

    @property
    def marks(self) -> bool:
        """Whether a wait ends only once ``GATHER_BYTES`` are buffered (or at its timeout)."""
        return self._sock is not None

    def __enter__(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):  # a tuning: the wait then ends at the first byte
                self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, GATHER_BYTES)

    def __exit__(self, *exc: object) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):  # the connection's own errors come next
                self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)

    def close(self) -> None:
        """Close the duplicate; the connection's own socket stays open."""
        if self._sock is not None:
            self._sock.close()


def same_host(local: str, peer: str) -> bool:
    """Whether a TCP connection from ``local`` to ``peer`` stays on this machine."""
    try:
        return ipaddress.ip_address(peer).is_loopback or peer == local
    except ValueError:
        return False


def identify_system(conn: Conn) -> SystemInfo:
    """IDENTIFY_SYSTEM over a replication connection."""
    row = conn.execute("IDENTIFY_SYSTEM").fetchone()
    assert row is not None
    return system_info(row, conn.info.server_version)


def system_info(row: tuple[Any, ...], server_version: int) -> SystemInfo:
    """IDENTIFY_SYSTEM's row (systemid, timeline, xlogpos, dbname) as SystemInfo."""
    return SystemInfo(
        system_id=str(row[0]),
        timeline=int(row[1]),
        xlogpos=Lsn.parse(str(row[2])),
        dbname=None if row[3] is None else str(row[3]),
        server_version=server_version,
    )


_ACTIVE_PID = re.compile(r"is active for PID (\d+)")


def connection_error(exc: psycopg.Error, dsn: str) -> BridgeError:
    """A connection-time failure, classified, with the fix.

    By SQLSTATE where the server sent one. libpq reports most connection failures as text
    only (refused, timeout, authentication, pg_hba), and psycopg then has no SQLSTATE to
    give: those are matched on libpq's messages, which are not translated by the server's
    ``lc_messages``.
    """
    where = redact_dsn(dsn)
    text = _first_line(exc)
    low = text.lower()
    code = exc.sqlstate or ""
    if code == "28P01" or "password authentication failed" in low or "no password supplied" in low:
        return ConfigError(
            f"authentication failed for {where}: check the user and password "
            "(PGPASSWORD, ~/.pgpass or the DSN)"
        )
    if code == "42501" or "replication role" in low or "permission denied to start wal" in low:
        return ConfigError(
            f"the role lacks the REPLICATION privilege on {where}: "
            "run ALTER ROLE <user> REPLICATION as a superuser"
        )
    if "for connection option" in low or "invalid connection option" in low:
        return ConfigError(f"invalid connection string ({where}): {text.split(': ')[-1]}")
    if "invalid uri" in low or 'missing "="' in low:
        return ConfigError(f"invalid connection string ({where}): {text.split(': ')[-1]}")
    if code == "28000" or "pg_hba.conf" in low:
        return ConfigError(f"the server refuses this client ({text}): add a pg_hba.conf entry")
    if code == "3D000" or ("does not exist" in low and "database" in low):
        return ConfigError(f"{text} on {where}: check dbname")
    if code in ("57P03", "53300") or any(
        phrase in low
        for phrase in (
            "not yet accepting connections",
            "is starting up",
            "is shutting down",
            "in recovery mode",
            "too many clients",
        )
    ):
        return ServerUnavailableError(f"{where}: {text} (temporary; retry)")
    if (
        "connection refused" in low
        or "could not connect" in low
        or "timeout" in low
        or ("could not translate host name" in low)
    ):
        return ServerUnavailableError(
            f"cannot connect to {where}: {text}. Is the server running and reachable?"
        )
    return ReplicationError(f"{where}: {text}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    # libpq quotes connection parameters in some messages; never let a password through
    return re.sub(r"password=\S+", "password=***", text)


def server_error(
    exc: psycopg.Error,
    *,
    slot: str,
    publications: tuple[str, ...],
    sqlstate: str | None = None,
) -> BridgeError:
    """A failure of a replication command or of the stream, classified by SQLSTATE, with the
    fix. ``sqlstate`` is for errors read off a raw result (the end of a copy). Where one
    code covers two causes (42704 for a missing slot or publication, 55000 for an
    invalidated slot or wal_level), the message tells them apart."""
    text = _first_line(exc)
    low = text.lower()
    code = sqlstate or exc.sqlstate or ""
    if code == "42704" and "slot" in low:  # undefined_object
        return ConfigError(
            f"replication slot {slot!r} does not exist: create it with --create-slot or "
            f"'pglogrepl-bridge slot create {slot}'"
        )
    if code == "55006":  # object_in_use
        match = _ACTIVE_PID.search(text)
        pid = f" (PID {match.group(1)})" if match else ""
        return SlotInUseError(
            f"replication slot {slot!r} is in use by another process{pid}: "
            "stop that consumer, or use another slot"
        )
    if code == "42704" and "publication" in low:
        return ConfigError(
            f"{text}: create it with 'pglogrepl-bridge publication create' or "
            "CREATE PUBLICATION, or fix --publication"
        )
    if code == "42710":  # duplicate_object
        return ConfigError(f"replication slot {slot!r} already exists: use it, or drop it")
    if code == "42501":  # insufficient_privilege
        return ConfigError(
            f"{text}: grant the role REPLICATION (ALTER ROLE <user> REPLICATION) or the "
            "privileges it lacks"
        )
    if code == "55000" and "wal_level" in low:  # object_not_in_prerequisite_state
        return ConfigError(
            "logical decoding needs wal_level = logical: set it in postgresql.conf "
            "(ALTER SYSTEM SET wal_level = logical) and restart the server"
        )
    if code == "55000":
        return ReplicationError(
            f"replication slot {slot!r} cannot be used ({text}): if it was invalidated, drop "
            "and re-create it, then resynchronise the consumer"
        )
    if code in ("22023", "42601"):  # invalid_parameter_value, syntax_error
        return ConfigError(f"{text}: this server does not support that option")
    return ReplicationError(f"replication failed: {text}")
