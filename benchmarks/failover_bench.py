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
import statistics
import tempfile
import threading
import time
from pathlib import Path

import psycopg

from pglogrepl_bridge.lsn import Lsn
from pglogrepl_bridge.testing.group import BridgeGroup, slot_holder
from pglogrepl_bridge.testing.postgres import find_bindirs, postgres_server

Conn = psycopg.Connection[tuple[object, ...]]


def wal(conn: Conn) -> int:
    row = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
    assert row is not None
    return int(Lsn.parse(str(row[0])))


def wait(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.002)


def takeovers(dsn: str, conn: Conn, tmp: Path, kills: int) -> list[float]:
    conn.execute("SELECT pg_create_logical_replication_slot('fo_takeover', 'pgoutput')")
    (tmp / "takeover").mkdir()
    cluster = BridgeGroup(dsn, "fo_takeover", "fo_pub", tmp / "takeover")
    cluster.start()
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
        wait(lambda: slot_holder(conn, "fo_takeover") is not None, 30, "a first master")
        thread.start()
        for _ in range(kills):
            time.sleep(1.0)
            first = slot_holder(conn, "fo_takeover")
            assert first is not None
            cluster.kill(first)
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
            cluster.start_member(first)
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
    cluster = BridgeGroup(dsn, slot, "fo_pub", d, members=members)
    cluster.start()
    try:  # from the moment a master streams: the election and start-up are not throughput
        wait(lambda: slot_holder(conn, slot) is not None, 60, "a master")
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
