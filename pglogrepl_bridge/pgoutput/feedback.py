"""Which WAL position may be confirmed to PostgreSQL. Pure bookkeeping, no IO, no clock.

The contract (see README, "The feedback contract"):

- ``received``: the furthest WAL position seen on the wire; reported as *write*.
- ``flushed``: the end LSN of the latest transaction such that it and every transaction
  delivered before it were acknowledged as durable; reported as *flush* and *apply*.
- A later acknowledgement never confirms an earlier transaction still unacknowledged.
- When nothing delivered is unacknowledged and no transaction is partly received (open,
  streamed or prepared), ``flushed`` may advance to the server's latest keepalive walEnd, so an
  idle slot, or one that sees only unpublished traffic, does not pin WAL.
- Nothing is ever confirmed on receipt; with ``no_ack`` nothing is confirmed at all.
"""

from __future__ import annotations

from collections import deque

from pglogrepl_bridge.errors import ReplicationError
from pglogrepl_bridge.pgoutput.walsender import StandbyStatusUpdate


class FeedbackTracker:
    """Which WAL position may be confirmed to PostgreSQL: the module's contract, as state. Owned by
    ``ReplicationSession``.
    """

    __slots__ = ("_acked", "_inflight", "flushed", "idle_end", "no_ack", "received")

    def __init__(self, start_lsn: int = 0, *, no_ack: bool = False) -> None:
        self.received = start_lsn
        self.flushed = start_lsn
        self.no_ack = no_ack
        self.idle_end = 0  # latest keepalive walEnd
        self._inflight: deque[int] = deque()  # end LSNs delivered, in order, not yet confirmed
        self._acked: set[int] = set()  # acknowledged, but behind an unacknowledged one

    @property
    def inflight(self) -> int:
        """Transactions delivered and not yet confirmable."""
        return len(self._inflight)

    @property
    def last_delivered(self) -> int:
        """The end LSN of the latest delivered transaction (or the confirmed position)."""
        return self._inflight[-1] if self._inflight else self.flushed

    def receive(self, wal_end: int) -> None:
        """WAL up to ``wal_end`` arrived (reported as the write position, never confirmed)."""
        if wal_end > self.received:
            self.received = wal_end

    def deliver(self, end_lsn: int) -> None:
        """A transaction ending at ``end_lsn`` was handed to the consumer."""
        if self._inflight and end_lsn <= self._inflight[-1]:
            raise ReplicationError(f"delivered end LSN {end_lsn} is not after the previous one")
        self._inflight.append(end_lsn)

    def ack(self, end_lsn: int, *, cumulative: bool = False) -> bool:
        """The consumer made the transaction ending at ``end_lsn`` durable.

        ``cumulative`` acknowledges every delivered transaction up to ``end_lsn`` (a replica's
        "applied through lsn"). Returns whether ``flushed`` moved.
        """
        if cumulative:
            for lsn in self._inflight:
                if lsn > end_lsn:
                    break
                self._acked.add(lsn)
        elif end_lsn in self._inflight:
            self._acked.add(end_lsn)
        else:
            return False
        before = self.flushed
        while self._inflight and self._inflight[0] in self._acked:
            lsn = self._inflight.popleft()
            self._acked.discard(lsn)
            self.flushed = max(self.flushed, lsn)
        return self.flushed != before

    def rewind(self, lsn: int) -> None:
        """Transactions after ``lsn`` will be delivered again: forget them as in flight."""
        while self._inflight and self._inflight[-1] > lsn:
            self._acked.discard(self._inflight.pop())

    def keepalive(self, wal_end: int, pending_lsn: int | None) -> bool:
        """The server says it has sent everything up to ``wal_end``.

        ``pending_lsn`` is where the oldest partly received transaction began (the
        assembler's ``oldest_pending_lsn``); we never confirm past it.
        """
        self.receive(wal_end)
        self.idle_end = max(self.idle_end, wal_end)
        if self._inflight:
            return False
        target = wal_end if pending_lsn is None else min(wal_end, pending_lsn)
        if target > self.flushed:
            self.flushed = target
            return True
        return False

    def status(
        self, clock: int, reply_requested: bool = False, *, hold: int | None = None
    ) -> StandbyStatusUpdate:
        """The standby status update to send now; ``clock`` is µs since 2000-01-01.

        ``hold`` caps the flush position below a transaction the server will not send again
        (a held PREPARE: see ``TransactionAssembler.held_since``).
        """
        if self.no_ack:
            # InvalidXLogRecPtr: the walsender confirms nothing, but hears we are alive
            return StandbyStatusUpdate(self.received, 0, 0, clock, reply_requested)
        flushed = self.flushed if hold is None else min(self.flushed, hold)
        return StandbyStatusUpdate(self.received, flushed, flushed, clock, reply_requested)
