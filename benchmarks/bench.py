"""End-to-end benchmark against pg_recvlogical, same rounds, same server, same WAL.

    .venv/bin/python benchmarks/bench.py                  # 200k changes, PostgreSQL 15, 3 rounds
    .venv/bin/python benchmarks/bench.py --smoke          # tiny, checks only (CI runs this)
    .venv/bin/python benchmarks/bench.py --memory         # 1M-row transaction, peak RSS
    .venv/bin/python benchmarks/bench.py --nats           # also publish into R1 and R3 streams
    .venv/bin/python benchmarks/bench.py --pin            # server on CPU 0, clients on CPU 1
    .venv/bin/python benchmarks/bench.py --socket unix    # the tools over the Unix-domain socket

Builds the workload on the embedded PostgreSQL after creating one slot per (round, tool), finds
the exact end LSN of the final commit, then times each tool round-robin, each on its own slot
(all use pgoutput proto_version 1, text format, no streaming, to compare like with like). For
each: the median wall time, the median same-round ratio to pg_recvlogical, walsender CPU
seconds, client CPU seconds and peak RSS. Every run is checked: the slot is confirmed to the
end and the counts match.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

import pglogrepl_bridge
from pglogrepl_bridge.lsn import Lsn
from pglogrepl_bridge.pgoutput import _accel as accel
from pglogrepl_bridge.postgres import admin
from pglogrepl_bridge.testing.postgres import PostgresServer, find_bindirs, postgres_server

HERE = Path(__file__).resolve().parent
PY = sys.executable
WIDE_COLS = 20  # plus the key: a 21-column table
ROWS_PER_TXN = 100  # 60 inserts, 25 updates, 15 deletes


@dataclass
class Run:
    wall: float
    walsender_cpu: float
    client_cpu: float
    peak_rss_mb: float


@dataclass
class Tool:
    name: str
    command: Callable[[str, str, Lsn, Path], list[str]]
    check: Callable[[subprocess.CompletedProcess[str], Path], None] = lambda r, d: None
    runs: list[Run] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)


def narrow_changes(conn: psycopg.Connection[tuple[object, ...]], base: int) -> None:
    """One transaction's changes to ``narrow`` (both workloads): 60 inserts from ``base``,
    25 updates, 15 deletes."""
    conn.execute(
        "INSERT INTO narrow SELECT g, 'value ' || g, g FROM generate_series(%s::int, %s::int) g",
        (base, base + 59),
    )
    conn.execute("UPDATE narrow SET n = n + 1 WHERE id >= %s AND id < %s", (base, base + 25))
    conn.execute("DELETE FROM narrow WHERE id >= %s AND id < %s", (base + 45, base + 60))


def workload(
    conn: psycopg.Connection[tuple[object, ...]], changes: int, *, wide: bool = True
) -> tuple[int, int]:
    """Inserts, updates and deletes in transactions of 100 changes (60, 25, 15), alternating
    a narrow and a wide table (narrow only with ``wide=False``); returns (transactions,
    changes). The publication is ``bench_pub``."""
    wide_cols = ", ".join(f"c{i} text" for i in range(WIDE_COLS))
    conn.execute("CREATE TABLE narrow (id int PRIMARY KEY, v text, n int)")
    conn.execute(f"CREATE TABLE wide (id int PRIMARY KEY, {wide_cols})")
    conn.execute("CREATE PUBLICATION bench_pub FOR TABLE narrow, wide")
    txns = max(1, changes // ROWS_PER_TXN)
    values = ", ".join(f"'value {i} ' || g" for i in range(WIDE_COLS))
    for t in range(txns):
        table_is_wide = wide and t % 2 == 1
        base = t * 60
        with conn.transaction():
            if table_is_wide:
                conn.execute(
                    f"INSERT INTO wide SELECT g, {values} FROM generate_series(%s::int, %s::int) g",
                    (base, base + 59),
                )
                conn.execute(
                    "UPDATE wide SET c0 = c0 || '!' WHERE id >= %s AND id < %s", (base, base + 25)
                )
                conn.execute("DELETE FROM wide WHERE id >= %s AND id < %s", (base + 45, base + 60))
            else:
                narrow_changes(conn, base)
    return txns, txns * ROWS_PER_TXN


#: The realistic wide table: the types real schemas carry, NULLs in a fifth of the values
#: (every column but the key), a TOASTed text in one row in ten.
REAL_COLUMNS = {
    "doc": (
        "jsonb",
        "jsonb_build_object('id', g, 'tags', jsonb_build_array('a', 'b'), "
        "'price', g * 1.5, 'name', 'item ' || g)",
    ),
    "raw_json": ("json", "json_build_object('g', g, 'ok', g % 2 = 0)"),
    "addr": ("inet", "('10.' || (g % 250) || '.' || (g % 200) || '.' || (g % 100))::inet"),
    "net": ("cidr", "('10.' || (g % 250) || '.0.0/16')::cidr"),
    "ints": ("int[]", "ARRAY[g, g + 1, g + 2]"),
    "words": ("text[]", "ARRAY['red', 'grün ' || g]"),
    "span": ("interval", "make_interval(hours => g % 48, mins => g % 60)"),
    "amount": ("numeric(12, 2)", "(g * 3.14159)::numeric(12, 2)"),
    "at": ("timestamptz", "timestamptz '2026-01-01 00:00:00+00' + g * interval '1 minute'"),
    "day": ("date", "date '2026-01-01' + (g % 365)"),
    "clock": ("time", "time '00:00' + g * interval '1 second'"),
    "uid": ("uuid", "md5(g::text)::uuid"),
    "blob": ("bytea", "decode(md5(g::text), 'hex')"),
    "flag": ("bool", "g % 3 = 0"),
    "ratio": ("float8", "g / 7.0"),
    "code": ("varchar(32)", "'code-' || g"),
    "note": ("text", "'naïve café ' || g || ' ✓'"),
    "big": ("text", "CASE WHEN g % 10 = 0 THEN repeat('toast ' || g, 800) ELSE 'small' END"),
}


def realistic_workload(
    conn: psycopg.Connection[tuple[object, ...]], changes: int
) -> tuple[int, int]:
    """The same shape as ``workload`` (transactions of 60 inserts, 25 updates and 15
    deletes, alternating tables), but the wide table is ``real``: jsonb, json, inet, cidr,
    arrays, interval, numeric, timestamptz, date, time, uuid, bytea, bool, float8, varchar,
    non-ASCII text and a TOASTed text, with NULLs. Updates leave the TOASTed column alone.
    The publication is ``bench_pub``."""
    cols = ", ".join(f"{name} {type_}" for name, (type_, _) in REAL_COLUMNS.items())
    conn.execute("CREATE TABLE narrow (id int PRIMARY KEY, v text, n int)")
    conn.execute(f"CREATE TABLE real (id int PRIMARY KEY, {cols})")
    conn.execute("CREATE PUBLICATION bench_pub FOR TABLE narrow, real")
    values = ", ".join(
        f"CASE WHEN (g + {i}) % 5 = 0 THEN NULL ELSE {expr} END"
        for i, (_, expr) in enumerate(REAL_COLUMNS.values())
    ).replace("%", "%%")  # the statement has parameters: a literal % is written %%
    txns = max(1, changes // ROWS_PER_TXN)
    for t in range(txns):
        base = t * 60
        with conn.transaction():
            if t % 2 == 1:
                conn.execute(
                    f"INSERT INTO real SELECT g, {values} FROM generate_series(%s::int, %s::int) g",
                    (base, base + 59),
                )
                conn.execute(
                    "UPDATE real SET amount = amount + 1, doc = doc || '{\"seen\": true}' "
                    "WHERE id >= %s AND id < %s",
                    (base, base + 25),
                )
                conn.execute("DELETE FROM real WHERE id >= %s AND id < %s", (base + 45, base + 60))
            else:
                narrow_changes(conn, base)
    return txns, txns * ROWS_PER_TXN


def final_commit_end(conn: psycopg.Connection[tuple[object, ...]], slot: str) -> Lsn:
    end = admin.last_commit_lsn(conn, slot, ("bench_pub",))
    assert end is not None
    return end


def sampler(
    dsn: str, slot: str, client: int, stop: threading.Event, cpu: list[float], rss: list[int]
) -> None:
    """Poll the walsender's CPU time and the client's resident memory (/proc) while they run.

    RSS is sampled rather than taken from wait4: a child's ru_maxrss counts the parent's pages
    it carried between fork and exec.
    """
    tick = os.sysconf("SC_CLK_TCK")
    with psycopg.connect(dsn, autocommit=True) as conn:
        pid = None
        while not stop.is_set():
            if pid is None:
                row = conn.execute(
                    "SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s", (slot,)
                ).fetchone()
                pid = row[0] if row else None
            if pid is not None:
                with contextlib.suppress(OSError, IndexError, ValueError):
                    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                    cpu.append((int(fields[11]) + int(fields[12])) / tick)
            with contextlib.suppress(OSError, ValueError, IndexError):
                for line in Path(f"/proc/{client}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        rss.append(int(line.split()[1]))
            stop.wait(0.02)


def timed(
    cmd: list[str], dsn: str, slot: str, stdout: int | None
) -> tuple[subprocess.CompletedProcess[str], Run]:
    stop = threading.Event()
    cpu: list[float] = []
    rss: list[int] = []
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=stdout, stderr=subprocess.PIPE, text=True)
    watcher = threading.Thread(target=sampler, args=(dsn, slot, proc.pid, stop, cpu, rss))
    watcher.start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    stop.set()
    watcher.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    stderr = proc.stderr.read() if proc.stderr else ""
    result = subprocess.CompletedProcess(cmd, proc.returncode, "", stderr)
    if result.returncode != 0:
        raise SystemExit(f"{cmd[0:3]} failed ({result.returncode}):\n{stderr[-2000:]}")
    run = Run(
        wall, max(cpu, default=0.0), usage.ru_utime + usage.ru_stime, max(rss, default=0) / 1024
    )
    return result, run


def start_replica() -> tuple[subprocess.Popen[str], int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [PY, str(HERE / "replica_process.py"), str(port)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    return proc, port


def confirmed(conn: psycopg.Connection[tuple[object, ...]], slot: str) -> Lsn:
    row = conn.execute(
        "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = %s", (slot,)
    ).fetchone()
    assert row is not None and row[0] is not None
    return Lsn.parse(row[0])


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--changes", type=int, default=200_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--version", type=int, default=15)
    ap.add_argument("--smoke", action="store_true", help="2,000 changes, 1 round: checks only")
    ap.add_argument("--memory", action="store_true", help="the 1M-row transaction RSS check")
    ap.add_argument(
        "--workload",
        choices=["basic", "realistic"],
        default="basic",
        help="basic: a narrow and a 21-column text table (the figures since the first "
        "session); realistic: the narrow table and one with the types real schemas carry",
    )
    ap.add_argument(
        "--baseline",
        metavar="PYTHON",
        help="also time another install's commands in the same rounds (e.g. a checkout of the "
        "previous commit with its own venv): before/after figures under the same noise",
    )
    ap.add_argument(
        "--pin",
        action="store_true",
        help="the source server's processes (the walsender among them) on CPU 0, the clients "
        "on CPU 1: the two sides on separate cores, as issue 19 measured (unpinned by default)",
    )
    ap.add_argument(
        "--socket",
        choices=["tcp", "unix"],
        default="tcp",
        help="how the tools reach the source: TCP on loopback (the figures since the first "
        "session) or the cluster's Unix-domain socket, as a local client does by default",
    )
    ap.add_argument(
        "--nats",
        action="store_true",
        help="also time publish into an R1 and an R3 JetStream stream, on a three-node NATS "
        "cluster started on loopback (one message per transaction)",
    )
    args = ap.parse_args()
    if args.smoke:
        args.changes, args.rounds = 2_000, 1
    versions = find_bindirs()
    version = args.version if args.version in versions else max(versions)
    with postgres_server(version) as pg:
        if args.pin:
            pin_apart(pg)
        if args.memory:
            memory_check(pg, 200_000 if args.smoke else 1_000_000)
        else:
            with contextlib.ExitStack() as stack:
                urls = None
                if args.nats:
                    from pglogrepl_bridge.testing.nats import nats_cluster

                    urls = stack.enter_context(nats_cluster(3)).urls
                compare(
                    pg, args.changes, args.rounds, versions[version], args.baseline,
                    args.workload, urls, args.socket,
                )  # fmt: skip


def pin_apart(pg: PostgresServer) -> None:
    """The server's postmaster and its processes on CPU 0 (backends forked later inherit it),
    this process and everything it starts on CPU 1. A PostgreSQL target database lives on the
    same server, so its backend shares CPU 0 with the walsender."""
    if len(os.sched_getaffinity(0)) < 2:
        raise SystemExit("--pin needs two CPUs")
    with psycopg.connect(pg.dsn, autocommit=True) as conn:
        backend = conn.execute("SELECT pg_backend_pid()").fetchone()[0]  # type: ignore[index]
    postmaster = int(Path(f"/proc/{backend}/stat").read_text().rsplit(")", 1)[1].split()[1])
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError, ValueError, IndexError):
            if entry.name.isdigit():
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                if int(entry.name) == postmaster or ppid == postmaster:
                    os.sched_setaffinity(int(entry.name), {0})
    os.sched_setaffinity(0, {1})
    print(f"pinned: server (postmaster {postmaster}) on CPU 0, clients on CPU 1", flush=True)


def precompile(baseline: str | None = None) -> None:
    """Write the package's bytecode, as a regular pip install does: an editable install run
    with PYTHONDONTWRITEBYTECODE set (as on some CI hosts) would compile every module from
    source on every start (~70 ms). The baseline's install too, so that both start alike."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    package = Path(pglogrepl_bridge.__file__).parent
    subprocess.run([PY, "-m", "compileall", "-q", str(package)], check=True, env=env)
    if baseline is not None:
        where = "import os, pglogrepl_bridge as p; print(os.path.dirname(p.__file__))"
        found = subprocess.run(
            [baseline, "-P", "-c", where], check=True, capture_output=True, text=True, cwd="/"
        ).stdout.strip()
        subprocess.run([baseline, "-m", "compileall", "-q", found], check=True, env=env)


def compare(
    pg: PostgresServer,
    changes: int,
    rounds: int,
    bindir: Path,
    baseline: str | None = None,
    kind: str = "basic",
    nats_urls: list[str] | None = None,
    over: str = "tcp",
) -> None:
    precompile(baseline)
    source = pg.unix_dsn if over == "unix" else pg.dsn
    if source is None:
        raise SystemExit("--socket unix needs a local cluster (not an external server)")
    built = "built" if accel.json_row is not None else "NOT built (pure Python)"
    print(f"C accelerator: {built}", flush=True)
    common = ["--proto-version", "1", "--no-streaming"]
    tables = ("narrow", "real" if kind == "realistic" else "wide")
    tmp = Path(tempfile.mkdtemp(prefix="pglb-bench-"))
    replicas: list[subprocess.Popen[str]] = []
    ports: list[int] = []
    before_ports: list[int] = []  # the baseline's bridge gets a replica of its own

    def ours(*extra: str, python: str = PY) -> Callable[[str, str, Lsn, Path], list[str]]:
        # -P: the baseline must not import this checkout's package from the working directory
        isolate = ["-P"] if python != PY else []
        return lambda dsn, slot, end, d: [
            python,
            *isolate,
            "-m",
            "pglogrepl_bridge",
            *extra,
            "--dsn",
            dsn,
            "--slot",
            slot,
            "--publication",
            "bench_pub",
            *common,
            "--until-lsn",
            str(end),
        ]

    def count_lines(result: subprocess.CompletedProcess[str], d: Path) -> None:
        lines = len((d / "out.jsonl").read_text().splitlines())
        assert lines == txns, f"jsonl lines {lines} != {txns}"

    def count_rows(result: subprocess.CompletedProcess[str], d: Path) -> None:
        with sqlite3.connect(d / "target.db") as db:
            rows = sum(db.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in tables)
        assert rows == expected_rows, f"sqlite rows {rows} != {expected_rows}"

    info = psycopg.conninfo.conninfo_to_dict(pg.dsn)

    def pg_target(d: Path) -> str:
        """A database of its own on the source's server (made with the slots): d.name."""
        return (
            f"postgresql+psycopg://{info['user']}:{info['password']}@{info['host']}:"
            f"{info['port']}/{d.name}"
        )

    def digest(db: psycopg.Connection[tuple[object, ...]]) -> list[object]:
        """Each table's rows as text, in key order, hashed: the target has the source's
        column types, so equal contents print equal."""
        query = "SELECT count(*), md5(string_agg(t::text, '|' ORDER BY id)) FROM {} t"
        return [db.execute(query.format(t)).fetchone() for t in tables]

    def count_pg_rows(result: subprocess.CompletedProcess[str], d: Path) -> None:
        with psycopg.connect(pg.dsn.replace("dbname=postgres", f"dbname={d.name}")) as db:
            got = digest(db)
        rows = sum(int(n) for n, _ in got)  # type: ignore[call-overload,misc]
        assert rows == expected_rows, f"postgresql rows {rows} != {expected_rows}"
        assert got == source_digest, "the PostgreSQL target's rows differ from the source's"

    def into_sqlite(*extra: str, python: str = PY) -> Callable[[str, str, Lsn, Path], list[str]]:
        """``replicate`` into a SQLite file of the run's own."""
        return lambda dsn, slot, end, d: [
            *ours("replicate", "--target", f"sqlite:///{d / 'target.db'}", "--snapshot",
                  "never", *extra, python=python)(dsn, slot, end, d)
        ]  # fmt: skip

    def into_postgres(*extra: str, python: str = PY) -> Callable[[str, str, Lsn, Path], list[str]]:
        """``replicate`` into a PostgreSQL database of the run's own (``pg_target``)."""
        return lambda dsn, slot, end, d: [
            *ours("replicate", "--target", pg_target(d), "--snapshot", "never", *extra,
                  python=python)(dsn, slot, end, d)
        ]  # fmt: skip

    def count_entries(result: subprocess.CompletedProcess[str], d: Path) -> None:
        assert f"({txns} WalEntries)" in result.stderr, result.stderr[-500:]

    tools = [
        Tool(
            "pg_recvlogical",
            lambda dsn, slot, end, d: [
                str(bindir / "pg_recvlogical"),
                "-d",
                dsn,
                "--slot",
                slot,
                "--start",
                "--endpos",
                str(end),
                "-f",
                "/dev/null",
                "-o",
                "proto_version=1",
                "-o",
                "publication_names=bench_pub",
                "--no-loop",
            ],
        ),
        Tool("tail --format null", ours("tail", "--format", "null")),
        Tool(
            "tail --format jsonl",
            lambda dsn, slot, end, d: [*ours("tail", "--format", "jsonl")(dsn, slot, end, d)],
            count_lines,
        ),
        Tool(
            "bridge --payload bincode",
            lambda dsn, slot, end, d: [
                *ours("bridge", "--payload", "bincode", "--replica", f"127.0.0.1:{ports[-1]}")(
                    dsn, slot, end, d
                )
            ],
            count_entries,
        ),
        Tool("replicate into SQLite", into_sqlite(), count_rows),
        Tool("replicate into PostgreSQL", into_postgres(), count_pg_rows),
        # every change written, in stream order: the figures before batches were reduced to
        # one net change per row (this workload's updates and deletes all hit rows its own
        # batch inserted, so reduced they cost the target nothing)
        Tool("replicate --no-reduce into SQLite", into_sqlite("--no-reduce"), count_rows),
        Tool("replicate --no-reduce into PostgreSQL", into_postgres("--no-reduce"), count_pg_rows),
    ]

    def count_published(result: subprocess.CompletedProcess[str], d: Path) -> None:
        assert f"published {txns} transactions" in result.stderr, result.stderr[-500:]

    def publish(replicas: int) -> Callable[[str, str, Lsn, Path], list[str]]:
        servers = [a for url in nats_urls or () for a in ("--nats", url)]
        return lambda dsn, slot, end, d: [
            *ours("publish", *servers, "--stream", f"B_{slot}", "--subject-prefix",
                  f"bench.{slot}", "--replicas", str(replicas))(dsn, slot, end, d)
        ]  # fmt: skip

    if nats_urls:
        tools += [
            Tool("publish, R1 stream", publish(1), count_published),
            Tool("publish, R3 stream", publish(3), count_published),
        ]
    if baseline is not None:
        tools += [
            Tool("before: tail --format null", ours("tail", "--format", "null", python=baseline)),
            Tool(
                "before: tail --format jsonl",
                ours("tail", "--format", "jsonl", python=baseline),
                count_lines,
            ),
            Tool(
                "before: bridge --payload bincode",
                lambda dsn, slot, end, d: [
                    *ours(
                        "bridge",
                        "--payload",
                        "bincode",
                        "--replica",
                        f"127.0.0.1:{before_ports[-1]}",
                        python=baseline,
                    )(dsn, slot, end, d)
                ],
                count_entries,
            ),
            Tool("before: replicate into SQLite", into_sqlite(python=baseline), count_rows),
            Tool(
                "before: replicate into PostgreSQL", into_postgres(python=baseline), count_pg_rows
            ),
        ]
    with psycopg.connect(pg.dsn, autocommit=True) as conn:
        for r in range(rounds):
            for i in range(len(tools)):
                conn.execute(
                    "SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (f"bench_{r}_{i}",)
                )
                if "PostgreSQL" in tools[i].name:  # its target database
                    conn.execute(f"CREATE DATABASE bench_{r}_{i}")
        started = time.perf_counter()
        if kind == "realistic":
            txns, total = realistic_workload(conn, changes)
        else:
            txns, total = workload(conn, changes)
        end = final_commit_end(conn, "bench_0_0")
        expected_rows = sum(
            conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0]  # type: ignore[index]
            for t in tables
        )
        source_digest = digest(conn)
        print(
            f"PostgreSQL {pg.version}: {total:,} changes in {txns:,} transactions "
            f"(built in {time.perf_counter() - started:.1f}s); final commit ends at {end}"
        )
        for r in range(rounds):
            replica, port = start_replica()  # a fresh replica each round: it applies it all
            replicas.append(replica)
            ports.append(port)
            if baseline is not None:
                replica, port = start_replica()
                replicas.append(replica)
                before_ports.append(port)
            base = None
            for i, tool in enumerate(tools):
                slot = f"bench_{r}_{i}"
                d = tmp / slot
                d.mkdir()
                with open(d / "out.jsonl", "w") as out:
                    sink = out.fileno() if tool.name.endswith("jsonl") else subprocess.DEVNULL
                    result, run = timed(tool.command(source, slot, end, d), pg.dsn, slot, sink)
                tool.check(result, d)
                assert confirmed(conn, slot) >= end, f"{tool.name}: slot not confirmed to end"
                tool.runs.append(run)
                base = base or run.wall
                tool.ratios.append(run.wall / base)
            print(f"round {r + 1}: " + ", ".join(f"{t.name} {t.runs[-1].wall:.2f}s" for t in tools))
    for replica in replicas:
        replica.terminate()
    print()
    print(
        f"{'tool':38} {'median s':>9} {'ratio':>6} {'walsender cpu s':>16} "
        f"{'client cpu s':>13} {'peak RSS MB':>12}"
    )
    for t in tools:
        print(
            f"{t.name:38} {statistics.median(r.wall for r in t.runs):9.2f} "
            f"{statistics.median(t.ratios):6.2f} "
            f"{statistics.median(r.walsender_cpu for r in t.runs):16.2f} "
            f"{statistics.median(r.client_cpu for r in t.runs):13.2f} "
            f"{max(r.peak_rss_mb for r in t.runs):12.0f}"
        )
    print(
        "checks: every slot confirmed to the final commit; jsonl lines, WalEntries and "
        "SQLite rows match the source; PostgreSQL targets hold the source's rows"
    )


def memory_check(pg: PostgresServer, rows: int) -> None:
    """One transaction of ``rows`` inserts, streamed (protocol 2+), through tail --format null."""
    with psycopg.connect(pg.dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE big (id int PRIMARY KEY, v text)")
        conn.execute("CREATE PUBLICATION bench_pub FOR TABLE big")
        conn.execute("SELECT pg_create_logical_replication_slot('mem', 'pgoutput')")
        conn.execute("INSERT INTO big SELECT g, 'row ' || g FROM generate_series(1, %s) g", (rows,))
        end = final_commit_end(conn, "mem")
    cmd = [
        PY,
        "-m",
        "pglogrepl_bridge",
        "tail",
        "--format",
        "null",
        "--dsn",
        pg.dsn,
        "--slot",
        "mem",
        "--publication",
        "bench_pub",
        "--streaming",
        "--until-lsn",
        str(end),
    ]
    _, run = timed(cmd, pg.dsn, "mem", subprocess.DEVNULL)
    with psycopg.connect(pg.dsn, autocommit=True) as conn:
        assert confirmed(conn, "mem") >= end
    print(
        f"{rows:,}-row transaction, streamed, tail --format null: {run.wall:.1f}s, "
        f"peak RSS {run.peak_rss_mb:.0f} MB (target < 200 MB)"
    )


if __name__ == "__main__":
    main()
