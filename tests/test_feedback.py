"""The feedback contract (README, "The feedback contract"), rule by rule, on the pure tracker.

Each case: a script of operations on a fresh ``FeedbackTracker`` and the (write, flush)
positions its status update must then report.
"""

from __future__ import annotations

import pytest

from pglogrepl_bridge.errors import ReplicationError
from pglogrepl_bridge.pgoutput.feedback import FeedbackTracker

Op = tuple[str, int] | tuple[str, int, int | None]

CASES: dict[str, tuple[list[Op], tuple[int, int]]] = {
    # 5. nothing is confirmed on receipt
    "receipt confirms nothing": ([("receive", 500), ("deliver", 100)], (500, 0)),
    # 2. the flush position is the end LSN of the latest acknowledged transaction
    "an ack confirms its end LSN": ([("deliver", 100), ("ack", 100)], (0, 100)),
    # 3. only a contiguous run counts
    "a later ack does not confirm an earlier one": (
        [("deliver", 100), ("deliver", 200), ("ack", 200)],
        (0, 0),
    ),
    "the gap filled, both are confirmed": (
        [("deliver", 100), ("deliver", 200), ("ack", 200), ("ack", 100)],
        (0, 200),
    ),
    "an ack of something never delivered is ignored": ([("deliver", 100), ("ack", 150)], (0, 0)),
    "a cumulative ack confirms everything up to it": (
        [("deliver", 100), ("deliver", 200), ("deliver", 300), ("ack_cumulative", 250)],
        (0, 200),
    ),
    # 4. idle: the keepalive's walEnd, when nothing is delivered-unacknowledged or partial
    "idle: keepalive advances": ([("keepalive", 900, None)], (900, 900)),
    "keepalive waits for unacknowledged transactions": (
        [("deliver", 100), ("keepalive", 900, None)],
        (900, 0),
    ),
    "keepalive stays below a partly received transaction": (
        [("keepalive", 900, 400)],
        (900, 400),
    ),
    "after the acks, the keepalive advances again": (
        [("deliver", 100), ("keepalive", 900, None), ("ack", 100), ("keepalive", 950, None)],
        (950, 950),
    ),
    # rewind forgets what will come again
    "rewind forgets what comes again": (
        [("deliver", 100), ("deliver", 200), ("rewind", 100), ("ack", 200), ("ack", 100)],
        (0, 100),
    ),
    # the consumer's own durable position is where confirming starts
    "a start position is confirmed from the outset": ([("start", 700)], (700, 700)),
}


@pytest.mark.parametrize("script", CASES, ids=list(CASES))
def test_feedback_rules(script: str) -> None:
    ops, (write, flush) = CASES[script]
    tracker = FeedbackTracker()
    for op in ops:
        name, lsn = op[0], op[1]
        if name == "start":
            tracker = FeedbackTracker(lsn)
        elif name == "receive":
            tracker.receive(lsn)
        elif name == "deliver":
            tracker.deliver(lsn)
        elif name == "ack":
            tracker.ack(lsn)
        elif name == "ack_cumulative":
            tracker.ack(lsn, cumulative=True)
        elif name == "keepalive":
            tracker.keepalive(lsn, op[2])  # type: ignore[misc]
        elif name == "rewind":
            tracker.rewind(lsn)
    update = tracker.status(clock=123)
    assert (update.write_lsn, update.flush_lsn, update.apply_lsn) == (write, flush, flush)


def test_no_ack_confirms_nothing_whatever_is_acknowledged() -> None:
    tracker = FeedbackTracker(no_ack=True)
    tracker.deliver(100)
    tracker.ack(100)
    tracker.keepalive(900, None)
    update = tracker.status(clock=1)
    assert (update.write_lsn, update.flush_lsn, update.apply_lsn) == (900, 0, 0)


def test_a_held_prepare_caps_the_flush_position() -> None:
    tracker = FeedbackTracker()
    tracker.deliver(100)
    tracker.ack(100)
    assert tracker.status(clock=1, hold=60).flush_lsn == 60
    assert tracker.status(clock=1, hold=None).flush_lsn == 100


def test_ack_reports_whether_the_position_moved() -> None:
    tracker = FeedbackTracker()
    tracker.deliver(100)
    tracker.deliver(200)
    assert tracker.ack(200) is False
    assert tracker.ack(100) is True
    assert tracker.inflight == 0


def test_deliveries_must_move_forward() -> None:
    tracker = FeedbackTracker()
    tracker.deliver(100)
    with pytest.raises(ReplicationError, match="not after"):
        tracker.deliver(100)
