"""The replication stream over psycopg 3: a thin IO loop around ``ReplicationSession``.

    with ReplicationStream(dsn, StreamOptions(slot="s", publications=("p",))) as stream:
        for txn in stream:
            sink.apply(txn)
            stream.ack(txn.end_lsn)

Everything about the stream's content (framing, decoding, assembly, skipping, feedback) is
the session's (``pgoutput.session``); this module only waits, reads, sends and reconnects.
The read loop itself is written once, as a generator (``_StreamBase._steps``) that yields
events and what to wait for (``Readable``, ``Gather``, ``Send``, ``IDLE``): this module drives
it with blocking waits, ``postgres.aio`` with the event loop's (psycopg's own split).
Reads are non-blocking ``get_copy_data`` calls that drain everything buffered before waiting
on the socket; after a burst the loop waits for a batch to gather (``Gather``) so the
walsender batches its sends. The connection is re-established with backoff when it drops,
and resumes where the consumer's acknowledgements left off, without delivering a
transaction twice.
"""

from __future__ import annotations

import contextlib
import logging
import select
import threading
import time
from collections import deque
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.pq import ExecStatus

from pglogrepl_bridge.errors import (
    BridgeError,
    ConfigError,
    ReplicationError,
    ServerUnavailableError,
    SlotInUseError,
)
from pglogrepl_bridge.lsn import Lsn, format_lsn
from pglogrepl_bridge.pgoutput import _accel
from pglogrepl_bridge.pgoutput.feedback import FeedbackTracker
from pglogrepl_bridge.pgoutput.session import ReplicationSession
from pglogrepl_bridge.pgoutput.transaction import Event, RowChange, Transaction
from pglogrepl_bridge.pgoutput.values import ValueLoaders, ValueProblem
from pglogrepl_bridge.pgoutput.walsender import unix_us_to_pg_time
from pglogrepl_bridge.postgres.connection import (
    Conn,
    Gatherer,
    SystemInfo,
    connect,
    limit_receive_buffer,
    server_error,
)
from pglogrepl_bridge.postgres.options import StreamOptions, max_proto_version
from pglogrepl_bridge.postgres.startup import StartPlan, start_steps

log = logging.getLogger(__name__)

__all__ = ["ReplicationStream", "StreamOptions", "max_proto_version", "pause_after"]

#: After a burst, the reader waits for a batch before it looks again, so that the walsender
#: fills the socket meanwhile: once the receive window is shut its sends only queue, a
#: fraction of the cost of sending each message into an open window (benchmarks/RESULTS.md,
#: fourth session). The wait ends when ``connection.GATHER_BYTES`` are there (``Gatherer``),
#: or after the pause, which grows with the burst, so a trickle of small transactions keeps
#: its latency.
PAUSE_PER_MESSAGE = 10e-6
MAX_PAUSE = 0.01
#: In a transaction the read loop takes row changes in C, up to this many per call
#: (``_fastrow.pump_rows``), then looks at its stop flag again
PUMP_ROWS = 256
_PUMP = _accel.row_pump(RowChange)


def pause_after(burst: int) -> float:
    """The longest wait for a batch once ``burst`` messages were read and the socket ran dry."""
    return min(MAX_PAUSE, burst * PAUSE_PER_MESSAGE)


class _StreamBase:
    """What the sync and async streams share: options, the session, acks from any thread."""

    def __init__(
        self,
        dsn: str,
        options: StreamOptions,
        *,
        on_problem: Callable[[ValueProblem], None] | None = None,
    ) -> None:
        if not options.publications:
            raise ConfigError("no publication given: name at least one with --publication")
        self.dsn = dsn
        self.options = options
        self._on_problem = on_problem
        self.session = self._new_session()
        self.system: SystemInfo | None = None
        self.proto_version = 0
        self.streaming: bool | str = False
        self.reconnects = 0
        self._stopping = False
        self._rewind_to: int | None = None
        self._owner: int | None = None  # the thread iterating: its acks apply at once
        self._acks: deque[tuple[int, bool]] = deque()  # acks from other threads, applied later
        self._last_status = 0.0
        self._fatal: BridgeError | None = None  # what the server said that ends the stream
        self._has_idle = False  # the consumer has an on_idle callback (the subclasses say)
        self._established = False  # a START_REPLICATION succeeded once: losses are retried
        self._first_attempt: float | None = None

    def _new_session(self) -> ReplicationSession:
        opts = self.options
        loaders = ValueLoaders(opts.values, type_map=opts.type_map, on_problem=self._on_problem)
        return ReplicationSession(
            start_lsn=opts.start_lsn or 0,
            until_lsn=opts.until_lsn,
            no_ack=opts.no_ack,
            loaders=loaders,
            spill_bytes=opts.spill_bytes,
            surface_prepares=opts.surface_prepares,
        )

    # -- what consumers and other threads call ----------------------------------------------

    def ack(self, end_lsn: int, *, cumulative: bool = False) -> None:
        """The transaction ending at ``end_lsn`` is durable downstream; it may be confirmed.

        Safe from any thread: from the iterating one it applies at once; from another (a
        sink's writer, the bridge's network thread) it is queued and applied by the loop
        within its next wake-up (at most 250 ms, 5 ms with ``until_lsn``).
        """
        if threading.get_ident() == self._owner:
            self.session.ack(end_lsn, cumulative=cumulative)
        else:
            self._acks.append((end_lsn, cumulative))

    def _apply_acks(self) -> None:
        acks = self._acks
        while acks:
            end_lsn, cumulative = acks.popleft()
            self.session.ack(end_lsn, cumulative=cumulative)

    def stop(self) -> None:
        """Ask the loop to finish (safe from a signal handler); a final status is sent."""
        self._stopping = True

    @property
    def stopping(self) -> bool:
        """Whether ``stop()`` was called."""
        return self._stopping

    def request_rewind(self, lsn: int) -> None:
        """Deliver every transaction ending after ``lsn`` again (from another thread too).

        Only possible down to the confirmed position: the slot keeps nothing older.
        """
        flushed = self.session.feedback.flushed
        if lsn < flushed:
            raise ReplicationError(
                f"cannot replay from {format_lsn(lsn)}: the slot is confirmed up to "
                f"{format_lsn(flushed)} and no longer keeps older changes"
            )
        self._rewind_to = lsn

    @property
    def rewind_pending(self) -> bool:
        """A ``request_rewind`` is not carried out yet: the transactions handed out until it
        is will come again (a publisher that buffers by LSN must not take them now)."""
        return self._rewind_to is not None

    @property
    def confirmed_lsn(self) -> Lsn:
        """The position confirmed (or to be confirmed by the next status update)."""
        return self.session.confirmed_lsn

    @property
    def feedback(self) -> FeedbackTracker:
        """The session's feedback bookkeeping (read-only for callers)."""
        return self.session.feedback

    @property
    def transactions(self) -> int:
        """Transactions delivered so far."""
        return self.session.transactions

    @property
    def changes(self) -> int:
        """Changes in the transactions delivered so far."""
        return self.session.changes

    def _retry_note(self, exc: BaseException, backoff: float) -> None:
        if self._established:
            self.reconnects += 1
            what = "replication connection lost"
        else:
            what = "cannot reach the server yet (--wait-for-server)"
        log.warning("%s (%s); retrying in %.1fs", what, _short(exc), backoff)

    def _planned(self, plan: StartPlan) -> None:
        self.system = plan.system
        self.proto_version = plan.proto_version
        self.streaming = plan.streaming
        self.session.slot_confirmed(plan.confirmed)
        log.info(
            "START_REPLICATION slot %s from %s, proto %d",
            self.options.slot,
            format_lsn(plan.confirmed),
            plan.proto_version,
        )

    def _on_notice(self, diag: psycopg.errors.Diagnostic) -> None:
        """NOTICE and WARNING from the walsender: logged, never swallowed. One that means
        changes of the publications will not be delivered ends the stream (``_fatal``), and
        nothing from where it was said is ever confirmed."""
        severity = diag.severity_nonlocalized or diag.severity or "NOTICE"
        text = diag.message_primary or ""
        context = f" ({diag.context})" if diag.context else ""
        level = logging.WARNING if severity in ("WARNING", "NOTICE") else logging.INFO
        log.log(level, "server %s: %s%s", severity, text, context)
        # PostgreSQL 18 skips a change whose publication did not exist at its WAL position
        # and says so only in this WARNING (15-17 fail with 42704 instead); 55000 is shared
        # with other messages, so the text decides.
        if diag.sqlstate == "55000" and "skipped loading publication" in text:
            self.session.stop_confirming_after(self.session.received_lsn)
            self._fatal = ConfigError(late_publication_message(text, diag.context, self.options))

    def _raise_if_fatal(self) -> None:
        if self._fatal is not None:
            raise self._fatal

    @staticmethod
    def _check_copy_both(cur: Any) -> None:
        """START_REPLICATION's answer must be the start of the COPY_BOTH stream."""
        if cur.pgresult is None or cur.pgresult.status != ExecStatus.COPY_BOTH:
            raise ReplicationError("START_REPLICATION did not enter COPY_BOTH mode")

    def _status_bytes(self) -> bytes:
        self._apply_acks()
        self._last_status = time.monotonic()
        return self.session.status_update(unix_us_to_pg_time(time.time_ns() // 1000))

    def _status_wanted(self, now: float) -> bool:
        session = self.session
        since = now - self._last_status
        interval = self.options.status_interval
        return session.reply_requested or since >= interval or (session.status_due and since >= 0.2)

    def _lost(self) -> None:
        """Partial transactions will be sent again from the confirmed position."""
        self.session.connection_lost()

    def _take_rewind(self) -> None:
        lsn, self._rewind_to = self._rewind_to, None
        assert lsn is not None
        self._apply_acks()
        self.session.rewind(lsn)
        log.info("rewinding the stream to %s", format_lsn(lsn))

    def _retryable(self, exc: BaseException) -> bool:
        """Whether a failure is worth a reconnect (and the options allow one).

        A stream that was established and then dropped is retried with backoff. A first
        connection that fails is a configuration or availability problem, reported at once,
        unless ``wait_for_server`` asks to keep trying for that long.
        """
        if not self.options.reconnect or self._stopping:
            return False
        if not self._established:
            if self._first_attempt is None:
                self._first_attempt = time.monotonic()
            waited = time.monotonic() - self._first_attempt
            return waited < self.options.wait_for_server and isinstance(
                exc, psycopg.OperationalError | ServerUnavailableError | Disconnected
            )
        if isinstance(exc, SlotInUseError):
            # a slot still held by our own dying walsender frees itself in a moment
            return self.reconnects > 0
        return isinstance(exc, psycopg.OperationalError | ServerUnavailableError | Disconnected)

    def _end_of_copy_error(self, res: psycopg.pq.abc.PGresult | None) -> BaseException:
        if res is not None and res.status == ExecStatus.FATAL_ERROR:
            message = (res.error_message or b"").decode(errors="replace").strip()
            sqlstate = res.error_field(psycopg.pq.DiagnosticField.SQLSTATE)
            code = sqlstate.decode() if sqlstate else ""
            if code.startswith(("57", "08")):  # admin shutdown, connection exceptions
                return Disconnected(message)
            if code == "42704" and "publication" in message:
                # checked at start, so it exists: it did not at the WAL position decoded
                context = res.error_field(psycopg.pq.DiagnosticField.CONTEXT)
                first = message.splitlines()[0].removeprefix("ERROR:").strip()
                return ConfigError(
                    late_publication_message(
                        first, context.decode(errors="replace") if context else None, self.options
                    )
                )
            return server_error(
                psycopg.Error(message),
                slot=self.options.slot,
                publications=self.options.publications,
                sqlstate=code,
            )
        return Disconnected(f"server ended the replication stream: {message_or(res)}")

    def _steps(self, pgconn: psycopg.pq.abc.PGconn) -> Steps:
        """The read loop of both streams, as a generator (psycopg's generators/waiting split):
        it yields the events to hand out and what to wait for, and the sync or async driver
        does the waiting. The per-message path never leaves this frame.

        Reads drain everything buffered before waiting; after a burst the loop waits for a
        batch to gather (``Gather``, at most ``pause_after``) so that the walsender batches
        its sends.
        """
        get_copy_data = pgconn.get_copy_data
        session = self.session
        receive = session.receive  # one call per CopyData message: the whole protocol
        feedback = session.feedback
        interval = self.options.status_interval
        until = self.options.until_lsn
        drained = 0
        burst = 0  # messages since the loop last waited for the server
        row_sink = session.row_sink if _PUMP is not None else None
        while not self._stopping:
            sink = row_sink() if row_sink is not None else None
            if sink is not None and _PUMP is not None:  # in a transaction: its rows in C
                taken, last, pending = _PUMP(get_copy_data, sink[0], sink[1], PUMP_ROWS)
                if taken:
                    drained += taken
                    session.took_rows(last)
                if pending is None:
                    continue  # PUMP_ROWS taken: look at the stop flag, then read on
                nbytes, data = pending
            else:
                nbytes, data = get_copy_data(1)
            if nbytes > 0:
                drained += 1
                event = receive(data)
                if event is not None:
                    self._raise_if_fatal()  # nothing is handed out after such a message
                    yield event
                    if self._acks:  # made while the consumer held the event
                        self._apply_acks()
                    if until is not None and session.done():
                        return
                continue  # what is buffered first; the checks below run once per read
            if nbytes < 0:
                raise self._end_of_copy_error(pgconn.get_result())
            self._raise_if_fatal()
            if self._acks:
                self._apply_acks()
            if not drained and self._has_idle:
                yield IDLE  # caught up: nothing buffered, nothing arrived since last look
                if self._acks:
                    self._apply_acks()
            if until is not None and session.done():
                return  # everything up to until_lsn is acknowledged: done
            if self._rewind_to is not None:
                raise _Rewind
            now = time.monotonic()
            if self._status_wanted(now):
                yield Send(self._status_bytes())
            timeout = max(0.0, min(interval - (now - self._last_status), 0.25))
            if until is not None and feedback.inflight:
                timeout = min(timeout, 0.005)  # the last acks may come from another thread
            if drained:
                # In a burst: read on at once if more is there; else wait for a batch, so
                # that we wake per batch rather than per message.
                burst += drained
                if not (yield Readable(0.0)):
                    yield Gather(pause_after(burst))
            else:
                burst = 0
                yield Readable(timeout)
            drained = 0
            pgconn.consume_input()


class ReplicationStream(_StreamBase):
    """Logical replication from one slot, as transactions, over a blocking psycopg connection.

    Iterate it for ``Transaction`` objects (``events()`` also yields non-transactional
    messages and, if asked, prepares); call ``ack(txn.end_lsn)`` once a transaction is
    durable downstream: only then is it confirmed to PostgreSQL (see README, "The feedback
    contract"). ``on_idle`` runs when everything received has been handed out and nothing more
    has arrived: the moment for a batching consumer to flush and acknowledge. Under a steady
    load it runs rarely, so batches fill up. ``on_problem`` hears of values that could not
    be converted (they keep their text).
    """

    def __init__(
        self,
        dsn: str,
        options: StreamOptions,
        *,
        on_problem: Callable[[ValueProblem], None] | None = None,
        on_idle: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(dsn, options, on_problem=on_problem)
        self._on_idle = on_idle
        self._has_idle = on_idle is not None
        self._conn: Conn | None = None

    def __enter__(self) -> ReplicationStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def connected(self) -> bool:
        """Streaming from PostgreSQL right now (not between a loss and the reconnect)."""
        return self._conn is not None

    def close(self) -> None:
        """Send a final status update, end the copy and disconnect (idempotent)."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        with contextlib.suppress(psycopg.Error, OSError):
            self._send_status(conn)
            _end_copy(conn)
        conn.close()

    def start(self) -> None:
        """Connect, check everything that can be checked, and issue START_REPLICATION."""
        opts = self.options
        conn = connect(self.dsn, replication=True, settings=opts.session_settings)
        conn.add_notice_handler(self._on_notice)  # before anything the server may say
        try:
            steps = start_steps(opts, conn.info.server_version, conn.info.backend_pid)
            query, plan = next(steps), None
            while plan is None:
                cur = conn.execute(query)
                rows = cur.fetchall() if cur.description is not None else []
                try:
                    query = steps.send(rows)
                except StopIteration as done:
                    plan = done.value
            self._planned(plan)
            limit_receive_buffer(conn, opts.recv_buffer)
            self._check_copy_both(conn.execute(plan.query))
        except psycopg.Error as exc:
            conn.close()
            raise server_error(exc, slot=opts.slot, publications=opts.publications) from None
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        self._established = True
        self._last_status = time.monotonic()

    def __iter__(self) -> Iterator[Transaction]:
        for event in self.events():
            if isinstance(event, Transaction):
                yield event

    def events(self) -> Iterator[Event]:
        """Every event: transactions, non-transactional messages and, if asked, prepares."""
        self._owner = threading.get_ident()
        if self._first_attempt is None:
            self._first_attempt = time.monotonic()
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
                self._take_rewind()
            except (psycopg.Error, BridgeError, Disconnected) as exc:
                if not self._retryable(exc):
                    raise as_bridge_error(exc, self.options) from None
                self._drop_connection()
                self._retry_note(exc, backoff)
                self._pause(backoff)
                backoff = min(backoff * 2, self.options.max_backoff)
        self.close()

    def _pause(self, seconds: float) -> None:
        """Sleep, but wake within 50 ms of ``stop()`` (a signal must not wait out a backoff)."""
        deadline = time.monotonic() + seconds
        while not self._stopping and (left := deadline - time.monotonic()) > 0:
            time.sleep(min(left, 0.05))

    def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(psycopg.Error):
                conn.close()
        self._lost()

    def _run(self) -> Iterator[Event]:
        """Drive ``_steps`` with blocking waits."""
        assert self._conn is not None
        conn = self._conn
        pgconn = conn.pgconn
        sock = pgconn.socket
        steps = self._steps(pgconn)
        gatherer = Gatherer.open(sock)
        answer: bool | None = None
        try:
            while True:
                try:
                    step = steps.send(answer)
                except StopIteration:
                    break
                answer = None
                if type(step) is Readable:
                    answer = bool(select.select([sock], [], [], step.timeout)[0])
                elif type(step) is Gather:
                    with gatherer:
                        select.select([sock], [], [], step.seconds)
                elif type(step) is Send:
                    pgconn.put_copy_data(step.data)
                    pgconn.flush()
                elif step is IDLE:
                    assert self._on_idle is not None
                    self._on_idle()
                else:
                    yield step  # type: ignore[misc]
        finally:
            gatherer.close()
        self.close()

    def _send_status(self, conn: Conn) -> None:
        pgconn = conn.pgconn
        pgconn.put_copy_data(self._status_bytes())
        pgconn.flush()


def _end_copy(conn: Conn, timeout: float = 5.0) -> None:
    """CopyDone, then wait (bounded) for the server's end of the stream.

    The walsender handles our messages in order, so once it has answered, the status update
    sent just before is applied to the slot: a command that returns has its confirmed
    position visible in pg_replication_slots. Data still in flight is dropped (it was not
    acknowledged, so it comes again next time).
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


@dataclass(frozen=True, slots=True)
class Readable:
    """Wait until the socket is readable, at most ``timeout`` s (0: just look); the answer
    sent back is whether it is."""

    timeout: float


@dataclass(frozen=True, slots=True)
class Gather:
    """Wait until a batch is buffered on the socket (``connection.Gatherer``: on TCP; on a
    Unix-domain socket, the first byte), at most ``seconds``. The walsender fills the socket
    meanwhile."""

    seconds: float


@dataclass(frozen=True, slots=True)
class Send:
    """Send a standby status update (the bytes of a CopyData message) and flush it."""

    data: bytes


IDLE = object()  # run the consumer's on_idle callback: the stream has caught up
Steps = Generator["Event | Readable | Gather | Send | object", "bool | None", None]


class _Rewind(Exception):
    """Internal: restart the stream at the requested position."""


class Disconnected(Exception):
    """Internal: the server ended the stream in a way a reconnect can cure."""


def message_or(res: psycopg.pq.abc.PGresult | None) -> str:
    """A result's error text, for messages."""
    if res is None:
        return "connection closed"
    return (res.error_message or b"").decode(errors="replace").strip() or str(res.status)


def _short(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def late_publication_message(text: str, context: str | None, options: StreamOptions) -> str:
    """Why a publication that exists now was missing for the slot, and what to do."""
    where = f" ({context})" if context else ""
    slot = options.slot
    return (
        f"{text}{where}: the publication did not exist at the WAL position being decoded, so "
        f"its changes from there cannot be delivered. The slot {slot!r} was created before "
        "the publication (or the publication was dropped and re-created). Nothing past the "
        f"last delivered transaction was confirmed. Fix: drop the slot and create it again "
        f"after the publication ('pglogrepl-bridge slot drop {slot}', then 'slot create "
        f"{slot}'), and resynchronise the consumer"
    )


def as_bridge_error(exc: BaseException, options: StreamOptions) -> BridgeError:
    """Whatever ended a stream, as an error of this package's tree."""
    if isinstance(exc, BridgeError):
        return exc
    if isinstance(exc, psycopg.Error):
        return server_error(exc, slot=options.slot, publications=options.publications)
    return ReplicationError(f"replication connection lost: {_short(exc)}")
