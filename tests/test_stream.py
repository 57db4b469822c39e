"""The replication stream against real servers: the feedback contract, resume, reconnects."""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import psycopg
import pytest

from pglogrepl_bridge.errors import ConfigError, ReplicationError
from pglogrepl_bridge.pgoutput.transaction import RowChange
from pglogrepl_bridge.postgres import connection
from pglogrepl_bridge.postgres.connection import connect, same_host
from pglogrepl_bridge.postgres.stream import (
    MAX_PAUSE,
    ReplicationStream,
    max_proto_version,
    pause_after,
)
from pglogrepl_bridge.testing.postgres import PostgresServer

from .streamkit import (
    STREAM_CLASSES,
    AnyStream,
    Conn,
    Consumer,
    ids_of,
    invalidate_slot,
    make_source,
    start_now,
    wait_for,
)


@pytest.fixture(params=sorted(STREAM_CLASSES))
def stream_cls(request: pytest.FixtureRequest) -> type[AnyStream]:
    """The stream-contract tests run for the sync and the async stream alike."""
    return STREAM_CLASSES[request.param]  # type: ignore[return-value]


def test_streams_transactions_with_typed_values(
    stream_cls: type[AnyStream], pg: PostgresServer, pg_conn: Conn
) -> None:
    src = make_source(pg_conn)
    consumer = Consumer(stream_cls(pg.dsn, src.options())).start()
    try:
        src.insert(1, 2)
        src.insert(3)
        txns = consumer.take(2)
    finally:
        consumer.stop()
    assert ids_of(txns) == [1, 2, 3]
    assert txns[0].end_lsn < txns[1].end_lsn
    change = txns[0].changes[0]
    assert change.new == {"id": 1, "v": "v1"}  # type: ignore[union-attr]
    assert consumer.stream.proto_version == max_proto_version(pg.version)


def test_never_confirms_on_receipt_and_only_contiguous_acks(
    stream_cls: type[AnyStream], pg: PostgresServer, pg_conn: Conn
) -> None:
    src = make_source(pg_conn)
    start = src.confirmed()
    consumer = Consumer(stream_cls(pg.dsn, src.options())).start()
    try:
        for i in range(1, 4):
            src.insert(i)
        t1, t2, t3 = consumer.take(3)
        # received, not acknowledged: several status updates later, nothing is confirmed
        time.sleep(1.0)
        assert src.confirmed() == start
        assert consumer.stream.feedback.received >= t3.commit_lsn  # write position moves
        consumer.stream.ack(t1.end_lsn)
        wait_for(lambda: (src.confirmed() or 0) >= t1.end_lsn, what="t1 confirmed")
        # a later ack does not confirm the earlier, unacknowledged t2
        consumer.stream.ack(t3.end_lsn)
        time.sleep(1.0)
        assert src.confirmed() == t1.end_lsn
        consumer.stream.ack(t2.end_lsn)
        # t3 now (or past it: an idle stream confirms up to the server's WAL end, which
        # other activity on the server may have moved meanwhile)
        wait_for(lambda: (src.confirmed() or 0) >= t3.end_lsn, what="t3 confirmed")
    finally:
        consumer.stop()


def test_idle_slot_advances_past_unpublished_traffic(
    stream_cls: type[AnyStream], pg: PostgresServer, pg_conn: Conn
) -> None:
    src = make_source(pg_conn)
    pg_conn.execute(f"CREATE TABLE {src.table}_other (id int)")
    consumer = Consumer(stream_cls(pg.dsn, src.options())).start()
    try:
        src.insert(1)
        (t1,) = consumer.take(1)
        time.sleep(0.5)  # status updates go out meanwhile: t1 is in flight, nothing passes it
        assert (src.confirmed() or 0) < t1.end_lsn
        consumer.stream.ack(t1.end_lsn)
        # confirmed, and then past it with the keepalives once idle (other tests' WAL)
        wait_for(lambda: (src.confirmed() or 0) >= t1.end_lsn, what="t1 confirmed")
        for i in range(20):
            pg_conn.execute(f"INSERT INTO {src.table}_other VALUES ({i})")
        target = src.wal_lsn()
        # the walsender's keepalives report progress past target; everything is acknowledged
        wait_for(lambda: (src.confirmed() or 0) >= target, what="idle advance")
    finally:
        consumer.stop()


def test_no_ack_confirms_nothing(
    stream_cls: type[AnyStream], pg: PostgresServer, pg_conn: Conn
) -> None:
    src = make_source(pg_conn)
    start = src.confirmed()
    consumer = Consumer(stream_cls(pg.dsn, src.options(no_ack=True))).start()
    try:
        src.insert(1)
        (t1,) = consumer.take(1)
        consumer.stream.ack(t1.end_lsn)
        pg_conn.execute(f"CREATE TABLE {src.table}_x (id int)")
        time.sleep(1.5)
        assert src.confirmed() == start
    finally:
        consumer.stop()
    assert src.confirmed() == start


def test_resume_from_consumer_position_skips_what_it_holds(
    stream_cls: type[AnyStream], pg: PostgresServer, pg_conn: Conn
) -> None:
    src = make_source(pg_conn)
    for i in range(1, 4):
        src.insert(i)
    # a peek stream sees all three; pretend the consumer durably holds the first two
    peek = Consumer(stream_cls(pg.dsn, src.options(no_ack=True))).start()
    t1, t2, _t3 = peek.take(3)
    peek.stop()
    consumer = Consumer(stream_cls(pg.dsn, src.options(start_lsn=t2.end_lsn))).start()
    try:
        src.insert(4)
        txns = consumer.take(2)
        assert ids_of(txns) == [3, 4]
        # the position the consumer supplied is durable: it is what gets confirmed first
        wait_for(lambda: src.confirmed() == t2.end_lsn, what="start position confirmed")
    finally:
        consumer.stop()
    assert t1.end_lsn < t2.end_lsn


def test_without_position_resumes_from_the_slot(
    stream_cls: type[AnyStream], pg: PostgresServer, pg_conn: Conn
) -> None:
    src = make_source(pg_conn)
    first = Consumer(stream_cls(pg.dsn, src.options())).start()
    src.insert(1)
    src.insert(2)
    t1, _t2 = first.take(2)
    first.stream.ack(t1.end_lsn)
    wait_for(lambda: src.confirmed() == t1.end_lsn, what="t1 confirmed")
    first.stop()
    again = Consumer(stream_cls(pg.dsn, src.options())).start()
    try:
        assert ids_of(again.take(1)) == [2]  # unacknowledged: sent again; acknowledged: not
    finally:
        again.stop()


@pytest.mark.parametrize("how", ["terminate", "restart"])
def test_reconnects_without_loss_or_duplicates(
    stream_cls: type[AnyStream], pg: PostgresServer, pg_conn: Conn, how: str
) -> None:
    if how == "restart" and pg.kind != "local":
        pytest.skip("restarting needs a local cluster")
    src = make_source(pg_conn)
    stream = stream_cls(pg.dsn, src.options())
    consumer = Consumer(stream).start()
    got = []
    conn = pg_conn
    try:
        for i in range(1, 6):
            src.insert(i)
        got += consumer.take(5)
        for t in got[:3]:
            stream.ack(t.end_lsn)  # 4 and 5 are delivered but not yet acknowledged
        wait_for(lambda: src.confirmed() == got[2].end_lsn, what="ack of 3")
        if how == "terminate":
            pid = src.walsender_pid()
            assert pid is not None
            pg_conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
        else:
            # a crash: a fast shutdown would wait for us to confirm 4 and 5, which we must not
            pg.restart("immediate")
            conn = psycopg.connect(pg.dsn, autocommit=True)
            src.conn = conn
        for i in range(6, 9):
            src.insert(i)
        got += consumer.take(3, timeout=40)
        for t in got[3:]:
            stream.ack(t.end_lsn)
        wait_for(lambda: (src.confirmed() or 0) >= got[-1].end_lsn, what="all confirmed")
        assert stream.reconnects >= 1
        time.sleep(0.5)
        assert consumer.received.empty()  # nothing delivered twice
    finally:
        consumer.stop()
        if conn is not pg_conn:
            conn.close()
    assert ids_of(got) == list(range(1, 9))


def test_missing_slot(stream_cls: type[AnyStream], pg: PostgresServer, pg_conn: Conn) -> None:
    src = make_source(pg_conn, slot=False)
    stream = stream_cls(pg.dsn, src.options())
    with pytest.raises(ConfigError, match=f"slot '{src.slot}' does not exist.*--create-slot"):
        start_now(stream)


def test_create_temporary_slot(
    stream_cls: type[AnyStream], pg: PostgresServer, pg_conn: Conn
) -> None:
    src = make_source(pg_conn, slot=False)
    stream = stream_cls(pg.dsn, src.options(create_slot=True, temporary=True))
    consumer = Consumer(stream).start()
    try:
        wait_for(lambda: src.walsender_pid() is not None, what="temporary slot")
        src.insert(1)
        assert ids_of(consumer.take(1)) == [1]
    finally:
        consumer.stop()
    wait_for(lambda: src.confirmed() is None and src.walsender_pid() is None, what="slot gone")


def test_missing_publication(
    stream_cls: type[AnyStream], pg: PostgresServer, pg_conn: Conn
) -> None:
    src = make_source(pg_conn)
    opts = src.options()
    stream = stream_cls(pg.dsn, type(opts)(slot=src.slot, publications=("nope",)))
    with pytest.raises(ConfigError, match="nope do not exist"):
        start_now(stream)


def test_slot_in_use(stream_cls: type[AnyStream], pg: PostgresServer, pg_conn: Conn) -> None:
    src = make_source(pg_conn)
    consumer = Consumer(stream_cls(pg.dsn, src.options())).start()
    try:
        wait_for(lambda: src.walsender_pid() is not None, what="active slot")
        pid = src.walsender_pid()
        with pytest.raises(ReplicationError, match=f"in use by another process \\(PID {pid}\\)"):
            start_now(stream_cls(pg.dsn, src.options(reconnect=False)))
    finally:
        consumer.stop()


def test_unsupported_option_is_refused_before_streaming(
    stream_cls: type[AnyStream], pg: PostgresServer, pg_conn: Conn
) -> None:
    src = make_source(pg_conn)
    best = max_proto_version(pg.version)
    with pytest.raises(ConfigError, match="proto_version 5 needs a newer server"):
        start_now(stream_cls(pg.dsn, src.options(proto_version=5)))
    with pytest.raises(ConfigError, match="streaming needs proto_version 2"):
        start_now(stream_cls(pg.dsn, src.options(proto_version=1, streaming=True)))
    if pg.version < 16:
        with pytest.raises(ConfigError, match="origin needs PostgreSQL 16"):
            start_now(stream_cls(pg.dsn, src.options(origin="none")))
    # the highest version we claim for this server is one it accepts
    consumer = Consumer(stream_cls(pg.dsn, src.options(proto_version=best))).start()
    try:
        src.insert(1)
        assert ids_of(consumer.take(1)) == [1]
        assert consumer.stream.proto_version == best
    finally:
        consumer.stop()


def test_role_without_replication_privilege(pg: PostgresServer, pg_conn: Conn) -> None:
    pg_conn.execute("DROP ROLE IF EXISTS norepl")
    pg_conn.execute("CREATE ROLE norepl LOGIN PASSWORD 'sekrit-pw'")
    dsn = psycopg.conninfo.make_conninfo(pg.dsn, user="norepl", password="sekrit-pw")
    with pytest.raises(ConfigError, match="lacks the REPLICATION privilege") as info:
        connect(dsn, replication=True)
    assert "sekrit-pw" not in str(info.value)


@pytest.mark.parametrize(("recv_buffer", "expected"), [(None, 80_000), (30_000, 60_000), (0, None)])
def test_receive_buffer_is_fixed_for_a_server_on_this_host(
    pg: PostgresServer,
    pg_conn: Conn,
    monkeypatch: pytest.MonkeyPatch,
    recv_buffer: int | None,
    expected: int | None,
) -> None:
    monkeypatch.setattr(connection, "LOCAL_RECEIVE_BUFFER", 40_000)
    src = make_source(pg_conn)
    stream = ReplicationStream(pg.dsn, src.options(recv_buffer=recv_buffer))
    try:
        stream.start()
        assert stream._conn is not None
        with socket.socket(fileno=os.dup(stream._conn.pgconn.socket)) as sock:
            if sock.family == socket.AF_UNIX:
                pytest.skip("the server is reached over a Unix socket")
            size = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    finally:
        stream.close()
    if expected is None:  # the kernel's own, autotuned buffer
        assert size not in (60_000, 80_000)
    else:
        assert size == expected  # Linux doubles what it is asked for


def test_text_arrives_as_utf8_whatever_the_client_encoding(
    stream_cls: type[AnyStream], pg: PostgresServer, pg_conn: Conn
) -> None:
    """pgoutput converts text to the session's client_encoding: the stream asks for UTF8, so
    a LATIN1 (or any) setting in the DSN or PGCLIENTENCODING changes nothing."""
    src = make_source(pg_conn)
    pg_conn.execute(f"INSERT INTO {src.table} VALUES (1, 'café €')")
    dsn = psycopg.conninfo.make_conninfo(pg.dsn, client_encoding="LATIN1")
    consumer = Consumer(stream_cls(dsn, src.options())).start()
    try:
        txns = consumer.take(1)
    finally:
        consumer.stop()
    assert txns[0].changes[0].new == {"id": 1, "v": "café €"}  # type: ignore[union-attr]


def test_pause_after_a_burst_grows_with_it() -> None:
    """A lone small transaction costs microseconds of latency; a bulk load pauses long enough
    for the walsender to batch its sends, but never more than MAX_PAUSE."""
    assert pause_after(3) < 0.0001
    assert pause_after(100) < pause_after(500) <= MAX_PAUSE
    assert pause_after(10**6) == MAX_PAUSE == 0.01


def test_a_gatherer_wakes_for_a_batch_and_then_for_any_byte() -> None:
    """On TCP the wait after a burst ends once GATHER_BYTES are buffered, not before (short
    of its timeout); outside it, and on a Unix-domain socket, a single byte ends it."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        sender = socket.create_connection(server.getsockname())
        reader, _ = server.accept()
        with sender, reader:
            gatherer = connection.Gatherer.open(reader.fileno())
            assert gatherer.marks
            try:
                sender.sendall(b"x" * (connection.GATHER_BYTES // 2))
                time.sleep(0.05)
                with gatherer:
                    assert not select.select([reader], [], [], 0.05)[0]  # half a batch: wait
                    sender.sendall(b"y" * connection.GATHER_BYTES)
                    assert select.select([reader], [], [], 5.0)[0]  # a batch: awake
                sent = connection.GATHER_BYTES // 2 + connection.GATHER_BYTES
                assert len(reader.recv(sent, socket.MSG_WAITALL)) == sent
                sender.sendall(b"z")
                assert select.select([reader], [], [], 5.0)[0]  # the mark is back to 1
            finally:
                gatherer.close()
            assert reader.fileno() >= 0  # close() closed its duplicate, not the socket
            reader.setblocking(False)
            assert reader.recv(10) == b"z"
    left, right = socket.socketpair(socket.AF_UNIX)
    with left, right:
        gatherer = connection.Gatherer.open(left.fileno())
        assert not gatherer.marks  # poll ignores the mark here: no wait for a batch
        right.sendall(b"z")
        with gatherer:
            assert select.select([left], [], [], 5.0)[0]
        gatherer.close()
        assert left.recv(10) == b"z"  # the socket itself stays open


def test_same_host() -> None:
    assert same_host("127.0.0.1", "127.0.0.1")
    assert same_host("10.1.2.3", "127.0.0.2")  # any loopback peer
    assert same_host("10.1.2.3", "10.1.2.3")  # our own address
    assert same_host("::1", "::1")
    assert not same_host("10.1.2.3", "10.1.2.4")
    assert not same_host("fe80::1%eth0", "fe80::2%eth0")
    assert not same_host("", "not an address")


def test_wrong_password_never_printed(pg: PostgresServer) -> None:
    dsn = psycopg.conninfo.make_conninfo(pg.dsn, password="wrong-pw-123")
    with pytest.raises(ConfigError, match="authentication failed") as info:
        connect(dsn, replication=True)
    assert "wrong-pw-123" not in str(info.value)


def test_connection_refused() -> None:
    with pytest.raises(Exception, match="cannot connect") as info:
        connect(
            "host=127.0.0.1 port=1 user=x password=topsecret connect_timeout=3", replication=True
        )
    assert "topsecret" not in str(info.value)


def test_invalidated_slot_is_refused(
    stream_cls: type[AnyStream], pg: PostgresServer, pg_conn: Conn
) -> None:
    src = make_source(pg_conn)
    invalidate_slot(src)
    with pytest.raises(ReplicationError, match=r"invalidated.*drop and re-create"):
        start_now(stream_cls(pg.dsn, src.options()))


_SYNC_CONSUMER = """
import signal, sys
from pglogrepl_bridge import ReplicationStream, StreamOptions
stream = ReplicationStream({dsn!r}, StreamOptions(slot={slot!r},
    publications=({publication!r},), status_interval=3600))
seen = []
def on_term(*_):
    # acknowledged only now: just the final status update can confirm it
    stream.ack(seen[-1])
    stream.stop()
signal.signal(signal.SIGTERM, on_term)
for txn in stream:
    seen.append(txn.end_lsn)
    print(int(txn.end_lsn), flush=True)
print("stopped", flush=True)
"""

_ASYNC_CONSUMER = """
import asyncio, signal, sys
from pglogrepl_bridge import AsyncReplicationStream, StreamOptions
async def main():
    stream = AsyncReplicationStream({dsn!r}, StreamOptions(slot={slot!r},
        publications=({publication!r},), status_interval=3600))
    seen = []
    def on_term():
        stream.ack(seen[-1])  # acknowledged only now: just the final status update confirms
        stream.stop()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, on_term)
    async with stream:
        async for txn in stream:
            seen.append(txn.end_lsn)
            print(int(txn.end_lsn), flush=True)
    print("stopped", flush=True)
asyncio.run(main())
"""


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_sigterm_sends_final_status(
    kind: str, pg: PostgresServer, pg_conn: Conn, tmp_path: Path
) -> None:
    src = make_source(pg_conn)
    script = tmp_path / "consume.py"
    template = _SYNC_CONSUMER if kind == "sync" else _ASYNC_CONSUMER
    script.write_text(template.format(dsn=pg.dsn, slot=src.slot, publication=src.publication))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        src.insert(1)
        assert proc.stdout is not None
        end = int(proc.stdout.readline())
        time.sleep(0.5)
        assert src.confirmed() != end  # not acknowledged yet
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.stdout.readline().strip() == "stopped"
        assert proc.wait(timeout=10) == 0
        assert time.monotonic() - started < 2  # a stop acts within the loop's next wake-up
    finally:
        proc.kill()
    assert src.confirmed() == end  # the final status update, sent before exiting


def test_until_lsn_stops_once_everything_up_to_it_is_acknowledged(
    stream_cls: type[AnyStream], pg: PostgresServer, pg_conn: Conn
) -> None:
    src = make_source(pg_conn)
    src.insert(1)
    src.insert(2)
    end = src.end()
    src.insert(3)  # after until_lsn: never delivered
    consumer = Consumer(stream_cls(pg.dsn, src.options(until_lsn=end))).start()
    try:
        t1, t2 = consumer.take(2)
        time.sleep(0.3)
        assert consumer.thread is not None and consumer.thread.is_alive()  # waits for acks
        consumer.stream.ack(t1.end_lsn)
        consumer.stream.ack(t2.end_lsn)
        consumer.thread.join(timeout=10)
        assert not consumer.thread.is_alive(), "the stream did not end at until_lsn"
    finally:
        consumer.stop()
    assert t2.end_lsn == end and consumer.received.empty()
    assert src.confirmed() == end


def test_rewind_delivers_again_from_postgresql(
    stream_cls: type[AnyStream], pg: PostgresServer, pg_conn: Conn
) -> None:
    src = make_source(pg_conn)
    stream = stream_cls(pg.dsn, src.options())
    consumer = Consumer(stream).start()
    try:
        for i in range(1, 4):
            src.insert(i)
        t1, _t2, _t3 = consumer.take(3)
        stream.ack(t1.end_lsn)
        wait_for(lambda: (src.confirmed() or 0) >= t1.end_lsn, what="t1 confirmed")
        with pytest.raises(ReplicationError, match="no longer keeps older changes"):
            stream.request_rewind(t1.end_lsn - 1)
        stream.request_rewind(t1.end_lsn)  # "send everything after t1 again"
        assert ids_of(consumer.take(2)) == [2, 3]
    finally:
        consumer.stop()


def test_two_phase_prepared_transaction_pins_the_slot_until_committed(
    stream_cls: type[AnyStream], pg: PostgresServer, pg_conn: Conn
) -> None:
    src = make_source(pg_conn, slot=False)
    pg_conn.execute(
        "SELECT pg_create_logical_replication_slot(%s, 'pgoutput', false, true)", (src.slot,)
    )
    start = src.confirmed()
    first = Consumer(stream_cls(pg.dsn, src.options(two_phase=True))).start()
    try:
        pg_conn.execute("BEGIN")
        pg_conn.execute(f"INSERT INTO {src.table} VALUES (1, 'prepared')")
        pg_conn.execute("PREPARE TRANSACTION 'pinned'")
        src.insert(2)
        (t2,) = first.take(1)  # the prepared one is held until its outcome is known
        first.stream.ack(t2.end_lsn)
        time.sleep(1.0)
        confirmed = src.confirmed()
        assert confirmed is not None and start is not None
        assert confirmed < t2.end_lsn  # t2 is acknowledged, but the PREPARE before it pins
    finally:
        first.stop()
    # a restart: the PREPARE is sent again, so COMMIT PREPARED still finds its changes. The
    # consumer's durable position skips t2, which the pinned slot could not confirm.
    again = Consumer(stream_cls(pg.dsn, src.options(two_phase=True, start_lsn=t2.end_lsn))).start()
    try:
        pg_conn.execute("COMMIT PREPARED 'pinned'")
        (txn,) = again.take(1)
        assert txn.gid == "pinned" and ids_of([txn]) == [1]
        again.stream.ack(txn.end_lsn)
        wait_for(lambda: (src.confirmed() or 0) >= txn.end_lsn, what="released")
    finally:
        again.stop()


def test_a_streamed_transaction_equals_its_plain_self(
    stream_cls: type[AnyStream], pg: PostgresServer, pg_conn: Conn
) -> None:
    """The same large transaction, written under a replication origin, read by two slots: one
    streamed while in progress (logical_decoding_work_mem = 64kB), one whole. Every field,
    origin included, and every change must be the same."""
    src = make_source(pg_conn)
    other_slot = f"{src.slot}_plain"
    pg_conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (other_slot,))
    origin = f"upstream_{src.slot}"
    with psycopg.connect(pg.dsn, autocommit=True) as writer:
        writer.execute("SELECT pg_replication_origin_create(%s)", (origin,))
        writer.execute("SELECT pg_replication_origin_session_setup(%s)", (origin,))
        with writer.transaction():
            writer.execute(
                f"INSERT INTO {src.table} SELECT g, repeat('x', 200) || g "
                "FROM generate_series(1, 3000) g"
            )
        with writer.transaction():  # a small one, never streamed
            writer.execute(f"INSERT INTO {src.table} VALUES (0, 'small')")
        writer.execute("SELECT pg_replication_origin_session_reset()")
    try:
        end = src.end()
        got = {}
        for slot, streaming in ((src.slot, True), (other_slot, False)):
            opts = src.options(
                until_lsn=end,
                streaming=streaming,
                session_settings={"logical_decoding_work_mem": "64kB"},
            )
            consumer = Consumer(stream_cls(pg.dsn, replace(opts, slot=slot))).start()
            try:
                txns = consumer.take(2)
                for t in txns:
                    consumer.stream.ack(t.end_lsn)
            finally:
                consumer.stop()
            got[streaming] = txns
            assert consumer.stream.streaming is streaming
        for streamed, plain in zip(got[True], got[False], strict=True):
            fields = ("xid", "commit_lsn", "end_lsn", "commit_timestamp", "origin", "gid")
            assert [getattr(streamed, f) for f in fields] == [getattr(plain, f) for f in fields]
            assert streamed.origin == origin
            assert [(c.op, c.new) for c in streamed.changes if isinstance(c, RowChange)] == [
                (c.op, c.new) for c in plain.changes if isinstance(c, RowChange)
            ]
        assert len(got[True][0].changes) == 3000
    finally:
        pg_conn.execute("SELECT pg_replication_origin_drop(%s)", (origin,))


def test_a_slot_older_than_its_publication_stops_with_the_cause(
    stream_cls: type[AnyStream], pg: PostgresServer, pg_conn: Conn
) -> None:
    """15-17 fail decoding with 'publication does not exist'; 18 only warns ("skipped loading
    publication") and skips the change. Both must stop the run, name the cause and the fix,
    and confirm nothing past what was delivered."""
    src = make_source(pg_conn, slot=False)
    pg_conn.execute(f"DROP PUBLICATION {src.publication}")
    pg_conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (src.slot,))
    before = src.confirmed()
    src.insert(1)  # decoded with the catalog of its time: no publication yet
    pg_conn.execute(f"CREATE PUBLICATION {src.publication} FOR TABLE {src.table}")
    src.insert(2)
    consumer = Consumer(stream_cls(pg.dsn, src.options(reconnect=False))).start()
    try:
        assert consumer.thread is not None
        consumer.thread.join(timeout=30)
        assert not consumer.thread.is_alive(), "the stream went on"
        assert consumer.received.empty()  # nothing handed out after the server's message
        assert isinstance(consumer.error, ConfigError)
        message = str(consumer.error)
        assert "created before" in message and f"slot drop {src.slot}" in message
    finally:
        consumer.error = None
        consumer.stop()
    assert src.confirmed() == before
