"""``pglogrepl-bridge replica``: the reference replica node as a command, fed by a real
bridge from a real PostgreSQL, into SQLite; and ``wire.follower``'s rules R1-R5 on their own.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import sqlalchemy as sa

from pglogrepl_bridge.bridge.runner import BridgeConfig, run_bridge
from pglogrepl_bridge.lsn import Lsn
from pglogrepl_bridge.postgres.stream import StreamOptions
from pglogrepl_bridge.sinks.replica import REPLICA_SOURCE
from pglogrepl_bridge.sinks.replicate import run_replicate
from pglogrepl_bridge.sinks.sql import CHECKPOINT_TABLE
from pglogrepl_bridge.testing.postgres import PostgresServer, free_port
from pglogrepl_bridge.wire.follower import Follower
from pglogrepl_bridge.wire.protocol import (
    Acknowledge,
    Heartbeat,
    Promotion,
    RequestFrom,
    VoteRequest,
    VoteResponse,
    WalEntry,
)

from .streamkit import Conn, last_commit_end, wait_for
from .test_bridge import Running, start_bridge
from .test_from_nats import _declared, _rows, more_changes
from .test_replicate import Source, assert_same
from .test_types_live import NO_BINARY_LOADER, _same, zoo_changes

REPO = Path(__file__).resolve().parent.parent


def entry(lsn: int) -> WalEntry:
    return WalEntry(1, lsn, 0, b"")


def test_entries_apply_once_in_order_and_are_acknowledged_when_durable() -> None:
    """R1, R2, R3."""
    f = Follower(7)
    assert f.connected("a") == []  # nothing applied yet: nothing to ask for
    step = f.receive("a", [entry(10), entry(20), entry(20), entry(15), Heartbeat(1, 20)])
    assert [e.lsn for e in step.entries] == [10, 20] and f.duplicates == 2
    assert f.last_lsn == 0  # not durable yet
    assert f.receive("a", [entry(20)]).entries == ()  # handed out already: not twice
    assert f.applied("a", step.entries) == [Acknowledge(7, 20)]
    assert f.connected("b") == [RequestFrom(7, 20)]  # R3: a new master connection
    assert f.receive("b", [entry(20), entry(30)]).entries == (entry(30),)
    f.failed()  # the target refused 30: it may come again
    assert f.receive("b", [entry(30)]).entries == (entry(30),)


def test_the_highest_term_is_followed_and_older_masters_are_closed() -> None:
    """R4."""
    f = Follower(7)
    f.connected("old")
    f.connected("new")
    assert f.receive("old", [entry(10)]).entries == (entry(10),)
    f.applied("old", (entry(10),))
    assert f.receive("new", [Promotion(2, 5), entry(20)]).entries == (entry(20),)
    assert f.term == 5 and f.master == 2
    step = f.receive("old", [entry(30)])  # the old master, still sending
    assert step.close and step.entries == ()
    assert f.applied("old", (entry(20),)) == []  # nothing acknowledged to it any more
    assert f.receive("new", [Promotion(3, 4)]).entries == ()  # an older term: not followed
    assert f.term == 5 and f.master == 2


def test_replicas_do_not_vote() -> None:
    """R5."""
    f = Follower(7)
    step = f.receive("a", [VoteRequest(2, 9, 1 << 40)])
    assert step.replies == (VoteResponse(2, 7, 9, False),)


def _position(url: str, node_id: int) -> int:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as c:
            row = c.execute(
                sa.text(
                    f"SELECT end_lsn FROM {CHECKPOINT_TABLE} WHERE source_id = :s AND slot = :n"
                ),
                {"s": REPLICA_SOURCE, "n": f"node-{node_id}"},
            ).first()
    except sa.exc.OperationalError:
        return 0  # not created yet
    finally:
        engine.dispose()
    return 0 if row is None else int(row[0])


def _wait_confirmed(pg_conn: Conn, slot: str) -> None:
    """Until the slot is confirmed up to the WAL written so far: it moves only on the
    replica's acknowledgements, so the replica holds everything."""
    wal = pg_conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
    assert wal is not None
    end = Lsn.parse(wal[0])

    def confirmed() -> bool:
        row = pg_conn.execute(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = %s",
            (slot,),
        ).fetchone()
        return row is not None and Lsn.parse(row[0]) >= end

    wait_for(confirmed, timeout=60, what="the replica to acknowledge everything")


def _replica(port: int, target: str, *extra: str) -> subprocess.Popen[str]:
    args = [sys.executable, "-m", "pglogrepl_bridge", "replica", "--node-id", "7",
            "--listen", f"127.0.0.1:{port}", "--target", target, *extra]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(args, env=env, stderr=subprocess.PIPE, text=True)


def _fed(
    pg: PostgresServer, pg_conn: Conn, tmp_path: Path, config: BridgeConfig
) -> tuple[Source, int, str, subprocess.Popen[str], Running]:
    """A source, a replica process on SQLite (its port and URL), and a bridge feeding it
    (``config``, with the replica's address added)."""
    src = Source(pg_conn)
    port = free_port()
    target = f"sqlite:///{tmp_path}/replica.db"
    proc = _replica(port, target)
    config = replace(config, replicas=[("127.0.0.1", port)])
    return src, port, target, proc, start_bridge(pg, src, config)  # type: ignore[arg-type]


def test_the_replica_command_applies_exactly_once_across_kill_9(
    pg: PostgresServer, pg_conn: Conn, tmp_path: Path
) -> None:
    config = BridgeConfig(payload="bincode", ack_quorum=1)
    src, port, target, proc, bridge = _fed(pg, pg_conn, tmp_path, config)
    rng = random.Random(11)
    try:
        for round_ in range(3):
            before = _position(target, 7)
            src.mixed_workload(100 * round_, 20)

            def progressed(b: int = before) -> bool:
                return _position(target, 7) > b

            wait_for(progressed, timeout=60, what="the replica to apply")
            time.sleep(rng.uniform(0.0, 0.3))
            proc.kill()  # SIGKILL: the bridge re-dials the next one and resends
            proc.wait()
            proc = _replica(port, target)
        more_changes(src)
        _wait_confirmed(pg_conn, src.slot)
    finally:
        bridge.stop()
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err[-2000:]
    assert "applied" in err
    assert assert_same(pg.dsn, target, src.items, "id") > 40
    assert_same(pg.dsn, target, src.notes, "k")


def test_a_json_payload_applies_like_a_bincode_one(
    pg: PostgresServer, pg_conn: Conn, tmp_path: Path
) -> None:
    """Inserts, updates that keep or change the key, deletes, TOAST, truncates: the JSON
    line's ``relations`` member says which columns are the key and what each type is."""
    config = BridgeConfig(payload="json", ack_quorum=1)
    src, _, target, proc, bridge = _fed(pg, pg_conn, tmp_path, config)
    try:
        src.mixed_workload(0, 30)
        more_changes(src)
        _wait_confirmed(pg_conn, src.slot)
    finally:
        bridge.stop()
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err[-2000:]
    assert assert_same(pg.dsn, target, src.items, "id") > 20
    assert_same(pg.dsn, target, src.notes, "k")


@pytest.mark.parametrize("binary", [False, True], ids=["text", "binary"])
def test_every_type_lands_from_json_as_replicate_lands_it(
    pg: PostgresServer, pg_conn: Conn, tmp_path: Path, binary: bool
) -> None:
    """The type zoo (enums, domains, composites, arrays, ranges, json, intervals...) through
    the slot into one SQLite file, and as the bridge's JSON payload through a replica into
    another: the same tables, the same values."""
    slot = f"zoo_json_{int(binary)}"
    columns = zoo_changes(pg_conn, slot)
    end = last_commit_end(pg_conn, slot, "types_pub")
    options = StreamOptions(slot=slot, publications=("types_pub",), binary=binary)
    direct, via_json = f"sqlite:///{tmp_path}/direct.db", f"sqlite:///{tmp_path}/json.db"
    text_options = replace(options, binary=False, no_ack=True)  # the JSON line is text
    run_replicate(pg.dsn, direct, text_options, snapshot="never", until=end)
    as_binary: list[tuple[object, ...]] = []
    if binary:  # what replicate keeps of a type without a binary loader: its bytes
        binary_direct = f"sqlite:///{tmp_path}/binary.db"
        run_replicate(
            pg.dsn, binary_direct, replace(options, no_ack=True), snapshot="never", until=end
        )
        as_binary = _rows(binary_direct)
    port = free_port()
    proc = _replica(port, via_json, "--payload", "json")
    try:
        config = BridgeConfig(payload="json", ack_quorum=1, replicas=[("127.0.0.1", port)])
        run_bridge(pg.dsn, replace(options, until_lsn=end), config)
        wait_for(lambda: _position(via_json, 7) >= end, timeout=60, what="the replica")
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err[-2000:]
    declared = _declared(direct)
    assert _declared(via_json) == declared
    by_slot, by_json = _rows(direct), _rows(via_json)
    assert len(by_json) == 2
    names = [name for name, _ in declared]
    for a, b in zip(by_slot, by_json, strict=True):
        differ = [
            (names[i], x, y) for i, (x, y) in enumerate(zip(a, b, strict=True)) if not _same(x, y)
        ]
        if not binary:
            assert differ == []
            continue
        # from a binary stream, a type without a binary loader is its bytes (J5), as
        # replicate keeps it; a few types' text is written differently, and PostgreSQL
        # itself must find the two values equal
        kept = as_binary[by_slot.index(a)]
        for name in NO_BINARY_LOADER & set(names):
            i = names.index(name)
            assert b[i] == kept[i], (name, b[i], kept[i])
        differ = [d for d in differ if d[0] not in NO_BINARY_LOADER]
        assert {name for name, _, _ in differ} <= _BINARY_TEXT_DIFFERS, differ
        for name, x, y in differ:
            kind = "jsonb" if columns[name][0] == "json" else columns[name][0]
            same = pg_conn.execute(f"SELECT %s::{kind} = %s::{kind}", (x, y)).fetchone()
            assert same == (True,), (name, x, y)


#: text forms of binary values (psycopg's objects) that differ from PostgreSQL's own output
_BINARY_TEXT_DIFFERS = {"c_interval", "c_json", "c_jsonb", "c_int4range", "c_tstzrange"}


def test_a_bad_listen_address_is_refused() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pglogrepl_bridge", "replica", "--node-id", "1", "--listen", "x"],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "HOST:PORT" in done.stderr


def test_the_payload_option_is_checked() -> None:
    args = [sys.executable, "-m", "pglogrepl_bridge", "replica", "--node-id", "1",
            "--listen", "127.0.0.1:0", "--payload", "xml"]  # fmt: skip
    done = subprocess.run(
        args, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert done.returncode == 2 and "auto, bincode or json" in done.stderr


def test_a_bincode_payload_whose_first_byte_is_a_brace_is_not_taken_for_json() -> None:
    from pglogrepl_bridge.sinks.replica import is_json_payload
    from pglogrepl_bridge.wire.payload import BincodeEncoder

    from .test_entries import _transactions

    txn = _transactions(16, "basic")[0]
    braced = replace(txn, xid=0x7B + 256 * 3)  # its first byte is "{"
    data = BincodeEncoder().transaction(braced)
    assert data[:1] == b"{" and not is_json_payload(data)
    assert is_json_payload(b'{"xid": 5, "lsn": "0/1"}')


def test_the_replica_takes_only_masters_with_a_certificate_over_tls(
    pg: PostgresServer, pg_conn: Conn, tmp_path: Path
) -> None:
    from pglogrepl_bridge.bridge.network import tls_context

    from .test_bridge import _certificates

    cert, key, ca = _certificates(tmp_path)
    src = Source(pg_conn)
    port = free_port()
    target = f"sqlite:///{tmp_path}/replica.db"
    proc = _replica(port, target, "--tls-cert", cert, "--tls-key", key, "--tls-ca", ca)
    replica = [("127.0.0.1", port)]
    anonymous = start_bridge(  # trusts the replica, but shows no certificate of its own
        pg,
        src,  # type: ignore[arg-type]
        BridgeConfig(
            replicas=replica,
            payload="bincode",
            ack_quorum=1,
            tls_client=tls_context(False, None, None, ca),
        ),
    )
    try:
        src.mixed_workload(0, 3)
        time.sleep(1.5)
        assert _position(target, 7) == 0  # refused at the handshake: nothing applied
    finally:
        anonymous.stop()
    end = int(src.end())  # nothing was confirmed: the slot still has it all
    bridge = start_bridge(
        pg,
        src,  # type: ignore[arg-type]
        BridgeConfig(
            replicas=replica,
            payload="bincode",
            ack_quorum=1,
            tls_client=tls_context(False, cert, key, ca),
        ),
    )
    try:
        wait_for(lambda: _position(target, 7) >= end, timeout=30, what="the replica to apply")
    finally:
        bridge.stop()
        proc.terminate()
        proc.communicate(timeout=30)
    assert_same(pg.dsn, target, src.items, "id")
