"""``pglogrepl-bridge publish``: the typer command over ``jetstream.publisher.run_publish``."""

from __future__ import annotations

from typing import Annotated

import typer

from pglogrepl_bridge.cli import app as cli
from pglogrepl_bridge.errors import ConfigError
from pglogrepl_bridge.jetstream.publisher import PublishConfig, run_publish


@cli.app.command()
def publish(
    slot: cli.Slot,
    publication: cli.Publications,
    nats: Annotated[
        list[str],
        typer.Option(
            "--nats", help="NATS server URL, e.g. nats://127.0.0.1:4222 (repeatable: the cluster)."
        ),
    ],
    stream: Annotated[str, typer.Option("--stream", help="JetStream stream name.")],
    subject_prefix: Annotated[
        str,
        typer.Option(
            "--subject-prefix",
            help="Transactions go to <prefix>.txn; a created stream takes <prefix>.>.",
        ),
    ] = "cdc",
    payload: Annotated[
        str,
        typer.Option(
            "--payload",
            help="Message body: json (the JSON line of tail) or bincode (a WalEntry, as the "
            "bridge sends it).",
        ),
    ] = "json",
    replicas: Annotated[
        int | None,
        typer.Option(
            "--replicas",
            min=1,
            max=5,
            help="Stream replicas when it is created (default 1); checked on an existing one.",
        ),
    ] = None,
    create: Annotated[
        bool,
        typer.Option("--create/--no-create", help="Create the stream when it does not exist."),
    ] = True,
    node_id: Annotated[
        int, typer.Option("--node-id", help="The WalEntry's node_id with --payload bincode.")
    ] = 1,
    ack_timeout: Annotated[
        float,
        typer.Option("--ack-timeout", min=0.1, help="Seconds to wait for JetStream's ack."),
    ] = 5.0,
    max_pending: Annotated[
        int,
        typer.Option(
            "--max-pending",
            min=1,
            max=4096,
            help="Messages awaiting JetStream's acknowledgement at most (each kept in memory "
            "until then).",
        ),
    ] = 64,
    dsn: cli.Dsn = "",
    create_slot: cli.CreateSlot = False,
    until_lsn: cli.UntilLsn = None,
    proto_version: cli.ProtoVersion = None,
    binary: cli.Binary = False,
    streaming: cli.Streaming = None,
    wait_for_server: cli.WaitForServer = 0.0,
    metrics_port: cli.MetricsPort = None,
    verbose: cli.Verbose = False,
) -> None:
    """Publish each committed transaction to a NATS JetStream stream, exactly once.

    One message per transaction, with a Nats-Msg-Id JetStream de-duplicates by, up to
    --max-pending in flight, each stored only right after the one before it; the slot is
    confirmed only to what JetStream acknowledged (with --replicas 3: a majority stored).
    Message shape and headers: docs/nats.md.
    """
    cli.setup_logging(verbose)
    with cli.handled(), cli.Signals() as signals:
        if payload not in ("json", "bincode"):
            raise ConfigError(f"--payload must be json or bincode, not {payload!r}")
        options = cli.stream_options(
            slot,
            publication,
            create_slot=create_slot,
            temporary=False,  # the stream holds what the slot confirmed: it must persist
            start_lsn=None,
            proto_version=proto_version,
            binary=binary,
            streaming=streaming,
            wait_for_server=wait_for_server,
            until_lsn=cli.parse_lsn(until_lsn, "--until-lsn"),
        )
        config = PublishConfig(
            servers=tuple(nats),
            stream=stream,
            subject_prefix=subject_prefix,
            payload=payload,  # type: ignore[arg-type]
            replicas=replicas,
            create=create,
            node_id=node_id,
            ack_timeout=ack_timeout,
            max_pending=max_pending,
        )
        stats = run_publish(
            dsn, options, config, on_stream=signals.attach, metrics_port=metrics_port
        )
        cli.summary(
            f"published {stats.published} transactions to {stream} ({stats.duplicates} already "
            f"there, {stats.skipped} skipped as stored before, {stats.retries} retries); "
            f"confirmed up to {stats.confirmed}",
        )
