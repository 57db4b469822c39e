"""Snapshot benchmark: ``replicate --snapshot only`` against the bulk tools, same run, same data.

    .venv/bin/python benchmarks/snapshot_bench.py            # 1M rows, PostgreSQL 15, 3 rounds
    .venv/bin/python benchmarks/snapshot_bench.py --smoke    # tiny, checks only (CI runs this)

Data: ``narrow`` (id, text, int) with 70% of the rows and ``real``, the realistic wide table of
``bench.py`` (jsonb, json, inet, cidr, arrays, interval, numeric, timestamptz, date, time,
uuid, bytea, bool, float8, varchar, non-ASCII text, a TOASTed text in one row in ten, NULLs
in a fifth of the values) with 30%.

Each round, in turn:
- ``ours → SQLite``: ``replicate --snapshot only`` into a new SQLite file;
- ``COPY | sqlite3 .import``: ``psql -c "COPY t TO STDOUT (FORMAT csv)"`` piped into the
  sqlite3 shell's CSV import, into tables created beforehand: SQLite's own bulk path;
- ``ours → PostgreSQL``: ``replicate --snapshot only`` into a new database;
- ``pg_dump | psql``: ``pg_dump --data-only -t narrow -t real`` piped into ``psql`` on a
  new database holding the same tables.

Reported: the median wall time, the median same-round ratio (ours / the tool), and our peak
RSS. Every run is checked: the row counts match the source.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import REAL_COLUMNS

from pglogrepl_bridge.testing.postgres import PostgresServer, find_bindirs, postgres_server

PY = sys.executable


def build(conn: psycopg.Connection[tuple[object, ...]], rows: int) -> tuple[int, int]:
    """The two tables, their publication and a slot; returns (narrow rows, real rows)."""
    narrow, real = rows * 7 // 10, rows - rows * 7 // 10
    cols = ", ".join(f"{name} {type_}" for name, (type_, _) in REAL_COLUMNS.items())
    values = ", ".join(
        f"CASE WHEN (g + {i}) % 5 = 0 THEN NULL ELSE {expr} END"
        for i, (_, expr) in enumerate(REAL_COLUMNS.values())
    )
    conn.execute("CREATE TABLE narrow (id int PRIMARY KEY, v text, n int)")
    conn.execute(f"CREATE TABLE real (id int PRIMARY KEY, {cols})")
    conn.execute(
        f"INSERT INTO narrow SELECT g, 'value ' || g, g FROM generate_series(1, {narrow}) g"
    )
    conn.execute(f"INSERT INTO real SELECT g, {values} FROM generate_series(1, {real}) g")
    conn.execute("VACUUM ANALYZE narrow")
    conn.execute("VACUUM ANALYZE real")
    conn.execute("CREATE PUBLICATION snap_pub FOR TABLE narrow, real")
    conn.execute("SELECT pg_create_logical_replication_slot('snap_slot', 'pgoutput')")
    return narrow, real


def timed(cmd: list[str] | str, *, shell: bool = False) -> tuple[float, float]:
    """Run to completion; (wall seconds, peak RSS MB of the process itself)."""
    start = time.monotonic()
    proc = subprocess.Popen(cmd, shell=shell, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        err = proc.stderr.read().decode() if proc.stderr else ""
        raise SystemExit(f"failed ({proc.returncode}): {cmd}\n{err[-2000:]}")
    return wall, usage.ru_maxrss / 1024


def ours(dsn: str, target: str, workers: int) -> list[str]:
    return [
        PY, "-m", "pglogrepl_bridge", "replicate", "--dsn", dsn, "--slot", "snap_slot",
        "-p", "snap_pub", "--target", target, "--snapshot", "only",
        "--snapshot-workers", str(workers),
    ]  # fmt: skip


def sqlite_count(path: Path) -> dict[str, int]:
    import sqlite3

    with sqlite3.connect(path) as db:
        return {
            t: db.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in ("narrow", "real")
        }


def pg_count(dsn: str) -> dict[str, int]:
    with psycopg.connect(dsn) as conn:
        return {
            t: conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0]  # type: ignore[index]
            for t in ("narrow", "real")
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--pg-version", type=int, default=15)
    parser.add_argument("--smoke", action="store_true", help="tiny, checks only")
    args = parser.parse_args()
    if args.smoke:
        args.rows, args.rounds = 3000, 1
    version = args.pg_version if args.pg_version in find_bindirs() else None
    sqlite3_bin = shutil.which("sqlite3")
    tmp = Path(tempfile.mkdtemp(prefix="pglb-snapbench-"))
    with postgres_server(version) as pg:
        bindir = find_bindirs()[pg.version]
        with psycopg.connect(pg.dsn, autocommit=True) as conn:
            counts = build(conn, args.rows)
            expected = {"narrow": counts[0], "real": counts[1]}
            size = conn.execute(
                "SELECT pg_size_pretty(pg_total_relation_size('narrow') + "
                "pg_total_relation_size('real'))"
            ).fetchone()
        workers = args.workers or min(4, os.cpu_count() or 1)
        print(
            f"PostgreSQL {pg.version}; {counts[0]} narrow + {counts[1]} realistic wide rows "
            f"({size[0] if size else '?'}); {args.rounds} rounds; --snapshot-workers {workers}; "
            f"{os.cpu_count()} CPUs",
            flush=True,
        )
        results: dict[str, list[float]] = {}
        ratios: dict[str, list[float]] = {"sqlite": [], "postgresql": []}
        rss: list[float] = []
        for r in range(args.rounds):
            got = run_round(pg, r, tmp, bindir, sqlite3_bin, workers, expected)
            for name, (wall, peak) in got.items():
                results.setdefault(name, []).append(wall)
                if name.startswith("ours"):
                    rss.append(peak)
            if sqlite3_bin:
                ratios["sqlite"].append(got["ours → SQLite"][0] / got["COPY | sqlite3 .import"][0])
            ratios["postgresql"].append(got["ours → PostgreSQL"][0] / got["pg_dump | psql"][0])
        print(f"\n{'tool':28} {'median s':>9} {'rows/s':>10}")
        total = sum(expected.values())
        for name, walls in results.items():
            med = statistics.median(walls)
            print(f"{name:28} {med:9.2f} {total / med:10.0f}")
        for kind, values in ratios.items():
            if values:
                shown = ", ".join(f"{v:.2f}" for v in values)
                median = statistics.median(values)
                print(f"same-round ratio into {kind}: median {median:.2f} ({shown})")
        print(f"our peak RSS: {max(rss):.0f} MB")
        print("checks: every copy has the source's row counts")
    shutil.rmtree(tmp, ignore_errors=True)


def run_round(
    pg: PostgresServer,
    r: int,
    tmp: Path,
    bindir: Path,
    sqlite3_bin: str | None,
    workers: int,
    expected: dict[str, int],
) -> dict[str, tuple[float, float]]:
    out: dict[str, tuple[float, float]] = {}
    db = tmp / f"ours_{r}.db"
    out["ours → SQLite"] = timed(ours(pg.dsn, f"sqlite:///{db}", workers))
    assert sqlite_count(db) == expected, sqlite_count(db)
    if sqlite3_bin:
        plain = tmp / f"plain_{r}.db"
        schema = (  # the tables ours made, without the rows: same column types
            f"{sqlite3_bin} {db} '.schema narrow' '.schema real' | {sqlite3_bin} {plain}"
        )
        subprocess.run(schema, shell=True, check=True)
        psql = bindir / "psql"
        pipe = " && ".join(
            f"{psql} '{pg.dsn}' -Xqc 'COPY {t} TO STDOUT (FORMAT csv)' | "
            f"{sqlite3_bin} {plain} '.import --csv /dev/stdin {t}'"
            for t in ("narrow", "real")
        )
        out["COPY | sqlite3 .import"] = timed(pipe, shell=True)
        assert sqlite_count(plain) == expected, sqlite_count(plain)
    with psycopg.connect(pg.dsn, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE ours_{r}")
        conn.execute(f"CREATE DATABASE dump_{r}")
    ours_dsn = psycopg.conninfo.make_conninfo(pg.dsn, dbname=f"ours_{r}")
    dump_dsn = psycopg.conninfo.make_conninfo(pg.dsn, dbname=f"dump_{r}")
    url = "postgresql+psycopg://"
    params = psycopg.conninfo.conninfo_to_dict(ours_dsn)
    url += f"{params['user']}:{params['password']}@{params['host']}:{params['port']}/ours_{r}"
    out["ours → PostgreSQL"] = timed(ours(pg.dsn, url, workers))
    assert pg_count(ours_dsn) == expected
    dump, psql = bindir / "pg_dump", bindir / "psql"
    subprocess.run(
        f"{dump} '{pg.dsn}' --schema-only -t narrow -t real | {psql} '{dump_dsn}' -Xq",
        shell=True,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    out["pg_dump | psql"] = timed(
        f"{dump} '{pg.dsn}' --data-only -t narrow -t real | {psql} '{dump_dsn}' -Xq", shell=True
    )
    assert pg_count(dump_dsn) == expected
    for path in tmp.glob(f"*_{r}.db"):
        path.unlink()
    with psycopg.connect(pg.dsn, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE ours_{r}")
        conn.execute(f"DROP DATABASE dump_{r}")
    return out


if __name__ == "__main__":
    main()
