"""PostgreSQL 18 publishes STORED generated columns when asked (``publish_generated_columns
= stored``): through decoding, ``tail`` and ``replicate``. Before 18 they are never sent."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import sqlalchemy as sa

from pglogrepl_bridge import ReplicationStream, RowChange, StreamOptions
from pglogrepl_bridge.sinks.replicate import run_replicate
from pglogrepl_bridge.testing.postgres import PostgresServer

from .streamkit import Conn, last_commit_end

_n = itertools.count()


def _source(conn: Conn) -> tuple[str, str, str]:
    n = next(_n)
    table, pub, slot = f"gen_{n}", f"gen_pub_{n}", f"gen_slot_{n}"
    conn.execute(
        f"CREATE TABLE {table} (id int PRIMARY KEY, price int, "
        "doubled int GENERATED ALWAYS AS (price * 2) STORED)"
    )
    with_option = (
        " WITH (publish_generated_columns = stored)" if conn.info.server_version >= 180000 else ""
    )
    conn.execute(f"CREATE PUBLICATION {pub} FOR TABLE {table}{with_option}")
    conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (slot,))
    conn.execute(f"INSERT INTO {table} (id, price) VALUES (1, 21)")
    return table, pub, slot


def test_stored_generated_columns(pg: PostgresServer, pg_conn: Conn, tmp_path: Path) -> None:
    table, pub, slot = _source(pg_conn)
    expected = {"id": 1, "price": 21, "doubled": 42} if pg.version >= 18 else {"id": 1, "price": 21}
    end = last_commit_end(pg_conn, slot, pub)
    options = StreamOptions(slot=slot, publications=(pub,), until_lsn=end, no_ack=True)
    with ReplicationStream(pg.dsn, options) as stream:
        changes = []
        for txn in stream:
            changes += [c for c in txn.changes if isinstance(c, RowChange)]
            stream.ack(txn.end_lsn)
    assert [c.new for c in changes] == [expected]
    tail = subprocess.run(
        [sys.executable, "-m", "pglogrepl_bridge", "tail", "--dsn", pg.dsn, "--slot", slot,
         "--publication", pub, "--format", "jsonl", "--no-ack", "--until-lsn", str(end)],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert json.loads(tail.stdout)["changes"][0]["new"] == expected
    target = f"sqlite:///{tmp_path / 'gen.db'}"
    run_replicate(pg.dsn, target, options.__class__(slot=slot, publications=(pub,)), until=end)
    engine = sa.create_engine(target)
    try:
        with engine.connect() as conn:
            rows = conn.execute(sa.text(f"SELECT * FROM {table}")).mappings().all()
    finally:
        engine.dispose()
    assert [dict(r) for r in rows] == [expected]
