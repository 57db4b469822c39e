"""The CLI: every command, its help, and each user mistake's message and exit code."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from typer.main import get_command
from typer.testing import CliRunner

from pglogrepl_bridge import __version__
from pglogrepl_bridge.cli import full_app
from pglogrepl_bridge.testing.postgres import PostgresServer, free_port, postgres_server

from .streamkit import Conn, Source, make_source, wait_for

app = full_app()
runner = CliRunner()


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pglogrepl_bridge", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def _commands() -> list[list[str]]:
    root = get_command(app)
    out = []
    commands: dict[str, Any] = root.commands  # type: ignore[attr-defined]  # a group
    for name, cmd in commands.items():
        subs = getattr(cmd, "commands", None)
        if subs:
            out += [[name, sub] for sub in subs]
        else:
            out.append([name])
    return out


COMMANDS = _commands()


def test_all_commands_exist() -> None:
    names = {" ".join(c) for c in COMMANDS}
    assert {
        "tail",
        "replicate",
        "bridge",
        "demo",
        "status",
        "slot create",
        "slot drop",
        "slot list",
        "publication create",
        "publication drop",
        "publication list",
    } <= names


@pytest.mark.parametrize("command", COMMANDS, ids=[" ".join(c) for c in COMMANDS])
def test_help_lists_every_option(command: list[str]) -> None:
    result = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    click_cmd = get_command(app)
    for part in command:
        click_cmd = click_cmd.commands[part]  # type: ignore[attr-defined]  # a group
    for param in click_cmd.params:
        for opt in getattr(param, "opts", []):
            if opt.startswith("--"):
                assert opt in result.output, (command, opt)


def test_version() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and __version__ in result.output


def test_python_dash_m_works() -> None:
    result = cli("--version")
    assert result.returncode == 0 and __version__ in result.stdout


def test_unknown_option_is_a_usage_error() -> None:
    result = cli("tail", "--slot", "s", "--publication", "p", "--frobnicate")
    assert result.returncode == 2
    assert "No such option" in result.stderr and "Traceback" not in result.stderr


@pytest.fixture
def source(pg: PostgresServer, pg_conn: Conn) -> Iterator[tuple[PostgresServer, Source]]:
    yield pg, make_source(pg_conn)


def _tail(pg: PostgresServer, src: Source, *extra: str) -> subprocess.CompletedProcess[str]:
    return cli(
        "tail",
        "--dsn",
        pg.dsn,
        "--slot",
        src.slot,
        "--publication",
        src.publication,
        *extra,
    )


def _end(pg_conn: Conn, src: Source) -> str:
    return str(src.end())


def test_tail_jsonl_until_lsn(source: tuple[PostgresServer, Source], pg_conn: Conn) -> None:
    pg, src = source
    src.insert(1, 2)
    pg_conn.execute(f"UPDATE {src.table} SET v = 'new' WHERE id = 1")
    result = _tail(pg, src, "--until-lsn", _end(pg_conn, src))
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [c["op"] for t in lines for c in t["changes"]] == ["insert", "insert", "update"]
    assert lines[1]["changes"][0]["new"] == {"id": 1, "v": "new"}
    # acknowledged: the slot moved, a second run starts after it
    again = _tail(pg, src, "--until-lsn", "0/1")
    assert again.returncode == 0 and again.stdout == ""


def test_tail_writes_utf8_whatever_stdout_encoding_says(
    source: tuple[PostgresServer, Source], pg_conn: Conn
) -> None:
    """JSON Lines are UTF-8: a latin-1 stdout (which cannot encode ✓) changes nothing."""
    pg, src = source
    src.insert(1)
    pg_conn.execute(f"UPDATE {src.table} SET v = 'naïve ✓ 😀' WHERE id = 1")
    result = subprocess.run(
        [sys.executable, "-m", "pglogrepl_bridge", "tail", "--dsn", pg.dsn, "--slot", src.slot,
         "--publication", src.publication, "--until-lsn", _end(pg_conn, src)],
        capture_output=True,
        timeout=120,
        env={**os.environ, "PYTHONIOENCODING": "latin-1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.decode("utf-8").splitlines()]
    assert lines[-1]["changes"][0]["new"] == {"id": 1, "v": "naïve ✓ 😀"}


def test_tail_filters_and_text_values(source: tuple[PostgresServer, Source], pg_conn: Conn) -> None:
    pg, src = source
    src.insert(1)
    pg_conn.execute(f"DELETE FROM {src.table}")
    end = _end(pg_conn, src)
    result = _tail(pg, src, "--until-lsn", end, "--op", "delete", "--values", "text", "--no-ack")
    assert result.returncode == 0, result.stderr
    (line,) = result.stdout.splitlines()
    assert json.loads(line)["changes"] == [
        {
            "op": "delete",
            "schema": "public",
            "table": src.table,
            "new": None,
            "old": {"id": "1"},
            "unchanged_toast": [],
        }
    ]
    # the same transaction, filtered out: jsonl prints a line only for what passes the filter
    other = _tail(pg, src, "--until-lsn", end, "--table", "public.nope", "--format", "jsonl")
    assert other.returncode == 0 and other.stdout == ""


def test_tail_pretty(source: tuple[PostgresServer, Source], pg_conn: Conn) -> None:
    pg, src = source
    src.insert(7)
    result = _tail(pg, src, "--until-lsn", _end(pg_conn, src), "--format", "pretty")
    assert result.returncode == 0, result.stderr
    assert "INSERT" in result.stdout and "id=7" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--dsn", "host=127.0.0.1 port=notaport"], "invalid"),
        (["--start-lsn", "12345"], "invalid LSN"),
        (["--until-lsn", "x/y"], "invalid LSN"),
        (["--values", "text", "--binary"], "drop --binary"),
        (["--temporary"], "--create-slot"),
    ],
)
def test_usage_errors(source: tuple[PostgresServer, Source], args: list[str], message: str) -> None:
    pg, src = source
    result = (
        _tail(pg, src, *args)
        if args[0] != "--dsn"
        else cli("tail", *args, "--slot", "s", "--publication", "p")
    )
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) <= 3


def test_unknown_slot_and_publication(source: tuple[PostgresServer, Source]) -> None:
    pg, src = source
    result = cli(
        "tail", "--dsn", pg.dsn, "--slot", "no_such_slot", "--publication", src.publication
    )
    assert result.returncode == 2
    assert "replication slot 'no_such_slot' does not exist" in result.stderr
    assert "--create-slot" in result.stderr
    result = cli(
        "tail",
        "--dsn",
        pg.dsn,
        "--slot",
        src.slot,
        "--publication",
        "no_such_pub",
    )
    assert result.returncode == 2 and "no_such_pub do not exist" in result.stderr


def test_wrong_password_is_not_printed(pg: PostgresServer) -> None:
    dsn = psycopg.conninfo.make_conninfo(pg.dsn, password="hunter2-wrong")
    result = cli("tail", "--dsn", dsn, "--slot", "s", "--publication", "p")
    assert result.returncode == 2
    assert "authentication failed" in result.stderr
    assert "hunter2-wrong" not in result.stderr + result.stdout
    verbose = cli("tail", "--dsn", dsn, "--slot", "s", "--publication", "p", "-v")
    assert "hunter2-wrong" not in verbose.stderr + verbose.stdout


def test_dsn_from_environment(source: tuple[PostgresServer, Source], pg_conn: Conn) -> None:
    pg, src = source
    src.insert(3)
    env_run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pglogrepl_bridge",
            "tail",
            "--slot",
            src.slot,
            "--publication",
            src.publication,
            "--until-lsn",
            _end(pg_conn, src),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={**__import__("os").environ, "PGLOGREPL_DSN": pg.dsn},
    )
    assert env_run.returncode == 0, env_run.stderr
    assert '"id":3' in env_run.stdout


def test_wal_level_not_logical() -> None:
    with postgres_server(16, settings={"wal_level": "replica"}) as server:
        result = cli("tail", "--dsn", server.dsn, "--slot", "s", "--publication", "p")
    assert result.returncode == 2
    assert "wal_level" in result.stderr and "logical" in result.stderr


def test_slot_and_publication_commands(pg: PostgresServer, pg_conn: Conn) -> None:
    pg_conn.execute("CREATE TABLE IF NOT EXISTS cli_t (id int PRIMARY KEY)")
    dsn = ["--dsn", pg.dsn]
    assert cli("publication", "create", "cli_pub", "--table", "public.cli_t", *dsn).returncode == 0
    listed = cli("publication", "list", *dsn)
    assert "cli_pub" in listed.stdout and "public.cli_t" in listed.stdout
    again = cli("publication", "create", "cli_pub", *dsn)
    assert again.returncode == 2 and "already exists" in again.stderr
    created = cli("slot", "create", "cli_slot", *dsn)
    assert created.returncode == 0 and "created slot cli_slot" in created.stdout
    status = cli("status", *dsn)
    assert status.returncode == 0 and "cli_slot" in status.stdout
    assert "cli_slot" in cli("slot", "list", *dsn).stdout
    assert cli("slot", "drop", "cli_slot", *dsn).returncode == 0
    missing = cli("slot", "drop", "cli_slot", *dsn)
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    assert cli("publication", "drop", "cli_pub", *dsn).returncode == 0
    assert "cli_pub" not in cli("publication", "list", *dsn).stdout


def test_demo_runs_and_checks_the_copy() -> None:
    result = cli("demo", "--accounts", "5")
    assert result.returncode == 0, result.stderr
    assert "copy equals the source" in result.stdout
    assert "took over" in result.stdout  # the failover step ran
    assert result.stdout.count("identical") == 6  # the copy's 2 tables, 2 replicas' 2 each


def test_metrics_and_clean_sigterm(source: tuple[PostgresServer, Source], tmp_path: Path) -> None:
    pg, src = source
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pglogrepl_bridge",
            "replicate",
            "--dsn",
            pg.dsn,
            "--slot",
            src.slot,
            "--publication",
            src.publication,
            "--target",
            f"sqlite:///{tmp_path / 'm.db'}",
            "--snapshot",
            "never",
            "--metrics-port",
            str(port),
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        src.insert(1, 2)
        src.insert(3)

        def scraped() -> bool:
            try:
                body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)
            except OSError:
                return False
            text = body.read().decode()
            return (
                "pglogrepl_transactions_total 2.0" in text and "pglogrepl_changes_total 3.0" in text
            )

        wait_for(scraped, timeout=30, what="metrics")
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
        for name in (
            "pglogrepl_received_lsn",
            "pglogrepl_confirmed_lsn",
            "pglogrepl_lag_bytes",
            "pglogrepl_reconnects_total",
        ):
            assert name in text
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        proc.kill()


def test_tail_stops_on_a_slot_older_than_its_publication(pg: PostgresServer, pg_conn: Conn) -> None:
    src = make_source(pg_conn, slot=False)
    pg_conn.execute(f"DROP PUBLICATION {src.publication}")
    pg_conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (src.slot,))
    src.insert(1)
    pg_conn.execute(f"CREATE PUBLICATION {src.publication} FOR TABLE {src.table}")
    src.insert(2)
    result = _tail(pg, src, "--format", "jsonl")
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    assert "created before the publication" in result.stderr
    if pg.version >= 18:  # the server's own WARNING reaches the user's log too
        assert "server WARNING: skipped loading publication" in result.stderr


def test_a_first_connection_that_cannot_succeed_fails_fast() -> None:
    dsn = f"host=127.0.0.1 port={free_port()} user=x dbname=x password=sekrit"
    started = time.monotonic()
    result = cli("tail", "--dsn", dsn, "--slot", "s", "--publication", "p")
    assert time.monotonic() - started < 10
    assert result.returncode == 1
    assert "cannot connect" in result.stderr and "sekrit" not in result.stderr


def test_sigterm_during_the_wait_for_a_server_stops_within_a_second() -> None:
    dsn = f"host=127.0.0.1 port={free_port()} user=x dbname=x"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pglogrepl_bridge", "tail", "--dsn", dsn, "--slot", "s",
         "--publication", "p", "--wait-for-server", "120"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        for _ in range(6):  # into the backoff: 0.1, 0.2, 0.4, 0.8, 1.6 s...
            assert "retrying" in proc.stderr.readline()
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 0  # a clean stop
        assert time.monotonic() - started < 1.0
    finally:
        proc.kill()


def test_failover_slots_and_their_columns(pg: PostgresServer, pg_conn: Conn) -> None:
    dsn = ["--dsn", pg.dsn]
    created = cli("slot", "create", "cli_failover", "--failover", *dsn)
    if pg.version < 17:
        assert created.returncode == 2 and "17 or later" in created.stderr
        assert "failover" not in cli("status", *dsn).stdout
        return
    try:
        assert created.returncode == 0, created.stderr
        row = pg_conn.execute(
            "SELECT failover FROM pg_replication_slots WHERE slot_name = 'cli_failover'"
        ).fetchone()
        assert row == (True,)
        for command in (["status"], ["slot", "list"]):
            out = cli(*command, *dsn).stdout
            header = next(line for line in out.splitlines() if "slot" in line and "active" in line)
            assert all(c in header for c in ("failover", "synced", "invalidated", "inactive"))
            line = next(line for line in out.splitlines() if "cli_failover" in line)
            assert "yes" in line.split("cli_failover", 1)[1]  # failover yes (active: no)
    finally:
        cli("slot", "drop", "cli_failover", *dsn)
