"""``pglogrepl-bridge replica``: the typer command over ``sinks.replica.run_replica``."""

from __future__ import annotations

from typing import Annotated

import typer

from pglogrepl_bridge.bridge.network import parse_address, tls_context
from pglogrepl_bridge.cli import app as cli
from pglogrepl_bridge.errors import ConfigError
from pglogrepl_bridge.sinks.replica import run_replica
from pglogrepl_bridge.sinks.replicate import DEFAULT_TARGET


@cli.app.command()
def replica(
    node_id: Annotated[int, typer.Option("--node-id", help="This replica's node id.")],
    listen: Annotated[
        str,
        typer.Option(
            "--listen",
            help="Accept the master's connection on HOST:PORT (loopback or a private "
            "network, unless TLS protects it).",
        ),
    ],
    target: Annotated[
        str, typer.Option("--target", help="SQLAlchemy URL of the target database.")
    ] = DEFAULT_TARGET,
    payload: Annotated[
        str,
        typer.Option(
            "--payload",
            help="auto (detect each entry's), bincode or json: the bridge's --payload.",
        ),
    ] = "auto",
    tls_cert: Annotated[str | None, typer.Option("--tls-cert", help="PEM certificate.")] = None,
    tls_key: Annotated[str | None, typer.Option("--tls-key", help="PEM private key.")] = None,
    tls_ca: Annotated[
        str | None,
        typer.Option("--tls-ca", help="CA bundle: only masters with a certificate it signed."),
    ] = None,
    until_lsn: cli.UntilLsn = None,
    verbose: cli.Verbose = False,
) -> None:
    """Apply the bridge's WalEntries to a SQL database, exactly once: a replica node.

    The master dials in (bridge --replica HOST:PORT). Each batch of entries
    commits with this node's position in the target, then is acknowledged; on every new
    connection it asks for what follows (RequestFrom), and it follows the highest term
    (docs/replication-message.md).
    """
    cli.setup_logging(verbose)
    with cli.handled(), cli.Signals() as signals:
        if (tls_key or tls_ca) and not tls_cert:
            raise ConfigError("--tls-key and --tls-ca need --tls-cert: the replica's own")
        if payload not in ("auto", "bincode", "json"):
            raise ConfigError(f"--payload must be auto, bincode or json, not {payload!r}")
        stats = run_replica(
            node_id,
            parse_address(listen, "--listen"),
            target,
            payload=payload,  # type: ignore[arg-type]
            until=cli.parse_lsn(until_lsn, "--until-lsn"),
            on_server=signals.attach,
            tls=tls_context(True, tls_cert, tls_key, tls_ca) if tls_cert else None,
        )
        cli.summary(
            f"replica {node_id}: applied {stats.entries} entries over {stats.connections} "
            f"connections ({stats.duplicates} received again); target at "
            f"{stats.last_lsn or stats.resumed_from}",
        )
