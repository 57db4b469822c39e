"""``SnapshotJob``: copy every published table into a sink, in parallel chunks, resumably.

The IO around ``plan``'s rules: one exported snapshot (``anchor``), N worker connections
that import it and COPY their chunks, and the sink, which commits each chunk with its
progress row. A stop (SIGINT, SIGTERM) ends the job between rows; what committed stays and
the next run resumes from it.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import (
    Callable,
    Collection,
    Generator,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import psycopg
from psycopg import sql

from pglogrepl_bridge.errors import (
    BridgeError,
    ConfigError,
    ReplicationError,
    TargetUnavailableError,
)
from pglogrepl_bridge.lsn import Lsn, format_lsn
from pglogrepl_bridge.pgoutput import _accel as accel
from pglogrepl_bridge.pgoutput.relcache import RelationCache, RelationInfo
from pglogrepl_bridge.pgoutput.values import ValueLoaders
from pglogrepl_bridge.postgres import admin
from pglogrepl_bridge.postgres.connection import Conn, connect, connection_error
from pglogrepl_bridge.postgres.copyout import copy_out
from pglogrepl_bridge.postgres.options import StreamOptions
from pglogrepl_bridge.postgres.startup import check_slot
from pglogrepl_bridge.snapshot import plan
from pglogrepl_bridge.snapshot.anchor import Anchor, ExportedSnapshot
from pglogrepl_bridge.snapshot.catalog import PublishedTable, key_ranges, published_tables
from pglogrepl_bridge.snapshot.copytext import split_row

log = logging.getLogger(__name__)

#: Default parallel copies: one per core, at most 4. Each worker holds a source connection
#: (with an open snapshot) and a target connection; beyond 4 the source's disks and the
#: target's single writer (SQLite) gain little, and the source pays for every connection.
DEFAULT_WORKERS = max(1, min(4, os.cpu_count() or 1))

#: settings of the workers' sessions: a long COPY must not hit the server's timeouts
_WORKER_SETTINGS = {
    "statement_timeout": "0",
    "idle_in_transaction_session_timeout": "0",
    "application_name": admin.SNAPSHOT_APPLICATION,  # what ``status`` looks for
}


@dataclass(frozen=True, slots=True)
class ChunkCopied:
    """Progress: a chunk committed in the target."""

    table: str
    index: int
    count: int
    rows: int
    table_rows: int  # this table's rows so far, in this run
    estimate: int  # the table's row estimate (pg_class.reltuples), -1 if unknown
    tables_done: int  # tables whose every chunk committed, in this run
    tables: int  # tables this run copies


@dataclass
class SnapshotStats:
    """What a snapshot did: tables copied and kept (from an earlier run), chunks, rows, and
    the checkpoint the stream resumes from; ``complete`` is False after a stop."""

    copied: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    chunks: int = 0
    rows: int = 0
    anchor: Lsn | None = None
    checkpoint: Lsn | None = None
    complete: bool = False
    seconds: float = 0.0


_Block = TypeVar("_Block")


class _Stopped(Exception):
    pass


class _SourceError(Exception):
    """A psycopg error of the source's COPY, carried past the sink's own error handling."""


class SnapshotSink(Protocol):
    """Where a snapshot's rows go: ``sinks.sql.SqlSink`` (durable, resumable) or
    ``snapshot.readrows.ReadRows`` (handed on, e.g. printed)."""

    def snapshot_progress(self) -> list[plan.ChunkDone]:
        """Chunks that committed in an earlier run."""
        ...

    def start_snapshot(
        self,
        relations: Sequence[RelationInfo],
        interrupted: Sequence[str],
        partial: Mapping[str, plan.TableCopy],
    ) -> None:
        """Prepare the tables about to be copied: ``interrupted`` ones lose an interrupted
        copy's rows, ``partial`` ones keep the rows of their committed chunks' key ranges."""
        ...

    def copy_chunk(
        self, rel: RelationInfo, rows: Iterable[Sequence[bytes | None]], chunk: plan.ChunkDone
    ) -> int:
        """Take a chunk's rows (and record the chunk); returns how many."""
        ...

    def takes_copy_text(self, rel: RelationInfo) -> bool:
        """Whether ``copy_lines`` takes this relation's COPY text lines as they are."""
        ...

    def copy_lines(self, rel: RelationInfo, lines: Iterable[bytes], chunk: plan.ChunkDone) -> int:
        """``copy_chunk`` for unparsed COPY text lines; returns how many."""
        ...

    def finish_snapshot(self, checkpoint: int | None, copied: Sequence[str] = ()) -> None:
        """Record the checkpoint the stream resumes from (None: it stays), and that the
        ``copied`` tables' requests are done."""
        ...


class SnapshotJob:
    """Copies the publications' tables into ``sink`` as of one exported snapshot, then records
    the checkpoint the stream continues from. Resumes an interrupted copy (``plan.resume``).
    """

    def __init__(
        self,
        dsn: str,
        sink: SnapshotSink,
        options: StreamOptions,
        *,
        workers: int = DEFAULT_WORKERS,
        on_progress: Callable[[ChunkCopied], None] | None = None,
        chunk_pages: int = plan.CHUNK_PAGES,
        advance_slot: bool = True,
        only: Collection[str] | None = None,
        tables: Collection[str] | None = None,
        slot_feeds_target: bool = True,
    ) -> None:
        if workers < 1:
            raise ConfigError("--snapshot-workers must be at least 1")
        self.dsn = dsn
        self.sink = sink
        self.options = options
        self.workers = workers
        self.on_progress = on_progress
        self.chunk_pages = chunk_pages
        self.advance_slot = advance_slot
        #: copy just these tables while the stream runs (a request, a table new to the
        #: target): the checkpoint stays, each table skips its changes up to its own anchor
        self.only = None if only is None else frozenset(only)
        #: copy only these of the published tables (a consumer that applies only them)
        self.tables = None if tables is None else frozenset(tables)
        #: False: the target is fed from elsewhere (a NATS stream that holds what the slot
        #: confirmed), so the slot's position says nothing about what the target can get
        self.slot_feeds_target = slot_feeds_target
        self._stop = threading.Event()
        self._lock = threading.Lock()

    def stop(self) -> None:
        """Stop between rows; committed chunks stay, the next run resumes (any thread)."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        """Whether ``stop`` was called."""
        return self._stop.is_set()

    def run(self) -> SnapshotStats:
        """Copy, then record the checkpoint; returns what was done."""
        started = time.monotonic()
        stats = SnapshotStats()
        done = self.sink.snapshot_progress()
        exporter, confirmed = self._exporter()
        conns: list[Conn] = []
        online = self.only is not None
        try:
            with exporter as anchor:
                log.info(
                    "snapshot %s exported at %s (slot %s)",
                    anchor.snapshot,
                    format_lsn(anchor.lsn),
                    anchor.slot,
                )
                conns = [self._worker_conn(anchor) for _ in range(self.workers)]
                tables = published_tables(conns[0], self.options.publications)
            # the export ends here: the workers' transactions hold the snapshot
            stats.anchor = anchor.lsn
            tables = self._chosen(tables)
            resumed = plan.resume(
                [t.name for t in tables], done, {t.name: t.split_key for t in tables}
            )
            for name in resumed.to_clear:
                log.info("the copy of %s was interrupted: copying it again", name)
            for name, part in resumed.partial.items():
                log.info(
                    "the copy of %s was interrupted: %d of %d chunks are kept, copying the rest",
                    name,
                    len(part.anchors),
                    part.count,
                )
            anchors = [c.lowest for c in (*resumed.kept.values(), *resumed.partial.values())]
            if resumed.to_copy:
                anchors.append(int(anchor.lsn))
            lowest = plan.checkpoint(anchors) if anchors else int(anchor.lsn)
            if confirmed is not None and confirmed > lowest:
                raise ReplicationError(
                    f"replication slot {self.options.slot!r} is at {format_lsn(confirmed)}, "
                    f"past the snapshot's {format_lsn(Lsn(lowest))}: changes in between are "
                    "gone. Empty the target (or use another one) and run again"
                )
            stats.kept = sorted(resumed.kept)
            stats.copied = list(resumed.to_copy)
            todo = [t for t in tables if t.name in set(resumed.to_copy)]
            self._copy(todo, anchor, conns, stats, resumed)
        finally:
            for conn in conns:
                conn.close()
        stats.seconds = time.monotonic() - started
        if self.stopping:
            return stats
        if online:  # the stream's checkpoint stays; the requests are done
            self.sink.finish_snapshot(None, sorted(self.only or ()))
            stats.complete = True
            return stats
        self.sink.finish_snapshot(lowest)
        stats.checkpoint = Lsn(lowest)
        stats.complete = True
        if self.advance_slot:
            self._advance_slot(Lsn(lowest))
        return stats

    def _exporter(self) -> tuple[ExportedSnapshot, Lsn | None]:
        """Where the snapshot comes from, and the slot's confirmed position to check against
        (None: a new slot, or a copy while our own stream holds the slot)."""
        opts = self.options
        if self.only is not None:
            return ExportedSnapshot(self.dsn), None
        if opts.temporary:
            raise ConfigError(
                "a snapshot needs a permanent slot (the copy and the stream must share it): "
                "drop --temporary, or use --snapshot never"
            )
        with connect(self.dsn, replication=False) as meta:
            slot = admin.get_slot(meta, opts.slot)
            dbname = meta.info.dbname
        if slot is not None and slot.database != dbname:
            raise ConfigError(
                f"replication slot {opts.slot!r} belongs to database {slot.database!r}, "
                f"not {dbname!r}: connect to that database, or use another slot"
            )
        if not self.slot_feeds_target:  # its reader (publish) holds it; the stream has
            return ExportedSnapshot(self.dsn), None  # what it confirmed
        if slot is not None:
            return ExportedSnapshot(self.dsn), check_slot(opts.slot, slot, backend_pid=-1)
        if opts.create_slot:  # the slot starts at the anchor
            return ExportedSnapshot(self.dsn, slot=opts.slot, two_phase=opts.two_phase), None
        raise ConfigError(
            f"replication slot {opts.slot!r} does not exist: create it with --create-slot "
            f"or 'pglogrepl-bridge slot create {opts.slot}'"
        )

    def _chosen(self, tables: list[PublishedTable]) -> list[PublishedTable]:
        """The published tables to copy: all of them, or those asked for while streaming."""
        pubs = ", ".join(self.options.publications)
        if self.tables is not None:
            chosen = [t for t in tables if t.name in self.tables]
            if tables and not chosen:
                raise ConfigError(
                    f"none of the tables asked for ({', '.join(sorted(self.tables))}) is "
                    f"published by {pubs}"
                )
            tables = chosen
        if self.only is None:
            if not tables:
                raise ConfigError(
                    f"publication(s) {pubs} publish no tables: add tables (ALTER PUBLICATION "
                    "... ADD TABLE), or use --snapshot never"
                )
            return tables
        unknown = set(self.only) - {t.name for t in tables}
        if unknown:
            log.warning(
                "snapshot requested for %s, not published by %s: ignored", sorted(unknown), pubs
            )
        return [t for t in tables if t.name in self.only]

    def _advance_slot(self, lsn: Lsn) -> None:
        """Confirm the slot up to the checkpoint: the target holds all before it, and the WAL
        the slot pinned for it can go. Optional: the stream would confirm it anyway."""
        try:
            with connect(self.dsn, replication=False) as conn:
                conn.execute(
                    "SELECT pg_replication_slot_advance(%s, %s::pg_lsn)",
                    (self.options.slot, format_lsn(lsn)),
                )
        except (psycopg.Error, BridgeError) as exc:
            log.warning("could not advance slot %s to the snapshot: %s", self.options.slot, exc)

    def _worker_conn(self, anchor: Anchor) -> Conn:
        conn = connect(self.dsn, replication=False, settings=_WORKER_SETTINGS)
        try:
            conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            conn.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(anchor.snapshot))
        except psycopg.Error as exc:
            conn.close()
            raise connection_error(exc, self.dsn) from None
        return conn

    def _copy(
        self,
        tables: Sequence[PublishedTable],
        anchor: Anchor,
        conns: list[Conn],
        stats: SnapshotStats,
        resumed: plan.ResumePlan,
    ) -> None:
        cache = RelationCache(ValueLoaders())
        infos: dict[str, RelationInfo] = {}
        for table in tables:
            for typ in table.types:
                cache.add_type(typ)
            infos[table.name] = cache.add_relation(table.relation)
        plans = {t.name: self._chunks(conns[0], t, resumed.partial.get(t.name)) for t in tables}
        self.sink.start_snapshot(list(infos.values()), resumed.to_clear, resumed.partial)
        work: queue.SimpleQueue[tuple[PublishedTable, plan.Chunk]] = queue.SimpleQueue()
        # big tables first: they set the job's length, small ones fill the gaps
        for table in sorted(tables, key=lambda t: -t.pages):
            for chunk in plans[table.name]:
                work.put((table, chunk))
        table_rows = dict.fromkeys(infos, 0)
        chunks_left = {name: len(chunks) for name, chunks in plans.items()}
        errors: list[BaseException] = []

        def worker(conn: Conn) -> None:
            try:
                while not self.stopping and not errors:
                    try:
                        table, chunk = work.get_nowait()
                    except queue.Empty:
                        return
                    rows = self._copy_chunk(conn, table, infos[table.name], chunk, anchor)
                    with self._lock:
                        stats.chunks += 1
                        stats.rows += rows
                        table_rows[table.name] += rows
                        chunks_left[table.name] -= 1
                        event = ChunkCopied(
                            table.name, chunk.index, chunk.count, rows,
                            table_rows[table.name], table.estimate,
                            sum(1 for n in chunks_left.values() if n == 0), len(chunks_left),
                        )  # fmt: skip
                    if self.on_progress is not None:
                        self.on_progress(event)
            except _Stopped:
                return
            except BaseException as exc:  # reported by run() in the main thread
                errors.append(exc)

        threads = [
            threading.Thread(target=worker, args=(c,), name=f"snapshot-{i}", daemon=True)
            for i, c in enumerate(conns)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            first = errors[0]
            if isinstance(first, BridgeError):
                raise first
            if isinstance(first, psycopg.Error):
                raise ReplicationError(f"cannot read the source: {str(first).strip()}") from None
            raise first

    def _chunks(
        self, conn: Conn, table: PublishedTable, partial: plan.TableCopy | None
    ) -> list[plan.Chunk]:
        """The chunks to copy (rule 2): a resumed key split's missing ones, else the table
        split by key when it can be, else by ctid."""
        if partial is not None and partial.ranges is not None:
            return plan.key_chunks(table.name, partial.ranges, partial.anchors)
        count = max(1, -(-table.pages // self.chunk_pages))
        try:
            ranges = key_ranges(conn, table, count)
        except psycopg.Error as exc:
            raise ReplicationError(
                f"cannot plan the copy of {table.name}: {str(exc).strip()}"
            ) from None
        if ranges is not None:
            return plan.key_chunks(table.name, ranges)
        return plan.chunks(table.name, table.pages, self.chunk_pages)

    def _copy_chunk(
        self,
        conn: Conn,
        table: PublishedTable,
        info: RelationInfo,
        chunk: plan.Chunk,
        anchor: Anchor,
    ) -> int:
        query = table.copy_query(chunk)
        ranges = None if chunk.ranges is None else chunk.ranges.encode()
        done = plan.ChunkDone(table.name, chunk.index, chunk.count, int(anchor.lsn), 0, ranges)
        backoff = 0.1
        while True:
            conn.execute("SAVEPOINT chunk")  # a failed target write re-reads the chunk
            try:
                if self.sink.takes_copy_text(info):  # COPY text as it is, rows not even copied
                    views = self._source(copy_out(conn, query, views=True))
                    try:
                        return self.sink.copy_lines(info, map(b"".join, views), done)
                    finally:
                        views.close()  # an unfinished COPY is cancelled
                blocks = self._source(copy_out(conn, query))
                try:
                    return self.sink.copy_chunk(info, _rows(blocks, info.ncols), done)
                finally:
                    blocks.close()
            except TargetUnavailableError as exc:
                conn.execute("ROLLBACK TO SAVEPOINT chunk")
                if self.stopping:
                    raise _Stopped from None
                log.warning("%s; retrying the chunk in %.1fs", exc, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self.options.max_backoff)
            except _SourceError as failed:
                cause = failed.args[0]
                if isinstance(cause, psycopg.errors.InsufficientPrivilege):
                    raise ConfigError(
                        f"cannot read {table.name}: {str(cause).strip()}: GRANT SELECT ON "
                        f"{table.name} to the replication role"
                    ) from None
                raise ReplicationError(
                    f"cannot read {table.name} from the source: {str(cause).strip()}"
                ) from None

    def _source(self, blocks: Iterator[_Block]) -> Generator[_Block, None, None]:
        """The source's blocks of rows, stopping between blocks; a failure of the source is
        wrapped so that the sink, which catches its own driver's errors, lets it through."""
        try:
            for block in blocks:
                if self._stop.is_set():
                    raise _Stopped
                yield block
        except psycopg.Error as exc:
            raise _SourceError(exc) from exc
        finally:
            close = getattr(blocks, "close", None)
            if close is not None:
                close()


def _rows(blocks: Iterator[list[bytes]], ncols: int) -> Iterator[list[bytes | None]]:
    fast = accel.copy_row  # C, where built; None for a row it leaves to split_row
    for block in blocks:
        if fast is not None:
            rows = [fast(line, ncols) for line in block]
            if None not in rows:  # every row regular: the common case, a block at a time
                yield from rows  # type: ignore[misc]
                continue
        for line in block:
            values = None if fast is None else fast(line, ncols)
            yield split_row(line, ncols) if values is None else values
