"""``doctor`` against real servers, each set up to fail one check, and one set up well."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator

import psycopg
import pytest

from pglogrepl_bridge.postgres.connection import connect
from pglogrepl_bridge.postgres.doctor import Finding, diagnose
from pglogrepl_bridge.testing.postgres import PostgresServer, postgres_server

from .streamkit import Conn, Source, invalidate_slot, make_source


def _find(findings: list[Finding], check: str) -> Finding:
    return next(f for f in findings if f.check == check)


def _diagnose(pg: PostgresServer, **kw: object) -> list[Finding]:
    with connect(pg.dsn, replication=False) as conn:
        return diagnose(conn, **kw)  # type: ignore[arg-type]


@pytest.fixture
def src(pg_conn: Conn) -> Iterator[Source]:
    source = make_source(pg_conn)
    yield source
    pg_conn.execute(f"DROP PUBLICATION IF EXISTS {source.publication}")


def test_all_clear_on_a_well_set_up_server(pg: PostgresServer, pg_conn: Conn, src: Source) -> None:
    pg_conn.execute("ALTER SYSTEM SET max_slot_wal_keep_size = '10GB'")
    pg_conn.execute("SELECT pg_reload_conf()")
    try:
        result = subprocess.run(
            [sys.executable, "-m", "pglogrepl_bridge", "doctor", "--dsn", pg.dsn,
             "--slot", src.slot, "--publication", src.publication, "--format", "json"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    finally:
        pg_conn.execute("ALTER SYSTEM RESET max_slot_wal_keep_size")
        pg_conn.execute("SELECT pg_reload_conf()")
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] is True
    assert [f for f in report["findings"] if f["status"] != "ok"] == []
    checks = {f["check"] for f in report["findings"]}
    assert {"wal_level", "role", f"slot {src.slot}", f"publication {src.publication}"} <= checks


def test_server_settings_without_logical_decoding_or_headroom(pg: PostgresServer) -> None:
    settings = {"wal_level": "replica", "max_replication_slots": "1", "max_wal_senders": "1"}
    with postgres_server(pg.version, settings=settings) as bad:
        with psycopg.connect(bad.dsn, autocommit=True) as conn:
            conn.execute("SELECT pg_create_physical_replication_slot('taken')")
        findings = _diagnose(bad)
    wal_level = _find(findings, "wal_level")
    assert wal_level.status == "problem" and "wal_level = logical" in wal_level.fix
    assert _find(findings, "max_replication_slots").status == "problem"  # 1 of 1 used
    assert _find(findings, "max_wal_senders").status == "warning"  # 0 of 1: no headroom
    keep = _find(findings, "max_slot_wal_keep_size")
    assert keep.status == "warning" and "max_slot_wal_keep_size" in keep.fix


def test_idle_slot_timeout_is_reported_on_18(pg: PostgresServer, pg_conn: Conn) -> None:
    if pg.version < 18:
        assert all(f.check != "idle_replication_slot_timeout" for f in _diagnose(pg))
        return
    pg_conn.execute("ALTER SYSTEM SET idle_replication_slot_timeout = '1h'")
    pg_conn.execute("SELECT pg_reload_conf()")
    try:
        finding = _find(_diagnose(pg), "idle_replication_slot_timeout")
    finally:
        pg_conn.execute("ALTER SYSTEM RESET idle_replication_slot_timeout")
        pg_conn.execute("SELECT pg_reload_conf()")
    assert finding.status == "warning" and "3600" in finding.detail


def test_role_without_replication(pg: PostgresServer, pg_conn: Conn) -> None:
    pg_conn.execute("DROP ROLE IF EXISTS doctor_norepl")
    pg_conn.execute("CREATE ROLE doctor_norepl LOGIN PASSWORD 'pw-doctor'")
    dsn = psycopg.conninfo.make_conninfo(pg.dsn, user="doctor_norepl", password="pw-doctor")
    with connect(dsn, replication=False) as conn:
        role = _find(diagnose(conn), "role")
    assert role.status == "problem" and "ALTER ROLE doctor_norepl REPLICATION" in role.fix


def test_publications_and_replica_identities(pg: PostgresServer, pg_conn: Conn) -> None:
    for table, setup in [
        ("doc_keyed", "id int PRIMARY KEY"),
        ("doc_keyless", "v int"),
        ("doc_nothing", "id int PRIMARY KEY"),
        ("doc_full", "v int"),
    ]:
        pg_conn.execute(f"DROP TABLE IF EXISTS {table} CASCADE")
        pg_conn.execute(f"CREATE TABLE {table} ({setup})")
    pg_conn.execute("ALTER TABLE doc_nothing REPLICA IDENTITY NOTHING")
    pg_conn.execute("ALTER TABLE doc_full REPLICA IDENTITY FULL")
    pg_conn.execute("DROP PUBLICATION IF EXISTS doc_pub")
    pg_conn.execute("DROP PUBLICATION IF EXISTS doc_inserts")
    pg_conn.execute(
        "CREATE PUBLICATION doc_pub FOR TABLE doc_keyed, doc_keyless, doc_nothing, doc_full"
    )
    pg_conn.execute(
        "CREATE PUBLICATION doc_inserts FOR TABLE doc_keyless WITH (publish = 'insert')"
    )
    try:
        findings = _diagnose(pg, publications=("doc_pub", "doc_inserts", "doc_missing"))
    finally:
        pg_conn.execute("DROP PUBLICATION doc_pub")
        pg_conn.execute("DROP PUBLICATION doc_inserts")
    assert _find(findings, "publication doc_pub").status == "ok"
    assert _find(findings, "publication doc_missing").status == "problem"
    idents = [f for f in findings if f.check.startswith("replica identity")]
    by_table = {(f.check, f.status) for f in idents}
    assert ("replica identity public.doc_keyed", "ok") in by_table
    assert ("replica identity public.doc_keyless", "problem") in by_table  # UPDATE fails
    assert ("replica identity public.doc_nothing", "problem") in by_table
    assert ("replica identity public.doc_full", "ok") in by_table
    assert ("replica identity public.doc_keyless", "warning") in by_table  # inserts only
    keyless = next(f for f in idents if f.status == "problem" and "keyless" in f.check)
    assert "REPLICA IDENTITY FULL" in keyless.fix and "fail on the source" in keyless.detail


def test_slots_missing_foreign_invalidated_and_pinning(
    pg: PostgresServer, pg_conn: Conn, src: Source
) -> None:
    assert _find(_diagnose(pg, slot="doc_nope"), "slot doc_nope").status == "problem"
    # a slot of another database
    pg_conn.execute("DROP DATABASE IF EXISTS doc_other")
    pg_conn.execute("CREATE DATABASE doc_other")
    other = psycopg.conninfo.make_conninfo(pg.dsn, dbname="doc_other")
    with psycopg.connect(other, autocommit=True) as conn:
        conn.execute("SELECT pg_create_logical_replication_slot('doc_foreign', 'pgoutput')")
    try:
        foreign = _find(_diagnose(pg, slot="doc_foreign"), "slot doc_foreign")
        assert foreign.status == "problem" and "doc_other" in foreign.detail
        # an inactive slot holding WAL back (a 1-byte threshold: any lag at all)
        src.insert(1000)
        pinned = _diagnose(pg, pinned_warning=0)
        assert any(f.check == f"inactive slot {src.slot}" for f in pinned)
        invalidate_slot(src)
        lost = _find(_diagnose(pg, slot=src.slot), f"slot {src.slot}")
        assert lost.status == "problem" and "invalidated" in lost.detail
    finally:
        pg_conn.execute("SELECT pg_drop_replication_slot('doc_foreign')")
        pg_conn.execute("DROP DATABASE doc_other")
