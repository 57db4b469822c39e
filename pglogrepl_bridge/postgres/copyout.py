"""``COPY ... TO STDOUT`` read straight from libpq, in blocks of rows.

psycopg's ``Copy`` object hands out one row per round of its generator and wait machinery:
about 4 µs a row, which for a snapshot of millions of rows is seconds of CPU taken from the
servers on the same cores. Here the rows buffered in libpq are drained with non-blocking
``get_copy_data`` calls and the socket is waited on only when none is left, as the
replication stream does. Errors are psycopg's own exceptions, from the server's result.
"""

from __future__ import annotations

import select
from collections.abc import Iterator
from typing import Literal, overload

import psycopg
from psycopg import sql
from psycopg.errors import error_from_result
from psycopg.pq import ExecStatus

from pglogrepl_bridge.postgres.connection import Conn

#: rows per block handed out: few Python steps per row, bounded memory
BLOCK_ROWS = 1024


@overload
def copy_out(
    conn: Conn, query: sql.Composable, *, views: Literal[False] = False
) -> Iterator[list[bytes]]:
    """Rows as bytes."""


@overload
def copy_out(
    conn: Conn, query: sql.Composable, *, views: Literal[True]
) -> Iterator[list[bytes | memoryview]]:
    """Rows as libpq's buffers."""


def copy_out(
    conn: Conn, query: sql.Composable, *, views: bool = False
) -> Iterator[list[bytes]] | Iterator[list[bytes | memoryview]]:
    """The rows (each ending in a newline) of a ``COPY ... TO STDOUT`` in blocks. The
    connection must be idle (in a transaction or not); it is idle again when this ends.
    Closing the iterator early cancels the COPY and leaves the transaction aborted (roll back
    to a savepoint to go on). ``views``: each row as libpq's own buffer, not copied into
    bytes, for a caller that only joins them (the copy into a PostgreSQL target)."""
    pgconn = conn.pgconn
    encoding = conn.info.encoding
    pgconn.send_query(query.as_bytes(conn))
    _wait_result(pgconn)
    result = pgconn.get_result()
    if result is None or result.status != ExecStatus.COPY_OUT:
        _drain(pgconn)
        if result is not None and result.status == ExecStatus.FATAL_ERROR:
            raise error_from_result(result, encoding)
        raise psycopg.ProgrammingError(f"not a COPY TO STDOUT: {result and result.status}")
    finished = False
    try:
        block: list[bytes | memoryview] = []
        get = pgconn.get_copy_data
        while True:
            nbytes, data = get(1)
            if nbytes > 0:
                block.append(data if views else bytes(data))
                if len(block) == BLOCK_ROWS:
                    yield block
                    block = []
                continue
            if nbytes == 0:  # nothing buffered: wait for the server
                select.select([pgconn.socket], [], [])
                pgconn.consume_input()
                continue
            break  # -1: the copy is done
        if block:
            yield block
        finished = True
        _wait_result(pgconn)
        result = pgconn.get_result()
        _drain(pgconn)
        if result is not None and result.status == ExecStatus.FATAL_ERROR:
            raise error_from_result(result, encoding)
    finally:
        if not finished:  # abandoned (an error downstream, a stop): end the COPY
            pgconn.get_cancel().cancel()
            _skip_rows(pgconn)
            _drain(pgconn)


def _wait_result(pgconn: psycopg.pq.abc.PGconn) -> None:
    while pgconn.is_busy():
        select.select([pgconn.socket], [], [])
        pgconn.consume_input()


def _drain(pgconn: psycopg.pq.abc.PGconn) -> None:
    """Read every remaining result so the connection is idle again."""
    while True:
        _wait_result(pgconn)
        result = pgconn.get_result()
        if result is None:
            return
        if result.status == ExecStatus.COPY_OUT:
            _skip_rows(pgconn)


def _skip_rows(pgconn: psycopg.pq.abc.PGconn) -> None:
    """Read and drop the rest of a COPY's rows (after a cancel: up to the error)."""
    while pgconn.get_copy_data(0)[0] >= 0:
        pass
