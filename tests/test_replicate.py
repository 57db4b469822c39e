"""`replicate` into SQLite, PostgreSQL and MariaDB: equality, exactly once, LWW, bad input."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa

from pglogrepl_bridge.errors import SinkError
from pglogrepl_bridge.lsn import Lsn
from pglogrepl_bridge.postgres import admin
from pglogrepl_bridge.postgres.stream import StreamOptions
from pglogrepl_bridge.sinks.sql import CHECKPOINT_TABLE
from pglogrepl_bridge.testing.postgres import PostgresServer

from .streamkit import Conn, last_commit_end, pg_url, replicate_changes

_n = itertools.count()

SCHEMA = """
CREATE TABLE {items} (
    id int PRIMARY KEY, name text, qty int, price numeric(10, 2), ratio double precision,
    flag boolean, tags text[], created timestamptz, day date, payload jsonb, blob bytea,
    uid uuid, big text, "odd name.%(x)" text DEFAULT 'bind names need escaping'
);
ALTER TABLE {items} ALTER COLUMN big SET STORAGE EXTERNAL;
CREATE TABLE {notes} (k text PRIMARY KEY, body varchar(200));
CREATE PUBLICATION {pub} FOR TABLE {items}, {notes};
"""


class Source:
    def __init__(self, conn: Conn) -> None:
        n = next(_n)
        self.conn = conn
        self.items, self.notes = f"items_{n}", f"notes_{n}"
        self.pub, self.slot = f"rpub_{n}", f"rslot_{n}"
        conn.execute(SCHEMA.format(items=self.items, notes=self.notes, pub=self.pub))
        conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (self.slot,))

    def options(self, **kw: Any) -> StreamOptions:
        return StreamOptions(slot=self.slot, publications=(self.pub,), status_interval=0.5, **kw)

    def insert(self, i: int) -> None:
        self.conn.execute(
            f"INSERT INTO {self.items} VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, "
            "gen_random_uuid(), %s)",
            (
                i,
                f"item {i}",
                i * 10,
                Decimal(i) / 3,
                i / 7,
                i % 2 == 0,
                [f"t{i}", None],
                datetime(2024, 1, 1, 12, 0, i % 60, i * 1000, tzinfo=UTC),
                "2024-02-29",
                psycopg.types.json.Jsonb({"i": i, "nested": [1, {"x": "y"}]}),
                bytes([i % 256, 0, 255]),
                "x" * 3000 if i % 5 == 0 else None,
            ),
        )

    def mixed_workload(self, start: int = 0, n: int = 40) -> None:
        c = self.conn
        for i in range(start, start + n):
            with c.transaction():
                self.insert(i)
                if i % 4 == 0:
                    c.execute(f"INSERT INTO {self.notes} VALUES (%s, %s)", (f"k{i}", f"note {i}"))
        with c.transaction():
            c.execute(
                f"UPDATE {self.items} SET qty = qty + 1, name = name || '!' "
                "WHERE id %% 3 = 0 AND id >= %s",
                (start,),
            )  # big stays unchanged TOAST
        with c.transaction():
            c.execute(f"UPDATE {self.items} SET id = id + 10000 WHERE id = %s", (start + 1,))
            c.execute(f"DELETE FROM {self.items} WHERE id = %s", (start + 2,))
            c.execute(f"UPDATE {self.notes} SET body = NULL WHERE k = %s", (f"k{start}",))
        with c.transaction():
            c.execute(f"DELETE FROM {self.notes} WHERE k = %s", (f"k{start + 4}",))

    def end(self) -> Lsn:
        return last_commit_end(self.conn, self.slot, self.pub)


def _like(value: Any, model: Any) -> Any:
    """Read back from a target, in the form the source gives."""
    if isinstance(model, datetime) and isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(model, Decimal) and value is not None:
        try:
            return Decimal(str(value))
        except InvalidOperation:
            return value
    if isinstance(model, list | dict) and isinstance(value, str):
        return json.loads(value)
    if isinstance(model, float) and isinstance(value, Decimal):
        return float(value)  # MariaDB's reflected DOUBLE reads back as Decimal
    if isinstance(model, bool) and isinstance(value, int):
        return bool(value)
    if isinstance(model, bytes) and isinstance(value, memoryview):
        return bytes(value)
    if isinstance(model, uuid.UUID) and isinstance(value, str):
        return uuid.UUID(value)
    if isinstance(model, str) and not isinstance(value, str) and value is not None:
        return str(value)
    return value


def assert_same(source_dsn: str, target_url: str, table: str, key: str) -> int:
    src = sa.create_engine(pg_url(source_dsn))
    dst = sa.create_engine(target_url)
    try:
        s_tbl = sa.Table(table, sa.MetaData(), autoload_with=src)
        d_tbl = sa.Table(table, sa.MetaData(), autoload_with=dst)
        with src.connect() as c:
            s_rows = [dict(r._mapping) for r in c.execute(sa.select(s_tbl).order_by(s_tbl.c[key]))]
        with dst.connect() as c:
            d_rows = [dict(r._mapping) for r in c.execute(sa.select(d_tbl).order_by(d_tbl.c[key]))]
    finally:
        src.dispose()
        dst.dispose()
    assert [r[key] for r in d_rows] == [r[key] for r in s_rows], table
    for s_row, d_row in zip(s_rows, d_rows, strict=True):
        for col, model in s_row.items():
            got = _like(d_row[col], model)
            if isinstance(model, float):
                assert got == pytest.approx(model), (table, s_row[key], col)
            else:
                assert got == model, (table, s_row[key], col, got, model)
    return len(s_rows)


def test_mixed_workload_row_by_row(pg: PostgresServer, pg_conn: Conn, target: str) -> None:
    src = Source(pg_conn)
    src.mixed_workload()
    stats = replicate_changes(pg.dsn, target, src.options(), until=src.end(), batch_changes=25)
    assert stats.batches >= 2
    assert assert_same(pg.dsn, target, src.items, "id") == 39
    assert assert_same(pg.dsn, target, src.notes, "k") == 9
    # a second run resumes from the checkpoint: nothing new, nothing applied twice
    src.conn.execute(f"TRUNCATE {src.notes}")
    src.conn.execute(f"INSERT INTO {src.notes} VALUES ('after', 'truncate')")
    again = replicate_changes(pg.dsn, target, src.options(), until=src.end())
    assert again.resumed_from == stats.last_lsn
    assert again.transactions == 2
    assert assert_same(pg.dsn, target, src.notes, "k") == 1
    assert assert_same(pg.dsn, target, src.items, "id") == 39


def test_schema_changes(pg: PostgresServer, pg_conn: Conn, tmp_path: Path) -> None:
    src = Source(pg_conn)
    url = f"sqlite:///{tmp_path / 't.db'}"
    src.insert(1)
    replicate_changes(pg.dsn, url, src.options(), until=src.end())
    pg_conn.execute(f"ALTER TABLE {src.notes} ADD COLUMN extra int")
    pg_conn.execute(f"INSERT INTO {src.notes} VALUES ('a', 'b', 7)")
    pg_conn.execute(f"ALTER TABLE {src.notes} DROP COLUMN body")
    pg_conn.execute(f"INSERT INTO {src.notes} VALUES ('c', 8)")
    replicate_changes(pg.dsn, url, src.options(), until=src.end())
    engine = sa.create_engine(url)
    with engine.connect() as c:
        rows = c.execute(sa.text(f"SELECT k, body, extra FROM {src.notes} ORDER BY k")).all()
    engine.dispose()
    # the added column is added; the dropped one is kept, no longer written
    assert rows == [("a", "b", 7), ("c", None, 8)]


def test_kill_9_at_any_moment(pg: PostgresServer, pg_conn: Conn, tmp_path: Path) -> None:
    src = Source(pg_conn)
    url = f"sqlite:///{tmp_path / 'killed.db'}"
    cmd = [
        sys.executable,
        "-m",
        "pglogrepl_bridge",
        "replicate",
        "--dsn",
        pg.dsn,
        "--slot",
        src.slot,
        "--publication",
        src.pub,
        "--target",
        url,
        "--batch",
        "7",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    kills = 0
    for round_no, delay in enumerate([0.4, 0.9, 1.3, 0.6]):
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        src.mixed_workload(start=round_no * 100, n=30)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
    _wait_released(pg_conn, src.slot)  # the killed run's walsender may outlive it a moment
    left = admin.last_commit_lsn(pg_conn, src.slot, (src.pub,))
    if left is None:  # the last killed run had applied and confirmed it all (a fast machine)
        confirmed_before = _confirmed(pg_conn, src.slot)
        assert confirmed_before is not None
        final_end = Lsn.parse(confirmed_before)
    else:
        final_end = left
        final = subprocess.run(
            [*cmd, "--until-lsn", str(final_end)],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert final.returncode == 0, final.stderr
    assert kills == 4
    assert assert_same(pg.dsn, url, src.items, "id") == 4 * 29
    assert assert_same(pg.dsn, url, src.notes, "k") == 4 * 7
    engine = sa.create_engine(url)
    with engine.connect() as c:
        checkpoint = c.execute(sa.text(f"SELECT end_lsn FROM {CHECKPOINT_TABLE}")).scalar()
    engine.dispose()
    assert checkpoint is not None and checkpoint >= final_end
    confirmed = _confirmed(pg_conn, src.slot)
    assert confirmed is not None and Lsn.parse(confirmed) >= final_end


class _LwwSource:
    """A source database of its own, with table public.lww, a publication and a slot."""

    def __init__(self, pg: PostgresServer, admin_conn: Conn) -> None:
        n = next(_n)
        self.db = f"lww_src_{n}"
        admin_conn.execute(f"CREATE DATABASE {self.db}")
        self.dsn = psycopg.conninfo.make_conninfo(pg.dsn, dbname=self.db)
        self.conn: Conn = psycopg.connect(self.dsn, autocommit=True)
        self.pub, self.slot = f"lpub_{n}", f"lslot_{n}"
        self.conn.execute("CREATE TABLE lww (k text PRIMARY KEY, body text)")
        self.conn.execute("ALTER TABLE lww ALTER COLUMN body SET STORAGE EXTERNAL")
        self.conn.execute(f"CREATE PUBLICATION {self.pub} FOR TABLE lww")
        self.conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (self.slot,))

    def run(self, sql: str) -> None:
        self.txn(sql)

    def txn(self, *statements: str) -> None:
        with self.conn.transaction():
            for sql in statements:
                self.conn.execute(sql)
        time.sleep(0.002)  # distinct commit timestamps across the two sources

    def options(self) -> StreamOptions:
        return StreamOptions(slot=self.slot, publications=(self.pub,), status_interval=0.5)

    def end(self) -> Lsn:
        return Source.end(self)  # type: ignore[arg-type]


def test_last_writer_wins_converges(pg: PostgresServer, pg_conn: Conn, tmp_path: Path) -> None:
    """Two source databases update the same keys; in either arrival order the newest wins."""
    outcomes = {}
    for order in ("a_then_b", "b_then_a"):
        a, b = _LwwSource(pg, pg_conn), _LwwSource(pg, pg_conn)
        a.run("INSERT INTO lww VALUES ('k1', 'a-old'), ('k2', 'a-k2')")
        b.run("INSERT INTO lww VALUES ('k1', 'b-newer'), ('k2', 'b-k2')")
        a.run("UPDATE lww SET body = 'a-newest' WHERE k = 'k2'")
        b.run("DELETE FROM lww WHERE k = 'k2'")  # the newest word on k2: gone
        a.run("INSERT INTO lww VALUES ('k3', 'a3')")
        # the cases, each inside one transaction of one source
        a.txn(
            "INSERT INTO lww VALUES ('k4', 'a4-new')", "UPDATE lww SET body = 'a4-2' WHERE k = 'k4'"
        )
        b.txn(
            "INSERT INTO lww VALUES ('k5', 'b5')",
            "UPDATE lww SET k = 'k6' WHERE k = 'k5'",
            "UPDATE lww SET k = 'k7' WHERE k = 'k6'",
        )
        b.run("INSERT INTO lww VALUES ('k8', repeat('t', 5000))")
        b.run("UPDATE lww SET k = 'k9' WHERE k = 'k8'")  # moves an unchanged TOASTed body
        url = f"sqlite:///{tmp_path / f'{order}.db'}"
        runs = [(a, 1), (b, 2)] if order == "a_then_b" else [(b, 2), (a, 1)]
        for src, node in runs:
            replicate_changes(
                src.dsn, url, src.options(), conflict="lww", node_id=node, until=src.end()
            )
        engine = sa.create_engine(url)
        with engine.connect() as c:
            outcomes[order] = c.execute(sa.text("SELECT k, body FROM lww ORDER BY k")).all()
        engine.dispose()
        a.conn.close()
        b.conn.close()
    assert outcomes["a_then_b"] == [
        ("k1", "b-newer"),
        ("k3", "a3"),
        ("k4", "a4-2"),
        ("k7", "b5"),
        ("k9", "t" * 5000),
    ]
    assert outcomes["b_then_a"] == outcomes["a_then_b"]


def _strict_table(engine: sa.Engine, table: str) -> None:
    """The notes table made in the target first, refusing body 'bad': an existing target
    table is used as it is, with its constraint."""
    with engine.begin() as c:
        c.execute(
            sa.text(
                f"CREATE TABLE {table} (k TEXT PRIMARY KEY, "
                "body VARCHAR(200) CHECK (body <> 'bad'))"
            )
        )


def test_constraint_violation_names_table_and_key_and_is_retried(
    pg: PostgresServer, pg_conn: Conn, tmp_path: Path
) -> None:
    src = Source(pg_conn)
    url = f"sqlite:///{tmp_path / 'strict.db'}"
    engine = sa.create_engine(url)
    _strict_table(engine, src.notes)
    pg_conn.execute(f"INSERT INTO {src.notes} VALUES ('ok', 'fine')")
    pg_conn.execute(f"INSERT INTO {src.notes} VALUES ('k-bad', 'bad')")
    slot_before = _confirmed(pg_conn, src.slot)
    with pytest.raises(SinkError, match=rf"table {src.notes} key {{'k': 'k-bad'}}"):
        replicate_changes(pg.dsn, url, src.options(), until=src.end(), batch_changes=1)
    with engine.connect() as c:
        rows = c.execute(sa.text(f"SELECT k FROM {src.notes}")).all()
    assert rows == [("ok",)]  # the good transaction before it was applied and confirmed
    # fix the target; the failed transaction was not acknowledged, so a restart applies it
    with engine.begin() as c:
        c.execute(sa.text(f"DROP TABLE {src.notes}"))
        c.execute(sa.text(f"CREATE TABLE {src.notes} (k TEXT PRIMARY KEY, body VARCHAR(200))"))
        c.execute(sa.text(f"INSERT INTO {src.notes} VALUES ('ok', 'fine')"))
    replicate_changes(pg.dsn, url, src.options(), until=src.end())
    with engine.connect() as c:
        rows = c.execute(sa.text(f"SELECT k, body FROM {src.notes} ORDER BY k")).all()
    engine.dispose()
    assert rows == [("k-bad", "bad"), ("ok", "fine")]
    assert slot_before is not None


def test_inserts_into_postgresql_go_through_copy_and_a_refused_row_is_named(
    pg: PostgresServer, pg_conn: Conn, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A group of inserts into PostgreSQL is one COPY; a row the target refuses fails it,
    and the row-by-row retry names the row; fixed, a restart applies it all."""
    from pglogrepl_bridge.sinks.sql import COPY_INSERTS_FROM, SqlSink

    copied: list[int] = []
    real_copy = SqlSink._copy_rows

    def counting(self: SqlSink, conn: Any, target: Any, rows: list[dict[str, Any]]) -> None:
        copied.append(len(rows))
        real_copy(self, conn, target, rows)

    monkeypatch.setattr(SqlSink, "_copy_rows", counting)
    src = Source(pg_conn)
    pg_conn.execute("CREATE DATABASE copy_target")
    url = pg_url(pg.dsn, "copy_target").render_as_string(hide_password=False)
    engine = sa.create_engine(url)
    _strict_table(engine, src.notes)
    rows = COPY_INSERTS_FROM * 3
    with pg_conn.transaction():
        for i in range(rows):
            body = "bad" if i == 30 else f"tab\there\nnewline \\ {i}"
            pg_conn.execute(f"INSERT INTO {src.notes} VALUES (%s, %s)", (f"k{i:03d}", body))
    with pytest.raises(SinkError, match=rf"table {src.notes} key {{'k': 'k030'}}"):
        replicate_changes(pg.dsn, url, src.options(), until=src.end())
    # the batch went as one COPY, which the bad row failed; then once more in stream order
    # (what a reordering made fail would pass there), before the row-by-row pass named it
    assert copied == [rows, rows]
    with engine.begin() as c:
        assert c.execute(sa.text(f"SELECT count(*) FROM {src.notes}")).scalar() == 0
        c.execute(sa.text(f"ALTER TABLE {src.notes} DROP CONSTRAINT {src.notes}_body_check"))
    replicate_changes(pg.dsn, url, src.options(), until=src.end())
    engine.dispose()
    assert copied == [rows, rows, rows]
    assert assert_same(pg.dsn, url, src.notes, "k") == rows


def test_unreachable_target(pg: PostgresServer, pg_conn: Conn) -> None:
    src = Source(pg_conn)
    with pytest.raises(SinkError, match="cannot reach the target") as info:
        replicate_changes(pg.dsn, "postgresql+psycopg://u:secret@127.0.0.1:1/x", src.options())
    assert "secret" not in str(info.value)  # at start: a wrong URL fails fast, no retrying


def _wait_released(conn: Conn, slot: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    query = "SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s"
    while (row := conn.execute(query, (slot,)).fetchone()) and row[0] is not None:
        assert time.monotonic() < deadline, f"slot {slot} still held by pid {row[0]}"
        time.sleep(0.05)


def _confirmed(conn: Conn, slot: str) -> str | None:
    row = conn.execute(
        "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = %s", (slot,)
    ).fetchone()
    return None if row is None else row[0]


def _recording(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """Record each row the sink writes as (op, its key's value as text)."""
    from pglogrepl_bridge.sinks.sql import SqlSink

    writes: list[tuple[str, str]] = []
    real = SqlSink._execute

    def execute(self: SqlSink, conn: Any, target: Any, op: str, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            if not isinstance(row, dict):  # a whole insert held unconverted (COPY text)
                row = self._new_row(row)
            key = row.get("_pglb_key_id", row.get("id"))
            writes.append((op, str(key)))
        real(self, conn, target, op, rows)

    monkeypatch.setattr(SqlSink, "_execute", execute)
    return writes


@pytest.mark.parametrize("reduce", [True, False], ids=["reduced", "stream-order"])
def test_a_batch_goes_in_as_one_net_change_per_row(
    pg: PostgresServer, pg_conn: Conn, target: str, monkeypatch: pytest.MonkeyPatch, reduce: bool
) -> None:
    """Rows inserted and deleted in one batch never reach the target; a row changed several
    times is written once, an update's unchanged TOAST kept from the insert before it; a
    key change and a delete-then-insert come out right. --no-reduce writes every change.
    Either way the target equals the source."""
    src = Source(pg_conn)
    for i in range(1, 5):
        src.insert(i)
    replicate_changes(pg.dsn, target, src.options(), until=src.end())
    writes = _recording(monkeypatch)
    c = pg_conn
    with c.transaction():
        src.insert(10)  # TOASTed (a multiple of 5): its update below leaves big unsent
        c.execute(f"UPDATE {src.items} SET qty = -1 WHERE id = 10")
        c.execute(f"UPDATE {src.items} SET name = 'twice' WHERE id = 10")
        src.insert(11)
        c.execute(f"DELETE FROM {src.items} WHERE id = 11")
        c.execute(f"UPDATE {src.items} SET qty = 7 WHERE id = 1")
        c.execute(f"UPDATE {src.items} SET name = 'one' WHERE id = 1")
    with c.transaction():
        c.execute(f"DELETE FROM {src.items} WHERE id = 2")
        src.insert(2)  # a new row with the deleted one's key
        c.execute(f"DELETE FROM {src.items} WHERE id = 3")
        c.execute(f"UPDATE {src.items} SET id = 40 WHERE id = 4")  # a key change
        c.execute(f"UPDATE {src.items} SET qty = 41 WHERE id = 40")
        c.execute(f"INSERT INTO {src.notes} VALUES ('n', 'a')")
        c.execute(f"UPDATE {src.notes} SET body = 'b' WHERE k = 'n'")
    replicate_changes(pg.dsn, target, src.options(), until=src.end(), reduce=reduce)
    assert assert_same(pg.dsn, target, src.items, "id") == 4
    assert assert_same(pg.dsn, target, src.notes, "k") == 1
    items = [w for w in writes if w[1] != "None"]
    if reduce:
        assert ("insert", "11") not in items and ("delete", "11") not in items
        assert items.count(("update", "1")) == 1
        assert [w for w in items if w[1] == "10"] == [("insert", "10")]
        assert [w for w in items if w[1] == "2"] == [("delete", "2"), ("insert", "2")]
        assert ("update", "4") in items  # the key change went as it came
    else:
        assert items.count(("update", "1")) == 2
        assert [w for w in items if w[1] == "11"] == [("insert", "11"), ("delete", "11")]


def test_a_reduced_batch_a_target_constraint_refuses_goes_in_stream_order(
    pg: PostgresServer, pg_conn: Conn, target: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A unique index made by hand in the target: the reduced order (updates in the order
    of their rows' last changes) would break it where the stream's order does not; the
    batch is applied again in stream order, and the target equals the source."""
    n = next(_n)
    table, pub, slot = f"uniq_{n}", f"upub_{n}", f"uslot_{n}"
    pg_conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, email text UNIQUE)")
    pg_conn.execute(f"CREATE PUBLICATION {pub} FOR TABLE {table}")
    pg_conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (slot,))
    engine = sa.create_engine(target)
    sa.Table(
        table,
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("email", sa.String(20), unique=True),
    ).create(engine)
    engine.dispose()
    options = StreamOptions(slot=slot, publications=(pub,), status_interval=0.5)
    pg_conn.execute(f"INSERT INTO {table} VALUES (1, 'x'), (2, 'w')")
    replicate_changes(pg.dsn, target, options, until=last_commit_end(pg_conn, slot, pub))
    with pg_conn.transaction():
        pg_conn.execute(f"UPDATE {table} SET email = 'z' WHERE id = 1")
        pg_conn.execute(f"UPDATE {table} SET email = 'x' WHERE id = 2")
        pg_conn.execute(f"UPDATE {table} SET email = 'q' WHERE id = 1")
    with caplog.at_level("INFO", logger="pglogrepl_bridge.sinks.sql"):
        replicate_changes(pg.dsn, target, options, until=last_commit_end(pg_conn, slot, pub))
    assert "applying it in stream order" in caplog.text
    assert assert_same(pg.dsn, target, table, "id") == 2


def test_an_in_memory_sqlite_target_is_written_from_the_reading_thread(
    pg: PostgresServer, pg_conn: Conn
) -> None:
    """Batches are written by a second thread, but SQLite's in-memory database lives in
    one thread's connection (its tables would be missing from another): it is written
    inline, and every batch lands."""
    src = Source(pg_conn)
    src.mixed_workload(n=12)
    end = src.end()
    stats = replicate_changes(pg.dsn, "sqlite://", src.options(), until=end, batch_changes=5)
    assert stats.batches >= 3
    assert stats.last_lsn == end


def test_copy_takes_held_rows_and_merged_rows_in_one_group(
    pg: PostgresServer, pg_conn: Conn, target: str
) -> None:
    """A reduced batch into PostgreSQL: a row updated without its TOASTed value (merged, so
    converted) heads a run of whole inserts held unconverted (COPY text from their bytes);
    one group, every column where it belongs."""
    src = Source(pg_conn)
    with pg_conn.transaction():
        src.insert(0)  # TOASTed: the update below leaves big unsent
        pg_conn.execute(f"UPDATE {src.items} SET qty = -5, name = 'merged' WHERE id = 0")
        for i in range(1, 25):
            src.insert(i)
    replicate_changes(pg.dsn, target, src.options(), until=src.end())
    assert assert_same(pg.dsn, target, src.items, "id") == 25
