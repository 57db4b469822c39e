"""Each example in examples/ runs against a real server and does what it says."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

from pglogrepl_bridge.testing.postgres import PostgresServer

from .streamkit import Conn, make_source

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run(example: str, pg: PostgresServer, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(EXAMPLES / example), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PGLOGREPL_DSN": pg.dsn},
    )


def test_tail_stdout(pg: PostgresServer, pg_conn: Conn) -> None:
    src = make_source(pg_conn)
    src.insert(1, 2)
    result = run("tail_stdout.py", pg, src.slot, src.publication, str(src.end()))
    assert result.returncode == 0, result.stderr
    assert [line.split()[1:3] for line in result.stdout.splitlines()] == [
        ["insert", src.table],
        ["insert", src.table],
    ]


def test_async_tail(pg: PostgresServer, pg_conn: Conn) -> None:
    src = make_source(pg_conn)
    src.insert(1, 2)
    end = src.end()
    result = run("async_tail.py", pg, src.slot, src.publication, str(end))
    assert result.returncode == 0, result.stderr
    assert [line.split()[1:3] for line in result.stdout.splitlines()] == [
        ["insert", src.table],
        ["insert", src.table],
    ]
    assert src.confirmed() == end  # acknowledged once printed


def test_custom_sink(pg: PostgresServer, pg_conn: Conn, tmp_path: Path) -> None:
    src = make_source(pg_conn)
    src.insert(5)
    end = src.end()
    out = tmp_path / "sink.jsonl"
    result = run(
        "custom_sink.py",
        pg,
        src.slot,
        src.publication,
        str(out),
        str(end),
    )
    assert result.returncode == 0, result.stderr
    (line,) = out.read_text().splitlines()
    assert json.loads(line)["changes"][0]["new"] == {"id": 5, "v": "v5"}
    assert src.confirmed() == end  # the sink acknowledged what it wrote


def test_replicate_sqlite(pg: PostgresServer, pg_conn: Conn, tmp_path: Path) -> None:
    src = make_source(pg_conn)
    src.insert(1, 2, 3)
    db = tmp_path / "copy.db"
    result = run(
        "replicate_sqlite.py",
        pg,
        src.slot,
        src.publication,
        str(db),
        str(src.end()),
    )
    assert result.returncode == 0, result.stderr
    with sqlite3.connect(db) as conn:
        rows = conn.execute(f"SELECT id, v FROM {src.table} ORDER BY id").fetchall()
    assert rows == [(1, "v1"), (2, "v2"), (3, "v3")]


def test_bridge_inprocess(pg: PostgresServer, pg_conn: Conn) -> None:
    src = make_source(pg_conn)
    src.insert(1)
    src.insert(2)
    end = str(src.end())
    result = run("bridge_inprocess.py", pg, src.slot, src.publication, end)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("replica applied") == 2
    assert "bridged 2 entries" in result.stdout
