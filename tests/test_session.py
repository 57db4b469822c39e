"""``ReplicationSession``, sans-IO: CopyData bytes in, events and status updates out.

Messages are built from the PostgreSQL docs (``pgoutput_builders``), framed as the walsender
frames them; no server is involved.
"""

from __future__ import annotations

import contextlib
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pglogrepl_bridge import DecodeError, Lsn, ReplicationSession, RowChange, Transaction
from pglogrepl_bridge.pgoutput import _accel
from pglogrepl_bridge.pgoutput.messages import (
    Begin,
    Column,
    Commit,
    Insert,
    Origin,
    PgOutputMessage,
    Relation,
    StreamCommit,
    StreamStart,
    StreamStop,
    TupleData,
)

from .pgoutput_builders import encode

_STATUS = struct.Struct("!cQQQq?")
REL = Relation(None, 16384, "public", "t", "d", (Column("id", 23, -1, True),))


def xlog(msg: PgOutputMessage, start: int) -> memoryview:
    """One XLogData CopyData message, a memoryview as psycopg hands it over."""
    return memoryview(b"w" + struct.pack("!QQq", start, start, 0) + encode(msg))


def keepalive(wal_end: int, reply: bool = False) -> bytes:
    return b"k" + struct.pack("!Qq?", wal_end, 0, reply)


def insert(i: int, xid: int | None = None) -> Insert:
    return Insert(xid, REL.relid, TupleData(b"t", (str(i).encode(),)))


def txn(xid: int, start: int, *ids: int, origin: str | None = None) -> list[memoryview]:
    """A plain transaction: Begin, (Origin), Relation, Inserts, Commit ending at start+100."""
    msgs: list[PgOutputMessage] = [Begin(start + 90, 0, xid)]
    if origin is not None:
        msgs.append(Origin(start + 90, origin))
    msgs += [REL, *(insert(i) for i in ids), Commit(0, start + 90, start + 100, 0)]
    return [xlog(m, start + n) for n, m in enumerate(msgs)]


def feed(session: ReplicationSession, frames: list[memoryview]) -> list[Any]:
    return [e for f in frames if (e := session.receive(f)) is not None]


def status(session: ReplicationSession) -> tuple[int, int]:
    _, write, flush, apply, _, _ = _STATUS.unpack(session.status_update(clock=1))
    assert apply == flush
    return write, flush


@pytest.fixture(params=["c", "python"])
def session(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> ReplicationSession:
    """Both row paths: the C shortcut behind ``receive`` (where built) and the Python one."""
    if request.param == "python":
        monkeypatch.setattr("pglogrepl_bridge.pgoutput.session._put_row", None)
    elif _accel.row_putter(RowChange) is None:
        pytest.skip("C accelerator not built")
    return ReplicationSession()


def test_a_transaction_comes_out_whole_and_is_only_confirmed_once_acked(
    session: ReplicationSession,
) -> None:
    (t,) = feed(session, txn(7, 1000, 1, 2, 3))
    assert isinstance(t, Transaction) and (t.xid, t.end_lsn) == (7, 1100)
    assert [c.new for c in t.changes if isinstance(c, RowChange)] == [
        {"id": 1},
        {"id": 2},
        {"id": 3},
    ]
    write, flush = status(session)
    assert write >= 1000 and flush == 0  # received, not confirmed
    assert session.ack(t.end_lsn) and session.status_due
    assert status(session) == (write, 1100) and not session.status_due


def test_the_received_position_counts_rows_taken_by_the_shortcut(
    session: ReplicationSession,
) -> None:
    frames = txn(7, 1000, 1, 2, 3)
    feed(session, frames[:-1])  # everything but the Commit
    assert session.received_lsn == 1000 + len(frames) - 2


def test_a_keepalive_asking_for_a_reply_is_noted(session: ReplicationSession) -> None:
    assert session.receive(keepalive(5000, reply=True)) is None
    assert session.reply_requested
    assert status(session) == (5000, 5000)  # idle: the slot may advance to walEnd
    assert not session.reply_requested


def test_what_the_consumer_holds_is_skipped() -> None:
    session = ReplicationSession(start_lsn=1100)
    assert feed(session, txn(7, 1000, 1)) == []  # ends at 1100: held already
    (t,) = feed(session, txn(8, 2000, 2))
    assert isinstance(t, Transaction) and t.xid == 8
    assert status(session)[1] == 1100


def test_after_a_lost_connection_resent_copies_are_skipped(session: ReplicationSession) -> None:
    (t1,) = feed(session, txn(7, 1000, 1))
    frames = txn(8, 2000, 2)
    feed(session, frames[:3])  # t2 partly received when the connection drops
    session.connection_lost()
    assert feed(session, txn(7, 1000, 1)) == []  # delivered, unacknowledged: not again
    (t2,) = feed(session, frames)
    assert isinstance(t2, Transaction) and t2.xid == 8
    session.ack(t1.end_lsn)
    assert status(session)[1] == 1100


def test_rewind_delivers_again(session: ReplicationSession) -> None:
    (t1,) = feed(session, txn(7, 1000, 1))
    assert len(feed(session, txn(8, 2000, 2))) == 1
    session.ack(t1.end_lsn)
    session.rewind(t1.end_lsn)
    assert feed(session, txn(7, 1000, 1)) == []
    (again,) = feed(session, txn(8, 2000, 2))
    assert isinstance(again, Transaction) and again.xid == 8


def test_a_streamed_transaction_keeps_its_origin(session: ReplicationSession) -> None:
    msgs: list[PgOutputMessage] = [
        StreamStart(9, True),
        Origin(0, "upstream"),
        Relation(9, REL.relid, "public", "t", "d", REL.columns),
        Insert(9, REL.relid, TupleData(b"t", (b"5",))),
        StreamStop(),
        StreamCommit(9, 0, 3090, 3100, 0),
    ]
    (t,) = feed(session, [xlog(m, 3000 + n) for n, m in enumerate(msgs)])
    (plain,) = feed(session, txn(10, 4000, 6, origin="upstream"))
    assert isinstance(t, Transaction) and isinstance(plain, Transaction)
    assert t.origin == plain.origin == "upstream"


@pytest.mark.parametrize(
    "data",
    [b"", b"w\x00\x00", b"k\x00", b"x" + bytes(24), b"w" + bytes(24) + b"Z"],
    ids=["empty", "short XLogData", "short keepalive", "unknown tag", "unknown message"],
)
def test_bad_copydata_is_a_decode_error(data: bytes) -> None:
    with pytest.raises(DecodeError):
        ReplicationSession().receive(data)


def test_nothing_after_until_lsn_is_delivered(session: ReplicationSession) -> None:
    session.until_lsn = 1050  # the first transaction ending at or after it is the last one
    (t1,) = feed(session, txn(7, 1000, 1))
    assert feed(session, txn(8, 2000, 2)) == []  # held back: it stays in the slot
    assert not session.done()
    session.ack(t1.end_lsn)
    assert session.done() and status(session)[1] == 1100


@settings(max_examples=500)
@given(st.lists(st.binary(max_size=60), max_size=8), st.sampled_from([b"w", b"k", b""]))
def test_nothing_but_decode_errors_escape_on_arbitrary_bytes(
    messages: list[bytes], tag: bytes
) -> None:
    """Whatever the bytes, receive either takes them or raises DecodeError (the package's
    error tree), never struct.error, IndexError or the like."""
    session = ReplicationSession()
    frames = [xlog(Begin(1090, 0, 1), 1000), xlog(REL, 1001)]
    frames += [memoryview(tag + struct.pack("!QQq", 1002, 1002, 0) + m) for m in messages]
    for frame in frames:
        with contextlib.suppress(DecodeError):
            session.receive(frame)


_PUMP = _accel.row_pump(RowChange)


def _pumped(
    session: ReplicationSession, frames: list[Any], limit: int
) -> tuple[list[Any], list[Lsn]]:
    """The frames as the stream's read loop takes them with ``_fastrow.pump_rows``: runs of
    rows in C through ``row_sink``, the rest through ``receive``. A None frame is a moment
    with nothing buffered: the received position there is noted."""
    assert _PUMP is not None
    queue = list(frames)

    def get_copy_data(async_: int) -> tuple[int, Any]:  # psycopg's, over the frames
        frame = queue.pop(0) if queue else None
        return (0, b"") if frame is None else (len(frame), frame)

    events, positions = [], []
    while queue:
        sink = session.row_sink()
        if sink is not None:
            taken, last, pending = _PUMP(get_copy_data, sink[0], sink[1], limit)
            if taken:
                session.took_rows(last)
            if pending is None:
                continue
            nbytes, data = pending
        else:
            nbytes, data = get_copy_data(1)
        if nbytes == 0:
            positions.append(session.received_lsn)
        elif (event := session.receive(data)) is not None:
            events.append(event)
    return events, positions


def _shape(event: Any) -> Any:
    if isinstance(event, Transaction):
        rows = [
            (c.op, c.relation.name, bytes(c.raw), c.new_at, c.old_at)
            for c in event.changes
            if isinstance(c, RowChange)
        ]
        return ("txn", event.xid, event.end_lsn, rows)
    return event


@pytest.mark.skipif(_PUMP is None, reason="C accelerator not built")
@given(
    st.lists(st.lists(st.integers(0, 99), max_size=9), min_size=1, max_size=5),
    st.sampled_from([1, 2, 256]),
)
def test_the_c_read_loop_takes_rows_as_receive_does(batches: list[list[int]], limit: int) -> None:
    """``pump_rows`` (the stream reads a transaction's rows in C): the same transactions,
    rows, and received position whenever nothing is buffered, as one ``receive`` per frame,
    whatever the limit."""
    frames: list[Any] = []
    for n, ids in enumerate(batches):
        rows = txn(100 + n, 1000 * (n + 1), *ids)
        frames += [*rows[:-1], None, rows[-1], keepalive(1000 * (n + 1) + 500)]  # a gap
    frames.insert(3, None)
    one, pumped = ReplicationSession(), ReplicationSession()
    expected, positions = [], []
    for frame in frames:  # one receive per frame; the position at each gap
        if frame is None:
            positions.append(one.received_lsn)
        elif (event := one.receive(frame)) is not None:
            expected.append(_shape(event))
    got, got_positions = _pumped(pumped, frames, limit)
    assert [_shape(e) for e in got] == expected
    assert got_positions == positions
