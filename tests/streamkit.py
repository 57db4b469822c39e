"""Helpers for tests that stream from a real server: unique names, a consumer thread, polling."""

from __future__ import annotations

import asyncio
import functools
import itertools
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psycopg
import sqlalchemy as sa

from pglogrepl_bridge.lsn import Lsn
from pglogrepl_bridge.pgoutput.transaction import Transaction
from pglogrepl_bridge.postgres import admin
from pglogrepl_bridge.postgres.aio import AsyncReplicationStream
from pglogrepl_bridge.postgres.stream import ReplicationStream, StreamOptions
from pglogrepl_bridge.sinks.replicate import run_replicate

#: ``run_replicate`` for the tests of the stream's application: changes only, no copy of the
#: rows that exist first (tests/test_snapshot.py covers that)
replicate_changes = functools.partial(run_replicate, snapshot="never")

Conn = psycopg.Connection[tuple[Any, ...]]
_ids = itertools.count()


@dataclass
class Source:
    """A table, a publication for it and a pgoutput slot, all named uniquely for one test."""

    conn: Conn
    table: str
    publication: str
    slot: str

    def insert(self, *ids: int) -> None:
        with self.conn.transaction():
            for i in ids:
                self.conn.execute(f"INSERT INTO {self.table} VALUES (%s, %s)", (i, f"v{i}"))

    def confirmed(self) -> Lsn | None:
        row = self.conn.execute(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = %s",
            (self.slot,),
        ).fetchone()
        return None if row is None or row[0] is None else Lsn.parse(row[0])

    def wal_lsn(self) -> Lsn:
        row = self.conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
        assert row is not None
        return Lsn.parse(row[0])

    def options(self, **kw: Any) -> StreamOptions:
        kw.setdefault("status_interval", 0.2)
        return StreamOptions(slot=self.slot, publications=(self.publication,), **kw)

    def end(self) -> Lsn:
        """The end LSN of the last published transaction so far (peeked, not consumed)."""
        return last_commit_end(self.conn, self.slot, self.publication)

    def walsender_pid(self) -> int | None:
        row = self.conn.execute(
            "SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s", (self.slot,)
        ).fetchone()
        return None if row is None else row[0]


def make_source(conn: Conn, *, slot: bool = True, extra: str = "") -> Source:
    n = next(_ids)
    src = Source(conn, f"t_{n}", f"pub_{n}", f"slot_{n}")
    conn.execute(f"CREATE TABLE {src.table} (id int PRIMARY KEY, v text {extra})")
    conn.execute(f"CREATE PUBLICATION {src.publication} FOR TABLE {src.table}")
    if slot:
        conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (src.slot,))
    return src


def invalidate_slot(src: Source) -> None:
    """Make the source's slot lose its WAL (max_slot_wal_keep_size, briefly 1MB)."""
    conn = src.conn
    conn.execute(f"INSERT INTO {src.table} VALUES (-1, 'before') ON CONFLICT DO NOTHING")
    conn.execute("ALTER SYSTEM SET max_slot_wal_keep_size = '1MB'")
    conn.execute("SELECT pg_reload_conf()")
    try:
        for i in range(4):  # push the slot's restart_lsn more than a segment behind
            conn.execute(f"INSERT INTO {src.table} VALUES ({-100 - i}, 'push')")
            conn.execute("SELECT pg_switch_wal()")
        conn.execute("CHECKPOINT")
        wait_for(
            lambda: (
                conn.execute(
                    "SELECT wal_status FROM pg_replication_slots WHERE slot_name = %s", (src.slot,)
                ).fetchone()
                == ("lost",)
            ),
            what="slot invalidated",
        )
    finally:
        conn.execute("ALTER SYSTEM RESET max_slot_wal_keep_size")
        conn.execute("SELECT pg_reload_conf()")


def last_commit_end(conn: Conn, slot: str, publication: str) -> Lsn:
    end = admin.last_commit_lsn(conn, slot, (publication,))
    assert end is not None, "nothing committed for that publication yet"
    return end


def wait_for(predicate: Callable[[], bool], timeout: float = 15.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what or predicate}")


AnyStream = ReplicationStream | AsyncReplicationStream
#: the stream-contract tests run for both (a ``stream_cls`` fixture)
STREAM_CLASSES = {"sync": ReplicationStream, "async": AsyncReplicationStream}


def start_now(stream: AnyStream) -> None:
    """``start()`` for either stream (for tests of what start refuses)."""
    if isinstance(stream, AsyncReplicationStream):
        asyncio.run(stream.start())
    else:
        stream.start()


@dataclass
class Consumer:
    """Iterates a stream (sync, or async in its own event loop) in a thread; the test takes
    transactions from ``received``."""

    stream: AnyStream
    received: queue.Queue[Transaction] = field(default_factory=queue.Queue)
    error: BaseException | None = None
    thread: threading.Thread | None = None

    def start(self) -> Consumer:
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self) -> None:
        try:
            if isinstance(self.stream, AsyncReplicationStream):
                asyncio.run(self._run_async(self.stream))
            else:
                for txn in self.stream:
                    self.received.put(txn)
        except BaseException as exc:  # reported to the test by take()/stop()
            self.error = exc

    async def _run_async(self, stream: AsyncReplicationStream) -> None:
        async with stream:
            async for txn in stream:
                self.received.put(txn)

    def take(self, n: int, timeout: float = 20.0) -> list[Transaction]:
        out: list[Transaction] = []
        deadline = time.monotonic() + timeout
        while len(out) < n:
            if self.error is not None:
                raise self.error
            try:
                out.append(self.received.get(timeout=max(0.01, deadline - time.monotonic())))
            except queue.Empty:
                raise AssertionError(f"got {len(out)} of {n} transactions") from None
        return out

    def stop(self) -> None:
        self.stream.stop()
        if self.thread is not None:
            self.thread.join(timeout=10)
            assert not self.thread.is_alive(), "stream did not stop"
        if self.error is not None:
            raise self.error


def ids_of(txns: list[Transaction]) -> list[int]:
    out = []
    for t in txns:
        for c in t.changes:
            new = getattr(c, "new", None)
            if new is not None:
                out.append(new["id"])
    return out


def pg_url(dsn: str, dbname: str | None = None) -> sa.URL:
    p = psycopg.conninfo.conninfo_to_dict(dsn)
    return sa.URL.create(
        "postgresql+psycopg",
        username=str(p["user"]),
        password=str(p.get("password") or ""),
        host=str(p["host"]),
        port=int(str(p["port"])),
        database=dbname or str(p["dbname"]),
    )
