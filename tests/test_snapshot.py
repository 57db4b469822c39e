"""Snapshot + stream: the rows that exist are copied, consistent with the stream that follows.

Every live case compares the target with the source row by row (keyed tables) or as a
multiset (keyless tables), into SQLite, PostgreSQL and MariaDB.
"""

from __future__ import annotations

import array
import fcntl
import itertools
import json
import os
import random
import signal
import subprocess
import sys
import termios
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from hypothesis import given
from hypothesis import strategies as st

from pglogrepl_bridge import ConfigError, SinkError, StreamOptions, TargetUnavailableError
from pglogrepl_bridge.pgoutput import _accel as accel
from pglogrepl_bridge.pgoutput.relcache import RelationInfo
from pglogrepl_bridge.sinks.replicate import ReplicateStats, run_replicate
from pglogrepl_bridge.sinks.sql import Conflict
from pglogrepl_bridge.snapshot import plan
from pglogrepl_bridge.snapshot.copytext import split_row
from pglogrepl_bridge.snapshot.readrows import ReadRows
from pglogrepl_bridge.snapshot.runner import ChunkCopied, SnapshotJob, SnapshotStats
from pglogrepl_bridge.testing.postgres import PostgresServer, free_port

from .streamkit import Conn, last_commit_end, pg_url, wait_for
from .test_sink_correctness import Tables, assert_equal, target_rows
from .test_types_live import _columns as _types_columns
from .test_types_live import _same
from .test_types_live import _setup as _types_setup

REPO = Path(__file__).resolve().parent.parent

# -- the pure rules ---------------------------------------------------------------------------


@given(st.integers(0, 10_000), st.integers(1, 64))
def test_chunks_cover_every_page_once_and_end_open(pages: int, per_chunk: int) -> None:
    chunks = plan.chunks("t", pages, per_chunk)
    assert chunks[0].first_page == 0 and chunks[-1].end_page is None
    for a, b in itertools.pairwise(chunks):
        assert a.end_page == b.first_page
    assert all(c.count == len(chunks) and c.index == i for i, c in enumerate(chunks))
    assert len(chunks) == max(1, -(-pages // per_chunk))


def test_resume_keeps_complete_tables_and_copies_the_rest_again() -> None:
    done = [
        plan.ChunkDone("a", 0, 2, 100, 5),
        plan.ChunkDone("a", 1, 2, 100, 5),  # complete at 100
        plan.ChunkDone("b", 0, 2, 100, 5),  # half done by ctid: copied again, cleared first
        plan.ChunkDone("c", 0, 1, 90, 0),
        plan.ChunkDone("c", 0, 1, 100, 0),  # one chunk twice: not one consistent copy
    ]
    got = plan.resume(["a", "b", "c", "d"], done)
    assert {k: dict(v.anchors) for k, v in got.kept.items()} == {"a": {0: 100, 1: 100}}
    assert got.to_copy == ("b", "c", "d")
    assert got.to_clear == ("b", "c")
    assert got.partial == {}
    assert plan.checkpoint([100, 120]) == 100
    assert plan.skipped_until([*done[:2], plan.ChunkDone("e", 0, 1, 120, 0)], 100) == {"e": 120}


KEYS = plan.KeyRanges("id", ("100", "200", "300"))


def test_a_key_split_resumes_by_chunk_under_each_chunks_anchor() -> None:
    enc = KEYS.encode()
    done = [
        plan.ChunkDone("k", 0, 4, 100, 5, enc),
        plan.ChunkDone("k", 2, 4, 100, 5, enc),  # chunks 1 and 3 were not copied
        plan.ChunkDone("m", 0, 4, 100, 5, enc),
        plan.ChunkDone("m", 1, 4, 100, 5, enc),
        plan.ChunkDone("m", 2, 4, 150, 5, enc),  # resumed earlier: complete, two anchors
        plan.ChunkDone("m", 3, 4, 150, 5, enc),
        plan.ChunkDone("s", 0, 4, 100, 5, enc),  # its key is another column now
    ]
    got = plan.resume(["k", "m", "s"], done, {"k": "id", "m": "id", "s": "uid"})
    assert got.to_copy == ("k", "s") and got.to_clear == ("s",)
    assert dict(got.partial["k"].anchors) == {0: 100, 2: 100}
    assert [c.index for c in plan.key_chunks("k", KEYS, got.partial["k"].anchors)] == [1, 3]
    m = got.kept["m"]
    assert m.complete and m.lowest == 100
    rule = m.skip()
    assert isinstance(rule, plan.KeySkip) and rule.highest == 150
    bounds = [100, 200, 300]
    assert [rule.anchor_at(bounds, v) for v in (-5, 99, 100, 199, 200, 10**9)] == [
        100, 100, 100, 100, 150, 150,
    ]  # fmt: skip
    skips = plan.skipped_until(done, 120)
    assert set(skips) == {"k", "m", "s"} and skips["k"] == plan.KeySkip(
        KEYS, (100, plan.UNTIL_COPIED, 100, plan.UNTIL_COPIED)
    )  # chunks not copied yet wait for their copy
    assert plan.skipped_until(done[2:6], 150) == {}  # the stream is past every anchor
    marked = [*done[2:6], plan.ChunkDone("m", -1, 0, plan.UNTIL_COPIED, 0)]
    assert plan.resume(["m"], marked).partial["m"].count == 4  # a request: copy the rest
    assert plan.skipped_until(marked, 0) == {"m": plan.UNTIL_COPIED}


@given(st.lists(st.integers(0, 30), max_size=12))
def test_key_ranges_spans_merge_adjacent_chunks(indexes: list[int]) -> None:
    ranges = plan.KeyRanges("id", tuple(str(b) for b in range(10, 310, 10)))
    spans = ranges.spans(indexes)
    inside = {v for v in range(-5, 320) if any(
        (lo is None or v >= int(lo)) and (hi is None or v < int(hi)) for lo, hi in spans
    )}  # fmt: skip
    chunk_of = {v: sum(1 for b in ranges.bounds if int(b) <= v) for v in range(-5, 320)}
    assert inside == {v for v, i in chunk_of.items() if i in set(indexes)}
    assert len(spans) <= len(set(indexes))
    assert plan.KeyRanges.decode(ranges.encode()) == ranges
    assert plan.KeyRanges.decode("not json") is None


@given(st.integers(-(10**12), 10**12), st.integers(0, 10**6), st.integers(1, 64))
def test_split_bounds_are_ascending_and_inside(low: int, span: int, count: int) -> None:
    bounds = plan.split_bounds(low, low + span, count)
    assert bounds == sorted(set(bounds)) and len(bounds) <= max(0, count - 1)
    assert all(low < b <= low + span for b in bounds)
    sample = [str(i) for i in range(low, low + min(span, 500) + 1)]
    picked = plan.quantiles(sample, count)
    assert len(set(picked)) == len(picked) <= max(0, count - 1)
    assert all(p in sample and p != sample[0] for p in picked)


def _copy_escape(value: bytes) -> bytes:
    """COPY TO's text escaping, as PostgreSQL's CopyAttributeOutText writes it."""
    out = bytearray()
    names = {8: b"b", 9: b"t", 10: b"n", 11: b"v", 12: b"f", 13: b"r", 92: b"\\"}
    for byte in value:
        out += b"\\" + names[byte] if byte in names else bytes([byte])
    return bytes(out)


@given(st.lists(st.one_of(st.none(), st.binary(max_size=20)), min_size=1, max_size=6))
def test_copy_text_rows_read_back_to_the_values(values: list[bytes | None]) -> None:
    line = b"\t".join(b"\\N" if v is None else _copy_escape(v) for v in values) + b"\n"
    assert split_row(line, len(values)) == values
    with pytest.raises(ValueError, match="columns"):
        split_row(line, len(values) + 1)
    if accel.copy_row is not None:  # the C splitter: the same values, and only them
        assert accel.copy_row(line, len(values)) == values
        assert accel.copy_row(line[:-1], len(values)) == values
        assert accel.copy_row(line, len(values) + 1) is None
        if len(values) > 1:
            assert accel.copy_row(line, len(values) - 1) is None


@given(st.binary(max_size=40), st.integers(min_value=1, max_value=5))
def test_the_c_splitter_agrees_or_declines_on_any_bytes(line: bytes, ncols: int) -> None:
    """Whatever the bytes, the C splitter gives split_row's values or declines (None)."""
    if accel.copy_row is None:
        return
    fast = accel.copy_row(line, ncols)
    if fast is not None:
        assert fast == split_row(line, ncols)


# -- live -------------------------------------------------------------------------------------


class Writers:
    """Concurrent writers on ``Tables``: inserts, updates (key changes included), deletes,
    TOASTed values, on the keyed and the keyless table, until stopped."""

    def __init__(self, dsn: str, t: Tables, seed: int) -> None:
        self.dsn, self.t = dsn, t
        self.rng = random.Random(seed)
        self._stop = threading.Event()
        self.errors: list[BaseException] = []
        self.count = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        k, kl, rng = self.t.keyed, self.t.keyless, self.rng
        try:
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                while not self._stop.is_set():
                    i = rng.randrange(4000)
                    with conn.transaction():
                        conn.execute(
                            f"INSERT INTO {k} VALUES ({i}, {i}, 'w', NULL) ON CONFLICT DO NOTHING"
                        )
                        j = rng.randrange(4000)
                        conn.execute(f"UPDATE {k} SET n = n + 1, note = 'u{j}' WHERE id = {j}")
                        moved = rng.randrange(4000)
                        conn.execute(
                            f"UPDATE {k} SET id = id + 10000 WHERE id = {moved} "
                            f"AND NOT EXISTS (SELECT 1 FROM {k} WHERE id = {moved + 10000})"
                        )
                        conn.execute(f"DELETE FROM {k} WHERE id = {rng.randrange(4000)}")
                        if rng.random() < 0.2:
                            big = "'" + str(i) * 3000 + "'"
                            conn.execute(f"UPDATE {k} SET big = {big} WHERE id = {i}")
                        conn.execute(f"INSERT INTO {kl} VALUES ({i % 7}, NULL)")
                        conn.execute(
                            f"DELETE FROM {kl} WHERE ctid = (SELECT ctid FROM {kl} "
                            f"WHERE a = {rng.randrange(7)} LIMIT 1)"
                        )
                    self.count += 1
        except BaseException as exc:
            self.errors.append(exc)

    def __enter__(self) -> Writers:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self.thread.join(30)
        assert not self.errors, self.errors


def _fill(t: Tables, rows: int = 3000) -> None:
    t.conn.execute(
        f"INSERT INTO {t.keyed} SELECT g, g, 'row ' || g, CASE WHEN g % 50 = 0 "
        f"THEN repeat(g::text, 2000) END FROM generate_series(0, {rows - 1}) g"
    )
    t.conn.execute(
        f"INSERT INTO {t.keyless} SELECT g % 7, CASE WHEN g % 3 = 0 THEN NULL ELSE 'x' END "
        f"FROM generate_series(1, {rows // 3}) g"
    )


@pytest.mark.parametrize("mode", ["source", "lww"])
@pytest.mark.parametrize("method", ["existing_slot", "new_slot"])
def test_snapshot_under_concurrent_writers_equals_the_source(
    pg: PostgresServer, pg_conn: Conn, target: str, method: str, mode: Conflict
) -> None:
    t = Tables(pg_conn)
    _fill(t)
    options = t.options()
    if method == "new_slot":
        options = replace(options, slot=t.slots[0] + "_new", create_slot=True)
    with Writers(pg.dsn, t, seed=1) as writers:
        time.sleep(0.2)  # writers are busy when the snapshot is exported
        stats = run_replicate(
            pg.dsn,
            target,
            options,
            conflict=mode,
            snapshot="only",
            snapshot_workers=3,
            snapshot_chunk_pages=2,
        )
        time.sleep(0.3)
    assert writers.count > 5
    copied = stats.snapshot
    assert copied is not None and copied.complete and copied.chunks > 10
    assert copied.rows > 3000
    end = last_commit_end(pg_conn, options.slot, t.pub)
    again = run_replicate(pg.dsn, target, options, conflict=mode, until=end)
    assert again.snapshot is None and again.transactions > 0  # streamed, not copied again
    assert_equal(target, t)


def test_partitioned_empty_and_filtered_tables(
    pg: PostgresServer, pg_conn: Conn, target: str
) -> None:
    c = pg_conn
    c.execute(
        "CREATE TABLE IF NOT EXISTS sp (id int, region text, v int, PRIMARY KEY (id, region)) "
        "PARTITION BY LIST (region)"
    )
    c.execute("CREATE TABLE IF NOT EXISTS sp_eu PARTITION OF sp FOR VALUES IN ('eu')")
    c.execute("CREATE TABLE IF NOT EXISTS sp_us PARTITION OF sp FOR VALUES IN ('us')")
    c.execute("TRUNCATE sp")
    c.execute(
        "INSERT INTO sp SELECT g, CASE WHEN g % 2 = 0 THEN 'eu' ELSE 'us' END, g "
        "FROM generate_series(1, 500) g"
    )
    c.execute("CREATE TABLE IF NOT EXISTS sempty (id int PRIMARY KEY, t text)")
    c.execute("CREATE TABLE IF NOT EXISTS sfilt (id int PRIMARY KEY, a int, secret text)")
    c.execute("TRUNCATE sfilt")
    c.execute("INSERT INTO sfilt SELECT g, g % 10, 'hidden' FROM generate_series(1, 300) g")
    suffix = str(abs(hash(target)) % 10**8)
    results = {}
    for via_root in (True, False):
        pub, slot = f"sppub_{suffix}_{int(via_root)}", f"spslot_{suffix}_{int(via_root)}"
        c.execute(
            f"CREATE PUBLICATION {pub} FOR TABLE sp, sempty, sfilt (id, a) WHERE (a > 5) "
            f"WITH (publish_via_partition_root = {str(via_root).lower()})"
        )
        c.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (slot,))
        url = target if via_root else _second_target(target, pg, c, suffix)
        opts = StreamOptions(slot=slot, publications=(pub,))
        stats = run_replicate(pg.dsn, url, opts, snapshot="only", snapshot_chunk_pages=1)
        assert stats.snapshot is not None and stats.snapshot.complete
        results[via_root] = _read(url)
        c.execute(f"DROP PUBLICATION {pub}")
        c.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
    source_sp = sorted(c.execute("SELECT id, region, v FROM sp").fetchall())
    source_filt = sorted(c.execute("SELECT id, a FROM sfilt WHERE a > 5").fetchall())
    root = results[True]
    assert sorted(root["sp"]) == source_sp
    assert "sp_eu" not in root
    leaves = results[False]
    assert "sp" not in leaves and sorted(leaves["sp_eu"] + leaves["sp_us"]) == source_sp
    for got in results.values():
        assert got["sempty"] == []
        assert sorted(got["sfilt"]) == source_filt  # the row filter and the column list hold
        assert got["sfilt_columns"] == ["id", "a"]


def _second_target(target: str, pg: PostgresServer, c: Conn, suffix: str) -> str:
    if target.startswith("sqlite"):
        return target.replace("target.db", "target2.db")
    if target.startswith("postgresql"):
        name = f"second_{suffix}"
        c.execute(f"CREATE DATABASE {name}")
        return pg_url(pg.dsn, name).render_as_string(hide_password=False)
    engine = sa.create_engine(target)  # MariaDB: one database, emptied
    with engine.begin() as conn:
        for (table,) in conn.execute(sa.text("SHOW TABLES")).all():
            conn.execute(sa.text(f"DROP TABLE `{table}`"))
    engine.dispose()
    return target


def _read(url: str) -> dict[str, Any]:
    engine = sa.create_engine(url)
    out: dict[str, Any] = {}
    try:
        with engine.connect() as c:
            inspector = sa.inspect(c)
            for name in ("sp", "sp_eu", "sp_us", "sempty", "sfilt"):
                if inspector.has_table(name):
                    cols = [x["name"] for x in inspector.get_columns(name)]
                    out[name] = [tuple(r) for r in c.execute(sa.text(f"SELECT * FROM {name}"))]
                    if name == "sfilt":
                        out["sfilt_columns"] = cols
    finally:
        engine.dispose()
    return out


_KILLED_RUN = """
import sys
import termios
from pglogrepl_bridge import StreamOptions
from pglogrepl_bridge.sinks.replicate import run_replicate
from pglogrepl_bridge.sinks.sql import Conflict
options = StreamOptions(slot=sys.argv[3], publications=(sys.argv[4],))
run_replicate(sys.argv[1], sys.argv[2], options, snapshot="only", snapshot_workers=2,
              snapshot_chunk_pages=1)
"""


def test_kill_9_during_the_snapshot_then_resume(
    pg: PostgresServer, pg_conn: Conn, tmp_path: Path
) -> None:
    t = Tables(pg_conn)
    _fill(t, rows=100_000)
    url = f"sqlite:///{tmp_path / 'killed.db'}"
    rng = random.Random(7)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = [sys.executable, "-c", _KILLED_RUN, pg.dsn]
    started = time.monotonic()  # a whole run, into another target, sets the kill times
    subprocess.run([*run, f"sqlite:///{tmp_path / 'whole.db'}", t.slots[0], t.pub], check=True)
    whole = time.monotonic() - started
    kills = 0
    with Writers(pg.dsn, t, seed=2):
        for _ in range(3):
            proc = subprocess.Popen([*run, url, t.slots[0], t.pub], env=env, stderr=subprocess.PIPE)
            time.sleep(rng.uniform(0.2, 0.7) * whole)
            if proc.poll() is None:
                proc.kill()
                kills += 1
            proc.wait()
    assert kills >= 2  # a run that finished first is fine: the next ones then just stream
    # a killed run's backend may still hold the slot for a moment (slot advance)
    active = "SELECT count(*) FROM pg_replication_slots WHERE slot_name = %s AND active"
    wait_for(
        lambda: pg_conn.execute(active, (t.slots[0],)).fetchone() == (0,),
        what="the killed run's backend to let go of the slot",
    )
    done = [plan.ChunkDone(*row[2:]) for row in _progress(url)]
    expected_kept = sorted(plan.resume([f"public.{t.keyed}", f"public.{t.keyless}"], done).kept)
    end = last_commit_end(pg_conn, t.slots[0], t.pub)
    stats = run_replicate(pg.dsn, url, t.options(), until=end, snapshot_chunk_pages=1)
    if stats.snapshot is not None:  # resumed: tables that were complete are not copied again
        assert stats.snapshot.complete
        assert stats.snapshot.kept == expected_kept
        assert not set(stats.snapshot.copied) & set(expected_kept)
    assert_equal(url, t)


def _progress(url: str) -> list[tuple[Any, ...]]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as c:
            if not sa.inspect(c).has_table("pglogrepl_bridge_snapshot"):
                return []
            return [tuple(r) for r in c.execute(sa.text("SELECT * FROM pglogrepl_bridge_snapshot"))]
    finally:
        engine.dispose()


def test_snapshot_only_then_replicate_on_the_command_line(
    pg: PostgresServer, pg_conn: Conn, tmp_path: Path
) -> None:
    t = Tables(pg_conn)
    _fill(t, rows=500)
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    base = [sys.executable, "-m", "pglogrepl_bridge", "replicate", "--dsn", pg.dsn]
    base += ["--slot", t.slots[0], "-p", t.pub, "--target", url]
    first = subprocess.run(
        [*base, "--snapshot", "only"], capture_output=True, text=True, timeout=120
    )
    assert first.returncode == 0, first.stderr
    assert "snapshot: copied" in first.stderr and "2 tables" in first.stderr
    assert "snapshot table=public." in first.stderr  # progress lines off a terminal
    assert_equal(url, t)
    t.txn(
        f"UPDATE {t.keyed} SET note = 'after' WHERE id < 10", f"DELETE FROM {t.keyless} WHERE a = 1"
    )
    end = last_commit_end(pg_conn, t.slots[0], t.pub)
    second = subprocess.run(
        [*base, "--until-lsn", str(end)], capture_output=True, text=True, timeout=120
    )
    assert second.returncode == 0, second.stderr
    assert "snapshot:" not in second.stderr
    assert_equal(url, t)


def test_bad_input_is_refused_with_the_fix(
    pg: PostgresServer, pg_conn: Conn, tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'bad.db'}"
    pg_conn.execute("CREATE PUBLICATION snap_nothing")
    pg_conn.execute("SELECT pg_create_logical_replication_slot('snap_nothing_slot', 'pgoutput')")
    try:
        opts = StreamOptions(slot="snap_nothing_slot", publications=("snap_nothing",))
        with pytest.raises(ConfigError, match="publish no tables"):
            run_replicate(pg.dsn, url, opts)
        with pytest.raises(ConfigError, match="permanent slot"):
            run_replicate(pg.dsn, url, replace(opts, create_slot=True, temporary=True))
        with pytest.raises(ConfigError, match="does not exist"):
            run_replicate(pg.dsn, url, replace(opts, slot="snap_no_such_slot"))
    finally:
        pg_conn.execute("DROP PUBLICATION snap_nothing")
    # a slot of another database
    pg_conn.execute("CREATE DATABASE snap_other")
    with psycopg.connect(pg.dsn, dbname="snap_other", autocommit=True) as other:
        other.execute("SELECT pg_create_logical_replication_slot('snap_other_slot', 'pgoutput')")
    t = Tables(pg_conn)
    with pytest.raises(ConfigError, match="belongs to database 'snap_other'"):
        run_replicate(pg.dsn, url, replace(t.options(), slot="snap_other_slot"))
    # a target that rejects a row names the table
    _fill(t, rows=100)
    engine = sa.create_engine(url)
    with engine.begin() as c:
        c.execute(
            sa.text(
                f"CREATE TABLE {t.keyed} (id INTEGER PRIMARY KEY, n INTEGER CHECK (n < 50), "
                "note TEXT, big TEXT)"
            )
        )
    engine.dispose()
    with pytest.raises(SinkError, match=f"{t.keyed}.*CHECK"):
        run_replicate(pg.dsn, url, t.options())
    # nothing half-applied or unrecorded: the refused table left neither rows nor progress;
    # the keyless one (copied by the other worker, or not yet when the job stopped) holds
    # all its rows with its progress row, or neither
    keyed, keyless = target_rows(url, t)
    recorded = {row[2] for row in _progress(url)}
    assert keyed == [] and recorded <= {f"public.{t.keyless}"}
    assert keyless == (t.source_rows()[1] if recorded else Counter())


def test_a_table_the_role_cannot_read(pg: PostgresServer, pg_conn: Conn, tmp_path: Path) -> None:
    t = Tables(pg_conn)
    _fill(t, rows=10)
    pg_conn.execute("DROP ROLE IF EXISTS snap_reader")
    pg_conn.execute("CREATE ROLE snap_reader LOGIN REPLICATION PASSWORD 'pw'")
    pg_conn.execute(f"GRANT SELECT ON {t.keyless} TO snap_reader")
    dsn = psycopg.conninfo.make_conninfo(pg.dsn, user="snap_reader", password="pw")
    with pytest.raises(ConfigError, match=f"GRANT SELECT ON public.{t.keyed}"):
        run_replicate(dsn, f"sqlite:///{tmp_path / 'r.db'}", t.options())


def test_tail_snapshot_then_stream_folds_to_the_source(pg: PostgresServer, pg_conn: Conn) -> None:
    """``tail --snapshot`` under concurrent writers: the read rows, then the changes, applied
    by key, give the source's table."""
    t = Tables(pg_conn)
    _fill(t, rows=2000)
    cmd = [sys.executable, "-m", "pglogrepl_bridge", "tail", "--dsn", pg.dsn, "--slot"]
    cmd += [t.slots[0], "-p", t.pub, "--snapshot", "--format", "jsonl", "--table", t.keyed]
    with Writers(pg.dsn, t, seed=3):
        time.sleep(0.2)
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(1.0)
    t.txn(f"INSERT INTO {t.keyed} VALUES (-1, -1, 'the end', NULL)")
    state: dict[int, tuple[Any, ...]] = {}
    reads = 0
    assert proc.stdout is not None
    for line in proc.stdout:
        txn = json.loads(line)
        for change in txn["changes"]:
            new, old = change.get("new"), change.get("old")
            if change["op"] == "read":
                assert txn["snapshot"] is True and new["id"] not in state
                reads += 1
            moved = state.pop(old["id"], None) if old is not None else None
            if change["op"] == "delete":
                continue
            full = moved or state.get(new["id"], (None, None, None, None))
            state[new["id"]] = (new["id"], new["n"], new["note"], new.get("big", full[3]))
        if any((c.get("new") or {}).get("id") == -1 for c in txn["changes"]):
            break
    proc.terminate()  # its stdout is read to the end: a stop can wait on a full pipe
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert reads > 1000
    assert sorted(state.values()) == t.source_rows()[0]


def _buffered(pipe: Any) -> int:
    """Bytes waiting in a pipe, unread."""
    count = array.array("i", [0])
    fcntl.ioctl(pipe.fileno(), termios.FIONREAD, count)
    return count[0]


def test_a_second_signal_ends_a_stop_stuck_on_stdout(pg: PostgresServer, pg_conn: Conn) -> None:
    """``tail --snapshot`` into a pipe nobody reads: the first SIGTERM's clean stop waits on
    the full pipe; a second one exits at once (128 + 15), and says so."""
    t = Tables(pg_conn)
    _fill(t, rows=3000)  # lines of far more than a pipe's 64 KiB
    cmd = [sys.executable, "-m", "pglogrepl_bridge", "tail", "--dsn", pg.dsn, "--slot"]
    cmd += [t.slots[0], "-p", t.pub, "--snapshot", "--format", "jsonl", "--table", t.keyed]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: _buffered(proc.stdout) >= 65536, timeout=60, what="a full pipe")
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert proc.poll() is None  # the clean stop waits for the reader
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 128 + signal.SIGTERM
        assert proc.stderr is not None
        assert b"a second signal during the stop: exiting at once" in proc.stderr.read()
    finally:
        proc.kill()


def _eventually_equal(check: Callable[[], None], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            check()
            return
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_a_requested_snapshot_and_a_table_added_while_running(
    pg: PostgresServer, pg_conn: Conn, target: str
) -> None:
    """``snapshot request`` repairs a drifted target table while the stream runs, and a table
    added to the publication is backfilled; both under concurrent writers."""
    t = Tables(pg_conn)
    _fill(t, rows=1500)
    added = f"{t.keyed}_added"
    pg_conn.execute(f"CREATE TABLE {added} (id int PRIMARY KEY, v text)")
    pg_conn.execute(f"INSERT INTO {added} SELECT g, 'old ' || g FROM generate_series(1, 300) g")
    running: list[Any] = []
    result: list[Any] = []

    def replicate() -> None:
        try:
            options = replace(t.options(), status_interval=0.2)
            result.append(
                run_replicate(
                    pg.dsn, target, options, on_stream=running.append, snapshot_chunk_pages=1
                )
            )
        except BaseException as exc:  # reported below
            result.append(exc)

    thread = threading.Thread(target=replicate, daemon=True)
    thread.start()
    try:
        _eventually_equal(lambda: assert_equal(target, t))
        engine = sa.create_engine(target)
        with engine.begin() as c:  # the target drifts: rows lost, values changed
            c.execute(sa.text(f"DELETE FROM {t.keyed} WHERE id < 100"))
            c.execute(sa.text(f"UPDATE {t.keyed} SET note = 'drift' WHERE id >= 100"))
        engine.dispose()
        with pytest.raises(AssertionError):
            assert_equal(target, t)
        with Writers(pg.dsn, t, seed=4):
            time.sleep(0.2)
            request = [sys.executable, "-m", "pglogrepl_bridge", "snapshot", "request"]
            asked = subprocess.run(
                [*request, "--dsn", pg.dsn, "--slot", t.slots[0], "--table", t.keyed],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert asked.returncode == 0, asked.stderr
            time.sleep(0.5)
            pg_conn.execute(f"ALTER PUBLICATION {t.pub} ADD TABLE {added}")
            pg_conn.execute(f"UPDATE {added} SET v = 'new' WHERE id % 10 = 0")
            time.sleep(0.5)
        t.txn(f"INSERT INTO {added} VALUES (1000, 'last')")

        def all_equal() -> None:
            assert_equal(target, t)
            engine = sa.create_engine(target)
            try:
                with engine.connect() as c:
                    got = sorted(tuple(r) for r in c.execute(sa.text(f"SELECT id, v FROM {added}")))
            except sa.exc.SQLAlchemyError as exc:
                raise AssertionError(str(exc)) from None
            finally:
                engine.dispose()
            assert got == sorted(pg_conn.execute(f"SELECT id, v FROM {added}").fetchall())

        _eventually_equal(all_equal)
    finally:
        for job_or_stream in running:
            job_or_stream.stop()
        thread.join(60)
    assert result and not isinstance(result[0], BaseException), result
    stats = result[0]
    assert stats.snapshot is not None and stats.snapshot.complete
    copied = sorted(name for backfill in stats.backfills for name in backfill.copied)
    assert copied == sorted([f"public.{added}", f"public.{t.keyed}"])
    assert all(b.complete for b in stats.backfills)


def test_progress_metrics_and_status_during_a_snapshot(
    pg: PostgresServer, pg_conn: Conn, tmp_path: Path
) -> None:
    """While rows are copied, ``status`` shows the worker's COPY, the metrics count the rows,
    and each committed chunk is reported with its table's progress."""
    t = Tables(pg_conn)
    _fill(t, rows=100_000)  # tens of MB: the server still sends when the first batch is out
    seen: dict[str, Any] = {}

    def on_rows(rel: RelationInfo, chunk: plan.ChunkDone, rows: list[bytes]) -> None:
        if "status" not in seen:  # the COPY is still running: this is its first batch
            seen["status"] = subprocess.run(
                [sys.executable, "-m", "pglogrepl_bridge", "status", "--dsn", pg.dsn],
                capture_output=True, text=True, timeout=60,
            ).stdout  # fmt: skip
        seen.setdefault("rows", []).append(rel.row_at(rows[0], 0))

    stats = SnapshotJob(pg.dsn, ReadRows(on_rows, batch=100), t.options(), workers=1).run()
    assert stats.complete and stats.rows == 100_000 + 33_333
    assert "running snapshot" in seen["status"] and f"public.{t.keyed}" in seen["status"]
    assert {"id", "n", "note", "big"} <= set(seen["rows"][0]) or {"a", "b"} == set(seen["rows"][0])

    port = free_port()
    events: list[ChunkCopied] = []
    scraped: list[str] = []

    def on_progress(event: ChunkCopied) -> None:
        events.append(event)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as page:
            scraped.append(page.read().decode())

    url = f"sqlite:///{tmp_path / 'metrics.db'}"
    run_replicate(
        pg.dsn, url, t.options(), snapshot="only", metrics_port=port,
        on_snapshot_progress=on_progress, snapshot_chunk_pages=64, snapshot_workers=1,
    )  # fmt: skip
    assert events[-1].tables_done == events[-1].tables == 2
    assert sum(e.rows for e in events) == 133_333
    assert all(e.table_rows <= 100_000 for e in events)
    assert "pglogrepl_snapshot_rows_total 133333.0" in scraped[-1]
    assert "pglogrepl_snapshot_tables_done 2.0" in scraped[-1]
    assert "pglogrepl_snapshot_tables_pending 0.0" in scraped[-1]


def test_every_type_lands_the_same_copied_or_streamed(
    pg: PostgresServer, pg_conn: Conn, target: str, tmp_path: Path
) -> None:
    """The type zoo of test_types_live, once through the stream and once through the
    snapshot, into two targets of one kind: every stored value is the same."""
    _types_setup(pg_conn)
    pg_conn.execute("SELECT pg_create_logical_replication_slot('zoo_slot', 'pgoutput')")
    columns = _types_columns(pg_conn)
    if target.startswith("mysql"):  # MariaDB holds no NaN or infinity (nor does the stream)
        columns = {
            **columns,
            "c_numeric": ("numeric", ["1.5", "123456789012345678901234567890.000000001"]),
            "c_float4": ("real", ["2.5", "1.5"]),
            "c_float8": ("double precision", ["-1.25", "0"]),
        }
    for i in range(2):
        values = ", ".join(v[i] for _, v in columns.values())
        pg_conn.execute(f"INSERT INTO all_types ({', '.join(columns)}) VALUES ({values})")
    pg_conn.execute("INSERT INTO all_types (id) VALUES (100)")  # NULLs everywhere
    options = StreamOptions(slot="zoo_slot", publications=("types_pub",))
    end = last_commit_end(pg_conn, "zoo_slot", "types_pub")
    streamed = _second_target(target, pg, pg_conn, f"zoo{abs(hash(target)) % 10**6}")
    if streamed == target:  # MariaDB has one database here: stream first, read, then copy
        run_replicate(pg.dsn, target, replace(options, no_ack=True), snapshot="never", until=end)
        by_stream = _rows_of(target, "all_types")
        _second_target(target, pg, pg_conn, "again")
    else:
        run_replicate(pg.dsn, streamed, replace(options, no_ack=True), snapshot="never", until=end)
        by_stream = _rows_of(streamed, "all_types")
    run_replicate(pg.dsn, target, options, snapshot="only")
    by_copy = _rows_of(target, "all_types")
    assert len(by_copy) == 3
    for copied, streamed_row in zip(by_copy, by_stream, strict=True):
        differ = [
            (i, a, b)
            for i, (a, b) in enumerate(zip(copied, streamed_row, strict=True))
            if not _same(a, b)
        ]
        assert differ == []


def _rows_of(url: str, table: str) -> list[tuple[Any, ...]]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as c:
            rows = c.exec_driver_sql(f"SELECT * FROM {table} ORDER BY id").all()
    finally:
        engine.dispose()
    return [tuple(r) for r in rows]


def test_a_chunk_is_read_again_after_the_target_went_away(
    pg: PostgresServer, pg_conn: Conn
) -> None:
    """A target that fails mid-chunk: the source's COPY is cancelled, the worker's snapshot
    transaction rolls back to before the chunk, and the chunk is read again, whole."""
    t = Tables(pg_conn)
    _fill(t, rows=20_000)
    got: dict[str, list[bytes]] = {}
    failures = {"left": 2}

    class Flaky(ReadRows):
        def copy_chunk(
            self, rel: RelationInfo, rows: Iterable[Sequence[bytes | None]], chunk: plan.ChunkDone
        ) -> int:
            if failures["left"] and rel.name == t.keyed:
                failures["left"] -= 1
                for n, _ in enumerate(rows):  # part of the chunk, then the target is gone
                    if n == 500:
                        raise TargetUnavailableError("the target went away")
            return super().copy_chunk(rel, rows, chunk)

    def on_rows(rel: RelationInfo, chunk: plan.ChunkDone, rows: list[bytes]) -> None:
        got.setdefault(rel.name, []).extend(rows)

    options = replace(t.options(), max_backoff=0.1)
    stats = SnapshotJob(pg.dsn, Flaky(on_rows), options, workers=1).run()
    assert stats.complete and failures["left"] == 0
    ids = sorted(map(_first_column_int, got[t.keyed]))
    assert ids == sorted(r[0] for r in t.source_rows()[0])  # each row once


def _first_column_int(raw: bytes) -> int:
    """The first column of a TupleData in text format (2 bytes count, 't', 4 bytes length)."""
    length = int.from_bytes(raw[3:7], "big")
    return int(raw[7 : 7 + length])


def _key_split_run(
    pg: PostgresServer, c: Conn, target: str, name: str, window: Callable[[int], None]
) -> tuple[int, SnapshotStats, ReplicateStats]:
    """A key-split table whose first run stops after two chunks; ``window(bound)`` writes
    between the runs (keys below ``bound`` are in the committed chunks); then a run that
    resumes and streams to the end. Returns the chunk count, the resumed copy, the run."""
    c.execute(f"CREATE TABLE {name} (id int PRIMARY KEY, v int, big text)")
    c.execute(f"ALTER TABLE {name} ALTER COLUMN big SET STORAGE EXTERNAL")  # TOASTed as is
    c.execute(
        f"INSERT INTO {name} SELECT g, g, CASE WHEN g % 10 = 0 THEN repeat('x', 3000) END "
        "FROM generate_series(0, 3999) g"
    )
    c.execute(f"CREATE PUBLICATION {name}_pub FOR TABLE {name}")
    options = StreamOptions(slot=f"{name}_slot", publications=(f"{name}_pub",), create_slot=True)
    jobs: list[SnapshotJob] = []

    def on_stream(job: object) -> None:
        if isinstance(job, SnapshotJob):
            jobs.append(job)

    def stop_after_two(event: ChunkCopied) -> None:
        if event.index == 1:
            jobs[-1].stop()

    stopped = run_replicate(
        pg.dsn, target, options, snapshot="only", snapshot_workers=1, snapshot_chunk_pages=2,
        on_stream=on_stream, on_snapshot_progress=stop_after_two,
    ).snapshot  # fmt: skip
    assert stopped is not None and not stopped.complete and stopped.chunks == 2
    progress = _progress(target)
    assert sorted(r[3] for r in progress) == [0, 1]
    ranges = plan.KeyRanges.decode(progress[0][-1])
    assert ranges is not None and ranges.column == "id" and ranges.count > 3
    window(int(ranges.bounds[1]))
    end = last_commit_end(c, options.slot, f"{name}_pub")
    options = replace(options, create_slot=False)
    run = run_replicate(pg.dsn, target, options, snapshot_workers=1, snapshot_chunk_pages=2,
                        until=end)  # fmt: skip
    assert run.snapshot is not None and run.snapshot.complete
    source = c.execute(f"SELECT id, v, big FROM {name} ORDER BY id").fetchall()
    assert _rows_of(target, name) == [tuple(r) for r in source]
    return ranges.count, run.snapshot, run


def test_a_resumed_key_split_keeps_its_chunks_and_follows_moved_keys(
    pg: PostgresServer, pg_conn: Conn, target: str
) -> None:
    c, name = pg_conn, f"rk_moves_{abs(hash(target)) % 10**8}"

    def window(bound: int) -> None:  # keys below ``bound``: in the committed chunks
        done, rest = 5, bound - bound % 10 + 101  # neither holds a TOASTed value
        c.execute(f"UPDATE {name} SET v = -v WHERE id IN ({done}, {rest})")
        c.execute(f"UPDATE {name} SET id = -1 WHERE id = {rest + 1}")  # rest → done: insert
        c.execute(f"UPDATE {name} SET id = 9000 WHERE id = {done + 2}")  # done → rest: delete
        c.execute(f"DELETE FROM {name} WHERE id IN ({done + 3}, {rest + 2})")
        c.execute(f"INSERT INTO {name} VALUES (-2, 0, NULL), (5000, 0, NULL)")
        c.execute(  # rest → done with its TOASTed value rewritten: sent whole, an insert
            f"UPDATE {name} SET id = -3, big = repeat('y', 3000) WHERE id = {rest + 19}"
        )

    count, resumed, run = _key_split_run(pg, c, target, name, window)
    # the committed chunks were not copied again, and the stream followed every key
    assert resumed.chunks == count - 2 and resumed.copied == [f"public.{name}"]
    assert run.backfills == [] and run.transactions == 6


def test_a_key_moved_without_its_toasted_value_copies_the_table_again(
    pg: PostgresServer, pg_conn: Conn, target: str
) -> None:
    c, name = pg_conn, f"rk_toast_{abs(hash(target)) % 10**8}"

    def window(bound: int) -> None:  # a TOASTed row from the copied-later chunks moves into
        row = bound + 100 - bound % 10  # the committed ones; pgoutput leaves its value out
        c.execute(f"UPDATE {name} SET id = -1 WHERE id = {row}")
        c.execute(f"UPDATE {name} SET v = -v WHERE id < 20")

    _, _, run = _key_split_run(pg, c, target, name, window)
    assert [b.copied for b in run.backfills] == [[f"public.{name}"]]


def test_a_key_that_follows_the_heap_splits_by_key_a_random_one_by_ctid(
    pg: PostgresServer, pg_conn: Conn, target: str
) -> None:
    c, suffix = pg_conn, abs(hash(target)) % 10**8
    serial, random_key = f"ks_serial_{suffix}", f"ks_uuid_{suffix}"
    c.execute(f"CREATE TABLE {serial} (id bigint PRIMARY KEY, v text)")
    c.execute(f"CREATE TABLE {random_key} (id uuid PRIMARY KEY, v text)")
    c.execute(f"INSERT INTO {serial} SELECT g, 'v' || g FROM generate_series(1, 3000) g")
    c.execute(
        f"INSERT INTO {random_key} SELECT gen_random_uuid(), 'v' FROM generate_series(1, 3000)"
    )
    c.execute(f"ANALYZE {serial}")
    c.execute(f"ANALYZE {random_key}")
    c.execute(f"CREATE PUBLICATION ks_{suffix} FOR TABLE {serial}, {random_key}")
    options = StreamOptions(slot=f"ks_{suffix}", publications=(f"ks_{suffix}",), create_slot=True)
    stats = run_replicate(pg.dsn, target, options, snapshot="only", snapshot_chunk_pages=2)
    assert stats.snapshot is not None and stats.snapshot.complete
    splits = {row[2]: plan.KeyRanges.decode(row[-1]) for row in _progress(target)}
    by_key = splits[f"public.{serial}"]
    assert by_key is not None and by_key.column == "id" and by_key.count > 3
    assert splits[f"public.{random_key}"] is None  # by ctid: every chunk reads its own pages
    for name in (serial, random_key):
        source = sorted(tuple(r) for r in c.execute(f"SELECT id::text, v FROM {name}"))
        got = sorted((str(i).replace("-", ""), v) for i, v in _rows_of(target, name))
        assert got == sorted((i.replace("-", ""), v) for i, v in source)


def test_publications_for_all_tables_and_for_tables_in_schema(
    pg: PostgresServer, pg_conn: Conn, tmp_path: Path
) -> None:
    pg_conn.execute("DROP DATABASE IF EXISTS snap_pubs")
    pg_conn.execute("CREATE DATABASE snap_pubs")  # FOR ALL TABLES: only these tables
    dsn = psycopg.conninfo.make_conninfo(pg.dsn, dbname="snap_pubs")
    # source table: (target table, its columns)
    tables = {
        "sales.orders": ("sales_orders", "id, total"),
        "sales.lines": ("sales_lines", "order_id, n"),  # no key: an insert-only table
        "public.users": ("users", "id, name"),
    }
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("CREATE SCHEMA sales")
        c.execute("CREATE TABLE sales.orders (id int PRIMARY KEY, total int)")
        c.execute("CREATE TABLE sales.lines (order_id int, n int)")
        c.execute("CREATE TABLE users (id bigint PRIMARY KEY, name text)")
        c.execute("INSERT INTO sales.orders SELECT g, g * 3 FROM generate_series(1, 300) g")
        c.execute("INSERT INTO sales.lines SELECT g % 300, g FROM generate_series(1, 900) g")
        c.execute("INSERT INTO users SELECT g, 'user ' || g FROM generate_series(1, 200) g")
        c.execute("CREATE PUBLICATION p_schema FOR TABLES IN SCHEMA sales")
        c.execute("CREATE PUBLICATION p_all FOR ALL TABLES")
        source = {
            name: sorted(c.execute(f"SELECT {cols} FROM {name}").fetchall())
            for name, (_, cols) in tables.items()
        }
    published = {"p_schema": {"sales.orders", "sales.lines"}, "p_all": set(tables)}
    for pub, names in published.items():
        url = f"sqlite:///{tmp_path / (pub + '.db')}"
        options = StreamOptions(slot=f"s_{pub}", publications=(pub,), create_slot=True)
        stats = run_replicate(dsn, url, options, snapshot="only", snapshot_chunk_pages=1)
        assert stats.snapshot is not None and stats.snapshot.complete
        assert set(stats.snapshot.copied) == names
        engine = sa.create_engine(url)
        try:
            with engine.connect() as conn:
                present = set(sa.inspect(conn).get_table_names())
                assert {tables[n][0] for n in tables} & present == {tables[n][0] for n in names}
                for name in names:
                    target_table, cols = tables[name]
                    got = conn.exec_driver_sql(f"SELECT {cols} FROM {target_table}").all()
                    assert sorted(tuple(r) for r in got) == source[name], name
        finally:
            engine.dispose()
