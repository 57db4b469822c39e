"""``pglogrepl-bridge replicate``: the typer command over ``sinks.replicate.run_replicate``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from pglogrepl_bridge.cli import app as cli
from pglogrepl_bridge.cli.snapshotprogress import snapshot_progress
from pglogrepl_bridge.errors import ConfigError
from pglogrepl_bridge.sinks.replicate import DEFAULT_TARGET, run_replicate
from pglogrepl_bridge.snapshot.runner import DEFAULT_WORKERS, SnapshotJob, SnapshotStats

if TYPE_CHECKING:
    from pglogrepl_bridge.jetstream.consumer import ConsumeConfig

OptionalSlot = Annotated[
    str | None,
    typer.Option("--slot", help="Logical replication slot (pgoutput); not with --from-nats."),
]
OptionalPublications = Annotated[
    list[str] | None,
    typer.Option("--publication", "-p", help="Publication to stream (repeatable)."),
]


@cli.app.command()
def replicate(
    slot: OptionalSlot = None,
    publication: OptionalPublications = None,
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
        int,
        typer.Option(
            "--batch",
            min=1,
            help="Changes held at most: one target transaction of up to half of them is "
            "written while the next is read. With --from-nats: messages per pull, one "
            "target transaction (at most 1024).",
        ),
    ] = 10_000,
    reduce: Annotated[
        bool,
        typer.Option(
            "--reduce/--no-reduce",
            help="Write each target transaction as one net change per row (a row inserted "
            "and deleted in it costs nothing). --no-reduce: every change, in stream order, "
            "for targets whose triggers must see each one. With --conflict lww every "
            "change is applied.",
        ),
    ] = True,
    snapshot: Annotated[
        str | None,
        typer.Option(
            "--snapshot",
            help="initial (default): when the target holds nothing from this slot, copy the "
            "existing rows first, consistent with the stream; never: changes only; only: "
            "copy, then stop (a later run streams on). With --from-nats the default is never; "
            "initial and only copy from --dsn, consistent with the stream.",
        ),
    ] = None,
    snapshot_workers: Annotated[
        int,
        typer.Option(
            "--snapshot-workers",
            min=1,
            help="Parallel table copies (default: one per core, at most 4).",
        ),
    ] = DEFAULT_WORKERS,
    from_nats: Annotated[
        list[str] | None,
        typer.Option(
            "--from-nats",
            help="Apply a JetStream stream written by 'publish' instead of the slot: a NATS "
            "server URL (repeatable: the cluster).",
        ),
    ] = None,
    stream: Annotated[
        str | None, typer.Option("--stream", help="With --from-nats: the stream.")
    ] = None,
    durable: Annotated[
        str | None,
        typer.Option(
            "--durable", help="With --from-nats: the durable consumer (one run per name)."
        ),
    ] = None,
    subject_prefix: Annotated[
        str, typer.Option("--subject-prefix", help="With --from-nats: publish's prefix.")
    ] = "cdc",
    table: Annotated[
        list[str] | None,
        typer.Option(
            "--table",
            help="With --from-nats: apply only this table's changes (schema.name; repeatable).",
        ),
    ] = None,
    metrics_port: cli.MetricsPort = None,
    verbose: cli.Verbose = False,
) -> None:
    """Apply the publication's changes to a SQL database, exactly once.

    A new target first gets a copy of the rows that already exist (--snapshot), then the
    changes. It resumes from the checkpoint kept in the target, so there is no --start-lsn.
    With --from-nats it applies the transactions 'publish' stored in a JetStream stream.
    """
    cli.setup_logging(verbose)
    with cli.handled(), cli.Signals() as signals:
        if conflict not in ("source", "lww"):
            raise ConfigError(f"--conflict must be 'source' or 'lww', not {conflict!r}")
        if from_nats:
            snapshot = snapshot or "never"
            if snapshot not in ("initial", "never", "only"):
                raise ConfigError(
                    f"--snapshot must be 'initial', 'never' or 'only', not {snapshot!r}"
                )
            if slot is not None or publication:
                raise ConfigError(
                    "--slot and --publication name the source of a stream, not of "
                    "--from-nats: the stream's messages say which slot they come from"
                )
            if not stream or not durable:
                raise ConfigError("--from-nats needs --stream and --durable")
            # the NATS side (asyncio, nats-py) is imported only here: startup time
            from pglogrepl_bridge.jetstream.consumer import ConsumeConfig

            _from_nats(
                signals,
                target,
                ConsumeConfig(
                    snapshot=snapshot,  # type: ignore[arg-type]
                    dsn=dsn,
                    snapshot_workers=snapshot_workers,
                    servers=tuple(from_nats),
                    stream=stream,
                    durable=durable,
                    subject_prefix=subject_prefix,
                    tables=frozenset(t if "." in t else f"public.{t}" for t in table)
                    if table
                    else None,
                    fetch=min(batch, 1024),
                    until=cli.parse_lsn(until_lsn, "--until-lsn"),
                    reduce=reduce,
                ),
                conflict=conflict,
                node_id=node_id,
                metrics_port=metrics_port,
            )
            return
        if stream or durable or table:
            raise ConfigError("--stream, --durable and --table go with --from-nats")
        if not slot or not publication:
            raise ConfigError("replicate needs --slot and --publication (or --from-nats)")
        snapshot = snapshot or "initial"
        if snapshot not in ("initial", "never", "only"):
            raise ConfigError(f"--snapshot must be 'initial', 'never' or 'only', not {snapshot!r}")
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
        with snapshot_progress() as progress:

            def attach(job_or_stream: object) -> None:
                signals.attach(job_or_stream)
                if not isinstance(job_or_stream, SnapshotJob):
                    progress.close()  # the snapshot is over: the stream runs on

            stats = run_replicate(
                dsn,
                target,
                options,
                conflict=conflict,  # type: ignore[arg-type]
                node_id=node_id,
                metrics_port=metrics_port,
                batch_changes=batch,
                until=cli.parse_lsn(until_lsn, "--until-lsn"),
                reduce=reduce,
                on_stream=attach,
                snapshot=snapshot,  # type: ignore[arg-type]
                snapshot_workers=snapshot_workers,
                on_snapshot_progress=progress,
            )
        _print_snapshot(stats.snapshot)
        cli.summary(
            f"replicated {stats.transactions} transactions ({stats.changes} changes) in "
            f"{stats.batches} batches; target at {stats.last_lsn or stats.resumed_from}",
        )


def _from_nats(
    signals: cli.Signals,
    target: str,
    config: ConsumeConfig,
    *,
    conflict: str,
    node_id: int | None,
    metrics_port: int | None,
) -> None:
    from pglogrepl_bridge.jetstream.consumer import run_consume

    with snapshot_progress() as progress:

        def attach(job_or_consumer: object) -> None:
            signals.attach(job_or_consumer)
            if not isinstance(job_or_consumer, SnapshotJob):
                progress.close()

        stats = run_consume(
            target,
            config,
            conflict=conflict,  # type: ignore[arg-type]
            node_id=node_id,
            on_consumer=attach,
            metrics_port=metrics_port,
            on_snapshot_progress=progress,
        )
    _print_snapshot(stats.snapshot)
    cli.summary(
        f"applied {stats.transactions} transactions ({stats.changes} changes) from "
        f"{config.stream} in {stats.batches} batches ({stats.skipped} already applied, "
        f"{stats.refetched} read again by sequence); target at "
        f"{stats.last_lsn or stats.resumed_from}",
    )


def _print_snapshot(copied: SnapshotStats | None) -> None:
    if copied is None:
        return
    state = "copied" if copied.complete else "stopped after copying"
    cli.summary(
        f"snapshot: {state} {copied.rows} rows of {len(copied.copied)} tables in "
        f"{copied.chunks} chunks ({copied.seconds:.1f}s)"
        + (f", kept {len(copied.kept)} tables copied earlier" if copied.kept else "")
        + ("" if copied.complete else "; run again to resume"),
    )
