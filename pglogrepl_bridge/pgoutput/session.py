"""One replication session, sans-IO: CopyData in, events out, status updates back.

h11's ``Connection`` is the model. The IO layer (``postgres.stream``, sync or async) does
only the waiting and the psycopg calls::

    session = ReplicationSession(options...)
    session.slot_confirmed(lsn)               # what the server already holds confirmed
    for each CopyData message `data`:
        event = session.receive(data)         # a Transaction, Message, ... or None
        if event is not None: hand it to the consumer
        if session.reply_requested: send session.status_update(now)
    session.ack(txn.end_lsn)                  # the consumer made it durable
    send session.status_update(now)           # bytes for put_copy_data, at the interval

The session owns every piece of a stream's state, and nothing else touches them:

- CopyData framing (``walsender``): XLogData and Primary keepalive; anything else is a
  ``DecodeError``.
- Decoding, the relation cache and transaction assembly (plain, streamed, two-phase), in
  ``TransactionAssembler``; the C row maker's shortcut for row changes sits behind
  ``receive`` and nowhere else.
- Skipping what the consumer already holds: transactions ending at or before ``skip_upto``
  (its durable position, or what was delivered before a reconnect) are not delivered again.
- The feedback bookkeeping (``FeedbackTracker``, whose module states the contract).

Rules enforced here (the IO layers rely on them):

1. ``receive`` takes exactly one CopyData message; an event it returns is delivered, and
   counts as in flight until acknowledged.
2. ``connection_lost`` forgets partial transactions (the server sends them again) but keeps
   delivered-unacknowledged ones in flight; their resent copies are skipped.
3. ``rewind(lsn)`` makes every transaction ending after ``lsn`` deliverable again.
4. The status update never confirms past a held PREPARE, an unfinished transaction, or the
   position where the server said changes were lost (``stop_confirming_after``).

Not thread-safe: one thread (or task) drives a session. ``postgres.stream`` queues acks
made from other threads and applies them from the driving thread.
"""

from __future__ import annotations

import struct
from typing import Any

from pglogrepl_bridge.errors import DecodeError
from pglogrepl_bridge.lsn import Lsn
from pglogrepl_bridge.pgoutput import _accel
from pglogrepl_bridge.pgoutput.assembly import TransactionAssembler
from pglogrepl_bridge.pgoutput.feedback import FeedbackTracker
from pglogrepl_bridge.pgoutput.relcache import RelationCache
from pglogrepl_bridge.pgoutput.streambuffer import DEFAULT_SPILL_BYTES
from pglogrepl_bridge.pgoutput.transaction import Event, RowChange, Transaction
from pglogrepl_bridge.pgoutput.values import ValueLoaders
from pglogrepl_bridge.pgoutput.walsender import XLOGDATA_HEADER, PrimaryKeepalive, parse_copy_data

_START = struct.Struct("!Q").unpack_from  # an XLogData's dataStart, at byte 1
# With the C accelerator: a whole XLogData row change into the open transaction, in one call
_put_row = _accel.row_putter(RowChange)


class ReplicationSession:
    """The state of one logical replication stream, driven by bytes (see the module doc).

    ``start_lsn`` is the consumer's durable position: nothing at or before it is delivered,
    and the feedback starts there. ``until_lsn``: the first transaction ending at or after it
    is the last one delivered (``done`` tells when it is acknowledged). ``no_ack`` confirms
    nothing, ever (a peek).
    """

    def __init__(
        self,
        *,
        start_lsn: int = 0,
        until_lsn: int | None = None,
        no_ack: bool = False,
        loaders: ValueLoaders | None = None,
        spill_bytes: int = DEFAULT_SPILL_BYTES,
        surface_prepares: bool = False,
    ) -> None:
        self.assembler = TransactionAssembler(
            RelationCache(loaders), spill_bytes=spill_bytes, surface_prepares=surface_prepares
        )
        self.feedback = FeedbackTracker(start_lsn, no_ack=no_ack)
        #: transactions ending at or before this are not delivered (the consumer has them)
        self.skip_upto = start_lsn
        self.until_lsn = until_lsn
        self._until_reached = False  # the last transaction to deliver was delivered
        #: never confirm past this (set when the server says changes were lost from here)
        self.cap: int | None = None
        #: the server asked for a status update at once (a keepalive with replyRequested)
        self.reply_requested = False
        #: acknowledgements since the last status update: one is worth sending soon
        self.status_due = False
        self.transactions = 0
        self.changes = 0
        self._by_id = self.assembler.relations.by_id
        # the open plain transaction's change list, where _put_row may append; None otherwise
        self.open_rows: list[Any] | None = None
        self._last_row: Any = None  # the last message _put_row took: its dataStart is noted late

    # -- bytes in ----------------------------------------------------------------------------

    def receive(self, data: bytes | memoryview) -> Event | None:
        """Take one CopyData message; return the event it completes, if any."""
        rows = self.open_rows
        if rows is not None and _put_row is not None and _put_row(self._by_id, rows, data):
            # the hot path: a row change appended in C. Its position is noted when next needed
            # (a memoryview keeps psycopg's buffer alive only until then).
            self._last_row = data
            return None
        return self._receive(data)

    def row_sink(self) -> tuple[dict[int, Any], list[Any]] | None:
        """Where row changes may go straight in, as ``receive``'s fast path puts them (the
        stream's ``_fastrow.pump_rows`` puts a run of them in one call): the relation cache
        and the open plain transaction's change list; None outside one."""
        rows = self.open_rows
        return None if rows is None else (self._by_id, rows)

    def took_rows(self, last: bytes | memoryview) -> None:
        """Row changes went in through ``row_sink``; ``last`` is the last one's message (its
        position is noted when next needed, as for ``receive``'s)."""
        self._last_row = last

    def _receive(self, data: bytes | memoryview) -> Event | None:
        self._note_last_row()
        if data and data[0] == 0x77 and len(data) >= XLOGDATA_HEADER:  # 'w' XLogData
            start = _START(data, 1)[0]
            feedback = self.feedback
            if start > feedback.received:
                feedback.received = start
            assembler = self.assembler
            event = assembler.feed(bytes(data[XLOGDATA_HEADER:]), start)
            self.open_rows = assembler.open_changes if _put_row is not None else None
            if event is None:
                return None
            if isinstance(event, Transaction):
                if event.end_lsn <= self.skip_upto or self._until_reached:
                    # the consumer has it already (checkpoint, or before a drop); or it comes
                    # after until_lsn, and stays in the slot for the next run
                    return None
                feedback.deliver(event.end_lsn)
                if self.until_lsn is not None and event.end_lsn >= self.until_lsn:
                    self._until_reached = True
                self.transactions += 1
                self.changes += len(event.changes)
            return event
        msg = parse_copy_data(data)  # a keepalive, or a DecodeError that names the problem
        if not isinstance(msg, PrimaryKeepalive):  # pragma: no cover - 'w' is handled above
            raise DecodeError("unexpected XLogData", msg_type="CopyData")
        self.feedback.keepalive(msg.wal_end, self.assembler.oldest_pending_lsn)
        if msg.reply_requested:
            self.reply_requested = True
        return None

    def _note_last_row(self) -> None:
        last = self._last_row
        if last is not None:
            self._last_row = None
            start = _START(last, 1)[0]
            if start > self.feedback.received:
                self.feedback.received = start

    # -- the consumer ------------------------------------------------------------------------

    def ack(self, end_lsn: int, *, cumulative: bool = False) -> bool:
        """The transaction ending at ``end_lsn`` is durable downstream; returns whether the
        confirmable position moved (then a status update is worth sending soon)."""
        moved = self.feedback.ack(end_lsn, cumulative=cumulative)
        if moved:
            self.status_due = True
        return moved

    def done(self) -> bool:
        """``until_lsn`` is reached: everything up to it is acknowledged, nothing delivered is
        pending. Always False without ``until_lsn``."""
        until = self.until_lsn
        return until is not None and self.feedback.flushed >= until and not self.feedback.inflight

    @property
    def confirmed_lsn(self) -> Lsn:
        """What the next status update confirms (before the held-PREPARE cap)."""
        return Lsn(self.feedback.flushed)

    @property
    def received_lsn(self) -> Lsn:
        """The furthest WAL position received (reported as write)."""
        self._note_last_row()
        return Lsn(self.feedback.received)

    # -- bytes out ---------------------------------------------------------------------------

    def status_update(self, clock: int) -> bytes:
        """The Standby status update to send now; ``clock`` is µs since 2000-01-01 UTC."""
        self._note_last_row()
        hold = self.assembler.held_since
        if self.cap is not None:
            hold = self.cap if hold is None else min(hold, self.cap)
        update = self.feedback.status(clock, hold=hold)
        self.reply_requested = False
        self.status_due = False
        return update.to_bytes()

    # -- the connection's life ---------------------------------------------------------------

    def slot_confirmed(self, lsn: int | None) -> None:
        """At (re)start: the slot's confirmed position, which the server holds already."""
        if lsn is not None and lsn > self.feedback.flushed:
            self.feedback.flushed = lsn

    def stop_confirming_after(self, lsn: int) -> None:
        """Never confirm past ``lsn``, whatever is acknowledged later: the server said that
        changes from there on were not sent (they must be decoded again, once fixed)."""
        self.cap = lsn if self.cap is None else min(self.cap, lsn)

    def connection_lost(self) -> None:
        """The stream broke: partial transactions come again from the confirmed position;
        delivered-but-unacknowledged ones stay in flight and their copies are skipped."""
        self.assembler.reset()
        self.open_rows = None
        self._last_row = None
        self.reply_requested = False
        self.skip_upto = max(self.skip_upto, self.feedback.last_delivered)

    def rewind(self, lsn: int) -> None:
        """Deliver every transaction ending after ``lsn`` again (after a reconnect)."""
        self.connection_lost()
        self.feedback.rewind(lsn)
        self.skip_upto = lsn
        self._until_reached = False  # what follows lsn is delivered again, up to until_lsn
