"""A bridge group: three ``bridge --peer`` processes, two ``replica`` processes, real
PostgreSQL, loopback. ``kill -9`` the master mid-workload: another member wins the election,
fences the slot and carries on; both replicas end equal to the source, every transaction
applied once. Throughout, the slot's confirmed position never passes what both replicas
(``--ack-quorum 2``) hold.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psycopg
import pytest

from pglogrepl_bridge.lsn import Lsn
from pglogrepl_bridge.testing.group import BridgeGroup, free_ports, slot_holder
from pglogrepl_bridge.testing.postgres import PostgresServer

from .streamkit import Conn, wait_for
from .test_replicate import Source, assert_same


class Writer:
    """Single-row transactions on the notes table, until stopped."""

    def __init__(self, dsn: str, table: str) -> None:
        self.conn = psycopg.connect(dsn, autocommit=True)
        self.table = table
        self.done = threading.Event()
        self.count = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        n = 0
        while not self.done.is_set():
            n += 1
            t = self.table
            if n % 5 == 0:
                self.conn.execute(f"DELETE FROM {t} WHERE k = %s", (f"w{n - 3}",))
            elif n % 3 == 0:
                self.conn.execute(f"UPDATE {t} SET body = %s WHERE k = %s", (f"u{n}", f"w{n - 1}"))
            else:
                self.conn.execute(f"INSERT INTO {t} VALUES (%s, %s)", (f"w{n}", f"body {n}"))
            self.count += 1
            time.sleep(0.01)

    def stop(self) -> None:
        self.done.set()
        self.thread.join(timeout=10)
        self.conn.close()


def _metrics(port: int) -> str:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return str(r.read().decode())


def _finish(writer: Writer, conn: Conn, slot: str) -> None:
    """Stop writing, then wait until the replicas acknowledged everything (the slot is
    confirmed to the end of the WAL only then: --ack-quorum 2 of 2)."""
    writer.stop()
    wal = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
    assert wal is not None
    end = int(Lsn.parse(wal[0]))
    wait_for(lambda: _confirmed(conn, slot) >= end, timeout=60,
             what="both replicas to acknowledge everything")  # fmt: skip


def _confirmed(conn: Conn, slot: str) -> int:
    row = conn.execute(
        "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = %s", (slot,)
    ).fetchone()
    return int(Lsn.parse(row[0])) if row is not None and row[0] is not None else 0


@pytest.mark.parametrize("how", ["kill", "pause"])
def test_the_master_lost_and_another_member_takes_over(
    pg: PostgresServer, pg_conn: Conn, tmp_path: Path, how: str
) -> None:
    """``kill``: SIGKILL. ``pause``: SIGSTOP for longer than the election timeout, then
    SIGCONT: the old master hears of the newer term and steps down, and its walsender was
    terminated by the winner (the slot is the fence)."""
    src = Source(pg_conn)
    src.mixed_workload(0, 10)
    group = BridgeGroup(pg.dsn, src.slot, src.pub, tmp_path)
    metrics_ports = free_ports(3)
    group.member_args = {n: ["--verbose", "--metrics-port", str(metrics_ports[n - 1])]
                         for n in (1, 2, 3)}  # fmt: skip
    writer = Writer(pg.dsn, src.notes)
    violations: list[str] = []
    sampling = threading.Event()
    start = _confirmed(pg_conn, src.slot)  # where the slot was created: nothing before it

    def sample() -> None:  # the confirmed position never passes what both replicas hold
        with psycopg.connect(pg.dsn, autocommit=True) as c:
            while not sampling.is_set():
                confirmed = _confirmed(c, src.slot)
                held = group.held()  # read after: replicas only move forward
                if held and confirmed > max(start, held):
                    violations.append(f"confirmed {confirmed:X} past the replicas' {held:X}")
                time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    group.start()
    try:
        wait_for(lambda: slot_holder(pg_conn, src.slot) is not None, timeout=30, what="a master")
        sampler.start()
        writer.thread.start()
        time.sleep(1.0)
        first = slot_holder(pg_conn, src.slot)
        assert first is not None
        victim = group.procs[f"member{first}"]
        before = group.held()
        if how == "kill":
            victim.kill()  # SIGKILL: no goodbye; its walsender dies with the connection
        else:
            victim.send_signal(signal.SIGSTOP)  # alive, silent, still holding the slot
        killed = time.monotonic()

        def taken_over() -> bool:
            return slot_holder(pg_conn, src.slot) not in (None, first)

        try:
            wait_for(taken_over, timeout=30, what="another member to take the slot")
            wait_for(lambda: group.held() > before, timeout=30,
                     what="the replicas to receive from the new master")  # fmt: skip
        except AssertionError as exc:  # the members' and replicas' own words, for CI's log
            raise AssertionError(f"{exc}; held {group.held():X}, before {before:X}\n"
                                 f"{group.report()}") from None  # fmt: skip
        takeover = time.monotonic() - killed
        now = slot_holder(pg_conn, src.slot)
        assert now is not None
        scraped = _metrics(metrics_ports[now - 1])
        assert "pglogrepl_group_role 2.0" in scraped
        assert "pglogrepl_group_term 1.0" not in scraped  # a newer term than the first
        if how == "pause":
            victim.send_signal(signal.SIGCONT)
            log = tmp_path / f"member{first}.log"
            wait_for(lambda: "follows" in log.read_text(), timeout=30,
                     what="the paused master to step down")  # fmt: skip
            assert slot_holder(pg_conn, src.slot) != first
        time.sleep(0.5)
        _finish(writer, pg_conn, src.slot)
    finally:
        sampling.set()
        writer.done.set()
        group.close()
    assert violations == []
    assert takeover < 10, takeover
    print(f"takeover after {how}: {takeover * 1000:.0f} ms")
    for url in group.targets.values():
        assert assert_same(pg.dsn, url, src.notes, "k") > 10
        assert_same(pg.dsn, url, src.items, "id")


class Proxy:
    """A TCP proxy for one member-to-member link, which the test can cut and heal."""

    def __init__(self, to_port: int) -> None:
        self.to_port = to_port
        self.server = socket.create_server(("127.0.0.1", 0))
        self.server.settimeout(0.1)
        self.port: int = self.server.getsockname()[1]
        self.cut = threading.Event()
        self.closed = threading.Event()
        self.socks: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                client, _ = self.server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if self.cut.is_set():
                client.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.to_port), timeout=1)
            except OSError:
                client.close()
                continue
            self.socks += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def sever(self) -> None:
        """Cut the link: its connections drop, new ones are refused."""
        self.cut.set()
        for s in self.socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        self.socks.clear()

    def heal(self) -> None:
        self.cut.clear()

    def close(self) -> None:
        self.sever()
        self.closed.set()
        self.server.close()


def test_a_master_cut_off_from_its_peers_steps_down_and_the_group_stays_one(
    pg: PostgresServer, pg_conn: Conn, tmp_path: Path
) -> None:
    """Only the links between the master and its peers are cut (its links to PostgreSQL
    and to the replicas stay): it steps down, the two others elect one of theirs, and at
    every moment at most one member streams. Healed, it rejoins as a standby."""
    src = Source(pg_conn)
    group = BridgeGroup(pg.dsn, src.slot, src.pub, tmp_path)
    proxies = {(i, j): Proxy(group.member_ports[j - 1]) for i in (1, 2, 3) for j in (1, 2, 3)
               if i != j}  # fmt: skip
    group.peer_ports = {link: proxy.port for link, proxy in proxies.items()}
    group.member_args = {n: ["--verbose"] for n in (1, 2, 3)}
    group.start()
    writer = Writer(pg.dsn, src.notes)
    holders: list[int | None] = []
    watching = threading.Event()

    def watch() -> None:  # who holds the slot, sampled; there is one slot, so one holder
        with psycopg.connect(pg.dsn, autocommit=True) as c:
            while not watching.is_set():
                holders.append(slot_holder(c, src.slot))
                time.sleep(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    try:
        wait_for(lambda: slot_holder(pg_conn, src.slot) is not None, timeout=30, what="a master")
        watcher.start()
        writer.thread.start()
        time.sleep(0.5)
        first = slot_holder(pg_conn, src.slot)
        assert first is not None
        for (i, j), proxy in proxies.items():
            if first in (i, j):
                proxy.sever()
        log = tmp_path / f"member{first}.log"
        wait_for(lambda: "stepping down" in log.read_text(), timeout=30,
                 what="the cut-off master to step down")  # fmt: skip

        def other_holds() -> bool:
            return slot_holder(pg_conn, src.slot) not in (None, first)

        wait_for(other_holds, timeout=30, what="the others to elect one of theirs")
        for proxy in proxies.values():
            proxy.heal()
        time.sleep(1.0)  # rejoined: it follows, it does not take the slot back
        assert other_holds()
        _finish(writer, pg_conn, src.slot)
    finally:
        watching.set()
        writer.done.set()
        group.close()
        for proxy in proxies.values():
            proxy.close()
    assert "follows" in log.read_text()  # it rejoined as a standby
    # once another member held the slot, the cut-off master never took it back
    taken = next(n for n, h in enumerate(holders) if h is not None and h != first)
    assert first not in holders[taken:]
    for url in group.targets.values():
        assert_same(pg.dsn, url, src.notes, "k")


def _run_group_case(pg: PostgresServer, pg_conn: Conn, tmp_path: Path, case: str) -> None:
    """A group of three and two replicas under a steady writer; ``case`` happens mid-way;
    then everything must be applied once, and both replicas equal the source."""
    src = Source(pg_conn)
    group = BridgeGroup(pg.dsn, src.slot, src.pub, tmp_path)
    writer = Writer(pg.dsn, src.notes)
    group.start()
    try:
        wait_for(lambda: slot_holder(pg_conn, src.slot) is not None, timeout=30, what="a master")
        writer.thread.start()
        time.sleep(0.5)
        before = group.held()
        if case == "replica":
            group.kill_replica(101)  # SIGKILL mid-stream, then the same node again
            time.sleep(0.3)
            group.start_replica(101)
        else:  # the whole group: every member stops, then all start again
            group.stop_members()
            time.sleep(0.3)
            for node in (1, 2, 3):
                group.start_member(node)
        wait_for(lambda: group.held() > before, timeout=30, what="the replicas to move on")
        time.sleep(0.3)
        peers = [a for p in group.member_ports for a in ("--peer", f"127.0.0.1:{p}")]
        shown: list[str] = []

        def status_shows_the_group() -> bool:
            done = subprocess.run(
                [sys.executable, "-m", "pglogrepl_bridge", "status", *peers],
                env=group.env, capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            assert done.returncode == 0, done.stderr
            shown.append(done.stdout)
            # the "master" column, and one member (between elections, none may say so)
            return done.stdout.count("master") >= 2 and "replica" in done.stdout

        wait_for(status_shows_the_group, timeout=30, what="status --peer to show the group")
        assert "standby" in shown[-1]
        _finish(writer, pg_conn, src.slot)
    finally:
        writer.done.set()
        group.close()
    for url in group.targets.values():
        assert assert_same(pg.dsn, url, src.notes, "k") > 10


def test_a_replica_killed_and_restarted_mid_stream(
    pg: PostgresServer, pg_conn: Conn, tmp_path: Path
) -> None:
    _run_group_case(pg, pg_conn, tmp_path, "replica")


def test_the_whole_group_restarted_while_the_replicas_stay(
    pg: PostgresServer, pg_conn: Conn, tmp_path: Path
) -> None:
    """Terms start again at 1; replicas forget a term with their last connection (R4), so
    the new group's master feeds them."""
    _run_group_case(pg, pg_conn, tmp_path, "group")
