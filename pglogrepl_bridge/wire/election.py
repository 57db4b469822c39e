"""Who is master of a bridge group, in which term: the election rules, sans IO.

A member is fed what it receives (``receive``) and the passing of time (``tick``; time is a
number of seconds passed in, randomness a ``random.Random`` passed in) and answers with
``Send`` actions and ``Became`` changes of role. No sockets, no clock: the bridge runs it
over its peer connections, the tests over a simulated network.

Rules (``docs/replication-message.md``, "Failover", states them for peers):

E1. The group is the members named at start (``node_id`` and ``peers``); a majority is more
    than half of them. Messages from anyone else (a replica) are ignored: replicas do not
    vote, and a replica's ``Promotion`` makes no member step down. A group of one is master
    of term 1 at once.
E2. Every member starts as a standby of term ``term`` (persisted by the caller, 0 at first)
    and knows no master. The master sends ``Heartbeat{node_id, lsn}`` to every peer every
    ``heartbeat`` seconds, and its ``Promotion`` to each peer that connects (``hello``).
E3. A standby or candidate that hears nothing from the master of its term (no Heartbeat, no
    Promotion) for its election timeout, a fresh random value in [timeout, 2 * timeout)
    each time, starts an election: term + 1, a vote for itself, and
    ``VoteRequest{node_id, term, last_lsn}`` to every peer.
E4. A member grants a VoteRequest when the request's term is not older than its own, it
    has not voted for another candidate in that term, and the candidate's ``last_lsn`` is
    not behind its own; it answers ``VoteResponse{candidate, voter, term, granted}`` either
    way. A request of a newer term makes it adopt that term first (a master or candidate
    of an older term steps down). Granting restarts its election timer.
E5. A candidate that holds grants from a majority of the group in its term, its own
    included, becomes master of that term and sends ``Promotion{node_id, term}`` to every
    peer (the bridge also sends it to every replica).
E6. A member that sees a Promotion of a term at least its own, from another member, follows
    that member as master: it adopts the term and steps down if it was master or
    candidate. A Promotion of an older term, or a Heartbeat from a member that is not its
    master, is answered with ``Promotion{its master, its term}`` when it knows one: so a
    master that was paused or cut off learns of the newer term and steps down.
E7. Terms never go back, and a member votes at most once per term.
E8. Only the master of the current term may send WalEntries (``may_send``); a member that
    has seen a newer term never sends another entry under its old one, and a master whose
    links reach no majority of the group for two election timeouts steps down
    (``step_down``: the caller watches its links), so a master cut off from its peers does
    not keep the slot from the one they elect. PostgreSQL's one
    walsender per slot fences the rest: a new master takes the slot over only after
    winning (``Became.master``), by terminating the old walsender.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Literal

from pglogrepl_bridge.wire.protocol import (
    Heartbeat,
    Promotion,
    ReplicationMessage,
    VoteRequest,
    VoteResponse,
)

Role = Literal["standby", "candidate", "master"]
#: ``Send.to`` for every peer
EVERY_PEER = -1


@dataclass(frozen=True, slots=True)
class Send:
    """Send ``msg`` to peer ``to`` (a node id), or to every peer (``EVERY_PEER``)."""

    to: int
    msg: ReplicationMessage


@dataclass(frozen=True, slots=True)
class Became:
    """This member's role changed: ``master`` of ``term``, or a follower of ``leader``
    (None: an election is going on)."""

    role: Role
    term: int
    leader: int | None

    @property
    def master(self) -> bool:
        """Whether this member now leads (and may take the slot)."""
        return self.role == "master"


Action = Send | Became


@dataclass
class Member:
    """One member's election state (rules E1-E8 in the module docstring)."""

    node_id: int
    peers: frozenset[int]
    rng: random.Random
    #: the group's size, this member included (default: ``peers`` and this one); a
    #: member that learns its peers' ids as they connect (``learn``) knows it from the start
    group_size: int = 0
    term: int = 0
    last_lsn: int = 0  # the highest LSN this member holds (sent as master, or received)
    heartbeat: float = 0.05
    timeout: float = 0.15
    role: Role = "standby"
    leader: int | None = None
    voted_for: int | None = None  # in ``term``
    votes: set[int] = field(default_factory=set)
    deadline: float = 0.0  # when the election timer fires (standby, candidate)
    heard: float = 0.0  # when the master (or a vote for one) was last heard of
    next_heartbeat: float = 0.0  # master

    def __post_init__(self) -> None:
        self.peers = frozenset(self.peers) - {self.node_id}
        self.group_size = max(self.group_size, len(self.peers) + 1)

    def learn(self, peer: int) -> bool:
        """A member's id, learnt from its link (E1); False when the group is already full
        of other ids (or it is this member's own id): then it is no member."""
        if peer == self.node_id:
            return False
        if peer not in self.peers:
            if len(self.peers) + 1 >= self.group_size:
                return False
            self.peers = self.peers | {peer}
        return True

    # -- E1, E2 -----------------------------------------------------------------------------

    @property
    def majority(self) -> int:
        """Votes needed to win: more than half of the group."""
        return self.group_size // 2 + 1

    @property
    def may_send(self) -> bool:
        """E8: whether this member may send WalEntries now."""
        return self.role == "master"

    def start(self, now: float) -> list[Action]:
        """Begin at ``now``: a group of one leads at once, others wait for a master."""
        self.heard = now
        if self.group_size == 1:
            return self._elect(now)
        self._reset_timer(now)
        return []

    def hello(self, peer: int) -> list[Action]:
        """E2: what to tell a peer that just connected (the master's Promotion)."""
        return self._tell(peer) if peer in self.peers else []

    # -- time -------------------------------------------------------------------------------

    def tick(self, now: float) -> list[Action]:
        """E2, E3: heartbeats of a master, elections of the others."""
        if self.role == "master":
            if now >= self.next_heartbeat:
                self.next_heartbeat = now + self.heartbeat
                return [Send(EVERY_PEER, Heartbeat(self.node_id, self.last_lsn))]
            return []
        if now >= self.deadline:
            return self._elect(now)
        return []

    def _reset_timer(self, now: float) -> None:
        self.deadline = now + self.timeout * (1 + self.rng.random())

    def _elect(self, now: float) -> list[Action]:
        """E3 (and E1's group of one, which E5 makes master at once)."""
        self.term += 1
        self.role, self.leader = "candidate", None
        self.voted_for, self.votes = self.node_id, {self.node_id}
        self._reset_timer(now)
        if len(self.votes) >= self.majority:
            return self._win(now)
        return [
            Became("candidate", self.term, None),
            Send(EVERY_PEER, VoteRequest(self.node_id, self.term, self.last_lsn)),
        ]

    def _win(self, now: float) -> list[Action]:
        """E5."""
        self.role, self.leader = "master", self.node_id
        self.next_heartbeat = now + self.heartbeat
        return [
            Became("master", self.term, self.node_id),
            Send(EVERY_PEER, Promotion(self.node_id, self.term)),
        ]

    def _adopt(self, term: int, now: float) -> list[Action]:
        """E4, E6, E7: a newer term; a master or candidate of an older one steps down."""
        if term <= self.term:
            return []
        stepped = self.role != "standby"
        self.term, self.voted_for, self.votes = term, None, set()
        self.role, self.leader = "standby", None
        self._reset_timer(now)
        return [Became("standby", term, None)] if stepped else []

    def step_down(self, now: float) -> list[Action]:
        """A master that cannot reach a majority of the group (its links are down) lets go:
        the others elect one among themselves, and this one must not hold the slot."""
        if self.role == "standby":
            return []
        self.role, self.leader = "standby", None
        self._reset_timer(now)
        return [Became("standby", self.term, None)]

    # -- messages ---------------------------------------------------------------------------

    def receive(self, msg: ReplicationMessage, now: float) -> list[Action]:
        """Apply the rules to a message from a peer; returns what to send and role changes.
        Anything else (WalEntry, Acknowledge, RequestFrom) is not the election's business."""
        if isinstance(msg, VoteRequest):
            return self._vote_request(msg, now)
        if isinstance(msg, VoteResponse):
            return self._vote_response(msg, now)
        if isinstance(msg, Promotion):
            return self._promotion(msg, now)
        if isinstance(msg, Heartbeat) and msg.node_id in self.peers:
            if msg.node_id == self.leader:
                self._reset_timer(now)
                self.heard = now
                self.last_lsn = max(self.last_lsn, msg.lsn)  # what a standby could resend
                return []
            return self._tell(msg.node_id)  # a master of an older term, still sending
        return []

    def _vote_request(self, msg: VoteRequest, now: float) -> list[Action]:
        """E4."""
        candidate = msg.node_id
        if candidate not in self.peers:  # E1: a replica, or a stranger
            return []
        actions = self._adopt(msg.term, now)
        granted = (
            msg.term == self.term
            and self.voted_for in (None, candidate)
            and msg.last_lsn >= self.last_lsn
            and self.role != "master"
        )
        if granted:
            self.voted_for = candidate
            self._reset_timer(now)
        actions.append(Send(candidate, VoteResponse(candidate, self.node_id, self.term, granted)))
        return actions

    def _vote_response(self, msg: VoteResponse, now: float) -> list[Action]:
        """E5 (and E4's newer term, learnt from a refusal)."""
        if msg.voter_id not in self.peers or msg.node_id != self.node_id:
            return []
        if msg.term > self.term:
            return self._adopt(msg.term, now)
        if self.role != "candidate" or msg.term != self.term or not msg.granted:
            return []
        self.votes.add(msg.voter_id)
        if len(self.votes) >= self.majority:
            return self._win(now)
        return []

    def _promotion(self, msg: Promotion, now: float) -> list[Action]:
        """E6."""
        if msg.node_id not in self.peers:  # E1: a replica's Promotion moves no member
            return []
        if msg.term < self.term:
            return self._tell(msg.node_id)  # a stale master: tell it of the newer term
        before = (self.role, self.leader, self.term)
        self._adopt(msg.term, now)
        self.role, self.leader = "standby", msg.node_id
        self._reset_timer(now)
        self.heard = now
        if (self.role, self.leader, self.term) == before:
            return []
        return [Became("standby", self.term, msg.node_id)]

    def _tell(self, peer: int) -> list[Action]:
        """Who leads this member's term, for a peer that acts as if it did not know."""
        if self.leader is None or self.leader == peer:
            return []
        return [Send(peer, Promotion(self.leader, self.term))]
