"""A replica node's rules, sans IO: what to apply, what to answer, which master to follow.

The ``replica`` command runs this over its connections (one per master that dials in) and
a SQL target; ``receive`` says which entries to apply, ``applied`` what to answer once they
are durable. Connections are opaque ids.

Rules (``docs/replication-message.md``, "Failover", for the masters' side):

R1. A WalEntry is applied only when its ``lsn`` is above the last one applied (or about to
    be), so entries are applied once, in LSN order, whatever is sent twice.
R2. ``Acknowledge{node_id, lsn}`` is sent only after the entries up to ``lsn`` are durable
    (``applied``), and only on a connection whose master may still send (R4); it is
    cumulative.
R3. On every new connection: ``RequestFrom{node_id, last applied}`` when anything was
    applied, so the master resends what this node lacks (and counts what it has).
R4. The highest term seen in a ``Promotion`` wins. A connection takes the term of the
    Promotion received on it (0 before any). Entries from a connection whose term is below
    the highest seen are not applied, and that connection is to be closed (``Step.close``):
    a master of an older term (paused, cut off) never feeds this node while a newer one
    does. When no connection is left, the term is forgotten: a group restarted as a whole
    counts its terms from 1 again. (Entries are WAL facts and R1 keeps them in order and
    once, whoever sends them: R4 keeps a stale master from wasting the link, not the data
    from harm.)
R5. Replicas do not vote: a ``VoteRequest`` is answered ``VoteResponse{candidate, node_id,
    term, granted: false}``.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field

from pglogrepl_bridge.wire.protocol import (
    Acknowledge,
    Heartbeat,
    Promotion,
    ReplicationMessage,
    RequestFrom,
    VoteRequest,
    VoteResponse,
    WalEntry,
)

ConnId = Hashable


@dataclass(frozen=True, slots=True)
class Step:
    """What to do after ``receive``: apply ``entries`` (in order) and then call
    ``applied``; send ``replies`` now; close the connection when ``close``."""

    entries: tuple[WalEntry, ...] = ()
    replies: tuple[ReplicationMessage, ...] = ()
    close: bool = False


@dataclass
class Follower:
    """One replica's state (rules R1-R5 in the module docstring)."""

    node_id: int
    last_lsn: int = 0  # the last entry applied and durable (persisted by the caller)
    term: int = 0  # the highest term seen in a Promotion
    conn_terms: dict[ConnId, int] = field(default_factory=dict)
    master: int | None = None  # the node id of the highest term's master
    heartbeats: int = 0
    duplicates: int = 0  # entries received again and not applied (R1)
    _pending: int = 0  # the highest lsn handed out to apply, not yet durable

    def connected(self, conn: ConnId) -> list[ReplicationMessage]:
        """R3: a master connected."""
        self.conn_terms[conn] = 0
        return [RequestFrom(self.node_id, self.last_lsn)] if self.last_lsn else []

    def disconnected(self, conn: ConnId) -> None:
        """Forget the connection's term (and the highest, with the last connection: R4)."""
        self.conn_terms.pop(conn, None)
        if not self.conn_terms:
            self.term, self.master = 0, None

    def receive(self, conn: ConnId, msgs: list[ReplicationMessage]) -> Step:
        """The rules over messages received together on ``conn``."""
        entries: list[WalEntry] = []
        replies: list[ReplicationMessage] = []
        for msg in msgs:
            if isinstance(msg, Promotion):
                if msg.term >= self.term:  # R4
                    self.term, self.master = msg.term, msg.node_id
                self.conn_terms[conn] = max(self.conn_terms.get(conn, 0), msg.term)
            elif isinstance(msg, WalEntry):
                if self.conn_terms.get(conn, 0) < self.term:  # R4: an older term's master
                    return Step(tuple(entries), tuple(replies), close=True)
                high = max(self.last_lsn, self._pending)
                if msg.lsn <= high:  # R1
                    self.duplicates += 1
                    continue
                entries.append(msg)
                self._pending = msg.lsn
            elif isinstance(msg, VoteRequest):  # R5
                replies.append(VoteResponse(msg.node_id, self.node_id, msg.term, False))
            elif isinstance(msg, Heartbeat):
                self.heartbeats += 1
        return Step(tuple(entries), tuple(replies))

    def applied(self, conn: ConnId, entries: tuple[WalEntry, ...]) -> list[ReplicationMessage]:
        """R2: ``entries`` are durable; the acknowledgement to send on ``conn``."""
        if not entries:
            return []
        self.last_lsn = max(self.last_lsn, entries[-1].lsn)
        if self.conn_terms.get(conn, 0) < self.term:
            return []  # R4: that master lost its term meanwhile
        return [Acknowledge(self.node_id, self.last_lsn)]

    def failed(self) -> None:
        """The entries handed out were not applied (the target refused): they may come
        again (the master resends after RequestFrom)."""
        self._pending = self.last_lsn
