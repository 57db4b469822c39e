"""``bridge.group``: the election over real sockets, in process (no PostgreSQL): three
members link up and elect one master; one leaves and another takes over; with mutual TLS,
a member without a certificate the CA signed never links, so it never leads.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Callable
from pathlib import Path

from pglogrepl_bridge.bridge.group import Group
from pglogrepl_bridge.bridge.network import tls_context
from pglogrepl_bridge.bridge.observe import ask
from pglogrepl_bridge.testing.group import free_ports

from .test_bridge import _certificates


def _until(check: Callable[[], bool], timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.01)
    return False


def _group(n: int, tls: tuple[ssl.SSLContext, ssl.SSLContext] | None = None) -> list[Group]:
    ports = free_ports(n)
    groups = [
        Group(
            i + 1,
            ("127.0.0.1", port),
            [("127.0.0.1", p) for p in ports if p != port],
            tls_client=tls[0] if tls else None,
            tls_server=tls[1] if tls else None,
        )
        for i, port in enumerate(ports)
    ]
    for g in groups:
        g.start()
    return groups


def _masters(groups: list[Group]) -> list[int]:
    return [g.member.node_id for g in groups if g.member.role == "master"]


def test_three_members_elect_one_and_another_takes_over_when_it_leaves() -> None:
    groups = _group(3)
    try:
        assert _until(lambda: len(_masters(groups)) == 1)
        (first,) = _masters(groups)
        time.sleep(0.3)  # settled: still one, and everyone follows it
        assert _masters(groups) == [first]
        assert all(g.member.leader == first for g in groups)
        groups[first - 1].close()
        rest = [g for g in groups if g.member.node_id != first]
        assert _until(lambda: len(_masters(rest)) == 1)
        assert _masters(rest)[0] != first
    finally:
        for g in groups:
            g.close()


def test_mutual_tls_keeps_a_member_without_a_certificate_out(tmp_path: Path) -> None:
    cert, key, ca = _certificates(tmp_path)
    tls = (tls_context(False, cert, key, ca), tls_context(True, cert, key, ca))
    groups = _group(2, tls)
    try:
        assert _until(lambda: len(_masters(groups)) == 1)
        leader = groups[0].member.leader
        # a third party that trusts the CA but has no certificate of its own
        port = free_ports(1)[0]
        stranger = Group(
            9,
            ("127.0.0.1", port),
            [g.listen_address for g in groups],
            tls_client=tls_context(False, None, None, ca),
        )
        stranger.start()
        try:
            time.sleep(1.0)
            assert stranger.member.peers == frozenset()  # no link was ever bound
            assert stranger.member.role != "master"  # 1 of a group of 3: never a majority
            assert _masters(groups) == [leader]
        finally:
            stranger.close()
    finally:
        for g in groups:
            g.close()


def test_an_observer_sees_the_master_the_term_and_the_replicas() -> None:
    groups = _group(3)
    try:
        assert _until(lambda: len(_masters(groups)) == 1)
        (master,) = _masters(groups)
        groups[master - 1].replica_positions = lambda: {101: 0x1000, 102: 0x0F00}
        time.sleep(0.2)
        views = [ask(g.listen_address) for g in groups]
        assert [v.error for v in views] == [None, None, None]
        assert sorted(v.node_id for v in views if v.node_id) == [1, 2, 3]
        assert [v.node_id for v in views if v.is_master] == [master]
        assert {v.master for v in views} == {master}
        assert len({v.term for v in views}) == 1
        assert [v.replicas for v in views if v.is_master] == [{101: 0x1000, 102: 0x0F00}]
        time.sleep(0.3)
        assert _masters(groups) == [master]  # asking moved nothing
        unreachable = ask(("127.0.0.1", free_ports(1)[0]))
        assert unreachable.error is not None and unreachable.node_id is None
    finally:
        for g in groups:
            g.close()


def test_standbys_keep_the_masters_entries_gapless_from_the_first() -> None:
    from pglogrepl_bridge.wire.protocol import WalEntry, frame

    groups = _group(3)
    try:
        assert _until(lambda: len(_masters(groups)) == 1)
        (master,) = _masters(groups)
        standbys = [g for g in groups if g.member.node_id != master]
        for lsn in (100, 200, 300, 300, 250, 400):  # a repeat and a step back are not kept
            groups[master - 1].send_entry(frame(WalEntry(master, lsn, 0, b"x")))
        assert _until(lambda: all(len(g.kept_after(100)) == 3 for g in standbys))
        for g in standbys:
            assert [e.lsn for e in g.kept_after(100)] == [200, 300, 400]
            assert [e.lsn for e in g.kept_after(300)] == [400]
            assert g.kept_after(50) == []  # they do not reach back to 50: nothing
        # the master leaves: the new one hands on what it kept
        groups[master - 1].close()
        rest = [g for g in groups if g.member.node_id != master]
        assert _until(lambda: len(_masters(rest)) == 1)
        assert [e.lsn for e in rest[0].kept_after(100)] == [200, 300, 400]
    finally:
        for g in groups:
            g.close()


def test_free_ports_are_never_given_twice() -> None:
    """Ports taken one call at a time for different servers of one test (a member's metrics,
    a replica) were sometimes the same: the bridge then dialled an HTTP server."""
    from pglogrepl_bridge.testing.postgres import free_port

    ports = free_ports(300) + [free_port() for _ in range(300)]
    assert len(set(ports)) == len(ports)
