"""``AsyncReplicationStream``: the same stream on psycopg's async connection, for asyncio.

    async with AsyncReplicationStream(dsn, options) as stream:
        async for txn in stream:
            await sink.apply(txn)
            stream.ack(txn.end_lsn)

The same options, the same session (``pgoutput.session``), the same start-up steps
(``postgres.startup``) and the same contract as ``ReplicationStream``: only the waiting
differs. The socket is watched with the event loop's ``add_reader``, so other tasks run
while the stream waits; ``ack`` may be called from any task or thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import select
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import psycopg
from psycopg import sql

from pglogrepl_bridge.errors import BridgeError
from pglogrepl_bridge.pgoutput.transaction import Event, Transaction
from pglogrepl_bridge.pgoutput.values import ValueProblem
from pglogrepl_bridge.postgres.connection import (
    SESSION_SETTINGS,
    Gatherer,
    connect_timeout,
    connection_error,
    limit_receive_buffer,
    server_error,
)
from pglogrepl_bridge.postgres.dsn import validate_dsn
from pglogrepl_bridge.postgres.options import StreamOptions
from pglogrepl_bridge.postgres.startup import start_steps
from pglogrepl_bridge.postgres.stream import (
    IDLE,
    Disconnected,
    Gather,
    Readable,
    Send,
    _Rewind,
    _StreamBase,
    as_bridge_error,
)

log = logging.getLogger(__name__)

AsyncConn = psycopg.AsyncConnection[tuple[Any, ...]]


class AsyncReplicationStream(_StreamBase):
    """Logical replication from one slot, as transactions, for asyncio.

    Iterate it with ``async for`` for ``Transaction`` objects (``events()`` also yields
    non-transactional messages and, if asked, prepares); call ``ack(txn.end_lsn)`` once a
    transaction is durable downstream. ``on_idle`` (sync or async) runs when the stream has
    caught up, as with ``ReplicationStream``.
    """

    def __init__(
        self,
        dsn: str,
        options: StreamOptions,
        *,
        on_problem: Callable[[ValueProblem], None] | None = None,
        on_idle: Callable[[], Any] | None = None,
    ) -> None:
        super().__init__(dsn, options, on_problem=on_problem)
        self._on_idle = on_idle
        self._has_idle = on_idle is not None
        self._conn: AsyncConn | None = None

    async def __aenter__(self) -> AsyncReplicationStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def connected(self) -> bool:
        """Streaming from PostgreSQL right now."""
        return self._conn is not None

    def ack(self, end_lsn: int, *, cumulative: bool = False) -> None:
        """The transaction ending at ``end_lsn`` is durable downstream; it may be confirmed.

        Queued and applied by the stream's task at its next wake-up (at once when it is the
        caller), so any task or thread may call it.
        """
        self._acks.append((end_lsn, cumulative))

    async def close(self) -> None:
        """Send a final status update, end the copy and disconnect (idempotent)."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        with contextlib.suppress(psycopg.Error, OSError):
            await self._send_status(conn)
            await _end_copy(conn)
        await conn.close()

    async def _connect(self) -> AsyncConn:
        validate_dsn(self.dsn)
        try:
            conn = await psycopg.AsyncConnection.connect(
                self.dsn, autocommit=True, replication="database", **connect_timeout(self.dsn)
            )
        except psycopg.Error as exc:
            raise connection_error(exc, self.dsn) from None
        try:
            settings = {**SESSION_SETTINGS, **self.options.session_settings}
            for name, value in settings.items():
                await conn.execute(
                    sql.SQL("SET {} = {}").format(sql.Identifier(name), sql.Literal(value))
                )
        except psycopg.Error as exc:
            await conn.close()
            raise connection_error(exc, self.dsn) from None
        return conn

    async def start(self) -> None:
        """Connect, check everything that can be checked, and issue START_REPLICATION."""
        opts = self.options
        conn = await self._connect()
        conn.add_notice_handler(self._on_notice)  # before anything the server may say
        try:
            steps = start_steps(opts, conn.info.server_version, conn.info.backend_pid)
            query, plan = next(steps), None
            while plan is None:
                cur = await conn.execute(query)
                rows = await cur.fetchall() if cur.description is not None else []
                try:
                    query = steps.send(rows)
                except StopIteration as done:
                    plan = done.value
            self._planned(plan)
            limit_receive_buffer(conn, opts.recv_buffer)
            self._check_copy_both(await conn.execute(plan.query))
        except psycopg.Error as exc:
            await conn.close()
            raise server_error(exc, slot=opts.slot, publications=opts.publications) from None
        except BaseException:
            await conn.close()
            raise
        self._conn = conn
        self._established = True
        self._last_status = time.monotonic()

    def __aiter__(self) -> AsyncIterator[Transaction]:
        return self._transactions()

    async def _transactions(self) -> AsyncIterator[Transaction]:
        async for event in self.events():
            if isinstance(event, Transaction):
                yield event

    async def events(self) -> AsyncIterator[Event]:
        """Every event: transactions, non-transactional messages and, if asked, prepares."""
        if self._first_attempt is None:
            self._first_attempt = time.monotonic()
        backoff = 0.1
        while not self._stopping:
            try:
                if self._conn is None:
                    await self.start()
                    backoff = 0.1
                async for event in self._run():
                    yield event
                return
            except _Rewind:
                await self._drop_connection()
                self._take_rewind()
            except (psycopg.Error, BridgeError, Disconnected) as exc:
                if not self._retryable(exc):
                    raise as_bridge_error(exc, self.options) from None
                await self._drop_connection()
                self._retry_note(exc, backoff)
                deadline = time.monotonic() + backoff
                while not self._stopping and (left := deadline - time.monotonic()) > 0:
                    await asyncio.sleep(min(left, 0.05))  # stop() acts within 50 ms
                backoff = min(backoff * 2, self.options.max_backoff)
        await self.close()

    async def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(psycopg.Error):
                await conn.close()
        self._lost()

    async def _run(self) -> AsyncIterator[Event]:
        """Drive the shared ``_steps`` with the event loop's waits."""
        assert self._conn is not None
        conn = self._conn
        pgconn = conn.pgconn
        steps = self._steps(pgconn)
        gatherer = Gatherer.open(pgconn.socket)
        answer: bool | None = None
        try:
            while True:
                try:
                    step = steps.send(answer)
                except StopIteration:
                    break
                answer = None
                if type(step) is Readable:
                    answer = await _readable(pgconn.socket, step.timeout)
                elif type(step) is Gather:
                    with gatherer:
                        await _readable(pgconn.socket, step.seconds)
                elif type(step) is Send:
                    await _send(conn, step.data)
                elif step is IDLE:
                    assert self._on_idle is not None
                    result = self._on_idle()
                    if asyncio.iscoroutine(result):
                        await result
                else:
                    yield step  # type: ignore[misc]
        finally:
            gatherer.close()
        await self.close()

    async def _send_status(self, conn: AsyncConn) -> None:
        await _send(conn, self._status_bytes())


async def _send(conn: AsyncConn, data: bytes) -> None:
    pgconn = conn.pgconn
    pgconn.put_copy_data(data)
    while pgconn.flush() == 1:  # non-blocking: wait until the socket takes the rest
        await _writable(pgconn.socket, 1.0)


async def _wait(fd: int, timeout: float, *, write: bool) -> bool:
    """Whether ``fd`` became ready within ``timeout`` seconds (0: just look)."""
    if timeout <= 0:  # a zero-timeout poll never blocks: no need to involve the loop
        ready_now = select.select([], [fd], [], 0) if write else select.select([fd], [], [], 0)
        return bool(ready_now[0] or ready_now[1])
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    (loop.add_writer if write else loop.add_reader)(fd, wake)
    try:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(ready, timeout)
        return ready.done()
    finally:
        (loop.remove_writer if write else loop.remove_reader)(fd)


async def _readable(fd: int, timeout: float) -> bool:
    return await _wait(fd, timeout, write=False)


async def _writable(fd: int, timeout: float) -> bool:
    return await _wait(fd, timeout, write=True)


async def _end_copy(conn: AsyncConn, timeout: float = 5.0) -> None:
    """CopyDone, then wait (bounded) for the server's end of the stream (see the sync one)."""
    pgconn = conn.pgconn
    pgconn.put_copy_end()
    while pgconn.flush() == 1:
        await _writable(pgconn.socket, 1.0)
    deadline = time.monotonic() + timeout
    while True:
        nbytes, _ = pgconn.get_copy_data(1)
        if nbytes < 0:
            break
        if nbytes == 0:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            await _readable(pgconn.socket, min(left, 0.1))
            pgconn.consume_input()
    while True:
        while pgconn.is_busy():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            await _readable(pgconn.socket, min(left, 0.1))
            pgconn.consume_input()
        if pgconn.get_result() is None:
            return
