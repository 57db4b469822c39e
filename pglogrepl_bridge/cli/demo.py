"""``demo`` (what ``make demo`` runs): the whole pipeline on an embedded PostgreSQL.

Starts a throwaway server, runs a workload, shows the changes live as ``tail`` prints them,
replicates them into a SQLite file, checks the copy equals the source; then runs a group of
three bridges feeding two replica nodes, kills the master, shows the takeover and checks both
replicas; and cleans up.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import psycopg
import typer
from rich.console import Console

from pglogrepl_bridge.cli import app as cli
from pglogrepl_bridge.cli.tail import Format, run_tail
from pglogrepl_bridge.lsn import Lsn
from pglogrepl_bridge.postgres import admin
from pglogrepl_bridge.postgres.stream import StreamOptions
from pglogrepl_bridge.sinks.replicate import run_replicate
from pglogrepl_bridge.testing.postgres import postgres_server

if TYPE_CHECKING:
    import sqlalchemy as sa

SCHEMA = """
CREATE TABLE accounts (
    id      bigint PRIMARY KEY,
    owner   text NOT NULL,
    balance numeric(12, 2) NOT NULL,
    tags    text[],
    updated timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE orders (
    id         int PRIMARY KEY,
    account_id bigint NOT NULL,
    amount     numeric(12, 2) NOT NULL,
    detail     jsonb
);
CREATE PUBLICATION demo_pub FOR TABLE accounts, orders;
"""
TABLES = ("accounts", "orders")


@dataclass
class DemoResult:
    """What the demo did and saw, for the summary and the tests."""

    transactions: int
    changes: int
    identical: bool
    seconds: float


def workload(conn: psycopg.Connection[Any], accounts: int, console: Console) -> None:
    """Inserts, updates (one changing a key) and deletes."""
    owners = ["ada", "grace", "edsger", "barbara", "ken", "margaret"]
    for i in range(1, accounts + 1):
        with conn.transaction():
            conn.execute(
                "INSERT INTO accounts (id, owner, balance, tags) VALUES (%s, %s, %s, %s)",
                (i, owners[i % len(owners)], Decimal(100 * i) / 7, ["demo", f"batch{i % 3}"]),
            )
            conn.execute(
                "INSERT INTO orders VALUES (%s, %s, %s, %s)",
                (i, i, Decimal(i) + Decimal("0.99"), psycopg.types.json.Jsonb({"n": i})),
            )
    with conn.transaction():
        conn.execute("UPDATE accounts SET balance = balance * 1.05, updated = now()")
    with conn.transaction():
        conn.execute("UPDATE orders SET id = id + 1000 WHERE id = 2")  # a key change
        conn.execute("DELETE FROM orders WHERE id = 3")
    with conn.transaction():
        conn.execute("DELETE FROM accounts WHERE id = %s", (accounts,))
    console.print(f"[dim]workload done: {accounts * 2 + 3} transactions[/]")


def _normal(value: Any) -> Any:
    """One comparable form for a value read from PostgreSQL or from SQLite."""
    if isinstance(value, datetime) and value.tzinfo is not None:
        return value.astimezone(UTC).replace(tzinfo=None)
    if isinstance(value, Decimal | float):
        return Decimal(str(value)).normalize()
    if isinstance(value, str):
        try:
            return Decimal(value).normalize()
        except ArithmeticError:
            return value
    return value


def snapshot(engine: sa.Engine, table: str) -> list[tuple[Any, ...]]:
    """A table's rows, normalised for comparing source and target."""
    import sqlalchemy as sa

    meta = sa.MetaData()
    tbl = sa.Table(table, meta, autoload_with=engine)
    cols = [c for c in tbl.c if not c.name.startswith("_pglb_")]
    with engine.connect() as conn:
        rows = conn.execute(sa.select(*cols).order_by(*tbl.primary_key.columns)).all()
    return [tuple(_normal(v) for v in row) for row in rows]


def run_demo(accounts: int = 12, console: Console | None = None) -> DemoResult:
    """The whole story on a throwaway server: workload, tail, replicate, compare."""
    import sqlalchemy as sa

    console = console or Console(highlight=False)
    started = time.monotonic()
    with postgres_server() as pg, tempfile.TemporaryDirectory(prefix="pglb-demo-") as tmp:
        console.print(f"[bold]PostgreSQL {pg.version}[/] ({pg.kind}) at {pg.safe_dsn}")
        with psycopg.connect(pg.dsn, autocommit=True) as conn:
            conn.execute(SCHEMA)
            for slot in ("demo_tail", "demo_copy", "demo_group"):  # each on its own
                conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (slot,))
            console.print("created tables accounts, orders; publication demo_pub; three slots")
            workload(conn, accounts, console)
        until = _last_commit(pg.dsn)

        console.rule("live changes (tail --format pretty)")
        tail_opts = StreamOptions(slot="demo_tail", publications=("demo_pub",), status_interval=1)
        printed = run_tail(pg.dsn, tail_opts, Format.pretty, "typed", None, until=until)

        console.rule("replicate into SQLite")
        target = f"sqlite:///{Path(tmp) / 'demo.db'}"
        copy_opts = StreamOptions(slot="demo_copy", publications=("demo_pub",), status_interval=1)
        # the slot predates the workload: every row arrives as a change, none needs copying
        stats = run_replicate(pg.dsn, target, copy_opts, until=until, snapshot="never")
        console.print(
            f"applied {stats.transactions} transactions, {stats.changes} changes, "
            f"in {stats.batches} batch(es)"
        )

        source = sa.create_engine(_sqlalchemy_url(pg.dsn))
        copy = sa.create_engine(target)
        identical = True
        for table in TABLES:
            same = snapshot(source, table) == snapshot(copy, table)
            identical &= same
            console.print(f"  {table}: {'[green]identical[/]' if same else '[red]DIFFERENT[/]'}")
        copy.dispose()

        console.rule("failover: three bridges, two replicas, the master killed")
        group_same = failover(pg.dsn, Path(tmp), source, console)
        identical &= group_same
        source.dispose()
    seconds = time.monotonic() - started
    console.rule("summary")
    console.print(
        f"{printed} transactions shown, {stats.changes} changes replicated, "
        f"copy {'equals' if identical else 'DIFFERS FROM'} the source; {seconds:.1f}s; "
        "server and files removed"
    )
    return DemoResult(printed, stats.changes, identical, seconds)


def failover(dsn: str, tmp: Path, source: sa.Engine, console: Console) -> bool:
    """A group of three bridges feeding two replica nodes (SQLite) from slot demo_group;
    the master is killed with SIGKILL mid-workload; another takes over. True when both
    replicas end equal to the source."""
    import sqlalchemy as sa

    from pglogrepl_bridge.testing.group import BridgeGroup, slot_holder

    group = BridgeGroup(dsn, "demo_group", "demo_pub", tmp)
    group.start()
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            master = _until(lambda: slot_holder(conn, "demo_group"), 30, "a master")
            console.print(f"member {master} of 3 is master; replicas 101 and 102 apply")
            for i in range(5):  # more work while it leads
                conn.execute("UPDATE accounts SET balance = balance + 1 WHERE id = %s", (i + 1,))
            group.kill(master)
            killed = time.monotonic()
            console.print(f"[bold red]kill -9[/] member {master}")
            conn.execute("UPDATE accounts SET tags = tags || '{failover}'::text[]")
            row = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
            mark = Lsn.parse(str(row[0])) if row is not None else Lsn(0)

            def new_master() -> int | None:
                holder = slot_holder(conn, "demo_group")
                return holder if holder not in (None, master) else None

            after = _until(new_master, 30, "a new master")
            _until(lambda: group.held() >= mark, 30, "the replicas to catch up")
            console.print(
                f"member {after} took over; both replicas hold the change made after the kill "
                f"{(time.monotonic() - killed) * 1000:.0f} ms after it"
            )
        same = True
        for node, url in group.targets.items():
            replica = sa.create_engine(url)
            for table in TABLES:
                equal = snapshot(source, table) == snapshot(replica, table)
                same &= equal
                state = "[green]identical[/]" if equal else "[red]DIFFERENT[/]"
                console.print(f"  replica {node} {table}: {state}")
            replica.dispose()
        return same
    finally:
        group.close()


def _until(probe: Any, timeout: float, what: str) -> Any:
    """``probe()``'s first true value within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = probe()
        if found:
            return found
        time.sleep(0.01)
    raise RuntimeError(f"demo: timed out waiting for {what}")


def _last_commit(dsn: str) -> Lsn:
    """Where to stop streaming: the end of the workload's last transaction."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        end = admin.last_commit_lsn(conn, "demo_copy", ("demo_pub",))
    assert end is not None
    return end


def _sqlalchemy_url(dsn: str) -> sa.URL:
    import sqlalchemy as sa

    params = psycopg.conninfo.conninfo_to_dict(dsn)
    return sa.URL.create(
        "postgresql+psycopg",
        username=str(params.get("user")),
        password=str(params.get("password")) if params.get("password") else None,
        host=str(params.get("host")),
        port=int(str(params.get("port"))),
        database=str(params.get("dbname")),
    )


@cli.app.command()
def demo(
    accounts: Annotated[int, typer.Option("--accounts", min=1, help="Workload size.")] = 12,
    verbose: cli.Verbose = False,
) -> None:
    """Run the whole pipeline on an embedded PostgreSQL, check the copy, clean up."""
    cli.setup_logging(verbose)
    with cli.handled():
        result = run_demo(accounts)
        if not result.identical:
            raise RuntimeError("the SQLite copy differs from the source")
