"""The bridge's sans-IO bookkeeping: windows, quorum, replays, votes, promotions."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from pglogrepl_bridge.wire.hub import Drop, Hub, Rewind, StepDown
from pglogrepl_bridge.wire.protocol import (
    Acknowledge,
    FrameReader,
    Promotion,
    RequestFrom,
    VoteRequest,
    VoteResponse,
    WalEntry,
    frame,
)


def entry(lsn: int) -> bytes:
    return frame(WalEntry(1, lsn, lsn * 10, b"x"))


def lsns(frames: list[bytes]) -> list[int]:
    out = []
    for msg in FrameReader().feed(b"".join(frames)):
        assert isinstance(msg, WalEntry)
        out.append(msg.lsn)
    return out


def test_entries_in_order_within_the_window() -> None:
    hub = Hub(node_id=1, quorum=1, window=2)
    hub.connect("a")
    for lsn in (10, 20, 30):
        hub.publish(lsn, entry(lsn))
    assert lsns(hub.pending("a")) == [10, 20]
    assert hub.pending("a") == []  # window full
    hub.receive("a", Acknowledge(7, 10))
    assert lsns(hub.pending("a")) == [30]


def test_quorum_lsn_needs_distinct_replicas() -> None:
    hub = Hub(node_id=1, quorum=2)
    for c in ("a", "b", "c"):
        hub.connect(c)
    for lsn in (10, 20, 30):
        hub.publish(lsn, entry(lsn))
    for c in ("a", "b", "c"):
        hub.pending(c)
    hub.receive("a", Acknowledge(7, 30))
    assert hub.quorum_lsn == 0
    # the same node again, on another connection: refused, not counted
    assert hub.receive("b", Acknowledge(7, 30)) == [
        Drop("b", "node 7 is already connected: a second connection claims it")
    ]
    assert hub.quorum_lsn == 0
    hub.receive("c", Acknowledge(8, 20))
    assert hub.quorum_lsn == 20


def test_one_connection_cannot_be_two_replicas() -> None:
    hub = Hub(node_id=1, quorum=2)
    hub.connect("liar")
    hub.publish(10, entry(10))
    hub.pending("liar")
    assert hub.receive("liar", Acknowledge(7, 10)) == []
    (drop,) = hub.receive("liar", Acknowledge(8, 10))  # --ack-quorum 2 on its own
    assert drop == Drop("liar", "the connection of node 7 speaks for node 8 too")
    assert hub.quorum_lsn == 0 and hub.acked_by_node == {}  # what it said no longer counts
    hub.disconnect("liar")
    hub.connect("again")  # once the first connection is gone, node 7 may come back
    assert hub.receive("again", RequestFrom(7, 10)) == []
    assert hub.acked_by_node == {}  # nothing was sent to it yet


def test_a_well_behaved_replica_keeps_its_credit_after_its_connection_closes() -> None:
    hub = Hub(node_id=1, quorum=2)
    hub.connect("a")
    hub.connect("b")
    hub.publish(10, entry(10))
    hub.pending("a")
    hub.pending("b")
    hub.receive("a", Acknowledge(7, 10))
    hub.disconnect("a")  # node 7 holds 10, connected or not
    hub.receive("b", Acknowledge(8, 10))
    assert hub.quorum_lsn == 10
    hub.connect("c")  # node 7 again, then it misbehaves: its settled credit stays
    hub.pending("c")
    hub.receive("c", Acknowledge(7, 10))
    (drop,) = hub.receive("c", Acknowledge(9, 10))
    assert isinstance(drop, Drop) and drop.reason.endswith("node 9 too")
    assert hub.acked_by_node[7] == 10 and hub.quorum_lsn == 10


def test_an_acknowledgement_counts_only_up_to_what_was_sent() -> None:
    hub = Hub(node_id=1, quorum=1, window=2)
    hub.connect("a")
    for lsn in (10, 20, 30):
        hub.publish(lsn, entry(lsn))
    hub.receive("a", Acknowledge(7, 30))  # nothing sent yet: nothing to vouch for
    assert hub.quorum_lsn == 0
    assert lsns(hub.pending("a")) == [10, 20]
    hub.receive("a", Acknowledge(7, 10**9))  # more than it was given
    assert hub.quorum_lsn == 20
    hub.receive("a", RequestFrom(7, 10**9))  # a replay request is no proof either
    assert hub.quorum_lsn == 20
    assert lsns(hub.pending("a")) == []  # it says it holds everything: nothing to resend


def test_request_from_replays_out_of_the_buffer() -> None:
    hub = Hub(node_id=1, quorum=1)
    hub.connect("a")
    hub.connect("b")
    for lsn in (10, 20, 30):
        hub.publish(lsn, entry(lsn))
    hub.pending("a")
    hub.receive("a", Acknowledge(7, 30))
    hub.receive("a", RequestFrom(7, 10))  # "I have 10, send what follows"
    assert lsns(hub.pending("a")) == [20, 30]


def test_request_from_older_than_the_buffer_rewinds() -> None:
    hub = Hub(node_id=1, quorum=1, max_entries=1)
    hub.connect("a")
    for lsn in (10, 20, 30):
        hub.publish(lsn, entry(lsn))
    hub.pending("a")
    hub.receive("a", Acknowledge(7, 20))  # a quorum has 20: 10 and 20 may leave the buffer
    assert hub.floor == 20 and hub.backlog == 1
    assert hub.receive("a", RequestFrom(7, 5)) == [Rewind(5)]
    hub.reset_to(5)
    # what the buffer had dropped is published again (it was skipped as already buffered,
    # and the replica got 30 right after 5)
    assert hub.backlog == 0 and hub.last_lsn == 5 and hub.floor == 5
    for lsn in (10, 20, 30):
        hub.publish(lsn, entry(lsn))
        assert lsns(hub.pending("a")) == [lsn]


def test_buffer_keeps_recent_entries_and_drops_only_what_a_quorum_has() -> None:
    hub = Hub(node_id=1, quorum=2, max_entries=2)
    hub.connect("fast")
    hub.connect("slow")
    for lsn in range(1, 6):
        hub.publish(lsn, entry(lsn))
    hub.pending("fast")
    hub.pending("slow")
    hub.receive("fast", Acknowledge(1, 5))
    assert hub.backlog == 5 and hub.unconfirmed == 5  # no quorum yet: nothing may go
    hub.receive("slow", Acknowledge(2, 3))
    assert hub.backlog == 2 and hub.floor == 3 and hub.unconfirmed == 2


def test_votes_are_refused_while_streaming() -> None:
    hub = Hub(node_id=1, quorum=1, term=3)
    hub.connect("a")
    hub.receive("a", VoteRequest(9, 4, 10**9))
    (reply,) = FrameReader().feed(b"".join(hub.pending("a")))
    assert reply == VoteResponse(9, 1, 4, False)


def test_votes_when_not_streaming_follow_the_rules() -> None:
    hub = Hub(node_id=1, quorum=1, term=3, healthy=False)
    hub.connect("a")
    hub.publish(50, entry(50))
    hub.pending("a")
    cases = [
        (VoteRequest(9, 2, 100), False),  # older term
        (VoteRequest(9, 4, 40), False),  # candidate behind us
        (VoteRequest(9, 4, 60), True),
        (VoteRequest(8, 4, 60), False),  # already voted for 9 in term 4
        (VoteRequest(9, 4, 60), True),  # the same candidate may ask again
    ]
    for req, granted in cases:
        hub.receive("a", req)
        (reply,) = FrameReader().feed(b"".join(hub.pending("a")))
        assert reply == VoteResponse(req.node_id, 1, req.term, granted), req


def test_promotion_of_another_node_steps_down() -> None:
    hub = Hub(node_id=1, quorum=1, term=3)
    hub.connect("a")
    assert hub.receive("a", Promotion(2, 2)) == []  # an older term: ignored
    assert hub.receive("a", Promotion(1, 5)) == []  # ourselves
    assert hub.receive("a", Promotion(2, 3)) == [StepDown(2, 3)]


def test_buffer_is_bounded_in_bytes_too() -> None:
    hub = Hub(node_id=1, quorum=1, max_entries=1000, max_bytes=3 * len(entry(1)))
    hub.connect("a")
    for lsn in range(1, 11):
        hub.publish(lsn, entry(lsn))
    assert hub.backlog == 10  # nothing acknowledged: nothing may go
    hub.pending("a")
    hub.receive("a", Acknowledge(5, 8))
    assert hub.backlog == 3 and hub.floor == 7


def test_full_when_a_quorum_lags_too_far() -> None:
    hub = Hub(node_id=1, quorum=1, max_entries=3, max_bytes=10**9)
    hub.connect("a")
    for lsn in (1, 2, 3):
        hub.publish(lsn, entry(lsn))
    assert hub.full
    hub.pending("a")
    hub.receive("a", Acknowledge(5, 1))
    assert not hub.full
    small = Hub(node_id=1, quorum=1, max_entries=100, max_bytes=2 * len(entry(1)))
    small.connect("a")
    for lsn in (1, 2, 3):
        small.publish(lsn, entry(lsn))
    assert small.full  # over the byte bound with nothing held by a quorum


def test_a_replica_that_holds_most_of_the_buffer_gets_the_rest_after_reconnecting() -> None:
    """What a RequestFrom says the replica holds is not in flight: a reconnecting replica
    whose position has more than a window of buffered entries below it still gets what
    follows (it was starved before: those entries counted against its window forever)."""
    hub = Hub(node_id=1, quorum=1, window=10)
    hub.connect("a")
    for lsn in range(1, 101):
        hub.publish(lsn, entry(lsn))
    while sent := hub.pending("a"):  # the replica takes everything, acknowledging as it goes
        hub.receive("a", Acknowledge(7, lsns(sent)[-1]))
    assert hub.quorum_lsn == 100 and hub.floor == 0  # all of it still buffered, for replays
    hub.disconnect("a")
    for lsn in range(101, 106):
        hub.publish(lsn, entry(lsn))
    hub.connect("b")  # the same replica again: it holds up to 97 (the rest was lost)
    hub.receive("b", RequestFrom(7, 97))
    assert lsns(hub.pending("b")) == [98, 99, 100, 101, 102, 103, 104, 105]


def test_a_replica_that_lags_past_the_buffer_gets_a_rewind_not_a_gap() -> None:
    """A connected replica more than the buffer behind a quorum was sent what followed the
    gap, and applied it as if nothing were missing (it applies any lsn above its last)."""
    hub = Hub(node_id=1, quorum=1, window=2, max_entries=3)
    hub.connect("fast")
    hub.connect("slow")
    for lsn in (1, 2, 3):
        hub.publish(lsn, entry(lsn))
    assert lsns(hub.pending("slow")) == [1, 2]  # its window; it does not acknowledge yet
    for lsn in range(4, 10):
        hub.publish(lsn, entry(lsn))
        while sent := hub.pending("fast"):
            hub.receive("fast", Acknowledge(7, lsns(sent)[-1]))
    assert hub.floor > 2  # 3 left the buffer: a quorum (fast) holds it
    assert lsns(hub.pending("slow")) == []  # not 7 and 8, past the gap
    assert hub.take_rewinds() == []  # 1 and 2 are still in flight: it may be stuck
    hub.receive("slow", Acknowledge(8, 2))
    assert lsns(hub.pending("slow")) == []
    assert hub.take_rewinds() == [Rewind(2)]
    assert hub.take_rewinds() == []
    hub.reset_to(2)  # what the runner does once the stream restarts after 2
    for lsn in (3, 4):
        hub.publish(lsn, entry(lsn))
    assert lsns(hub.pending("slow")) == [3, 4]


def test_what_replicas_say_they_hold_is_not_waited_for() -> None:
    """A restarted bridge gets again what its replicas applied but PostgreSQL had not
    confirmed. They do not acknowledge what they hold, nor are they sent it: waiting for
    those acknowledgements filled the buffer and stopped the stream for good."""
    hub = Hub(node_id=1, quorum=1, max_entries=5)
    hub.connect("a")
    hub.receive("a", RequestFrom(7, 100))  # it holds up to 100; the stream restarts at 0
    for lsn in range(1, 51):
        hub.publish(lsn, entry(lsn))
        assert not hub.full
    assert hub.backlog <= 5 and lsns(hub.pending("a")) == []
    assert hub.quorum_lsn == 0  # a claim is no proof: nothing is confirmed on its word
    for lsn in (100, 110):
        hub.publish(lsn, entry(lsn))
    assert lsns(hub.pending("a")) == [110]
    hub.receive("a", Acknowledge(7, 110))
    assert hub.quorum_lsn == 110


def test_a_stalled_replica_never_has_more_than_its_window_in_flight() -> None:
    """The window bounds what the bridge queues for a replica that stopped reading. Counting
    in flight only what was still buffered let a replica outside the quorum get one more
    entry for every one the buffer dropped, for ever: its socket buffer grew without end."""
    hub = Hub(node_id=1, quorum=1, window=3, max_entries=4)
    hub.connect("fast")
    hub.connect("stalled")
    given: list[int] = []
    for lsn in range(1, 200):
        hub.publish(lsn, entry(lsn))
        while sent := hub.pending("fast"):
            hub.receive("fast", Acknowledge(7, lsns(sent)[-1]))
        given += lsns(hub.pending("stalled"))
    assert given == [1, 2, 3]  # it never acknowledged: its window, and nothing more
    assert hub.floor > 3 and hub.take_rewinds() == []  # stuck on its window, not rewound
    hub.receive("stalled", Acknowledge(8, 3))  # it wakes up: past the gap, a rewind
    assert lsns(hub.pending("stalled")) == [] and hub.take_rewinds() == [Rewind(3)]


def test_the_window_counts_what_was_sent_above_what_the_replica_holds() -> None:
    """Acknowledgements free the window; a RequestFrom's resend and a rewind's re-publish
    count again only what is sent again."""
    hub = Hub(node_id=1, quorum=1, window=3)
    hub.connect("a")
    for lsn in range(1, 11):
        hub.publish(lsn, entry(lsn))
    assert lsns(hub.pending("a")) == [1, 2, 3]
    hub.receive("a", Acknowledge(7, 1))
    assert lsns(hub.pending("a")) == [4]
    hub.receive("a", RequestFrom(7, 2))  # it lost 3 and 4: they are sent again
    assert lsns(hub.pending("a")) == [3, 4, 5]
    assert hub.pending("a") == []
    hub.reset_to(4)  # the stream restarts after 4: 5 is published again, and sent again
    hub.publish(5, entry(5))
    hub.receive("a", Acknowledge(7, 3))
    assert lsns(hub.pending("a")) == [5]


@given(
    st.integers(1, 5),
    st.integers(2, 8),
    st.lists(st.tuples(st.sampled_from("pfsa"), st.integers(0, 9)), max_size=60),
)
def test_each_replica_gets_consecutive_entries_and_never_more_than_its_window(
    window: int, max_entries: int, ops: list[tuple[str, int]]
) -> None:
    """Whatever the buffer drops, and however replicas outside the quorum acknowledge: each
    gets entries in order without a gap, and at most ``window`` above what it acknowledged.
    Ops: ``p`` publish some, ``f`` the quorum's replica takes and acknowledges all, ``s`` a slow
    replica takes what is pending, ``a`` it acknowledges some of what it got."""
    hub = Hub(node_id=1, quorum=1, window=window, max_entries=max_entries)
    for conn in ("fast", "slow"):
        hub.connect(conn)
    got: list[int] = []
    acked = 0
    for op, arg in ops:
        if op == "p":
            for _ in range(arg + 1):
                hub.publish(hub.last_lsn + 1, entry(hub.last_lsn + 1))
        elif op == "f":
            while sent := hub.pending("fast"):
                hub.receive("fast", Acknowledge(7, lsns(sent)[-1]))
        elif op == "s":
            got += lsns(hub.pending("slow"))
        elif got:
            acked = max(acked, got[min(arg, len(got) - 1)])
            hub.receive("slow", Acknowledge(8, acked))
        assert got == list(range(1, len(got) + 1))  # in order, no gap
        assert len([lsn for lsn in got if lsn > acked]) <= window
