"""A bridge group on loopback, as processes: members (``bridge --peer``) and ``replica``
nodes with SQLite targets. The demo runs one; so can a test or a benchmark.

Which member is master is read from PostgreSQL: each member connects with
``application_name=member<N>``, and the walsender that holds the slot has the master's.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import IO, Any

import psycopg

from pglogrepl_bridge.sinks.replica import REPLICA_SOURCE
from pglogrepl_bridge.sinks.sql import CHECKPOINT_TABLE
from pglogrepl_bridge.testing.postgres import free_port

PACKAGE_ROOT = Path(__file__).resolve().parent.parent.parent


def free_ports(n: int) -> list[int]:
    """``n`` loopback ports free right now, none given out before (``free_port``)."""
    return [free_port() for _ in range(n)]


def slot_holder(conn: psycopg.Connection[Any], slot: str) -> int | None:
    """The node id of the member whose walsender holds ``slot`` (None: nobody)."""
    row = conn.execute(
        "SELECT a.application_name FROM pg_replication_slots s "
        "JOIN pg_stat_activity a ON a.pid = s.active_pid WHERE s.slot_name = %s",
        (slot,),
    ).fetchone()
    name = str(row[0]) if row is not None else ""
    return int(name.removeprefix("member")) if name.startswith("member") else None


class BridgeGroup:
    """``members`` bridges in one group and ``replicas`` replica nodes, ``--ack-quorum``
    all replicas, ``--payload bincode``; logs in ``workdir``."""

    def __init__(
        self,
        dsn: str,
        slot: str,
        publication: str,
        workdir: Path,
        *,
        members: int = 3,
        replicas: int = 2,
    ) -> None:
        self.dsn, self.slot, self.publication, self.workdir = dsn, slot, publication, workdir
        self.member_ports = free_ports(members)
        self.replica_ports = free_ports(replicas)
        self.targets = {
            101 + i: f"sqlite:///{workdir}/replica{101 + i}.db" for i in range(replicas)
        }
        self.env = {**os.environ, "PYTHONPATH": str(PACKAGE_ROOT)}
        #: more options for a member (node id -> arguments), e.g. --metrics-port, --verbose
        self.member_args: dict[int, list[str]] = {}
        #: the port member i dials to reach member j, when not j's own (a proxy between)
        self.peer_ports: dict[tuple[int, int], int] = {}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._logs: list[IO[bytes]] = []

    def _spawn(self, name: str, *args: str) -> None:
        log = open(self.workdir / f"{name}.log", "ab")  # noqa: SIM115 - closed in close()
        self._logs.append(log)
        self.procs[name] = subprocess.Popen(
            [sys.executable, "-m", "pglogrepl_bridge", *args], env=self.env, stderr=log
        )

    def start(self) -> None:
        """Start the replicas, then every member."""
        for node in self.targets:
            self.start_replica(node)
        for i in range(len(self.member_ports)):
            self.start_member(i + 1)

    def start_replica(self, node: int) -> None:
        """Start (or start again) replica ``node`` (101, 102, ...)."""
        port = self.replica_ports[node - 101]
        self._spawn(f"replica{node}", "replica", "--node-id", str(node),
                    "--listen", f"127.0.0.1:{port}", "--target", self.targets[node])  # fmt: skip

    def kill_replica(self, node: int) -> None:
        """SIGKILL replica ``node``."""
        proc = self.procs[f"replica{node}"]
        proc.kill()
        proc.wait()

    def stop_members(self) -> None:
        """SIGTERM every member and wait: the whole group goes down (replicas stay)."""
        members = [p for name, p in self.procs.items() if name.startswith("member")]
        for proc in members:
            if proc.poll() is None:
                proc.terminate()
        for proc in members:
            proc.wait(timeout=30)

    def start_member(self, node: int) -> None:
        """Start (or start again) member ``node`` (1-based)."""
        i = node - 1
        via = [self.peer_ports.get((node, j + 1), p) for j, p in enumerate(self.member_ports)
               if j != i]  # fmt: skip
        peers = [a for p in via for a in ("--peer", f"127.0.0.1:{p}")]
        reps = [a for p in self.replica_ports for a in ("--replica", f"127.0.0.1:{p}")]
        self._spawn(
            f"member{node}", "bridge", "--dsn", f"{self.dsn} application_name=member{node}",
            "--slot", self.slot, "-p", self.publication, "--node-id", str(node),
            "--listen", f"127.0.0.1:{self.member_ports[i]}", *peers, *reps,
            "--ack-quorum", str(len(self.replica_ports)), "--payload", "bincode",
            *self.member_args.get(node, []),
        )  # fmt: skip

    def kill(self, node: int) -> None:
        """SIGKILL member ``node``."""
        proc = self.procs[f"member{node}"]
        proc.kill()
        proc.wait()

    def held(self) -> int:
        """The position every replica holds (its checkpoint, committed with its rows)."""
        low = []
        for node, url in self.targets.items():
            path = url.removeprefix("sqlite:///")
            try:
                with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
                    row = db.execute(
                        f"SELECT end_lsn FROM {CHECKPOINT_TABLE} WHERE source_id = ? AND slot = ?",
                        (REPLICA_SOURCE, f"node-{node}"),
                    ).fetchone()
            except sqlite3.Error:
                return 0
            low.append(int(row[0]) if row else 0)
        return min(low)

    def report(self, lines: int = 30) -> str:
        """What a failed wait needs to be understood: each process's state and the end of
        its log (the test's temporary directory is gone by the time CI's log is read)."""
        out = []
        for name, proc in sorted(self.procs.items()):
            path = self.workdir / f"{name}.log"
            tail = path.read_text(errors="replace").splitlines()[-lines:] if path.exists() else []
            out.append(f"--- {name} (exit {proc.poll()}) ---")
            out.extend(tail)
        return "\n".join(out)

    def close(self) -> None:
        """Stop every process (SIGTERM, then SIGKILL) and close the logs."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        for log in self._logs:
            log.close()
