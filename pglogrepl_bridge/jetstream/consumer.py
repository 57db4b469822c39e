"""``run_consume``: a JetStream stream written by ``publish`` applied to a SQL store, exactly
once (``replicate --from-nats``).

A durable pull consumer on ``<prefix>.txn`` feeds ``SqlSink``, the sink ``replicate`` uses:
each fetched batch is applied in one target transaction together with its checkpoint, and
only then acknowledged to JetStream. The target's checkpoint, not the consumer's state, says
what is applied: a message at or below it (a redelivery after a crash between commit and
acknowledgement) is acknowledged and skipped.

Order is checked, not assumed. Messages a dead run had fetched but not acknowledged are
redelivered only after the consumer's ack wait, so a new run is first handed the ones after
them; and a fetch can be lost with a connection. Each message names its predecessor
(``Pglb-Prev-Lsn``, ``naming`` rule 3): one whose predecessor is past the checkpoint is not
applied; the missing ones are read from the stream by sequence first (``_fill_gap``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from pglogrepl_bridge.errors import ConfigError, ProtocolError, TargetUnavailableError
from pglogrepl_bridge.jetstream import client, naming
from pglogrepl_bridge.jetstream.entries import EntryReader
from pglogrepl_bridge.lsn import Lsn, format_lsn
from pglogrepl_bridge.pgoutput.transaction import Change, RowChange, Transaction, TruncateChange
from pglogrepl_bridge.progress import Metrics
from pglogrepl_bridge.snapshot.runner import DEFAULT_WORKERS
from pglogrepl_bridge.wire.jsonread import JsonPayloadReader

if TYPE_CHECKING:
    from nats.js import JetStreamContext

    from pglogrepl_bridge.sinks.sql import Conflict, SqlSink
    from pglogrepl_bridge.snapshot.runner import ChunkCopied, SnapshotJob, SnapshotStats

log = logging.getLogger(__name__)

#: the checkpoint row of a consumer is (source system, ``<slot>/<durable>``): consumers of one
#: slot's stream into one target (different tables, say) keep their own positions
CHECKPOINT_SLOT = "{slot}/{durable}"


@dataclass(frozen=True)
class ConsumeConfig:
    """Where to read and what to apply (``replicate --from-nats``'s options)."""

    servers: tuple[str, ...]
    stream: str
    durable: str
    subject_prefix: str = "cdc"
    #: apply only these tables' changes (``schema.name``); None: all
    tables: frozenset[str] | None = None
    #: never: the target starts at the oldest message the stream holds; initial: when the
    #: target holds nothing from this consumer, copy the published tables from ``dsn``
    #: first (online, consistent with the stream); only: copy, record, stop
    snapshot: Literal["initial", "never", "only"] = "never"
    dsn: str = ""  # the source, for a snapshot
    snapshot_workers: int = DEFAULT_WORKERS
    fetch: int = 256  # messages per pull, applied in one target transaction
    ack_wait: float = 60.0  # seconds before JetStream redelivers an unacknowledged message
    max_backoff: float = 5.0
    until: Lsn | None = None  # stop once the target holds this LSN
    #: each pull's transactions as one net change per row (``sinks.reduce``)
    reduce: bool = True


@dataclass
class ConsumeStats:
    """What a run did."""

    transactions: int = 0  # applied (possibly with no change left after --table)
    changes: int = 0
    batches: int = 0
    skipped: int = 0  # at or below the checkpoint: applied before
    refetched: int = 0  # read by sequence to close a gap in delivery
    resumed_from: Lsn | None = None
    last_lsn: Lsn | None = None
    system_id: str = ""
    slot: str = ""
    publications: tuple[str, ...] = ()
    snapshot: SnapshotStats | None = None


class Consumer:
    """A run's stop switch (signals call ``stop``)."""

    def __init__(self) -> None:
        self.stopping = False

    def stop(self) -> None:
        """Stop after the batch being applied (any thread)."""
        self.stopping = True


def run_consume(
    target: str,
    config: ConsumeConfig,
    *,
    conflict: Conflict = "source",
    node_id: int | None = None,
    on_consumer: Callable[[Consumer | SnapshotJob], None] | None = None,
    metrics_port: int | None = None,
    on_snapshot_progress: Callable[[ChunkCopied], None] | None = None,
) -> ConsumeStats:
    """Apply the stream until stopped (or ``config.until``); returns what was done.

    ``on_consumer`` receives the run's stop switch, and a snapshot job before it runs."""
    run = consume(
        target,
        config,
        conflict=conflict,
        node_id=node_id,
        on_consumer=on_consumer,
        metrics_port=metrics_port,
        on_snapshot_progress=on_snapshot_progress,
    )
    return asyncio.run(run)


async def consume(
    target: str,
    config: ConsumeConfig,
    *,
    conflict: Conflict = "source",
    node_id: int | None = None,
    on_consumer: Callable[[Consumer | SnapshotJob], None] | None = None,
    metrics_port: int | None = None,
    on_snapshot_progress: Callable[[ChunkCopied], None] | None = None,
) -> ConsumeStats:
    """``run_consume`` for a running event loop."""
    prefix = naming.check_prefix(config.subject_prefix)
    subject = naming.txn_subject(prefix)
    runner = Consumer()
    if on_consumer is not None:
        on_consumer(runner)
    stats = ConsumeStats()
    nc = await client.connect(config.servers)
    metrics = Metrics(metrics_port) if metrics_port is not None else None
    try:
        js = nc.jetstream(timeout=10)
        await _check_stream(js, config.stream, subject)
        first = await _source_of(js, config.stream, subject, runner)
        if first is None:
            return stats  # stopped before anything was published
        stats.system_id, stats.slot, stats.publications = first
        sink = await asyncio.to_thread(
            _open_sink, target, config, first, conflict=conflict, node_id=node_id
        )
        try:
            run = _Run(js, config, subject, sink, runner, stats, metrics)
            run.on_consumer = on_consumer
            run.on_snapshot_progress = on_snapshot_progress
            await run.go()
        finally:
            sink.engine.dispose()
    finally:
        await client.close(nc)
        if metrics is not None:
            metrics.close()
    return stats


def _open_sink(
    target: str,
    config: ConsumeConfig,
    source: tuple[str, str, tuple[str, ...]],
    *,
    conflict: Conflict,
    node_id: int | None,
) -> SqlSink:
    import zlib

    from pglogrepl_bridge.sinks.sql import SqlSink

    system_id, slot, _ = source
    key = CHECKPOINT_SLOT.format(slot=slot, durable=config.durable)
    if len(key) > 64:
        raise ConfigError(
            f"--durable {config.durable!r} is too long for slot {slot!r}: the checkpoint key "
            f"{key!r} must fit in 64 characters"
        )
    return SqlSink(
        target,
        source_id=system_id,
        slot=key,
        conflict=conflict,
        node_id=zlib.crc32(system_id.encode()) & 0x7FFFFFFF if node_id is None else node_id,
        reduce=config.reduce,
    )


async def _check_stream(js: JetStreamContext, stream: str, subject: str) -> None:
    from nats.js.errors import NotFoundError

    for attempt in range(40):  # a cluster that just started may not have a leader yet
        try:
            info = await js.stream_info(stream)
            break
        except NotFoundError:
            raise ConfigError(
                f"NATS stream {stream} does not exist: start 'pglogrepl-bridge publish "
                f"--stream {stream}' first, or fix --stream"
            ) from None
        except Exception as exc:
            if attempt == 39:
                raise ConfigError(f"cannot read NATS stream {stream}: {exc}") from None
            await asyncio.sleep(0.25)
    subjects = list(info.config.subjects or [])
    if not naming.covers(subjects, subject):
        raise ConfigError(
            f"NATS stream {stream} does not take subject {subject} (its subjects: "
            f"{', '.join(subjects) or 'none'}): use the --subject-prefix publish was given"
        )


async def _source_of(
    js: JetStreamContext, stream: str, subject: str, runner: Consumer
) -> tuple[str, str, tuple[str, ...]] | None:
    """(system id, slot, publications) of the stream's transactions: the last message says
    (the subject holds one source's; ``naming`` rule 4). Waits for a first message (None:
    stopped)."""
    from nats.js.errors import NotFoundError

    waited = False
    while not runner.stopping:
        try:
            msg = await js.get_last_msg(stream, subject)
        except NotFoundError:
            if not waited:
                log.info("stream %s holds no transaction yet: waiting for publish", stream)
                waited = True
            await asyncio.sleep(0.5)
            continue
        position = naming.stored_position(msg.headers)
        if position is None:
            raise ConfigError(
                f"the last message on {subject} in stream {stream} was not written by "
                "pglogrepl-bridge publish (no Pglb-System-Id/Pglb-Slot/Pglb-Lsn headers)"
            )
        publications = naming.publications_of(msg.headers or {})
        return position.system_id, position.slot, publications or ()
    return None


class _Run:
    """One run's loop: fetch, check order, apply with the checkpoint, acknowledge."""

    def __init__(
        self,
        js: JetStreamContext,
        config: ConsumeConfig,
        subject: str,
        sink: SqlSink,
        runner: Consumer,
        stats: ConsumeStats,
        metrics: Metrics | None,
    ) -> None:
        self.js = js
        self.config = config
        self.subject = subject
        self.sink = sink
        self.runner = runner
        self.stats = stats
        self.metrics = metrics
        self.reader = EntryReader()
        self.json = JsonPayloadReader()  # --payload json: the line and its relations member
        self.applied = Lsn(0)
        self.on_consumer: Callable[[Consumer | SnapshotJob], None] | None = None
        self.on_snapshot_progress: Callable[[ChunkCopied], None] | None = None

    async def go(self) -> None:
        checkpoint = await asyncio.to_thread(self.sink.checkpoint)
        self.stats.resumed_from = checkpoint
        if checkpoint is not None:
            log.info("the target holds the stream up to %s", checkpoint)
            await asyncio.to_thread(self.sink.load_skips, int(checkpoint))
        elif self.config.snapshot != "never":
            copied = self.stats.snapshot = await asyncio.to_thread(self._snapshot)
            if not copied.complete:
                return  # stopped: the next run resumes the copy
            checkpoint = copied.checkpoint
        if self.config.snapshot == "only" or self.runner.stopping:
            return
        if checkpoint is None:
            checkpoint = await self._chain_start()
            if checkpoint is None:
                return  # stopped while waiting
            log.info("a new target: applying the stream from after %s", checkpoint)
        self.applied = checkpoint
        if self._done():
            return
        sub = await self._subscribe()
        try:
            while not self.runner.stopping:
                try:
                    msgs = await sub.fetch(self.config.fetch, timeout=1)
                except TimeoutError:  # nats-py's own, or asyncio's where its deadline ran out
                    continue
                except Exception as exc:  # a connection lost meanwhile: nats-py reconnects
                    log.warning("fetching from NATS failed (%s); retrying", exc)
                    await asyncio.sleep(0.5)
                    continue
                await self._batch(msgs)
                if self._done():
                    return
        finally:
            try:
                await sub.unsubscribe()
            except Exception as exc:
                log.debug("unsubscribing: %s", exc)

    def _snapshot(self) -> SnapshotStats:
        """The published tables (or ``--table``'s) copied from the source as of one
        consistent point, the checkpoint set to it; the stream's chain then says whether it
        holds everything after (``_fill_gap``). The slot is publish's: left alone."""
        from pglogrepl_bridge.postgres.options import StreamOptions
        from pglogrepl_bridge.sinks.replicate import source_identity
        from pglogrepl_bridge.snapshot.runner import SnapshotJob

        stats, config = self.stats, self.config
        if not stats.publications:
            raise ConfigError(
                f"the messages of stream {config.stream} do not say which publications they "
                "come from (Pglb-Publications): republish with this version, or use "
                "--snapshot never"
            )
        system_id = source_identity(config.dsn)
        if system_id != stats.system_id:
            raise ConfigError(
                f"--dsn points at database system {system_id}, but the stream's transactions "
                f"come from system {stats.system_id}: point --dsn at the source of the stream"
            )
        job = SnapshotJob(
            config.dsn,
            self.sink,
            StreamOptions(slot=stats.slot, publications=stats.publications),
            workers=config.snapshot_workers,
            on_progress=self.on_snapshot_progress,
            advance_slot=False,
            tables=config.tables,
            slot_feeds_target=False,
        )
        if self.on_consumer is not None:
            self.on_consumer(job)
        return job.run()

    async def _chain_start(self) -> Lsn | None:
        """Where a new target without a snapshot starts: after the ``Pglb-Prev-Lsn`` of the
        oldest message the stream holds on our subject (None: stopped)."""
        from nats.js.errors import NotFoundError

        while not self.runner.stopping:
            info = await self.js.stream_info(self.config.stream)
            for seq in range(info.state.first_seq, info.state.last_seq + 1):
                try:
                    msg = await self.js.get_msg(self.config.stream, seq)
                except NotFoundError:
                    continue
                if msg.subject == self.subject:
                    return self._position(msg.headers or {})[1]
            await asyncio.sleep(0.5)
        return None

    def _done(self) -> bool:
        until = self.config.until
        return until is not None and self.applied >= until

    async def _subscribe(self) -> Any:
        """The durable pull consumer: created on the first run, bound to afterwards."""
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
        from nats.js.errors import NotFoundError

        stream, durable = self.config.stream, self.config.durable
        try:
            info = await self.js.consumer_info(stream, durable)
        except NotFoundError:
            await self.js.add_consumer(
                stream,
                ConsumerConfig(
                    durable_name=durable,
                    filter_subject=self.subject,
                    ack_policy=AckPolicy.EXPLICIT,
                    deliver_policy=DeliverPolicy.ALL,
                    ack_wait=self.config.ack_wait,
                    max_ack_pending=max(4 * self.config.fetch, 1024),
                ),
            )
            log.info("created durable consumer %s on %s", durable, stream)
        else:
            have = info.config.filter_subject
            if have not in (None, "", self.subject):
                raise ConfigError(
                    f"durable consumer {durable} of stream {stream} reads {have}, not "
                    f"{self.subject}: choose another --durable (or the matching "
                    "--subject-prefix)"
                )
        return await self.js.pull_subscribe_bind(durable, stream)

    async def _batch(self, msgs: list[Any]) -> None:
        """Apply what is new in ``msgs``, in order, then acknowledge them (those past
        ``--until-lsn`` are handed back, for the next run)."""
        txns: list[Transaction] = []
        last = self.applied
        until = self.config.until
        taken = len(msgs)
        for i, msg in enumerate(msgs):
            if until is not None and last >= until:
                taken = i  # --until-lsn: the rest is for a later run
                break
            headers = msg.headers or {}
            lsn, previous = self._position(headers)
            if lsn <= last:
                self.stats.skipped += 1
                continue
            if previous > last:  # its predecessor was not applied: read it first
                filled = await self._fill_gap(last, previous, msg.metadata.sequence.stream)
                txns.extend(filled)
                if filled:
                    last = filled[-1].end_lsn
            txns.append(self._transaction(msg.data, headers))
            last = lsn
        if txns:
            await self._apply(txns)
        for i, msg in enumerate(msgs):
            try:
                await (msg.ack() if i < taken else msg.nak())
            except Exception as exc:  # redelivered later (and skipped, if it was applied)
                log.debug("acknowledging a message failed: %s", exc)

    def _position(self, headers: Mapping[str, str]) -> tuple[Lsn, Lsn]:
        stored = naming.stored_position(headers)
        if stored is None or naming.PREV_LSN not in headers:
            raise ProtocolError(
                "a message without Pglb-Lsn/Pglb-Prev-Lsn headers: the stream was not written "
                "by this version of pglogrepl-bridge publish"
            )
        if (stored.system_id, stored.slot) != (self.stats.system_id, self.stats.slot):
            raise ConfigError(
                f"stream {self.config.stream} holds transactions of two sources on "
                f"{self.subject} (system {stored.system_id}, slot {stored.slot}, after "
                f"{self.stats.system_id}, {self.stats.slot}): give each slot its own prefix"
            )
        return stored.lsn, Lsn.parse(headers[naming.PREV_LSN])

    def _transaction(self, body: bytes, headers: Mapping[str, str]) -> Transaction:
        payload = headers.get(naming.PAYLOAD)
        if payload == "bincode":
            txn = self.reader.transaction(body, headers.get(naming.RELATIONS))
        elif payload == "json":
            txn = self.json.transaction(body)
        else:
            raise ConfigError(
                f"stream {self.config.stream} carries --payload {payload} messages, which "
                "this version does not read: publish the slot with --payload bincode"
            )
        tables = self.config.tables
        if tables is None:
            return txn
        kept: list[Change] = []
        for change in txn.changes:
            if isinstance(change, RowChange):
                if change.relation.qualified_name in tables:
                    kept.append(change)
            elif isinstance(change, TruncateChange):
                rels = tuple(r for r in change.relations if r.qualified_name in tables)
                if rels:
                    kept.append(TruncateChange(rels, change.cascade, change.restart_identity))
        return Transaction(
            txn.xid, txn.commit_lsn, txn.end_lsn, txn.commit_timestamp, txn.origin, tuple(kept)
        )

    async def _fill_gap(self, last: Lsn, previous: Lsn, seq: int) -> list[Transaction]:
        """The transactions after ``last`` up to ``previous``, read backwards by stream
        sequence from before ``seq``: messages delivered to a run that died, or in a fetch
        that was lost, come again only after the ack wait; they must be applied first."""
        from nats.js.errors import NotFoundError

        info = await self.js.stream_info(self.config.stream)
        oldest = info.state.first_seq
        found: list[Transaction] = []
        want = previous
        at = seq - 1
        while want > last:
            if at < oldest:
                raise ConfigError(
                    f"stream {self.config.stream} does not hold the transactions between "
                    f"{format_lsn(last)} and {format_lsn(want)}, which this target needs: its "
                    "limits removed them, or publishing began after that point. Copy the "
                    "target again (a new target with --snapshot initial)"
                )
            try:
                msg = await self.js.get_msg(self.config.stream, at)
            except NotFoundError:
                at -= 1
                continue
            at -= 1
            headers = msg.headers or {}
            if msg.subject != self.subject:
                continue
            lsn, before = self._position(headers)
            if lsn == want:
                found.append(self._transaction(msg.data or b"", headers))
                want = before
        self.stats.refetched += len(found)
        found.reverse()
        log.info(
            "read %d transactions after %s from the stream by sequence (not yet redelivered)",
            len(found),
            format_lsn(last),
        )
        return found

    async def _apply(self, txns: list[Transaction]) -> None:
        """``sink.apply`` in a thread, retried with backoff while the target is away."""
        backoff = 0.1
        while True:
            try:
                await asyncio.to_thread(self.sink.apply, txns)
                break
            except TargetUnavailableError as exc:
                if self.runner.stopping:
                    raise
                log.warning("%s; retrying in %.1fs", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.config.max_backoff)
        self.applied = txns[-1].end_lsn
        self.stats.transactions += len(txns)
        self.stats.changes += sum(len(t.changes) for t in txns)
        self.stats.batches += 1
        self.stats.last_lsn = self.applied
        if self.metrics is not None:
            self.metrics.nats_applied_lsn.set(int(self.applied))
            self.metrics.nats_applied.inc(len(txns))
