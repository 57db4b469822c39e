"""The ``slot``, ``publication``, ``snapshot`` and ``status`` commands: small administrative
helpers."""

from __future__ import annotations

import ssl
import time
from typing import Annotated, Any

import typer
from rich.live import Live
from rich.table import Table

from pglogrepl_bridge.cli.app import (
    Dsn,
    Verbose,
    app,
    handled,
    out,
    setup_logging,
    stop_on_signals,
)
from pglogrepl_bridge.lsn import format_lsn
from pglogrepl_bridge.postgres import admin
from pglogrepl_bridge.postgres.connection import connect

slot_app = typer.Typer(help="Create, drop and list replication slots.", no_args_is_help=True)
pub_app = typer.Typer(help="Create, drop and list publications.", no_args_is_help=True)
app.add_typer(slot_app, name="slot")
app.add_typer(pub_app, name="publication")
snapshot_app = typer.Typer(
    help="Ask a running replicate to copy tables again.", no_args_is_help=True
)
app.add_typer(snapshot_app, name="snapshot")


# -- slots, publications, status -------------------------------------------------------------


@slot_app.command("create")
def slot_create(
    name: Annotated[str, typer.Argument(help="Slot name.")],
    dsn: Dsn = "",
    two_phase: Annotated[
        bool, typer.Option("--two-phase", help="Decode PREPARE (PG 15+).")
    ] = False,
    failover: Annotated[
        bool, typer.Option("--failover", help="Synchronise to standbys (PG 17+).")
    ] = False,
    verbose: Verbose = False,
) -> None:
    """Create a pgoutput logical replication slot."""
    setup_logging(verbose)
    with handled(), connect(dsn, replication=True) as conn:
        lsn = admin.create_slot(conn, name, two_phase=two_phase, failover=failover)
        typer.echo(f"created slot {name} at {lsn}")


@slot_app.command("drop")
def slot_drop(
    name: Annotated[str, typer.Argument(help="Slot name.")],
    dsn: Dsn = "",
    wait: Annotated[bool, typer.Option("--wait", help="Wait while the slot is in use.")] = False,
    verbose: Verbose = False,
) -> None:
    """Drop a replication slot."""
    setup_logging(verbose)
    with handled(), connect(dsn, replication=True) as conn:
        admin.drop_slot(conn, name, wait=wait)
        typer.echo(f"dropped slot {name}")


@slot_app.command("list")
def slot_list(dsn: Dsn = "", verbose: Verbose = False) -> None:
    """List replication slots with their positions and lag."""
    setup_logging(verbose)
    with handled(), connect(dsn, replication=False) as conn:
        out().print(_slots_table(admin.list_slots(conn), conn.info.server_version // 10000))


@pub_app.command("create")
def publication_create(
    name: Annotated[str, typer.Argument(help="Publication name.")],
    dsn: Dsn = "",
    table: Annotated[
        list[str],
        typer.Option("--table", help="schema.name to publish (repeatable); none: FOR ALL TABLES."),
    ] = [],  # noqa: B006
    verbose: Verbose = False,
) -> None:
    """Create a publication, FOR ALL TABLES or for named tables."""
    setup_logging(verbose)
    with handled(), connect(dsn, replication=False) as conn:
        admin.create_publication(conn, name, tuple(table))
        typer.echo(f"created publication {name}")


@pub_app.command("drop")
def publication_drop(
    name: Annotated[str, typer.Argument(help="Publication name.")],
    dsn: Dsn = "",
    verbose: Verbose = False,
) -> None:
    """Drop a publication."""
    setup_logging(verbose)
    with handled(), connect(dsn, replication=False) as conn:
        admin.drop_publication(conn, name)
        typer.echo(f"dropped publication {name}")


@pub_app.command("list")
def publication_list(dsn: Dsn = "", verbose: Verbose = False) -> None:
    """List publications and their tables."""
    setup_logging(verbose)
    with handled(), connect(dsn, replication=False) as conn:
        table = Table("publication", "all tables", "tables")
        for pub in admin.list_publications(conn):
            table.add_row(pub.name, "yes" if pub.all_tables else "no", ", ".join(pub.tables))
        out().print(table)


def _yes(value: bool | None) -> str:
    return "" if value is None else "yes" if value else "no"


def _slots_table(slots: list[admin.SlotInfo], major: int) -> Any:
    """The slots, with the columns this server version has (16+: conflicting; 17+: failover,
    synced, invalidation reason, inactive since)."""
    columns = ["slot", "active", "pid", "confirmed", "restart", "lag bytes", "wal_status"]
    columns += ["safe_wal_size"]
    if major >= 17:
        columns += ["failover", "synced", "invalidated", "inactive since"]
    elif major >= 16:
        columns += ["conflicting"]
    table = Table(*columns)
    for s in slots:
        row = [
            s.name,
            "yes" if s.active else "no",
            str(s.active_pid or ""),
            str(s.confirmed_flush_lsn or ""),
            str(s.restart_lsn or ""),
            "" if s.lag_bytes is None else f"{s.lag_bytes:,}",
            s.wal_status or "",
            "" if s.safe_wal_size is None else f"{s.safe_wal_size:,}",
        ]
        if major >= 17:
            invalidated = s.invalidation_reason or ("conflict" if s.conflicting else "")
            since = s.inactive_since.isoformat(timespec="seconds") if s.inactive_since else ""
            row += [_yes(s.failover), _yes(s.synced), invalidated, since]
        elif major >= 16:
            row += [_yes(s.conflicting)]
        table.add_row(*row)
    return table


def _status(conn: Any) -> Any:
    """The slots table, and under it the running snapshot's copies, if any."""
    from rich.console import Group

    slots = _slots_table(admin.list_slots(conn), conn.info.server_version // 10000)
    copies = admin.snapshot_copies(conn)
    if not copies:
        return slots
    table = Table("snapshot worker", "table", "rows copied", "bytes", title="running snapshot")
    for c in copies:
        table.add_row(str(c.pid), c.table, f"{c.rows:,}", f"{c.bytes:,}")
    return Group(slots, table)


def _group_status(peers: list[str], tls: ssl.SSLContext | None) -> Table:
    from pglogrepl_bridge.bridge.network import parse_address
    from pglogrepl_bridge.bridge.observe import ask

    views = [ask(parse_address(p, "--peer"), tls=tls) for p in peers]
    table = Table(title="bridge group", title_justify="left")
    for column in ("member", "address", "role", "term", "master", "last LSN"):
        table.add_column(column)
    replicas: dict[int, int] = {}
    for v in views:
        host, port = v.address
        if v.error is not None:
            table.add_row("?", f"{host}:{port}", f"[red]{v.error}[/]", "", "", "")
            continue
        role = "[bold green]master[/]" if v.is_master else "standby"
        table.add_row(
            str(v.node_id), f"{host}:{port}", role, str(v.term),
            str(v.master or "none known"), format_lsn(v.last_lsn),
        )  # fmt: skip
        replicas.update(v.replicas)
    if replicas:
        table.add_section()
        for node, lsn in sorted(replicas.items()):
            table.add_row(str(node), "", "replica", "", "", format_lsn(lsn))
    return table


@app.command()
def status(
    dsn: Dsn = "",
    watch: Annotated[bool, typer.Option("--watch", help="Refresh every --interval.")] = False,
    interval: Annotated[float, typer.Option("--interval", min=0.2)] = 2.0,
    peer: Annotated[
        list[str],
        typer.Option(
            "--peer",
            help="A bridge group member's --listen HOST:PORT (repeatable): show the group "
            "(the master, the term, each member's and each replica's last LSN) instead.",
        ),
    ] = [],  # noqa: B006 - typer reads the default, never mutates it
    tls_cert: Annotated[str | None, typer.Option("--tls-cert", help="PEM certificate.")] = None,
    tls_key: Annotated[str | None, typer.Option("--tls-key", help="PEM private key.")] = None,
    tls_ca: Annotated[
        str | None, typer.Option("--tls-ca", help="CA bundle of the group's links.")
    ] = None,
    verbose: Verbose = False,
) -> None:
    """Each slot: active or not, confirmed and restart LSNs, lag in bytes, WAL status; and
    the table copies of a running snapshot. With --peer: a bridge group's members instead."""
    setup_logging(verbose)
    if peer:
        from pglogrepl_bridge.bridge.network import tls_context

        with handled():
            tls = tls_context(False, tls_cert, tls_key, tls_ca) if tls_ca or tls_cert else None
            if not watch:
                out().print(_group_status(peer, tls))
                return
            stopped = {"now": False}
            with (
                stop_on_signals(lambda: stopped.update(now=True)),
                Live(_group_status(peer, tls), refresh_per_second=4) as live,
            ):
                while not stopped["now"]:
                    time.sleep(interval)
                    live.update(_group_status(peer, tls))
        return
    with handled(), connect(dsn, replication=False) as conn:
        if not watch:
            out().print(_status(conn))
            return
        stopped = {"now": False}
        with (
            stop_on_signals(lambda: stopped.update(now=True)),
            Live(_status(conn), refresh_per_second=4) as live,
        ):
            while not stopped["now"]:
                time.sleep(interval)
                live.update(_status(conn))


@snapshot_app.command("request")
def snapshot_request(
    slot: Annotated[
        str, typer.Option("--slot", "-s", help="The slot a running replicate streams from.")
    ],
    table: Annotated[
        list[str], typer.Option("--table", "-t", help="schema.name to copy again (repeatable).")
    ],
    dsn: Dsn = "",
    verbose: Verbose = False,
) -> None:
    """Copy tables again into the target of the replicate running on SLOT, while it streams.

    The request is a logical decoding message: it is ordered with the changes, and a
    replicate that is not running now acts on it when it comes to it.
    """
    setup_logging(verbose)
    with handled(), connect(dsn, replication=False) as conn:
        lsn = admin.request_snapshot(conn, slot, tuple(table))
        typer.echo(f"requested a snapshot of {', '.join(table)} on slot {slot} at {lsn}")
