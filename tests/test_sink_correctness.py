"""The SQL sink on the shapes real schemas have: last-writer-wins that equals the source,
tables without a key (REPLICA IDENTITY FULL, NULLs, equal rows), a target that restarts, and
the real error when a batch that created a table fails. Every case in both conflict modes,
into SQLite, PostgreSQL and MariaDB; and a hypothesis state machine over random workloads.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from pglogrepl_bridge import SinkError, StreamOptions
from pglogrepl_bridge.testing.postgres import PostgresServer, postgres_server

from .mariadb_server import mariadb_available
from .streamkit import Conn, last_commit_end, pg_url, replicate_changes

_n = itertools.count()
MODES = ["source", "lww"]


class Tables:
    """A keyed table with a TOASTable column and a keyless REPLICA IDENTITY FULL table, one
    publication, and a slot per (conflict mode, target) made before any change."""

    def __init__(self, conn: Conn, slots: int = 1) -> None:
        n = next(_n)
        self.conn = conn
        self.keyed, self.keyless, self.pub = f"sk_{n}", f"sn_{n}", f"spub_{n}"
        conn.execute(f"CREATE TABLE {self.keyed} (id int PRIMARY KEY, n int, note text, big text)")
        conn.execute(f"ALTER TABLE {self.keyed} ALTER COLUMN big SET STORAGE EXTERNAL")
        conn.execute(f"CREATE TABLE {self.keyless} (a int, b text)")
        conn.execute(f"ALTER TABLE {self.keyless} REPLICA IDENTITY FULL")
        conn.execute(f"CREATE PUBLICATION {self.pub} FOR TABLE {self.keyed}, {self.keyless}")
        self.slots = [f"sslot_{n}_{i}" for i in range(slots)]
        for slot in self.slots:
            conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (slot,))

    def options(self, slot: int = 0) -> StreamOptions:
        return StreamOptions(slot=self.slots[slot], publications=(self.pub,), status_interval=0.5)

    def txn(self, *statements: str) -> None:
        with self.conn.transaction():
            for sql in statements:
                self.conn.execute(sql)

    def end(self) -> Any:
        return last_commit_end(self.conn, self.slots[0], self.pub)

    def source_rows(self) -> tuple[list[tuple[Any, ...]], Counter[tuple[Any, ...]]]:
        keyed = self.conn.execute(f"SELECT id, n, note, big FROM {self.keyed} ORDER BY id")
        keyless = self.conn.execute(f"SELECT a, b FROM {self.keyless}")
        return [tuple(r) for r in keyed.fetchall()], Counter(tuple(r) for r in keyless.fetchall())


def target_rows(url: str, t: Tables) -> tuple[list[tuple[Any, ...]], Counter[tuple[Any, ...]]]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as c:
            names = set(sa.inspect(c).get_table_names())
            keyed = (
                c.execute(sa.text(f"SELECT id, n, note, big FROM {t.keyed} ORDER BY id")).all()
                if t.keyed in names
                else []
            )
            keyless = (
                c.execute(sa.text(f"SELECT a, b FROM {t.keyless}")).all()
                if t.keyless in names
                else []
            )
    finally:
        engine.dispose()
    return [tuple(r) for r in keyed], Counter(tuple(r) for r in keyless)


def assert_equal(url: str, t: Tables) -> None:
    assert target_rows(url, t) == t.source_rows()


@pytest.mark.parametrize("mode", MODES)
def test_the_three_lww_cases_end_equal_to_the_source(
    pg: PostgresServer,
    pg_conn: Conn,
    target: str,
    mode: str,
) -> None:
    t = Tables(pg_conn)
    k = t.keyed
    # an insert, then an update of it, in one transaction
    t.txn(
        f"INSERT INTO {k} VALUES (1, 1, 'new', NULL)",
        f"UPDATE {k} SET n = 2, note = 'updated same txn' WHERE id = 1",
    )
    # a chain of key changes in one transaction
    t.txn(
        f"INSERT INTO {k} VALUES (2, 1, 'x', NULL)",
        f"UPDATE {k} SET id = 3 WHERE id = 2",
        f"UPDATE {k} SET id = 4 WHERE id = 3",
    )
    # a key change of a row whose TOASTed column did not change
    t.txn(f"INSERT INTO {k} VALUES (5, 1, 'toast', repeat('b', 5000))")
    t.txn(f"UPDATE {k} SET id = 6 WHERE id = 5")
    replicate_changes(pg.dsn, target, t.options(), conflict=mode, until=t.end())  # type: ignore[arg-type]
    keyed, _ = target_rows(target, t)
    assert [r[0] for r in keyed] == [1, 4, 6]
    assert keyed[0][1:3] == (2, "updated same txn")
    assert keyed[2][3] == "b" * 5000
    assert_equal(target, t)


@pytest.mark.parametrize("mode", MODES)
def test_a_keyless_table_with_nulls_and_equal_rows(
    pg: PostgresServer,
    pg_conn: Conn,
    target: str,
    mode: str,
) -> None:
    t = Tables(pg_conn)
    n = t.keyless
    one = f"(SELECT ctid FROM {n} WHERE {{}} LIMIT 1)"
    t.txn(
        f"INSERT INTO {n} VALUES (1, 'x'), (1, 'x'), (1, 'x'), (NULL, 'y'), (NULL, NULL), (2, NULL)"
    )
    first_one, first_x = one.format("a = 1"), one.format("a = 1 AND b = 'x'")
    t.txn(f"UPDATE {n} SET b = 'z' WHERE ctid = {first_one}")  # one of three
    t.txn(f"DELETE FROM {n} WHERE ctid = {first_x}")  # one of two
    t.txn(f"UPDATE {n} SET a = 3 WHERE a IS NULL AND b IS NULL")  # matched through a NULL
    t.txn(f"DELETE FROM {n} WHERE a IS NULL")
    t.txn(f"INSERT INTO {n} VALUES (NULL, NULL), (NULL, NULL)")
    replicate_changes(pg.dsn, target, t.options(), conflict=mode, until=t.end())  # type: ignore[arg-type]
    _, keyless = target_rows(target, t)
    assert keyless == Counter(
        {(1, "z"): 1, (1, "x"): 1, (3, None): 1, (2, None): 1, (None, None): 2}
    )
    assert_equal(target, t)
    engine = sa.create_engine(target)
    try:
        with engine.connect() as c:
            pk = sa.inspect(c).get_pk_constraint(n)["constrained_columns"]
    finally:
        engine.dispose()
    assert pk == ["_pglb_rowid"]  # no key over the source's columns: NULLs and equal rows fit


def test_a_postgresql_target_that_restarts_is_waited_for(pg: PostgresServer, pg_conn: Conn) -> None:
    t = Tables(pg_conn)
    with postgres_server(pg.version) as target_pg:
        url = pg_url(target_pg.dsn).render_as_string(hide_password=False)
        streams: list[Any] = []
        result: list[Any] = []

        def replicate() -> None:
            try:
                result.append(
                    replicate_changes(
                        pg.dsn, url, t.options(), batch_changes=20, on_stream=streams.append
                    )
                )
            except BaseException as exc:  # reported below
                result.append(exc)

        thread = threading.Thread(target=replicate, daemon=True)
        thread.start()
        try:
            for i in range(40):
                t.txn(f"INSERT INTO {t.keyed} VALUES ({i}, {i}, 'before', NULL)")
            _wait(lambda: len(target_rows(url, t)[0]) == 40, "first rows")
            target_pg.restart("fast")  # in flight: the sink's connections are cut
            for i in range(40, 80):
                t.txn(f"INSERT INTO {t.keyed} VALUES ({i}, {i}, 'during', NULL)")
                if i == 50:
                    target_pg.restart("immediate")  # and once more, as a crash
            _wait(lambda: len(target_rows(url, t)[0]) == 80, "every row", timeout=90)
        finally:
            if streams:
                streams[0].stop()
            thread.join(timeout=30)
        assert result and not isinstance(result[0], BaseException), result
        assert_equal(url, t)


def test_a_failed_batch_that_created_a_table_reports_the_real_error(
    pg: PostgresServer, pg_conn: Conn
) -> None:
    """The batch's rollback takes the table it created with it; the row-by-row pass that
    names the culprit must not trip over that table being gone."""
    t = Tables(pg_conn)
    with postgres_server(pg.version) as target_pg:
        url = pg_url(target_pg.dsn).render_as_string(hide_password=False)
        with psycopg.connect(target_pg.dsn, autocommit=True) as c:  # the target refuses NULLs
            c.execute(
                f"CREATE TABLE {t.keyed} (id int PRIMARY KEY, n int NOT NULL, note text, big text)"
            )
        t.txn(f"INSERT INTO {t.keyless} VALUES (1, 'created in this batch')")
        t.txn(f"INSERT INTO {t.keyed} VALUES (1, NULL, 'refused', NULL)")
        with pytest.raises(SinkError) as info:
            replicate_changes(pg.dsn, url, t.options(), until=t.end())
    message = str(info.value)
    assert "does not exist" not in message
    assert t.keyed in message and "key {'id': 1}" in message
    assert "null" in message.lower()


def _wait(predicate: Any, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except sa.exc.OperationalError:
            pass  # the target is restarting
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


# -- random workloads ------------------------------------------------------------------------

_keys = st.integers(0, 6)
_notes = st.none() | st.sampled_from(["a", "b", "c"])


def test_random_single_source_workloads_replicate_exactly(
    pg: PostgresServer, pg_conn: Conn, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A hypothesis state machine writes random transactions (inserts, updates, deletes, key
    changes, several per transaction; TOASTed values; NULLs and equal rows in the keyless
    table); at the end of each run, both conflict modes replicate it into SQLite and
    PostgreSQL (and MariaDB where it runs), and every target must equal the source."""
    use_mariadb = mariadb_available()
    maria = request.getfixturevalue("mariadb_url") if use_mariadb else None
    runs = itertools.count()

    class Workload(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.t = Tables(pg_conn, slots=2)
            self.pending: list[str] = []

        @rule(i=_keys, note=_notes, big=st.booleans())
        def insert(self, i: int, note: str | None, big: bool) -> None:
            value = f"repeat('t{i}', 2000)" if big else "NULL"
            self.pending.append(
                f"INSERT INTO {self.t.keyed} VALUES ({i}, {i}, {_lit(note)}, {value}) "
                "ON CONFLICT (id) DO NOTHING"
            )

        @rule(i=_keys, note=_notes)
        def update(self, i: int, note: str | None) -> None:  # big stays unchanged TOAST
            self.pending.append(
                f"UPDATE {self.t.keyed} SET n = n + 1, note = {_lit(note)} WHERE id = {i}"
            )

        @rule(i=_keys, j=_keys)
        def change_key(self, i: int, j: int) -> None:
            k = self.t.keyed
            self.pending.append(
                f"UPDATE {k} SET id = {j} WHERE id = {i} "
                f"AND NOT EXISTS (SELECT 1 FROM {k} WHERE id = {j})"
            )

        @rule(i=_keys)
        def delete(self, i: int) -> None:
            self.pending.append(f"DELETE FROM {self.t.keyed} WHERE id = {i}")

        @rule(a=st.none() | st.integers(0, 2), b=_notes, copies=st.integers(1, 2))
        def insert_keyless(self, a: int | None, b: str | None, copies: int) -> None:
            rows = ", ".join([f"({_lit(a)}, {_lit(b)})"] * copies)
            self.pending.append(f"INSERT INTO {self.t.keyless} VALUES {rows}")

        @rule(a=st.none() | st.integers(0, 2), b=_notes, delete=st.booleans())
        def change_one_keyless(self, a: int | None, b: str | None, delete: bool) -> None:
            n = self.t.keyless
            one = f"(SELECT ctid FROM {n} WHERE a IS NOT DISTINCT FROM {_lit(a)} LIMIT 1)"
            if delete:
                self.pending.append(f"DELETE FROM {n} WHERE ctid = {one}")
            else:
                self.pending.append(f"UPDATE {n} SET b = {_lit(b)} WHERE ctid = {one}")

        @precondition(lambda self: bool(self.pending))
        @rule()
        def commit(self) -> None:
            self.t.txn(*self.pending)
            self.pending.clear()

        @invariant()
        def nothing_is_left_half_done(self) -> None:
            assert len(self.pending) < 40

        def teardown(self) -> None:
            try:
                self._replicate_and_compare()
            finally:  # slots count against max_replication_slots: one run's go with it
                for slot in self.t.slots:
                    pg_conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))

        def _replicate_and_compare(self) -> None:
            if self.pending:
                self.commit()
            try:
                end = self.t.end()
            except AssertionError:
                return  # nothing was committed
            run = next(runs)
            for slot, mode in enumerate(MODES):
                urls = [f"sqlite:///{tmp_path / f'r{run}_{mode}.db'}"]
                name = f"rtarget_{run}_{mode}_{next(_n)}"
                pg_conn.execute(f"CREATE DATABASE {name}")
                urls.append(pg_url(pg.dsn, name).render_as_string(hide_password=False))
                if maria is not None:  # a database of its own, as for PostgreSQL
                    urls.append(_maria_database(maria, name))
                for i, url in enumerate(urls):
                    options = self.t.options(slot)
                    if i < len(urls) - 1:  # the same slot for every target: the last consumes
                        options = replace(options, no_ack=True)
                    # SQLite takes small batches: rows reduced (sinks.reduce) over rows
                    # that earlier batches wrote; the others take the run as one batch
                    batch = 4 if i == 0 else 10_000
                    replicate_changes(
                        pg.dsn,
                        url,
                        options,
                        conflict=mode,  # type: ignore[arg-type]
                        until=end,
                        batch_changes=batch,
                    )
                    assert_equal(url, self.t)

    Workload.TestCase.settings = settings(
        # a random draw of 8 sometimes committed too little to compare: a fixed one that
        # does keeps CI steady (the exploration happens on every developer's run of
        # test_sink_correctness with HYPOTHESIS_RANDOM=1)
        derandomize=not os.environ.get("HYPOTHESIS_RANDOM"),
        max_examples=8,
        stateful_step_count=20,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    Workload.TestCase().runTest()
    assert next(runs) >= 4, "too few workloads committed anything to compare"


def _maria_database(url: str, name: str) -> str:
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text(f"CREATE DATABASE {name}"))
    finally:
        engine.dispose()
    return sa.engine.make_url(url).set(database=name).render_as_string(hide_password=False)


def _lit(value: object) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, int):
        return str(value)
    return "'" + str(value).replace("'", "''") + "'"
