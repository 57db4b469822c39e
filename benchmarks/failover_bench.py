"""Bridge group benchmark: takeover time after ``kill -9`` of the master, and steady
throughput of a three-member group against a single bridge.

    .venv/bin/python benchmarks/failover_bench.py            # 20 kills, 2,000 transactions
    .venv/bin/python benchmarks/failover_bench.py --kills 3 --transactions 200   # quick

Everything on loopback, started here: an embedded PostgreSQL, two ``replica`` processes
(SQLite targets), three ``bridge --peer`` members (or one plain bridge), ``--ack-quorum 2``,
``--payload bincode``.

Takeover: a writer commits a one-row transaction every 5 ms; the master (found by the
``application_name`` of the walsender holding the slot) is killed with SIGKILL; the gap is
the time from the kill until both replicas hold a transaction committed after it. The
killed member is started again before the next round, so the group stays at three.

Throughput: 2,000 transactions of 100 changes are committed first, then the bridge (group
or single) starts; the time from the moment a master holds the slot until both replicas
hold everything (durably, in their targets), same server, alternating, 3 rounds each.
"""

from __future__ import annotations

import argparse
import os
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psycopg

from pglogrepl_bridge.lsn import Lsn
from pglogrepl_bridge.sinks.sql import CHECKPOINT_TABLE
from pglogrepl_bridge.testing.postgres import find_bindirs, postgres_server

PY = sys.executable
REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(REPO)}
Conn = psycopg.Connection[tuple[object, ...]]


def ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    found = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return found


def confirmed(conn: Conn, slot: str) -> int:
    row = conn.execute(
        "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = %s", (slot,)
    ).fetchone()
    return int(Lsn.parse(str(row[0]))) if row and row[0] else 0


def holder(conn: Conn, slot: str) -> str | None:
    row = conn.execute(
        "SELECT a.application_name FROM pg_replication_slots s "
        "JOIN pg_stat_activity a ON a.pid = s.active_pid WHERE s.slot_name = %s",
        (slot,),
    ).fetchone()
    return None if row is None else str(row[0])


def wal(conn: Conn) -> int:
    row = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
    assert row is not None
    return int(Lsn.parse(str(row[0])))


class Cluster:
    """Two replicas and the members of one group (or one plain bridge) on a slot."""

    def __init__(self, dsn: str, slot: str, tmp: Path, members: int) -> None:
        self.dsn, self.slot, self.tmp = dsn, slot, tmp
        self.replica_ports = ports(2)
        self.member_ports = ports(members)
        self.replicas = [
            subprocess.Popen(
                [
                    PY,
                    "-m",
                    "pglogrepl_bridge",
                    "replica",
                    "--node-id",
                    str(101 + i),
                    "--listen",
                    f"127.0.0.1:{p}",
                    "--target",
                    f"sqlite:///{tmp}/r{i}.db",
                ],
                env=ENV,
                stderr=subprocess.DEVNULL,
            )
            for i, p in enumerate(self.replica_ports)
        ]
        self.members: dict[int, subprocess.Popen[bytes]] = {}
        for i in range(members):
            self.start(i)

    def start(self, i: int) -> None:
        reps = [a for p in self.replica_ports for a in ("--replica", f"127.0.0.1:{p}")]
        group: list[str] = []
        if len(self.member_ports) > 1:
            group = ["--listen", f"127.0.0.1:{self.member_ports[i]}"] + [
                a
                for j, p in enumerate(self.member_ports)
                if j != i
                for a in ("--peer", f"127.0.0.1:{p}")
            ]
        self.members[i] = subprocess.Popen(
            [PY, "-m", "pglogrepl_bridge", "bridge", "--dsn",
             f"{self.dsn} application_name=member{i}", "--slot", self.slot, "-p", "fo_pub",
             "--node-id", str(i + 1), *group, *reps, "--ack-quorum", "2", "--payload", "bincode"],
            env=ENV, stderr=subprocess.DEVNULL,
        )  # fmt: skip

    def held(self) -> int:
        """What both replicas hold (their positions, committed with their rows)."""
        low = []
        for i in range(len(self.replicas)):
            try:
                with sqlite3.connect(f"file:{self.tmp}/r{i}.db?mode=ro", uri=True) as db:
                    query = f"SELECT end_lsn FROM {CHECKPOINT_TABLE} WHERE source_id = 'replica'"
                    row = db.execute(query).fetchone()
            except sqlite3.Error:
                return 0
            low.append(int(row[0]) if row else 0)
        return min(low)

    def close(self) -> None:
        procs = [*self.members.values(), *self.replicas]
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()


def wait(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.002)


def takeovers(dsn: str, conn: Conn, tmp: Path, kills: int) -> list[float]:
    conn.execute("SELECT pg_create_logical_replication_slot('fo_takeover', 'pgoutput')")
    (tmp / "takeover").mkdir()
    cluster = Cluster(dsn, "fo_takeover", tmp / "takeover", 3)
    stop = threading.Event()
    committed: list[tuple[float, int]] = []  # (time, end LSN of a commit)

    def writer() -> None:
        with psycopg.connect(dsn, autocommit=True) as w:
            n = 0
            while not stop.is_set():
                n += 1
                w.execute("INSERT INTO fo_t VALUES (%s, 'x') ON CONFLICT (id) DO UPDATE "
                          "SET v = excluded.v || 'y'", (n % 5000,))  # fmt: skip
                committed.append((time.monotonic(), wal(w)))
                time.sleep(0.005)

    gaps = []
    thread = threading.Thread(target=writer, daemon=True)
    try:
        wait(lambda: holder(conn, "fo_takeover") is not None, 30, "a first master")
        thread.start()
        for _ in range(kills):
            time.sleep(1.0)
            first = holder(conn, "fo_takeover")
            assert first is not None
            i = int(first.removeprefix("member"))
            cluster.members[i].kill()
            killed = time.monotonic()
            after = wal(conn)

            # the first transaction committed after the kill, held by both replicas
            def written(k: float = killed) -> bool:
                return any(t > k for t, _ in committed[-50:])

            wait(written, 10, "a commit")
            target = max(next(lsn for t, lsn in committed if t > killed), after)

            def held(want: int = target) -> bool:
                return cluster.held() >= want

            wait(held, 30, "the takeover")
            gaps.append(time.monotonic() - killed)
            cluster.members[i].wait()
            cluster.start(i)
            print(f"  takeover {len(gaps)}: {gaps[-1] * 1000:.0f} ms", flush=True)
    finally:
        stop.set()
        thread.join(timeout=5)
        cluster.close()
    return gaps


def throughput(dsn: str, conn: Conn, tmp: Path, members: int, rnd: int, txns: int) -> float:
    slot = f"fo_tp_{members}_{rnd}"
    conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (slot,))
    base = (rnd * 10 + members) * 1_000_000
    for t in range(txns):
        with conn.transaction():
            conn.execute(
                "INSERT INTO fo_t SELECT g, 'v ' || g FROM generate_series(%s::int, %s::int) g",
                (base + t * 100, base + t * 100 + 99),
            )
    end = wal(conn)
    d = tmp / slot
    d.mkdir()
    cluster = Cluster(dsn, slot, d, members)
    try:  # from the moment a master streams: the election and start-up are not throughput
        wait(lambda: holder(conn, slot) is not None, 60, "a master")
        started = time.monotonic()
        wait(lambda: cluster.held() >= end, 300, "the replicas to hold everything")
        return time.monotonic() - started
    finally:
        cluster.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--transactions", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    version = max(find_bindirs())
    tmp = Path(tempfile.mkdtemp(prefix="pglb-failover-"))
    with postgres_server(version) as pg, psycopg.connect(pg.dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE fo_t (id int PRIMARY KEY, v text)")
        conn.execute("CREATE PUBLICATION fo_pub FOR TABLE fo_t")
        print(f"PostgreSQL {pg.version}; takeover after kill -9 of the master, {args.kills}x")
        gaps = takeovers(pg.dsn, conn, tmp, args.kills)
        print(
            f"takeover: median {statistics.median(gaps) * 1000:.0f} ms, "
            f"worst {max(gaps) * 1000:.0f} ms, best {min(gaps) * 1000:.0f} ms"
        )
        single, group = [], []
        for r in range(args.rounds):
            single.append(throughput(pg.dsn, conn, tmp, 1, r, args.transactions))
            group.append(throughput(pg.dsn, conn, tmp, 3, r, args.transactions))
            print(f"  round {r + 1}: single {single[-1]:.2f}s, group of 3 {group[-1]:.2f}s")
        s, g = statistics.median(single), statistics.median(group)
        print(
            f"throughput, {args.transactions} transactions of 100 changes to two replicas: "
            f"single bridge {s:.2f}s, group of three {g:.2f}s (ratio {g / s:.2f})"
        )


if __name__ == "__main__":
    main()
