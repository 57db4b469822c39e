"""``replicate``: the stream applied to a SQL store, in batches, exactly once.

The sink is a replica like any other: it receives transactions and acknowledges each one only
after the target transaction holding it (and its checkpoint) committed.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Annotated

import typer

from . import cliapp as cli
from .connection import connect, identify_system
from .errors import ConfigError
from .lsn import Lsn
from .progress import Progress
from .stream import ReplicationStream, StreamOptions
from .transaction import Transaction

if TYPE_CHECKING:  # SQLAlchemy loads only when replicating: tail and bridge start faster
    from .sqlsink import Conflict

DEFAULT_TARGET = "sqlite:///pglogrepl_bridge.db"


@dataclass
class ReplicateStats:
    transactions: int = 0
    changes: int = 0
    batches: int = 0
    resumed_from: Lsn | None = None
    last_lsn: Lsn | None = None


def source_identity(dsn: str) -> str:
    """The source's system identifier: checkpoints are per (source, slot)."""
    with connect(dsn, replication=True) as conn:
        return identify_system(conn).system_id


def run_replicate(
    dsn: str,
    target: str,
    options: StreamOptions,
    *,
    conflict: Conflict = "source",
    node_id: int | None = None,
    batch_changes: int = 10_000,
    until: Lsn | None = None,
    metrics_port: int | None = None,
) -> ReplicateStats:
    from .sqlsink import SqlSink

    system_id = source_identity(dsn)
    sink = SqlSink(
        target,
        source_id=system_id,
        slot=options.slot,
        conflict=conflict,
        node_id=zlib.crc32(system_id.encode()) & 0x7FFFFFFF if node_id is None else node_id,
    )
    stats = ReplicateStats(resumed_from=sink.checkpoint())
    if until is not None:
        options = replace(options, until_lsn=until)
    if stats.resumed_from is not None:
        # the target holds everything up to its checkpoint: start after it
        options = replace(options, start_lsn=stats.resumed_from)
    pending: list[Transaction] = []
    size = 0

    def flush() -> None:
        nonlocal size
        if not pending:
            return
        sink.apply(pending)
        for txn in pending:
            stream.ack(txn.end_lsn)
        stats.batches += 1
        stats.last_lsn = pending[-1].end_lsn
        pending.clear()
        size = 0

    stream = ReplicationStream(dsn, options, on_idle=flush, on_problem=cli.report_problem)
    with stream, cli.stop_on_signals(stream.stop), Progress(stream, metrics_port=metrics_port):
        for txn in stream:
            pending.append(txn)
            size += len(txn.changes) + 1
            stats.transactions += 1
            stats.changes += len(txn.changes)
            if size >= batch_changes:
                flush()
        flush()  # on a clean stop: what was received is applied, then confirmed on close
    return stats


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
    with cli.handled():
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
        )
        cli.err().print(
            f"replicated {stats.transactions} transactions ({stats.changes} changes) in "
            f"{stats.batches} batches; target at {stats.last_lsn or stats.resumed_from}",
            highlight=False,
        )
