"""``pglogrepl-bridge replicate``: the typer command over ``sinks.replicate.run_replicate``."""

from __future__ import annotations

from typing import Annotated

import typer

from pglogrepl_bridge.cli import app as cli
from pglogrepl_bridge.errors import ConfigError
from pglogrepl_bridge.sinks.replicate import DEFAULT_TARGET, run_replicate


@cli.app.command()
def replicate(
    slot: cli.Slot,
    publication: cli.Publications,
    target: Annotated[
        str, typer.Option("--target", help="SQLAlchemy URL of the target database.")
    ] = DEFAULT_TARGET,
    dsn: cli.Dsn = "",
    create_slot: cli.CreateSlot = False,
    temporary: cli.Temporary = False,
    until_lsn: cli.UntilLsn = None,
    proto_version: cli.ProtoVersion = None,
    binary: cli.Binary = False,
    streaming: cli.Streaming = None,
    wait_for_server: cli.WaitForServer = 0.0,
    conflict: Annotated[
        str,
        typer.Option(
            "--conflict",
            help="source: apply in stream order; lww: last writer "
            "(commit time, then node id) wins.",
        ),
    ] = "source",
    node_id: Annotated[
        int | None,
        typer.Option(
            "--node-id",
            help="This source's id for --conflict lww (default: from its system identifier).",
        ),
    ] = None,
    batch: Annotated[
        int, typer.Option("--batch", min=1, help="Changes per target transaction at most.")
    ] = 10_000,
    metrics_port: cli.MetricsPort = None,
    verbose: cli.Verbose = False,
) -> None:
    """Apply the publication's changes to a SQL database, exactly once.

    It resumes from the checkpoint kept in the target, so there is no --start-lsn.
    """
    cli.setup_logging(verbose)
    with cli.handled(), cli.Signals() as signals:
        if conflict not in ("source", "lww"):
            raise ConfigError(f"--conflict must be 'source' or 'lww', not {conflict!r}")
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
        )
        stats = run_replicate(
            dsn,
            target,
            options,
            conflict=conflict,  # type: ignore[arg-type]
            node_id=node_id,
            metrics_port=metrics_port,
            batch_changes=batch,
            until=cli.parse_lsn(until_lsn, "--until-lsn"),
            on_stream=signals.attach,
        )
        cli.err().print(
            f"replicated {stats.transactions} transactions ({stats.changes} changes) in "
            f"{stats.batches} batches; target at {stats.last_lsn or stats.resumed_from}",
            highlight=False,
        )
