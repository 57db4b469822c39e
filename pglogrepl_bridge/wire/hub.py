"""The bridge's bookkeeping, sans IO: which WalEntries each replica gets, what a quorum holds,
and what to answer. Connections are opaque ids; time is passed in; frames are bytes.

- Entries go to every replica in LSN order, at most ``window`` unacknowledged at a time,
  counted per connection, whether or not they are still buffered (a replica that stops
  reading is sent a window and no more); what a replica's RequestFrom says it holds is not
  in flight (a reconnecting replica ahead of most of the buffer gets what follows at once).
- A replica's acknowledgements are cumulative: it applies only ``lsn > last``, in order.
- ``quorum_lsn`` is the highest LSN acknowledged by ``quorum`` distinct replicas; only that
  may be confirmed to PostgreSQL.
- A quorum is made of distinct, real replicas. A connection's first Acknowledge or
  RequestFrom binds its node id: a connection speaking for a second node id, or a second
  connection claiming the id of a live one, is dropped (``Drop``) and nothing it said
  counts, before or after: its credit is revoked in the same step, so a quorum never
  includes it. An acknowledgement counts only up to the highest LSN sent on that connection, so
  no replica can vouch for an entry it was never given.
- The newest ``max_entries`` stay in a buffer for RequestFrom; older ones leave it once a
  quorum holds them. A replay from before the buffer restarts the PostgreSQL stream, which
  works as long as the slot was not confirmed past it.
- What a quorum says it holds (``held_lsn``: acknowledgements and RequestFrom claims) is
  never waited for: replicas do not acknowledge what they already have, and are not sent it.
  The publisher does not stop for it and the buffer may let it go. Why: a bridge restarted
  after its replicas applied more than PostgreSQL had confirmed gets those transactions
  again, and waited for acknowledgements that could never come once they filled the buffer.
  Only ``quorum_lsn`` is confirmed: a claim is no proof, an acknowledgement is.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Hashable
from dataclasses import dataclass, field

from pglogrepl_bridge.errors import ProtocolError
from pglogrepl_bridge.wire.protocol import (
    Acknowledge,
    Heartbeat,
    Promotion,
    ReplicationMessage,
    RequestFrom,
    VoteRequest,
    VoteResponse,
    frame,
)

log = logging.getLogger(__name__)

ConnId = Hashable


@dataclass
class Replica:
    """The hub's view of one replica connection: what it was sent and what it acknowledged."""

    node_id: int | None = None  # bound by its first Acknowledge or RequestFrom
    sent: int = 0  # where sending continues: the highest LSN sent, or a replay's start
    high: int = 0  # the highest LSN ever sent on this connection: acks count up to it
    acked: int = 0  # highest LSN it acknowledged (cumulative, at most ``high``)
    #: what its RequestFrom said it holds: not in flight (the window), though no quorum
    #: counts it beyond ``high``
    holds: int = 0
    rewound: int = -1  # ``sent`` when a rewind was last asked for it: asked once for each
    #: the LSNs sent on this connection above ``max(acked, holds)``, oldest first: the
    #: window's count. Kept here, not derived from the buffer: entries that left the buffer
    #: are still in flight to a replica that has not acknowledged them.
    unacked: list[int] = field(default_factory=list)

    def settle(self) -> None:
        """Forget in-flight entries that it acknowledged or says it holds."""
        mark = max(self.acked, self.holds)
        if self.unacked and self.unacked[0] <= mark:
            del self.unacked[: bisect.bisect_right(self.unacked, mark)]


@dataclass(frozen=True, slots=True)
class Rewind:
    """Restart the PostgreSQL stream after ``lsn``: a replica needs what the buffer dropped."""

    lsn: int


@dataclass(frozen=True, slots=True)
class StepDown:
    """Another node was promoted at ``term``: stop streaming (split-brain guard)."""

    node_id: int
    term: int


@dataclass(frozen=True, slots=True)
class Drop:
    """Close connection ``conn``: its peer broke the quorum's rules (``reason``)."""

    conn: ConnId
    reason: str


Action = Rewind | StepDown | Drop


@dataclass
class Hub:
    """The bridge's decisions, sans-IO: which entries each replica gets next (within its window),
    what a quorum acknowledged (the slot's next confirmed position), and what to do about
    RequestFrom, votes and Promotions. The network thread feeds it replies and sends what it
    returns.
    """

    node_id: int
    quorum: int
    window: int = 1000
    max_entries: int = 10_000
    max_bytes: int = 64 * 1024 * 1024  # the replay buffer's other bound
    term: int = 1
    healthy: bool = True
    #: a group's master: each replica connection starts with ``Promotion{node_id, term}``,
    #: so replicas follow the newest master (``wire.follower`` R4)
    announce: bool = False
    _lsns: list[int] = field(default_factory=list)
    _frames: list[bytes] = field(default_factory=list)
    _bytes: int = 0
    floor: int = 0  # every entry with lsn > floor is in the buffer
    last_lsn: int = 0
    replicas: dict[ConnId, Replica] = field(default_factory=dict)
    acked_by_node: dict[int, int] = field(default_factory=dict)
    #: what each node's RequestFrom said it holds: not confirmed on its word, never waited for
    claimed_by_node: dict[int, int] = field(default_factory=dict)
    #: acknowledgements of connections that closed without breaking a rule: a replica holds
    #: what it acknowledged after its connection is gone
    settled: dict[int, int] = field(default_factory=dict)
    voted: dict[int, int] = field(default_factory=dict)  # term -> candidate we voted for
    outbox: dict[ConnId, list[bytes]] = field(default_factory=dict)
    _rewinds: list[int] = field(default_factory=list)  # for take_rewinds

    # -- entries ---------------------------------------------------------------------------

    def publish(self, lsn: int, entry_frame: bytes) -> None:
        """Buffer the entry of the transaction ending at ``lsn``; replicas get it in order."""
        if lsn <= self.last_lsn:
            raise ProtocolError(f"WalEntry lsn {lsn} is not above the last one, {self.last_lsn}")
        self._lsns.append(lsn)
        self._frames.append(entry_frame)
        self._bytes += len(entry_frame)
        self.last_lsn = lsn
        self._trim()

    def reset_to(self, lsn: int) -> None:
        """After a rewind, entries above ``lsn`` will be published again. From before the
        buffer (``lsn < floor``) that includes what it had dropped: the floor comes down too,
        or the publisher would skip those entries as already buffered."""
        cut = bisect.bisect_right(self._lsns, lsn)
        self._bytes -= sum(map(len, self._frames[cut:]))
        del self._lsns[cut:], self._frames[cut:]
        self.floor = min(self.floor, lsn)
        self.last_lsn = max(lsn, self._lsns[-1] if self._lsns else self.floor)
        for rep in self.replicas.values():
            rep.sent = min(rep.sent, self.last_lsn)
            del rep.unacked[bisect.bisect_right(rep.unacked, self.last_lsn) :]  # sent again

    @property
    def backlog(self) -> int:
        """Entries published but not yet acknowledged by a quorum."""
        return len(self._lsns)

    @property
    def unconfirmed(self) -> int:
        """Entries a quorum does not hold yet, nor say they hold: the publisher waits while
        there are too many."""
        return len(self._lsns) - bisect.bisect_right(self._lsns, self.held_lsn)

    @property
    def full(self) -> bool:
        """Too much that a quorum does not hold yet: the publisher should wait."""
        unconfirmed = self.unconfirmed
        return unconfirmed >= self.max_entries or (unconfirmed > 1 and self._bytes > self.max_bytes)

    def _trim(self) -> None:
        """Keep the newest entries for replays, within ``max_entries`` and ``max_bytes``;
        older ones go once a quorum has them."""
        held = bisect.bisect_right(self._lsns, self.held_lsn)  # the most we may drop
        cut = max(len(self._lsns) - self.max_entries, 0)
        size = self._bytes - sum(map(len, self._frames[:cut]))
        while cut < held and size > self.max_bytes:
            size -= len(self._frames[cut])
            cut += 1
        cut = min(cut, held)
        if cut:
            self.floor = self._lsns[cut - 1]
            self._bytes -= sum(map(len, self._frames[:cut]))
            del self._lsns[:cut], self._frames[:cut]

    # -- replicas --------------------------------------------------------------------------

    def connect(self, conn: ConnId) -> None:
        """A replica connection came up (``conn`` is an opaque id)."""
        self.replicas[conn] = Replica(sent=self.floor, acked=0)
        self.outbox[conn] = [frame(Promotion(self.node_id, self.term))] if self.announce else []

    def disconnect(self, conn: ConnId) -> None:
        """A replica connection went away; what it was sent but did not acknowledge is resent
        later.
        """
        rep = self.replicas.pop(conn, None)
        self.outbox.pop(conn, None)
        if rep is not None and rep.node_id is not None and rep.acked:
            self.settled[rep.node_id] = max(self.settled.get(rep.node_id, 0), rep.acked)

    @property
    def quorum_lsn(self) -> int:
        """Highest LSN that ``quorum`` distinct replicas acknowledged (0: none yet)."""
        acks = sorted(self.acked_by_node.values(), reverse=True)
        return acks[self.quorum - 1] if len(acks) >= self.quorum else 0

    @property
    def held_lsn(self) -> int:
        """Highest LSN that ``quorum`` distinct replicas acknowledged or said they hold (in a
        RequestFrom): nothing at or below it is waited for (see the module doc). At least
        ``quorum_lsn``; never confirmed on its own."""
        acked, claimed = self.acked_by_node, self.claimed_by_node
        marks = sorted(
            (max(acked.get(node, 0), claimed.get(node, 0)) for node in acked.keys() | claimed),
            reverse=True,
        )
        return marks[self.quorum - 1] if len(marks) >= self.quorum else 0

    def pending(self, conn: ConnId) -> list[bytes]:
        """Frames to write to ``conn`` now: answers first, then entries within the window.

        A replica whose next entry already left the buffer (it lagged more than the buffer
        holds behind a quorum) is sent nothing past the gap, which it would apply as if
        nothing were missing: once it holds all it was sent, a ``Rewind`` to that is queued
        (``take_rewinds``).
        """
        rep = self.replicas[conn]
        out = self.outbox[conn]
        self.outbox[conn] = []
        if rep.sent < self.floor:
            # only once it holds all it was sent: a replica that stopped acknowledging is
            # stuck on its window anyway, and must not restart the stream again and again
            if max(rep.acked, rep.holds) >= rep.sent and rep.rewound != rep.sent:
                rep.rewound = rep.sent
                self._rewinds.append(rep.sent)
            return out
        start = bisect.bisect_right(self._lsns, rep.sent)
        room = self.window - len(rep.unacked)
        if room > 0 and start < len(self._lsns):
            stop = min(len(self._lsns), start + room)
            out += self._frames[start:stop]
            # what it holds is not in flight (a RequestFrom below an earlier one resends it)
            held = bisect.bisect_right(self._lsns, max(rep.acked, rep.holds), start, stop)
            rep.unacked += self._lsns[held:stop]
            rep.sent = self._lsns[stop - 1]
            rep.high = max(rep.high, rep.sent)
        return out

    def take_rewinds(self) -> list[Rewind]:
        """The rewinds ``pending`` found necessary since the last call (oldest first)."""
        rewinds, self._rewinds = sorted(self._rewinds), []
        return [Rewind(lsn) for lsn in rewinds[:1]]  # the oldest serves them all

    def heartbeat(self) -> bytes:
        """The Heartbeat to send now."""
        return frame(Heartbeat(self.node_id, self.last_lsn))

    def receive(self, conn: ConnId, msg: ReplicationMessage) -> list[Action]:
        """A reply from replica ``conn``; returns what the bridge must do, if anything."""
        rep = self.replicas[conn]
        if isinstance(msg, Acknowledge | RequestFrom):
            problem = self._bind(conn, rep, msg.node_id)
            if problem is not None:
                log.warning("dropping a replica connection: %s", problem)
                self._revoke(rep)
                return [Drop(conn, problem)]
        if isinstance(msg, Acknowledge):
            self._ack(rep, msg.node_id, msg.lsn)
        elif isinstance(msg, RequestFrom):
            # it holds everything up to lsn: that counts as acknowledged (up to ``high``),
            # and none of it is in flight
            self._ack(rep, msg.node_id, msg.lsn)
            rep.holds = max(rep.holds, msg.lsn)
            rep.unacked.clear()  # what it holds is not in flight; what follows is sent again
            if msg.lsn > self.claimed_by_node.get(msg.node_id, 0):
                self.claimed_by_node[msg.node_id] = msg.lsn
                if msg.lsn > self.last_lsn:
                    log.warning(
                        "replica %d says it holds up to %X, past this stream's last entry "
                        "(%X): what it holds is not sent to it again, and is confirmed to "
                        "PostgreSQL once it acknowledges an entry after that",
                        msg.node_id,
                        msg.lsn,
                        self.last_lsn,
                    )
                self._trim()
            if msg.lsn < self.floor:
                log.warning(
                    "replica %d asks to replay from %X, older than the buffer (%X): "
                    "restarting the PostgreSQL stream",
                    msg.node_id,
                    msg.lsn,
                    self.floor,
                )
                rep.sent = msg.lsn
                return [Rewind(msg.lsn)]
            rep.sent = msg.lsn  # resend from there, out of the buffer
        elif isinstance(msg, VoteRequest):
            self.outbox[conn].append(frame(self._vote(msg)))
        elif isinstance(msg, Promotion):
            if msg.node_id != self.node_id and msg.term >= self.term:
                return [StepDown(msg.node_id, msg.term)]
        elif isinstance(msg, Heartbeat):
            log.warning(
                "node %d sends heartbeats too: another master is alive (term %d here)",
                msg.node_id,
                self.term,
            )
        return []

    def _bind(self, conn: ConnId, rep: Replica, node_id: int) -> str | None:
        """Bind ``node_id`` to ``conn`` on its first word; the reason to drop it, if any."""
        if rep.node_id == node_id:
            return None
        if rep.node_id is not None:
            return f"the connection of node {rep.node_id} speaks for node {node_id} too"
        for other, known in self.replicas.items():
            if other != conn and known.node_id == node_id:
                return f"node {node_id} is already connected: a second connection claims it"
        rep.node_id = node_id
        return None

    def _revoke(self, rep: Replica) -> None:
        """A connection broke a rule: what it acknowledged no longer counts (its node keeps
        only what earlier, well-behaved connections of it acknowledged)."""
        node = rep.node_id
        rep.acked = 0
        if node is None:
            return  # it claimed a live node's id: that node's own connection keeps its credit
        self.claimed_by_node.pop(node, None)
        held = self.settled.get(node, 0)
        if held:
            self.acked_by_node[node] = held
        else:
            self.acked_by_node.pop(node, None)

    def _ack(self, rep: Replica, node_id: int, lsn: int) -> None:
        counted = min(lsn, rep.high)  # what it was given on this connection, at most
        rep.acked = max(rep.acked, counted)
        rep.sent = max(rep.sent, rep.acked)
        rep.settle()
        if counted > self.acked_by_node.get(node_id, 0):
            self.acked_by_node[node_id] = counted
            self._trim()

    def _vote(self, req: VoteRequest) -> VoteResponse:
        """While we stream we are the master: no vote for anyone. Otherwise, the usual rules:
        the term is not older, one vote per term, the candidate is not behind us."""
        if self.healthy:
            return VoteResponse(req.node_id, self.node_id, req.term, False)
        granted = (
            req.term >= self.term
            and self.voted.get(req.term, req.node_id) == req.node_id
            and req.last_lsn >= self.last_lsn
        )
        if granted:
            self.voted[req.term] = req.node_id
            self.term = req.term
        return VoteResponse(req.node_id, self.node_id, req.term, granted)
