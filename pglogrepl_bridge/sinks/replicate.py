"""``run_replicate``: the stream applied to a SQL store, in batches, exactly once.

The sink is a replica like any other: it receives transactions and acknowledges each one only
after the target transaction holding it (and its checkpoint) committed.
"""

from __future__ import annotations

import logging
import time
import zlib
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Literal

from pglogrepl_bridge.errors import TargetUnavailableError
from pglogrepl_bridge.lsn import Lsn
from pglogrepl_bridge.pgoutput.transaction import Transaction
from pglogrepl_bridge.postgres.connection import connect_waiting, identify_system
from pglogrepl_bridge.postgres.stream import ReplicationStream, StreamOptions
from pglogrepl_bridge.progress import Metrics, Progress
from pglogrepl_bridge.snapshot.plan import CHUNK_PAGES
from pglogrepl_bridge.snapshot.runner import (
    DEFAULT_WORKERS,
    ChunkCopied,
    SnapshotJob,
    SnapshotStats,
)

if TYPE_CHECKING:  # SQLAlchemy loads only when replicating: tail and bridge start faster
    from pglogrepl_bridge.sinks.sql import Conflict, SqlSink

log = logging.getLogger(__name__)

DEFAULT_TARGET = "sqlite:///pglogrepl_bridge.db"
#: initial: copy the existing rows first when the target holds nothing from (source, slot);
#: never: stream only; only: copy, record the checkpoint, and stop
SnapshotMode = Literal["initial", "never", "only"]


def apply_retrying(
    sink: SqlSink, txns: list[Transaction], stream: ReplicationStream, *, max_backoff: float
) -> None:
    """``sink.apply``, retried with backoff while the target is unavailable (a restart, the
    network), until it succeeds or the stream is stopped. Nothing is acknowledged meanwhile;
    a stop gives up with the error, and the batch comes again on the next run."""
    backoff = 0.1
    while True:
        try:
            sink.apply(txns)
            return
        except TargetUnavailableError as exc:
            if stream.stopping:
                raise
            log.warning("%s; retrying in %.1fs", exc, backoff)
            deadline = time.monotonic() + backoff
            while not stream.stopping and time.monotonic() < deadline:
                time.sleep(0.05)
            backoff = min(backoff * 2, max_backoff)


@dataclass
class ReplicateStats:
    """What ``run_replicate`` did: transactions, changes, batches, and the positions it resumed
    from and reached.
    """

    transactions: int = 0
    changes: int = 0
    batches: int = 0
    resumed_from: Lsn | None = None
    last_lsn: Lsn | None = None
    snapshot: SnapshotStats | None = None
    #: copies made while streaming (snapshot requests, tables new to the target)
    backfills: list[SnapshotStats] = field(default_factory=list)


def source_identity(dsn: str, wait: float = 0.0) -> str:
    """The source's system identifier: checkpoints are per (source, slot)."""
    with connect_waiting(dsn, replication=True, wait=wait) as conn:
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
    on_stream: Callable[[ReplicationStream | SnapshotJob], None] | None = None,
    snapshot: SnapshotMode = "initial",
    snapshot_workers: int = DEFAULT_WORKERS,
    on_snapshot_progress: Callable[[ChunkCopied], None] | None = None,
    snapshot_chunk_pages: int = CHUNK_PAGES,
    reduce: bool = True,
) -> ReplicateStats:
    """Apply the stream to ``target`` until stopped (or ``until``); returns what was done.

    With ``snapshot="initial"`` (the default) and no checkpoint in the target for this
    (source, slot), the publications' existing rows are copied first (``snapshot.runner``),
    consistent with the stream that follows; ``"only"`` stops after the copy. Unless it is
    ``"never"``, a table named by ``pglogrepl-bridge snapshot request`` (a logical decoding
    message in the stream) or new to the target (added to a publication) is copied again
    while the stream waits, each from its own consistent point.

    Batches are applied in one target transaction with the checkpoint, then acknowledged;
    one is written (by a second thread) while the next is read, each of up to half
    ``batch_changes`` changes, so at most ``batch_changes`` are held. A batch is also
    flushed whenever the stream catches up and no batch is being written, so a trickle is
    not held back, and a burst is not cut into a commit per few transactions. A batch goes in
    as one net change per row (``sinks.reduce``) unless ``reduce`` is False. ``on_stream``
    receives the stream before it starts (the CLI attaches its signal handlers there), and
    the snapshot job before it runs.
    """
    from pglogrepl_bridge.sinks.sql import SqlSink

    system_id = source_identity(dsn, options.wait_for_server)
    sink = SqlSink(
        target,
        source_id=system_id,
        slot=options.slot,
        conflict=conflict,
        node_id=zlib.crc32(system_id.encode()) & 0x7FFFFFFF if node_id is None else node_id,
        reduce=reduce,
    )
    metrics = Metrics(metrics_port) if metrics_port is not None else None
    try:
        return _replicate(
            dsn, sink, options, stats=ReplicateStats(resumed_from=sink.checkpoint()),
            metrics=metrics, batch_changes=batch_changes, until=until, on_stream=on_stream,
            snapshot=snapshot, snapshot_workers=snapshot_workers,
            on_snapshot_progress=on_snapshot_progress, snapshot_chunk_pages=snapshot_chunk_pages,
        )  # fmt: skip
    finally:
        if metrics is not None:
            metrics.close()


def _replicate(
    dsn: str,
    sink: SqlSink,
    options: StreamOptions,
    *,
    stats: ReplicateStats,
    metrics: Metrics | None,
    batch_changes: int,
    until: Lsn | None,
    on_stream: Callable[[ReplicationStream | SnapshotJob], None] | None,
    snapshot: SnapshotMode,
    snapshot_workers: int,
    on_snapshot_progress: Callable[[ChunkCopied], None] | None,
    snapshot_chunk_pages: int,
) -> ReplicateStats:
    if metrics is not None:
        shown = on_snapshot_progress

        def on_snapshot_progress(event: ChunkCopied) -> None:
            metrics.snapshot_rows.inc(event.rows)
            metrics.snapshot_done.set(event.tables_done)
            metrics.snapshot_pending.set(event.tables - event.tables_done)
            if shown is not None:
                shown(event)

    if snapshot != "never":
        # snapshot requests travel as logical decoding messages; tables new to the target
        # (added to a publication) are copied too
        options = replace(options, messages=True)
        sink.backfill = True

    def run_job(only: list[str] | None = None) -> SnapshotStats:
        """A snapshot job: all published tables first, or ``only`` these while streaming
        (the slot then stays where the stream confirms it)."""
        job = SnapshotJob(
            dsn,
            sink,
            options,
            workers=snapshot_workers,
            on_progress=on_snapshot_progress,
            chunk_pages=snapshot_chunk_pages,
            advance_slot=only is None,
            only=only,
        )
        if on_stream is not None:
            on_stream(job)
        return job.run()

    def copy_tables(tables: list[str]) -> bool:
        """Copy ``tables`` again while the stream waits; False if stopped meanwhile."""
        done = run_job(tables)
        stats.backfills.append(done)
        return done.complete

    if stats.resumed_from is None and snapshot != "never":
        stats.snapshot = run_job()
        if not stats.snapshot.complete:
            return stats  # stopped: the next run resumes the copy
        stats.last_lsn = stats.snapshot.checkpoint
    elif stats.resumed_from is not None:
        sink.load_skips(int(stats.resumed_from))
        pending_copies = sink.pending_copies() if snapshot != "never" else []
        if pending_copies and not copy_tables(pending_copies):
            return stats  # stopped during the copy: it is resumed on the next run
    if snapshot == "only":
        return stats
    start = stats.last_lsn or stats.resumed_from
    if until is not None and stats.last_lsn is not None and stats.last_lsn >= until:
        return stats  # the copy holds everything up to --until-lsn, and the slot is there
    if until is not None:
        options = replace(options, until_lsn=until)
    if start is not None:
        # the target holds everything up to its checkpoint: start after it
        options = replace(options, start_lsn=start)
    pending: list[Transaction] = []
    size = 0
    # One batch is applied (in the writer thread) while the next is read: the walsender,
    # this process and the target work at once. A target SQLite database in memory lives
    # in one thread's connection, so it is written inline.
    writer = None if sink.in_memory else ThreadPoolExecutor(1, thread_name_prefix="pglb-apply")
    writing: Future[None] | None = None
    # two batches in memory at once (one written, one read): each takes half, so at most
    # batch_changes changes are held, as when one batch was read, then written
    per_batch = batch_changes if writer is None else max(1, batch_changes // 2)

    def apply_batch(batch: list[Transaction]) -> None:
        try:
            apply_retrying(sink, batch, stream, max_backoff=options.max_backoff)
        except BaseException:
            stream.stop()  # the stream ends; settle() raises this in the reading thread
            raise
        for txn in batch:
            stream.ack(txn.end_lsn)  # from the writer thread: applied by the stream's loop
        stats.batches += 1
        stats.last_lsn = batch[-1].end_lsn

    def settle() -> None:
        """Wait for the batch being written (its error is raised here); then copy the tables
        it asked for, before any later batch is applied."""
        nonlocal writing
        if writing is not None:
            done, writing = writing, None
            done.result()
        if sink.requested:  # a snapshot request, or a new table, was in the batch
            copy_tables(sink.pending_copies())

    def flush() -> None:
        nonlocal size, writing
        if not pending:  # caught up: the batch in flight ends, and its copies are made
            settle()
            return
        batch = pending.copy()
        pending.clear()
        size = 0
        settle()
        if writer is None:
            apply_batch(batch)
            settle()
        else:
            writing = writer.submit(apply_batch, batch)

    def idle() -> None:
        """Caught up with the source: write what is pending, unless a batch is still being
        written. Then what is pending waits for that write and the stream's next look (at
        most a quarter of a second when nothing arrives), where flushing would wait anyway
        and then give a handful of transactions a commit of their own: a reader just ahead of
        the walsender made a commit, four fsyncs into SQLite, every few milliseconds."""
        if writing is not None and not writing.done():
            return
        flush()

    stream = ReplicationStream(dsn, options, on_idle=idle)
    if on_stream is not None:
        on_stream(stream)
    try:
        with stream, Progress(stream, metrics=metrics):
            for txn in stream:
                pending.append(txn)
                size += len(txn.changes) + 1
                stats.transactions += 1
                stats.changes += len(txn.changes)
                if size >= per_batch:
                    flush()
            flush()  # on a clean stop: what was received is applied, then confirmed on close
            settle()
    finally:
        if writer is not None:
            writer.shutdown(wait=True)  # a failed stream still lets the batch in flight end
    return stats
