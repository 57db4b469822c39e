"""The replication stream: START_REPLICATION over psycopg 3, a thin IO shell around the core.

    with ReplicationStream(dsn, StreamOptions(slot="s", publications=("p",))) as stream:
        for txn in stream:
            sink.apply(txn)
            stream.ack(txn.end_lsn)

Reads are non-blocking ``get_copy_data`` calls that drain everything buffered before waiting
on the socket, with a pause after a burst (MAX_PAUSE) so the walsender batches its sends.
Status updates report what ``FeedbackTracker`` allows: never more than the consumer
acknowledged. The connection is re-established with backoff when it drops, and
resumes where the consumer's acknowledgements left off, without delivering a transaction twice.
"""

from __future__ import annotations

import contextlib
import logging
import select
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Literal

import psycopg
from psycopg import sql
from psycopg.pq import ExecStatus

from pglogrepl_bridge.errors import (
    BridgeError,
    ConfigError,
    ReplicationError,
    ServerUnavailableError,
)
from pglogrepl_bridge.lsn import Lsn, format_lsn
from pglogrepl_bridge.pgoutput.assembly import TransactionAssembler
from pglogrepl_bridge.pgoutput.feedback import FeedbackTracker
from pglogrepl_bridge.pgoutput.relcache import RelationCache
from pglogrepl_bridge.pgoutput.streambuffer import DEFAULT_SPILL_BYTES
from pglogrepl_bridge.pgoutput.transaction import Event, Transaction
from pglogrepl_bridge.pgoutput.values import ValueLoaders, ValueMode, ValueProblem
from pglogrepl_bridge.pgoutput.walsender import unix_us_to_pg_time
from pglogrepl_bridge.postgres import admin
from pglogrepl_bridge.postgres.connection import (
    Conn,
    SystemInfo,
    connect,
    identify_system,
    limit_receive_buffer,
    server_error,
)

log = logging.getLogger(__name__)

_XLOG_HEAD = struct.Struct("!QQq")
_KEEPALIVE = struct.Struct("!Qq?")

#: After a burst, the reader pauses before it looks again, so that the walsender fills the
#: socket meanwhile: once the receive window is shut its sends only queue, a fraction of the
#: cost of sending each message into an open window (its CPU time fell by a third in the
#: benchmark, see benchmarks/RESULTS.md).
#: The pause grows with the burst, so a trickle of small transactions keeps its latency.
PAUSE_PER_MESSAGE = 10e-6
MAX_PAUSE = 0.01


def pause_after(burst: int) -> float:
    """Seconds to pause once ``burst`` messages have been read and the socket ran dry."""
    return min(MAX_PAUSE, burst * PAUSE_PER_MESSAGE)


#: Highest pgoutput protocol version per server major version.
_PROTO_BY_MAJOR = {14: 2, 15: 3, 16: 4}


def max_proto_version(major: int) -> int:
    if major >= 16:
        return 4
    return _PROTO_BY_MAJOR.get(major, 1)


@dataclass(frozen=True)
class StreamOptions:
    """What to stream and how. ``start_lsn`` is the consumer's durable position, if it has one
    (e.g. a sink's checkpoint); transactions ending at or before it are not delivered."""

    slot: str
    publications: tuple[str, ...]
    proto_version: int | None = None  # None: the highest the server supports
    binary: bool = False
    messages: bool = False
    streaming: bool | Literal["parallel"] | None = None  # None: on when the protocol allows
    two_phase: bool = False
    origin: Literal["any", "none"] | None = None
    start_lsn: int | None = None
    #: stop once everything up to here is acknowledged (the slot's position already counts)
    until_lsn: int | None = None
    create_slot: bool = False
    temporary: bool = False
    no_ack: bool = False
    values: ValueMode = "typed"
    type_map: dict[str, str] = field(default_factory=dict)
    spill_bytes: int = DEFAULT_SPILL_BYTES
    surface_prepares: bool = False
    status_interval: float = 10.0
    reconnect: bool = True
    max_backoff: float = 30.0
    #: extra GUCs for the walsender session, e.g. {"logical_decoding_work_mem": "64kB"}
    session_settings: dict[str, str] = field(default_factory=dict)
    #: SO_RCVBUF of the replication socket: None fixes a small one for a server on this
    #: host (see connection.limit_receive_buffer), 0 keeps the kernel's autotuning
    recv_buffer: int | None = None


class ReplicationStream:
    def __init__(
        self,
        dsn: str,
        options: StreamOptions,
        *,
        on_problem: Callable[[ValueProblem], None] | None = None,
        on_idle: Callable[[], None] | None = None,
    ) -> None:
        """``on_idle`` runs when everything received has been handed out and nothing more has
        arrived: the loop is about to wait. The moment for a batching consumer to flush and
        acknowledge; under a steady load it runs rarely, so batches fill up."""
        if not options.publications:
            raise ConfigError("no publication given: name at least one with --publication")
        self.dsn = dsn
        self.options = options
        self._on_problem = on_problem
        self._on_idle = on_idle
        self._conn: Conn | None = None
        self.system: SystemInfo | None = None
        self.proto_version = 0
        self.streaming: bool | Literal["parallel"] = False
        self.assembler = self._new_assembler()
        self.feedback = FeedbackTracker(options.start_lsn or 0, no_ack=options.no_ack)
        self._skip_upto = options.start_lsn or 0
        self._stopping = False
        self._rewind_to: int | None = None
        self._lock = threading.Lock()  # guards self.feedback against ack() from other threads
        self._last_status = 0.0
        self._status_due = False
        self.reconnects = 0
        self.transactions = 0
        self.changes = 0

    # -- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> ReplicationStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def stop(self) -> None:
        """Ask the loop to finish (safe from a signal handler); a final status is sent."""
        self._stopping = True

    @property
    def connected(self) -> bool:
        """Streaming from PostgreSQL right now (not between a loss and the reconnect)."""
        return self._conn is not None

    @property
    def stopping(self) -> bool:
        return self._stopping

    def request_rewind(self, lsn: int) -> None:
        """Deliver every transaction ending after ``lsn`` again (from another thread too).

        Only possible down to the confirmed position: the slot keeps nothing older.
        """
        if lsn < self.feedback.flushed:
            raise ReplicationError(
                f"cannot replay from {format_lsn(lsn)}: the slot is confirmed up to "
                f"{format_lsn(self.feedback.flushed)} and no longer keeps older changes"
            )
        self._rewind_to = lsn

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        with contextlib.suppress(psycopg.Error, OSError):
            self._send_status(conn)
            self._end_copy(conn)
        conn.close()

    @staticmethod
    def _end_copy(conn: Conn, timeout: float = 5.0) -> None:
        """CopyDone, then wait (bounded) for the server's end of the stream.

        The walsender handles our messages in order, so once it has answered, the status
        update sent just before is applied to the slot: a command that returns has its
        confirmed position visible in pg_replication_slots. Data still in flight is
        dropped (it was not acknowledged, so it comes again next time).
        """
        pgconn = conn.pgconn
        pgconn.put_copy_end()
        pgconn.flush()
        deadline = time.monotonic() + timeout
        while True:
            nbytes, _ = pgconn.get_copy_data(1)
            if nbytes < 0:
                break
            if nbytes == 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                select.select([pgconn.socket], [], [], min(left, 0.1))
                pgconn.consume_input()
        while True:  # the CommandComplete of START_REPLICATION, then no more results
            while pgconn.is_busy():  # never block in get_result: a hung server must not hang us
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                select.select([pgconn.socket], [], [], min(left, 0.1))
                pgconn.consume_input()
            if pgconn.get_result() is None:
                return

    def ack(self, end_lsn: int, *, cumulative: bool = False) -> None:
        """The transaction ending at ``end_lsn`` is durable downstream; it may be confirmed.

        Safe to call from another thread than the one iterating (e.g. a sink's writer).
        """
        with self._lock:
            if self.feedback.ack(end_lsn, cumulative=cumulative):
                self._status_due = True

    @property
    def confirmed_lsn(self) -> Lsn:
        return Lsn(self.feedback.flushed)

    # -- starting ----------------------------------------------------------------------------

    def _new_assembler(self) -> TransactionAssembler:
        loaders = ValueLoaders(
            self.options.values, type_map=self.options.type_map, on_problem=self._on_problem
        )
        return TransactionAssembler(
            RelationCache(loaders),
            spill_bytes=self.options.spill_bytes,
            surface_prepares=self.options.surface_prepares,
        )

    def start(self) -> None:
        """Connect, check everything that can be checked, and issue START_REPLICATION."""
        opts = self.options
        conn = connect(self.dsn, replication=True, settings=opts.session_settings)
        try:
            self.system = identify_system(conn)
            self._check_server(conn)
            if opts.create_slot and (opts.temporary or admin.get_slot(conn, opts.slot) is None):
                admin.create_slot(
                    conn, opts.slot, temporary=opts.temporary, two_phase=opts.two_phase
                )
            confirmed = self._check_slot(conn) or 0
            if confirmed > self.feedback.flushed:
                self.feedback.flushed = confirmed  # the server holds it confirmed already
            # Ask from the slot's own position, never from the consumer's: a start above it
            # makes the server skip a PREPARE it already sent (two-phase), whose transaction
            # is still to come. What the consumer already holds is skipped here instead.
            start = confirmed
            query = self._start_query(start)
            log.info(
                "START_REPLICATION slot %s from %s, proto %d",
                opts.slot,
                format_lsn(start),
                self.proto_version,
            )
            limit_receive_buffer(conn, opts.recv_buffer)
            cur = conn.execute(query)
            if cur.pgresult is None or cur.pgresult.status != ExecStatus.COPY_BOTH:
                raise ReplicationError("START_REPLICATION did not enter COPY_BOTH mode")
        except psycopg.Error as exc:
            conn.close()
            raise server_error(exc, slot=opts.slot, publications=opts.publications) from None
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        self._last_status = time.monotonic()

    def _check_server(self, conn: Conn) -> None:
        opts = self.options
        assert self.system is not None
        major = self.system.major
        row = conn.execute("SHOW wal_level").fetchone()
        if row is None or row[0] != "logical":
            raise ConfigError(
                f"wal_level is {row[0] if row else 'unknown'!r}, logical decoding needs "
                "'logical': ALTER SYSTEM SET wal_level = logical, then restart the server"
            )
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
        self.streaming = proto >= 2 if opts.streaming is None else opts.streaming
        missing = admin.missing_publications(conn, opts.publications)
        if missing:
            raise ConfigError(
                f"publication(s) {', '.join(missing)} do not exist in database "
                f"{self.system.dbname!r}: create with 'pglogrepl-bridge publication create' "
                "or CREATE PUBLICATION"
            )
        self.proto_version = proto

    def _check_slot(self, conn: Conn) -> Lsn | None:
        """Refuse a missing, foreign, invalidated or busy slot; return its confirmed LSN."""
        slot = admin.get_slot(conn, self.options.slot)
        name = self.options.slot
        if slot is None:
            raise ConfigError(
                f"replication slot {name!r} does not exist: create it with --create-slot or "
                f"'pglogrepl-bridge slot create {name}'"
            )
        if slot.slot_type != "logical" or slot.plugin != "pgoutput":
            raise ConfigError(f"slot {name!r} is not a pgoutput logical slot ({slot.plugin})")
        if slot.wal_status == "lost":
            raise ReplicationError(
                f"replication slot {name!r} is invalidated (wal_status lost): drop and "
                "re-create it, then resynchronise the consumer"
            )
        if slot.active and slot.active_pid is not None and slot.active_pid != conn.info.backend_pid:
            raise ReplicationError(
                f"replication slot {name!r} is in use by another process "
                f"(PID {slot.active_pid}): stop that consumer, or use another slot"
            )
        return slot.confirmed_flush_lsn

    def _start_query(self, start: int) -> sql.Composed:
        opts = self.options
        params: list[tuple[str, str]] = [
            ("proto_version", str(self.proto_version)),
            ("publication_names", admin.publication_names_option(opts.publications)),
        ]
        if opts.binary:
            params.append(("binary", "true"))
        if opts.messages:
            params.append(("messages", "true"))
        if self.streaming:
            params.append(("streaming", "parallel" if self.streaming == "parallel" else "on"))
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

    # -- the loop ----------------------------------------------------------------------------

    def __iter__(self) -> Iterator[Transaction]:
        for event in self.events():
            if isinstance(event, Transaction):
                yield event

    def events(self) -> Iterator[Event]:
        """Every event: transactions, non-transactional messages and, if asked, prepares."""
        backoff = 0.1
        while not self._stopping:
            try:
                if self._conn is None:
                    self.start()
                    backoff = 0.1  # connected: the next loss starts the backoff afresh
                yield from self._run()
                return
            except _Rewind:
                self._drop_connection()
                lsn, self._rewind_to = self._rewind_to, None
                assert lsn is not None
                with self._lock:
                    self.feedback.rewind(lsn)
                self._skip_upto = lsn
                log.info("rewinding the stream to %s", format_lsn(lsn))
            except (psycopg.OperationalError, ServerUnavailableError, _Disconnected) as exc:
                if not self.options.reconnect or self._stopping:
                    raise _as_bridge_error(exc, self.options) from None
                self._drop_connection()
                self.reconnects += 1
                log.warning(
                    "replication connection lost (%s); reconnecting in %.1fs", _short(exc), backoff
                )
                time.sleep(backoff)
                backoff = min(backoff * 2, self.options.max_backoff)
            except ReplicationError as exc:
                # a slot still held by our own dying walsender frees itself in a moment
                if "in use by another process" not in str(exc) or not self.reconnects:
                    raise
                log.warning("%s; retrying in %.1fs", exc, backoff)
                self._drop_connection()
                time.sleep(backoff)
                backoff = min(backoff * 2, self.options.max_backoff)
        self.close()

    def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(psycopg.Error):
                conn.close()
        # partial transactions will be sent again from the confirmed position
        self.assembler.reset()
        # delivered-but-unacknowledged transactions stay in flight: the consumer still holds
        # them and will acknowledge them; re-sent copies are skipped, not delivered twice
        self._skip_upto = max(self._skip_upto, self.feedback.last_delivered)

    def _run(self) -> Iterator[Event]:
        assert self._conn is not None
        conn = self._conn
        pgconn = conn.pgconn
        assembler = self.assembler
        feed = assembler.feed
        # Row changes inside a plain transaction, most of the stream, can skip feed: put_row
        # appends them to the open transaction (rows) in one call. Everything else, and any
        # row put_row declines, goes through feed, after which rows is looked up again.
        put_row = assembler.put_row
        by_id = assembler.relations.by_id
        rows = None
        tracker = self.feedback
        interval = self.options.status_interval
        sock = pgconn.socket
        until = self.options.until_lsn
        drained = 0
        burst = 0  # messages since the loop last waited for the server
        last_row = None  # the last message put_row took
        while not self._stopping:
            nbytes, data = pgconn.get_copy_data(1)
            if nbytes > 0:
                drained += 1
                if rows is not None and put_row(by_id, rows, data):  # type: ignore[misc]
                    last_row = data  # its position is noted once per read, below
                elif (tag := data[0]) == 0x77:  # 'w' XLogData
                    start = _XLOG_HEAD.unpack_from(data, 1)[0]
                    if start > tracker.received:
                        tracker.received = start
                    event = feed(bytes(data[25:]), start)
                    if put_row is not None:
                        rows = assembler.open_changes
                    if event is not None:
                        yield from self._deliver(event)
                        if until is not None and tracker.flushed >= until:
                            break
                elif tag == 0x6B:  # 'k' keepalive
                    wal_end, _sent, reply = _KEEPALIVE.unpack_from(data, 1)
                    with self._lock:
                        tracker.keepalive(wal_end, assembler.oldest_pending_lsn)
                    if reply:
                        self._send_status(conn)
                continue  # what is buffered first; the checks below run once per read
            if last_row is not None:  # put_row leaves the received position to here
                start = _XLOG_HEAD.unpack_from(last_row, 1)[0]
                if start > tracker.received:
                    tracker.received = start
                last_row = None
            if nbytes < 0:
                self._end_of_copy(conn)
            if not drained and self._on_idle is not None:
                self._on_idle()  # caught up: nothing buffered, nothing arrived since last look
            if until is not None and tracker.flushed >= until and not tracker.inflight:
                break  # everything up to until_lsn is acknowledged: done
            if self._rewind_to is not None:
                raise _Rewind
            now = time.monotonic()
            if now - self._last_status >= interval or (
                self._status_due and now - self._last_status >= 0.2
            ):
                self._send_status(conn)
            timeout = max(0.0, min(interval - (now - self._last_status), 0.25))
            if until is not None and tracker.inflight:
                timeout = min(timeout, 0.005)  # the last acks may come from another thread
            if drained:
                # In a burst: read on at once if more is there; else pause (MAX_PAUSE), so
                # that we wake per batch rather than per message.
                burst += drained
                if not select.select([sock], [], [], 0)[0]:
                    time.sleep(pause_after(burst))
            else:
                burst = 0
                select.select([sock], [], [], timeout)
            drained = 0
            pgconn.consume_input()
        self.close()

    def _deliver(self, event: Event) -> Iterator[Event]:
        if isinstance(event, Transaction):
            if event.end_lsn <= self._skip_upto:
                return  # the consumer has it already (checkpoint, or delivered before a drop)
            with self._lock:
                self.feedback.deliver(event.end_lsn)
            self.transactions += 1
            self.changes += len(event.changes)
        yield event

    def _end_of_copy(self, conn: Conn) -> None:
        res = conn.pgconn.get_result()
        if res is not None and res.status == ExecStatus.FATAL_ERROR:
            message = (res.error_message or b"").decode(errors="replace").strip()
            sqlstate = res.error_field(psycopg.pq.DiagnosticField.SQLSTATE)
            code = sqlstate.decode() if sqlstate else ""
            if code.startswith(("57", "08")):  # admin shutdown, connection exceptions
                raise _Disconnected(message)
            raise server_error(
                psycopg.Error(message),
                slot=self.options.slot,
                publications=self.options.publications,
            )
        raise _Disconnected(f"server ended the replication stream: {message_or(res)}")

    def _send_status(self, conn: Conn) -> None:
        clock = unix_us_to_pg_time(time.time_ns() // 1000)
        with self._lock:
            update = self.feedback.status(clock, hold=self.assembler.held_since)
        pgconn = conn.pgconn
        pgconn.put_copy_data(update.to_bytes())
        pgconn.flush()
        self._last_status = time.monotonic()
        self._status_due = False


class _Rewind(Exception):
    """Internal: restart the stream at the requested position."""


class _Disconnected(Exception):
    """The server ended the stream in a way a reconnect can cure."""


def message_or(res: psycopg.pq.abc.PGresult | None) -> str:
    if res is None:
        return "connection closed"
    return (res.error_message or b"").decode(errors="replace").strip() or str(res.status)


def _short(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _as_bridge_error(exc: BaseException, options: StreamOptions) -> BridgeError:
    if isinstance(exc, BridgeError):
        return exc
    if isinstance(exc, psycopg.Error):
        return server_error(exc, slot=options.slot, publications=options.publications)
    return ReplicationError(f"replication connection lost: {_short(exc)}")
