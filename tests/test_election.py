"""``wire.election``: the rules E1-E8, on their own and over a simulated network.

The network delivers messages after random delays, drops some, partitions members, pauses
and kills them; time is simulated. Whatever happens: never two masters in one term, one vote
per member per term, terms never go back; and once the network behaves, one master emerges
within a few election timeouts.
"""

from __future__ import annotations

import heapq
import itertools
import random
from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from pglogrepl_bridge.wire.election import EVERY_PEER, Became, Member, Send
from pglogrepl_bridge.wire.protocol import (
    Heartbeat,
    Promotion,
    ReplicationMessage,
    VoteRequest,
    VoteResponse,
    from_bincode,
    to_bincode,
)

STEP = 0.005  # seconds of simulated time per tick


@dataclass
class Net:
    """Members over a lossy, delaying network, in simulated time."""

    members: dict[int, Member]
    rng: random.Random
    delay: float = 0.01
    drop: float = 0.0
    now: float = 0.0
    down: set[int] = field(default_factory=set)  # killed or paused: neither ticks nor hears
    cut: set[frozenset[int]] = field(default_factory=set)  # links that carry nothing
    queue: list[tuple[float, int, int, int, bytes]] = field(default_factory=list)
    seq: itertools.count[int] = field(default_factory=itertools.count)
    masters: dict[int, set[int]] = field(default_factory=dict)  # term -> who became master
    grants: dict[tuple[int, int], set[int]] = field(default_factory=dict)  # (voter, term)
    terms: dict[int, list[int]] = field(default_factory=dict)

    @classmethod
    def of(cls, n: int, seed: int, **kw: float) -> Net:
        rng = random.Random(seed)
        ids = list(range(1, n + 1))
        members = {i: Member(i, frozenset(ids), random.Random(rng.random())) for i in ids}
        net = cls(members, rng, **kw)  # type: ignore[arg-type]
        for m in members.values():
            net.handle(m.node_id, m.start(0.0))
        return net

    def handle(self, sender: int, actions: list[Send | Became]) -> None:
        member = self.members[sender]
        self.terms.setdefault(sender, []).append(member.term)
        for action in actions:
            if isinstance(action, Became):
                if action.master:
                    self.masters.setdefault(action.term, set()).add(sender)
                continue
            if isinstance(action.msg, VoteResponse) and action.msg.granted:
                self.grants.setdefault((sender, action.msg.term), set()).add(action.msg.node_id)
            targets = member.peers if action.to == EVERY_PEER else {action.to}
            for to in targets:
                if self.rng.random() < self.drop or frozenset((sender, to)) in self.cut:
                    continue
                at = self.now + self.rng.random() * self.delay
                # through the real codec: what the bridge would frame and send
                heapq.heappush(self.queue, (at, next(self.seq), sender, to, to_bincode(action.msg)))

    def run(self, seconds: float) -> None:
        end = self.now + seconds
        while self.now < end:
            self.now += STEP
            while self.queue and self.queue[0][0] <= self.now:
                _, _, sender, to, raw = heapq.heappop(self.queue)
                if to in self.down or sender in self.down:
                    continue
                self.handle(to, self.members[to].receive(from_bincode(raw), self.now))
            for i, m in self.members.items():
                if i not in self.down:
                    self.handle(i, m.tick(self.now))

    def leaders(self) -> set[int]:
        return {i for i, m in self.members.items() if m.role == "master" and i not in self.down}

    def check_safety(self) -> None:
        for term, who in self.masters.items():
            assert len(who) == 1, f"two masters in term {term}: {who}"
        for (voter, term), candidates in self.grants.items():
            assert len(candidates) == 1, f"{voter} voted twice in term {term}: {candidates}"
        for member, seen in self.terms.items():
            assert seen == sorted(seen), f"the term of {member} went back: {seen}"


def test_a_group_of_one_leads_at_once() -> None:
    m = Member(1, frozenset({1}), random.Random(0))
    actions = m.start(0.0)
    assert Became("master", 1, 1) in actions and m.may_send
    assert m.tick(0.01) == [] and m.tick(0.06) == [Send(EVERY_PEER, Heartbeat(1, 0))]


def test_three_members_elect_one_and_follow_it() -> None:
    net = Net.of(3, seed=1)
    net.run(1.0)
    (leader,) = net.leaders()
    term = net.members[leader].term
    assert all(m.leader == leader and m.term == term for m in net.members.values())
    assert [m.may_send for m in net.members.values()].count(True) == 1
    net.check_safety()


def test_the_vote_rules() -> None:
    """E4: not an older term, one vote per term, a candidate not behind."""
    m = Member(1, frozenset({1, 2, 3}), random.Random(0), term=5, last_lsn=100)

    def answer(msg: ReplicationMessage) -> VoteResponse:
        (send,) = [a for a in m.receive(msg, 0.0) if isinstance(a, Send)]
        assert isinstance(send.msg, VoteResponse)
        return send.msg

    assert not answer(VoteRequest(2, 4, 200)).granted  # an older term
    assert answer(VoteRequest(2, 4, 200)).term == 5  # ... told the current one
    assert not answer(VoteRequest(2, 6, 99)).granted  # behind this member's log
    assert m.term == 6  # the newer term adopted even so
    assert answer(VoteRequest(2, 6, 100)).granted  # not behind: granted
    assert answer(VoteRequest(2, 6, 100)).granted  # the same candidate again: still yes
    assert not answer(VoteRequest(3, 6, 500)).granted  # another candidate, same term
    assert answer(VoteRequest(3, 7, 100)).granted  # a new term, a new vote
    assert m.receive(VoteRequest(9, 8, 1000), 0.0) == []  # E1: not a member


def test_a_replica_promotion_moves_no_member() -> None:
    m = Member(1, frozenset({1, 2, 3}), random.Random(0))
    m.start(0.0)
    assert m.receive(Promotion(42, 99), 0.0) == [] and m.term == 0


def test_killing_the_master_elects_another_within_a_few_timeouts() -> None:
    net = Net.of(3, seed=7)
    net.run(1.0)
    (first,) = net.leaders()
    net.down.add(first)
    killed = net.now
    while not net.leaders() and net.now < killed + 5:
        net.run(STEP)
    (second,) = net.leaders()
    assert second != first
    assert net.now - killed < 4 * net.members[second].timeout  # E3: a few timeouts at most
    assert net.members[second].term > net.members[first].term
    net.check_safety()


def test_a_paused_master_learns_of_the_new_term_and_steps_down() -> None:
    """SIGSTOP longer than the election timeout, then SIGCONT: it hears a newer term and
    stops sending (E6, E8) before anything it sent could be taken for the new term's."""
    net = Net.of(3, seed=3)
    net.run(1.0)
    (old,) = net.leaders()
    net.down.add(old)
    net.run(1.0)
    (new,) = net.leaders()
    net.down.discard(old)  # it wakes up thinking it leads, and heartbeats
    assert net.members[old].may_send
    net.run(0.5)
    assert not net.members[old].may_send and net.members[old].leader == new
    assert net.leaders() == {new}
    net.check_safety()


def test_a_master_cut_off_from_its_peers_loses_the_group_and_the_group_stays_one() -> None:
    net = Net.of(3, seed=5)
    net.run(1.0)
    (old,) = net.leaders()
    others = [i for i in net.members if i != old]
    net.cut = {frozenset((old, i)) for i in others}
    net.run(1.5)
    assert net.leaders() - {old}  # the majority side elected one of its own
    new_term = max(net.members[i].term for i in others)
    net.cut = set()  # healed: the old master hears of the newer term
    net.run(1.0)
    assert len(net.leaders()) == 1 and net.members[old].term >= new_term
    net.check_safety()


@settings(max_examples=200)
@given(
    seed=st.integers(0, 2**32 - 1),
    size=st.sampled_from([2, 3, 5]),
    drop=st.sampled_from([0.0, 0.1, 0.3]),
    delay=st.sampled_from([0.002, 0.05, 0.2]),
    kills=st.lists(st.tuples(st.floats(0.1, 3.0), st.floats(0.05, 1.0)), max_size=4),
)
def test_never_two_masters_in_a_term_whatever_the_network_does(
    seed: int, size: int, drop: float, delay: float, kills: list[tuple[float, float]]
) -> None:
    net = Net.of(size, seed=seed, drop=drop, delay=delay)
    rng = random.Random(seed)
    for after, pause in kills:
        net.run(after)
        victim = rng.choice(list(net.members))
        net.down.add(victim)  # killed, or paused
        net.run(pause)
        net.down.discard(victim)
    net.check_safety()
    # then a well-behaved network: one master, followed by everyone
    net.drop, net.delay = 0.0, 0.01
    net.run(3.0)
    net.check_safety()
    (leader,) = net.leaders()
    assert all(m.leader == leader for m in net.members.values())
