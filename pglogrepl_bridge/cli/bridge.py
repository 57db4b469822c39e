"""``pglogrepl-bridge bridge``: the typer command over ``bridge.runner.run_bridge``."""

from __future__ import annotations

from typing import Annotated

import typer

from pglogrepl_bridge.bridge.network import parse_address, tls_context
from pglogrepl_bridge.bridge.runner import BridgeConfig, run_bridge
from pglogrepl_bridge.cli import app as cli
from pglogrepl_bridge.errors import BridgeError, ConfigError


@cli.app.command()
def bridge(
    slot: cli.Slot,
    publication: cli.Publications,
    replica: Annotated[
        list[str], typer.Option("--replica", help="Replica to dial, HOST:PORT (repeatable).")
    ] = [],  # noqa: B006 - typer reads the default, never mutates it
    listen: Annotated[
        str | None,
        typer.Option(
            "--listen", help="Accept replicas on HOST:PORT (give 127.0.0.1 unless TLS protects it)."
        ),
    ] = None,
    node_id: Annotated[int, typer.Option("--node-id", help="This bridge's node id.")] = 1,
    peer: Annotated[
        list[str],
        typer.Option(
            "--peer",
            help="Another member of this bridge's group: its --listen HOST:PORT (repeatable). "
            "Members elect one master; the others wait to take over. --listen then serves "
            "the group, and replicas are dialled (--replica).",
        ),
    ] = [],  # noqa: B006 - typer reads the default, never mutates it
    ack_quorum: Annotated[
        int | None,
        typer.Option(
            "--ack-quorum",
            min=1,
            help="Replicas that must acknowledge "
            "before PostgreSQL is told (default: a majority of --replica).",
        ),
    ] = None,
    payload: Annotated[
        str, typer.Option("--payload", help="WalEntry data: json or bincode.")
    ] = "json",
    heartbeat_interval: Annotated[
        float, typer.Option("--heartbeat-interval", min=0.001, help="Seconds between heartbeats.")
    ] = 0.05,
    window: Annotated[
        int, typer.Option("--window", min=1, help="Unacknowledged entries per replica at most.")
    ] = 1000,
    buffer_entries: Annotated[
        int,
        typer.Option(
            "--buffer-entries",
            min=1,
            help="Newest entries kept to answer a replica's RequestFrom without asking "
            "PostgreSQL again; the stream pauses while this many are unacknowledged by a quorum.",
        ),
    ] = 10_000,
    buffer_mb: Annotated[
        float,
        typer.Option(
            "--buffer-mb", min=0.001, help="The same buffer's bound in MiB of WalEntry frames."
        ),
    ] = 64.0,
    term: Annotated[
        int,
        typer.Option("--term", min=0, help="This master's election term (alone; a group elects)."),
    ] = 1,
    tls_cert: Annotated[str | None, typer.Option("--tls-cert", help="PEM certificate.")] = None,
    tls_key: Annotated[str | None, typer.Option("--tls-key", help="PEM private key.")] = None,
    tls_ca: Annotated[
        str | None, typer.Option("--tls-ca", help="CA bundle to verify peers (enables TLS).")
    ] = None,
    dsn: cli.Dsn = "",
    create_slot: cli.CreateSlot = False,
    temporary: cli.Temporary = False,
    until_lsn: cli.UntilLsn = None,
    proto_version: cli.ProtoVersion = None,
    binary: cli.Binary = False,
    streaming: cli.Streaming = None,
    wait_for_server: cli.WaitForServer = 0.0,
    metrics_port: cli.MetricsPort = None,
    verbose: cli.Verbose = False,
) -> None:
    """Send transactions to replicas as WalEntry frames; confirm what a quorum acknowledged.

    While streaming it refuses every vote; a Promotion of another node at a term at least its
    own stops it (see docs/replication-message.md).
    """
    cli.setup_logging(verbose)
    with cli.handled(), cli.Signals() as signals:
        if payload not in ("json", "bincode"):
            raise ConfigError(f"--payload must be json or bincode, not {payload!r}")
        tls = tls_cert is not None or tls_ca is not None
        config = BridgeConfig(
            node_id=node_id,
            replicas=[parse_address(r, "--replica") for r in replica],
            listen=parse_address(listen, "--listen") if listen else None,
            ack_quorum=ack_quorum,
            payload=payload,  # type: ignore[arg-type]
            heartbeat_interval=heartbeat_interval,
            window=window,
            buffer_entries=buffer_entries,
            buffer_bytes=int(buffer_mb * 1024 * 1024),
            term=term,
            tls_client=tls_context(False, tls_cert, tls_key, tls_ca) if tls else None,
            tls_server=tls_context(True, tls_cert, tls_key, tls_ca) if tls else None,
            peers=[parse_address(p, "--peer") for p in peer],
        )
        if config.listen and config.listen[0] not in ("127.0.0.1", "::1", "localhost") and not tls:
            cli.log.warning(
                "--listen %s:%d without TLS: anyone who can reach it gets the data", *config.listen
            )
        options = cli.stream_options(
            slot,
            publication,
            create_slot=create_slot,
            temporary=temporary,
            start_lsn=None,
            proto_version=proto_version,
            binary=binary,
            streaming=streaming,
            wait_for_server=wait_for_server,
            until_lsn=cli.parse_lsn(until_lsn, "--until-lsn"),
        )
        stats = run_bridge(
            dsn, options, config, metrics_port=metrics_port, on_stream=signals.attach
        )
        if stats.stepped_down is not None:
            raise BridgeError(
                f"stopped: node {stats.stepped_down.node_id} was promoted at term "
                f"{stats.stepped_down.term}; this bridge is no longer the master"
            )
        cli.summary(
            f"bridged {stats.transactions} transactions ({stats.entries} WalEntries); "
            f"confirmed up to {stats.confirmed}",
        )
