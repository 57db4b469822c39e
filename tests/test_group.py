"""A bridge group: three ``bridge --peer`` processes, two ``replica`` processes, real
PostgreSQL, loopback. ``kill -9`` the master mid-workload: another member wins the election,
fences the slot and carries on; both replicas end equal to the source, every transaction
applied once. Throughout, the slot's confirmed position never passes what both replicas
(``--ack-quorum 2``) hold.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa

from pglogrepl_bridge.lsn import Lsn
from pglogrepl_bridge.sinks.replica import REPLICA_SOURCE
from pglogrepl_bridge.sinks.sql import CHECKPOINT_TABLE
from pglogrepl_bridge.testing.postgres import PostgresServer

from .streamkit import Conn, wait_for
from .test_replicate import Source, assert_same

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _position(url: str, node_id: int) -> int | None:
    """A replica's applied position (None: not readable at this instant)."""
    engine = sa.create_engine(url)
    try:
        with engine.connect() as c:
            query = f"SELECT end_lsn FROM {CHECKPOINT_TABLE} WHERE source_id = :s AND slot = :n"
            row = c.execute(sa.text(query), {"s": REPLICA_SOURCE, "n": f"node-{node_id}"}).first()
    except sa.exc.OperationalError:
        return None  # not created yet, or locked by the replica's write
    finally:
        engine.dispose()
    return 0 if row is None else int(row[0])


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


def _holder(conn: Conn, slot: str) -> str | None:
    row = conn.execute(
        "SELECT a.application_name FROM pg_replication_slots s "
        "JOIN pg_stat_activity a ON a.pid = s.active_pid WHERE s.slot_name = %s",
        (slot,),
    ).fetchone()
    return None if row is None else str(row[0])


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
    member_ports, replica_ports, metrics_ports = _free_ports(3), _free_ports(2), _free_ports(3)
    targets = {101 + i: f"sqlite:///{tmp_path}/replica{i}.db" for i in range(2)}
    replicas = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pglogrepl_bridge",
                "replica",
                "--node-id",
                str(node),
                "--listen",
                f"127.0.0.1:{port}",
                "--target",
                url,
            ],
            env=ENV,
            stderr=open(tmp_path / f"replica{node}.log", "w"),  # noqa: SIM115
        )
        for (node, url), port in zip(targets.items(), replica_ports, strict=True)
    ]

    def member(i: int) -> subprocess.Popen[bytes]:
        peers = [
            a for j, p in enumerate(member_ports) if j != i for a in ("--peer", f"127.0.0.1:{p}")
        ]
        reps = [a for p in replica_ports for a in ("--replica", f"127.0.0.1:{p}")]
        return subprocess.Popen(
            [sys.executable, "-m", "pglogrepl_bridge", "bridge", "--verbose",
             "--dsn", f"{pg.dsn} application_name=member{i + 1}", "--slot", src.slot,
             "-p", src.pub, "--node-id", str(i + 1), "--listen", f"127.0.0.1:{member_ports[i]}",
             *peers, *reps, "--ack-quorum", "2", "--payload", "bincode",
             "--metrics-port", str(metrics_ports[i])],
            env=ENV, stderr=open(tmp_path / f"member{i + 1}.log", "w"),
        )  # fmt: skip

    members = {i + 1: member(i) for i in range(3)}
    writer = Writer(pg.dsn, src.notes)
    violations: list[str] = []
    sampling = threading.Event()

    start = _confirmed(pg_conn, src.slot)  # where the slot was created: nothing before it

    def sample() -> None:  # the confirmed position never passes what both replicas hold
        with psycopg.connect(pg.dsn, autocommit=True) as c:
            while not sampling.is_set():
                confirmed = _confirmed(c, src.slot)
                held = [_position(url, node) for node, url in targets.items()]
                if None not in held and confirmed > max(start, min(h or 0 for h in held)):
                    violations.append(f"confirmed {confirmed:X} past a replica: {held}")
                time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    try:
        wait_for(lambda: _holder(pg_conn, src.slot) is not None, timeout=30, what="a master")
        sampler.start()
        writer.thread.start()
        time.sleep(1.0)
        first = _holder(pg_conn, src.slot)
        assert first is not None and first.startswith("member")
        victim = members[int(first.removeprefix("member"))]
        before = [_position(url, node) or 0 for node, url in targets.items()]
        if how == "kill":
            victim.kill()  # SIGKILL: no goodbye; its walsender dies with the connection
        else:
            victim.send_signal(signal.SIGSTOP)  # alive, silent, still holding the slot
        killed = time.monotonic()

        def taken_over() -> bool:
            holder = _holder(pg_conn, src.slot)
            return holder is not None and holder != first

        wait_for(taken_over, timeout=30, what="another member to take the slot")

        def resumed() -> bool:
            return all((_position(url, node) or 0) > b
                       for (node, url), b in zip(targets.items(), before, strict=True))  # fmt: skip

        wait_for(resumed, timeout=30, what="the replicas to receive from the new master")
        takeover = time.monotonic() - killed
        now = _holder(pg_conn, src.slot)
        assert now is not None
        scraped = _metrics(metrics_ports[int(now.removeprefix("member")) - 1])
        assert "pglogrepl_group_role 2.0" in scraped
        assert "pglogrepl_group_term 1.0" not in scraped  # a newer term than the first
        if how == "pause":
            victim.send_signal(signal.SIGCONT)
            log = tmp_path / f"{first}.log"
            wait_for(lambda: "follows" in log.read_text(), timeout=30,
                     what="the paused master to step down")  # fmt: skip
            assert _holder(pg_conn, src.slot) != first
        time.sleep(0.5)
        writer.stop()
        wal = pg_conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
        assert wal is not None
        end = int(Lsn.parse(wal[0]))
        wait_for(lambda: _confirmed(pg_conn, src.slot) >= end, timeout=60,
                 what="both replicas to acknowledge everything")  # fmt: skip
    finally:
        sampling.set()
        writer.done.set()
        for proc in [*members.values(), *replicas]:
            if proc.poll() is None:
                proc.terminate()
        for proc in [*members.values(), *replicas]:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    assert violations == []
    assert takeover < 10, takeover
    print(f"takeover after {how}: {takeover * 1000:.0f} ms")
    for url in targets.values():
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
    member_ports, replica_ports = _free_ports(3), _free_ports(2)
    proxies = {(i, j): Proxy(member_ports[j]) for i in range(3) for j in range(3) if i != j}
    targets = {101 + i: f"sqlite:///{tmp_path}/replica{i}.db" for i in range(2)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "pglogrepl_bridge", "replica", "--node-id", str(node),
             "--listen", f"127.0.0.1:{port}", "--target", url],
            env=ENV, stderr=subprocess.DEVNULL,
        )
        for (node, url), port in zip(targets.items(), replica_ports, strict=True)
    ]  # fmt: skip
    for i in range(3):
        peers = [
            a for j in range(3) if j != i for a in ("--peer", f"127.0.0.1:{proxies[i, j].port}")
        ]
        reps = [a for p in replica_ports for a in ("--replica", f"127.0.0.1:{p}")]
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "pglogrepl_bridge", "bridge", "--verbose",
             "--dsn", f"{pg.dsn} application_name=member{i + 1}", "--slot", src.slot,
             "-p", src.pub, "--node-id", str(i + 1), "--listen", f"127.0.0.1:{member_ports[i]}",
             *peers, *reps, "--ack-quorum", "2", "--payload", "bincode"],
            env=ENV, stderr=open(tmp_path / f"member{i + 1}.log", "w"),  # noqa: SIM115
        ))  # fmt: skip
    writer = Writer(pg.dsn, src.notes)
    holders: list[str | None] = []
    watching = threading.Event()

    def watch() -> None:  # who holds the slot, sampled; there is one slot, so one holder
        with psycopg.connect(pg.dsn, autocommit=True) as c:
            while not watching.is_set():
                holders.append(_holder(c, src.slot))
                time.sleep(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    try:
        wait_for(lambda: _holder(pg_conn, src.slot) is not None, timeout=30, what="a master")
        watcher.start()
        writer.thread.start()
        time.sleep(0.5)
        first = _holder(pg_conn, src.slot)
        assert first is not None
        m = int(first.removeprefix("member")) - 1
        for (i, j), proxy in proxies.items():
            if m in (i, j):
                proxy.sever()
        log = tmp_path / f"{first}.log"
        wait_for(lambda: "stepping down" in log.read_text(), timeout=30,
                 what="the cut-off master to step down")  # fmt: skip

        def other_holds() -> bool:
            holder = _holder(pg_conn, src.slot)
            return holder is not None and holder != first

        wait_for(other_holds, timeout=30, what="the others to elect one of theirs")
        for proxy in proxies.values():
            proxy.heal()
        time.sleep(1.0)  # rejoined: it follows, it does not take the slot back
        assert other_holds()
        writer.stop()
        wal = pg_conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
        assert wal is not None
        end = int(Lsn.parse(wal[0]))
        wait_for(lambda: _confirmed(pg_conn, src.slot) >= end, timeout=60,
                 what="both replicas to acknowledge everything")  # fmt: skip
    finally:
        watching.set()
        writer.done.set()
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        for proxy in proxies.values():
            proxy.close()
    assert "follows" in log.read_text()  # it rejoined as a standby
    # once another member held the slot, the cut-off master never took it back
    taken = next(n for n, h in enumerate(holders) if h is not None and h != first)
    assert first not in holders[taken:]
    for url in targets.values():
        assert_same(pg.dsn, url, src.notes, "k")
