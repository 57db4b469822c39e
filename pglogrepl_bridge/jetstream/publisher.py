"""``run_publish``: the slot's transactions into a NATS JetStream stream, exactly once.

The IO around ``naming``'s rules: nats-py (asyncio) and ``AsyncReplicationStream``. Each
transaction is published and acknowledged by JetStream (with an R3 stream: stored by a
majority of its replicas) before the next one goes and before the slot is confirmed to it.
A failed publish is retried with backoff, after checking whether the stream stored it
after all; NATS servers that go away are reconnected to by nats-py meanwhile. Nothing is
buffered beyond the one transaction in flight.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pglogrepl_bridge.errors import ConfigError, ReplicationError
from pglogrepl_bridge.jetstream import client, naming
from pglogrepl_bridge.lsn import Lsn, format_lsn
from pglogrepl_bridge.pgoutput.transaction import Transaction
from pglogrepl_bridge.postgres.aio import AsyncReplicationStream
from pglogrepl_bridge.postgres.connection import connect_waiting, identify_system
from pglogrepl_bridge.postgres.options import StreamOptions
from pglogrepl_bridge.progress import Metrics, Progress
from pglogrepl_bridge.wire.payload import PayloadFormat, encoder
from pglogrepl_bridge.wire.protocol import WalEntry, to_bincode
from pglogrepl_bridge.wire.relations import RelationWriter, relations_of

if TYPE_CHECKING:
    from nats.js import JetStreamContext

#: rule 3's guard (``nats.js.api.Header.EXPECTED_LAST_SEQUENCE``) and JetStream's error code
#: when the stream's last sequence is not the one it names. (Not Nats-Expected-Last-Msg-Id:
#: nats-server 2.15 answers no publish to a clustered stream after refusing one of those.)
EXPECTED_LAST_SEQUENCE = "Nats-Expected-Last-Sequence"
WRONG_LAST_SEQUENCE = 10071

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PublishConfig:
    """Where and how to publish (the ``publish`` command's options)."""

    servers: tuple[str, ...]
    stream: str
    subject_prefix: str = "cdc"
    payload: PayloadFormat = "json"
    #: the stream's replicas when it is created; checked against an existing one if given
    replicas: int | None = None
    create: bool = True
    node_id: int = 1  # the WalEntry's node_id with --payload bincode
    ack_timeout: float = 5.0  # seconds to wait for JetStream's acknowledgement
    max_pending: int = 64  # messages awaiting acknowledgement at most (rule 3)
    max_backoff: float = 5.0
    duplicate_window: float = 120.0  # seconds, for a stream created here


@dataclass
class PublishStats:
    """What a run did."""

    transactions: int = 0  # received from PostgreSQL
    published: int = 0  # stored by JetStream as new messages
    duplicates: int = 0  # already stored (a re-publish JetStream or rule 4 recognised)
    skipped: int = 0  # already in the stream when the run started (rule 4)
    retries: int = 0
    resumed_after: Lsn | None = None
    last_acked_lsn: Lsn | None = None
    confirmed: Lsn = field(default_factory=Lsn)


class _Stopped(Exception):
    pass


def run_publish(
    dsn: str,
    options: StreamOptions,
    config: PublishConfig,
    *,
    on_stream: Callable[[AsyncReplicationStream], None] | None = None,
    metrics_port: int | None = None,
) -> PublishStats:
    """Publish until stopped (or ``options.until_lsn``); returns what was done."""
    run = publish(dsn, options, config, on_stream=on_stream, metrics_port=metrics_port)
    return asyncio.run(run)


async def publish(
    dsn: str,
    options: StreamOptions,
    config: PublishConfig,
    *,
    on_stream: Callable[[AsyncReplicationStream], None] | None = None,
    metrics_port: int | None = None,
) -> PublishStats:
    """``run_publish`` for a running event loop."""
    prefix = naming.check_prefix(config.subject_prefix)
    if config.replicas is not None and not 1 <= config.replicas <= 5:
        raise ConfigError("--replicas must be between 1 and 5 (JetStream's limit)")
    subject = naming.txn_subject(prefix)
    system_id = await asyncio.to_thread(_system_id, dsn, options.wait_for_server)
    stats = PublishStats()
    nc = await client.connect(config.servers)
    metrics = Metrics(metrics_port) if metrics_port is not None else None
    try:
        js = nc.jetstream(timeout=config.ack_timeout)
        await _ensure_stream(js, config, subject)
        stored = naming.resume_after(
            await _last_position(js, config.stream, subject, settle=5.0),
            system_id,
            options.slot,
            config.stream,
        )
        stats.resumed_after = stored
        if stored is not None:
            log.info("stream %s holds this slot's transactions up to %s", config.stream, stored)
        encode = _body(config)
        described = RelationWriter()
        publications = naming.publications_header(options.publications)
        stream = AsyncReplicationStream(dsn, options)
        if on_stream is not None:
            on_stream(stream)
        async with stream:
            previous = stored  # rule 3's chain
            pipe = _Pipeline(js, stream, config, subject, stats, metrics)
            await pipe.guard(system_id, options.slot, stored)
            with Progress(stream, metrics=metrics, extra=pipe.status):
                try:
                    async for txn in stream:
                        stats.transactions += 1
                        end = txn.end_lsn
                        if stored is not None and end <= stored:
                            stats.skipped += 1  # rule 4: stored before the last run stopped
                            pipe.nothing_to_publish(end)
                        elif txn.changes:
                            if previous is None:  # the first message: the chain
                                previous = stream.confirmed_lsn  # starts where the slot stood
                            headers = naming.headers(
                                txn,
                                system_id,
                                options.slot,
                                config.payload,
                                described(relations_of(txn)),
                                previous,
                                publications,
                            )
                            await pipe.send(end, encode(txn), headers)
                            previous = end
                        else:
                            pipe.nothing_to_publish(end)
                    await pipe.finish()
                except _Stopped:
                    pass
            stats.confirmed = stream.confirmed_lsn
    finally:
        await client.close(nc)
        if metrics is not None:
            metrics.close()
    return stats


def _system_id(dsn: str, wait: float) -> str:
    with connect_waiting(dsn, replication=True, wait=wait) as conn:
        return identify_system(conn).system_id


def _body(config: PublishConfig) -> Callable[[Transaction], bytes]:
    """Rule 1: the message body of a transaction."""
    data = encoder(config.payload)
    if config.payload == "json":
        return data
    node_id = config.node_id
    return lambda txn: to_bincode(WalEntry(node_id, txn.end_lsn, txn.timestamp_us, data(txn)))


async def _ensure_stream(js: JetStreamContext, config: PublishConfig, subject: str) -> None:
    """Create the stream, or check that an existing one takes our subject and de-duplicates
    (a clear error otherwise)."""
    from nats.js.api import StorageType, StreamConfig
    from nats.js.errors import NotFoundError

    name = config.stream
    for attempt in range(40):  # a cluster that just started may not have a leader yet
        try:
            info = await js.stream_info(name)
            break
        except NotFoundError:
            if not config.create:
                raise ConfigError(
                    f"NATS stream {name} does not exist: create it (subjects "
                    f"{naming.stream_subjects(config.subject_prefix)[0]}), or drop --no-create"
                ) from None
            wanted = StreamConfig(
                name=name,
                subjects=naming.stream_subjects(config.subject_prefix),
                num_replicas=config.replicas or 1,
                storage=StorageType.FILE,
                duplicate_window=config.duplicate_window,
            )
            try:
                await js.add_stream(wanted)
                log.info("created NATS stream %s (%d replicas)", name, wanted.num_replicas)
                return
            except Exception as exc:
                _retry_or_raise(exc, attempt, f"cannot create NATS stream {name}")
        except Exception as exc:
            _retry_or_raise(exc, attempt, f"cannot read NATS stream {name}")
        await asyncio.sleep(0.25)
    have = info.config
    if not naming.covers(list(have.subjects or []), subject):
        raise ConfigError(
            f"NATS stream {name} does not take subject {subject} (its subjects: "
            f"{', '.join(have.subjects or []) or 'none'}): add {subject} to it, or choose the "
            "--subject-prefix its subjects allow"
        )
    if config.replicas is not None and have.num_replicas != config.replicas:
        raise ConfigError(
            f"NATS stream {name} has {have.num_replicas} replicas, --replicas asks for "
            f"{config.replicas}: change the stream (nats stream edit) or the option"
        )
    if not have.duplicate_window:
        raise ConfigError(
            f"NATS stream {name} does not de-duplicate (duplicate_window is 0): set a window "
            "(e.g. 2m), or a re-publish after a failure could be stored twice"
        )


def _retry_or_raise(exc: Exception, attempt: int, what: str) -> None:
    from nats.errors import NoRespondersError  # nats-py's TimeoutError is a TimeoutError
    from nats.js.errors import APIError, ServiceUnavailableError

    transient = isinstance(exc, TimeoutError | NoRespondersError | ServiceUnavailableError)
    if transient and attempt < 39:
        return
    if isinstance(exc, APIError):
        raise ConfigError(f"{what}: {exc.description}") from None
    raise ReplicationError(f"{what}: {exc or type(exc).__name__}: is JetStream enabled?") from None


async def _last_position(
    js: JetStreamContext, stream: str, subject: str, *, settle: float = 0.0
) -> naming.StoredPosition | None:
    """Rule 4: the position in the last message on ``subject`` (None: no message).

    ``settle``: seconds during which "no such stream" is taken for a stream just created
    whose leader the cluster has not announced everywhere yet."""
    from nats.js.errors import NotFoundError

    waited = 0.0
    while True:
        try:
            msg = await js.get_last_msg(stream, subject)
        except NotFoundError as exc:
            if getattr(exc, "err_code", None) != 10059:
                return None  # the stream has no message on the subject
            if waited >= settle:  # the stream itself is gone
                raise ConfigError(f"NATS stream {stream} does not exist (any more)") from None
            await asyncio.sleep(0.1)
            waited += 0.1
            continue
        return naming.stored_position(msg.headers)


@dataclass
class _Entry:
    """A transaction in the pipeline, until the slot may be confirmed to its end."""

    end: Lsn
    body: bytes | None = None  # None: nothing (more) to publish
    headers: dict[str, str] = field(default_factory=dict)
    future: asyncio.Future[Any] | None = None


class _Pipeline:
    """Rule 3: messages go in commit order, up to ``max_pending`` awaiting acknowledgement,
    each guarded by ``Nats-Expected-Last-Sequence`` (the stream's sequence after the one
    before), so JetStream stores a message only right after its predecessor and a lost one
    cannot leave a hole that a later one fills. The slot is confirmed in order, to the last
    transaction whose message and all before it were acknowledged. A failure (a timeout, a
    refusal, a connection lost) lets everything in flight settle, reads what the stream
    holds (rule 4) and publishes the rest again, one at a time. A stream whose last message
    is not ours (another publisher on it) cannot be guarded: then one message at a time.
    """

    def __init__(
        self,
        js: JetStreamContext,
        stream: AsyncReplicationStream,
        config: PublishConfig,
        subject: str,
        stats: PublishStats,
        metrics: Metrics | None,
    ) -> None:
        self.js, self.stream, self.config = js, stream, config
        self.subject, self.stats, self.metrics = subject, stats, metrics
        self.guarded = False
        self.last_seq = 0  # the stream's sequence after the last message sent: the guard
        self.queue: deque[_Entry] = deque()
        self.flying = 0
        self.moved = asyncio.Event()  # something settled: room, or the end of a recovery
        self.recovery: asyncio.Task[None] | None = None
        self.failure: BaseException | None = None

    def status(self) -> str:
        """For the progress line and log: what JetStream holds and what awaits it."""
        acked = self.stats.last_acked_lsn
        return (
            f"published: {self.stats.published} pending: {self.flying} "
            f"acked: {format_lsn(acked) if acked is not None else '-'}"
        )

    @property
    def window(self) -> int:
        return self.config.max_pending if self.guarded else 1

    async def guard(self, system_id: str, slot: str, stored: Lsn | None) -> None:
        """Guard when the stream's last message (any subject) is our last, or it has none."""
        try:
            info = await self.js.stream_info(self.config.stream)
            last_seq = info.state.last_seq
            if last_seq == 0 and not info.state.messages:
                self.guarded, self.last_seq = True, 0
                return
            last = await self.js.get_msg(self.config.stream, last_seq)
        except Exception as exc:  # deleted meanwhile, a leader change: do without
            log.info("publishing one message at a time (cannot read the stream: %s)", exc)
            return
        found = (last.headers or {}).get(naming.MSG_ID)
        if stored is not None and found == naming.msg_id(system_id, slot, int(stored)):
            self.guarded, self.last_seq = True, last_seq
        else:
            log.info(
                "stream %s's last message is another publisher's: one message at a time",
                self.config.stream,
            )

    def nothing_to_publish(self, end: Lsn) -> None:
        """A transaction with no message: confirmed once all before it are."""
        self.queue.append(_Entry(end))
        self._drain()

    async def send(self, end: Lsn, body: bytes, headers: dict[str, str]) -> None:
        """Publish, waiting only while ``max_pending`` messages await acknowledgement."""
        await self._ready()
        entry = _Entry(end, body, headers)
        self.queue.append(entry)
        if not self.guarded:
            await self._one(entry)
            self._drain()
            return
        headers[EXPECTED_LAST_SEQUENCE] = str(self.last_seq)
        self.last_seq += 1  # the stream is ours alone (``guard``): its next sequence
        try:
            future = await self.js.publish_async(
                self.subject, body, headers=headers, stream=self.config.stream
            )
        except Exception as exc:  # not even sent: the recovery publishes it
            log.debug("publishing: %s", exc)
            future = asyncio.get_running_loop().create_future()
            future.set_exception(exc)
        entry.future = future
        self.flying += 1
        self._gauge()
        if not future.done():
            asyncio.get_running_loop().call_later(self.config.ack_timeout, _expire, future)
        future.add_done_callback(self._settled)

    async def finish(self) -> None:
        """Wait until everything sent is acknowledged; when the run is stopped, only for
        what is in flight (each settles within ack_timeout)."""
        while self.queue:
            if self.failure is not None:
                raise self.failure
            if self.recovery is None and self.flying == 0:
                self._drain()
                if not self.queue or self.stream.stopping:
                    return
                self._recover_later()
            self.moved.clear()
            await self.moved.wait()

    async def _ready(self) -> None:
        while True:
            if self.failure is not None:
                raise self.failure
            if self.recovery is None and self.flying < self.window:
                return
            self.moved.clear()
            await self.moved.wait()

    def _settled(self, future: asyncio.Future[Any]) -> None:
        self.flying -= 1
        self._gauge()
        self._drain()
        self.moved.set()

    def _drain(self) -> None:
        """Confirm, in order, what JetStream holds; a failure at the head starts a recovery."""
        while self.queue and self.recovery is None:
            head = self.queue[0]
            if head.body is not None:
                future = head.future
                if future is None or not future.done():
                    return
                problem = future.exception() if not future.cancelled() else TimeoutError()
                if problem is not None:
                    self._recover_later(problem, head)
                    return
                self._stored(head, bool(future.result().duplicate))
            self.queue.popleft()
            self.stream.ack(head.end)

    def _stored(self, entry: _Entry, duplicate: bool) -> None:
        if duplicate:
            self.stats.duplicates += 1
        else:
            self.stats.published += 1
        entry.body = None
        self.stats.last_acked_lsn = entry.end
        if self.metrics is not None:
            self.metrics.nats_published.inc()
            self.metrics.nats_acked_lsn.set(entry.end)

    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.nats_pending.set(self.flying)

    def _recover_later(
        self, problem: BaseException | None = None, head: _Entry | None = None
    ) -> None:
        if self.recovery is not None:
            return
        if head is not None:
            self.stats.retries += 1
            log.warning(
                "publishing the transaction ending at %s failed (%s); checking what the "
                "stream holds, then publishing again",
                format_lsn(head.end),
                problem or type(problem).__name__,
            )
        self.recovery = asyncio.ensure_future(self._recover())
        self.recovery.add_done_callback(self._recovered)

    def _recovered(self, task: asyncio.Task[None]) -> None:
        self.recovery = None
        if not task.cancelled() and task.exception() is not None:
            self.failure = task.exception()
            self.stream.stop()  # the loop may be waiting for WAL: end it, to raise this
        self._drain()
        self.moved.set()

    async def _recover(self) -> None:
        while self.flying:  # each settles within ack_timeout
            self.moved.clear()
            await self.moved.wait()
        position, self.last_seq = await self._position()
        for entry in list(self.queue):
            if entry.body is None:
                continue
            if position is not None and entry.end <= position:
                self._stored(entry, duplicate=True)  # stored; its acknowledgement was lost
                continue
            await self._one(entry)

    async def _position(self) -> tuple[Lsn | None, int]:
        """Rule 4, retried while the cluster is away: the LSN our subject's last message
        holds and the stream's sequence of it (0: none)."""
        from nats.js.errors import NotFoundError

        backoff = 0.1
        while True:
            try:
                msg = await self.js.get_last_msg(self.config.stream, self.subject)
                found = naming.stored_position(msg.headers)
                return (None if found is None else found.lsn), int(msg.seq or 0)
            except NotFoundError as exc:
                if getattr(exc, "err_code", None) == 10059:
                    raise ConfigError(
                        f"NATS stream {self.config.stream} does not exist (any more)"
                    ) from None
                return None, 0
            except Exception as exc:
                log.debug("cannot read the stream's last message yet: %s", exc)
            await _pause(self.stream, backoff)
            backoff = min(backoff * 2, self.config.max_backoff)

    async def _one(self, entry: _Entry) -> None:
        """Publish ``entry`` alone until JetStream acknowledges it."""
        from nats.errors import Error as NatsError
        from nats.js.errors import APIError, ServiceUnavailableError

        assert entry.body is not None
        config, headers = self.config, entry.headers
        backoff = 0.1
        while True:
            if self.guarded:
                headers[EXPECTED_LAST_SEQUENCE] = str(self.last_seq)
            try:
                ack = await self.js.publish(
                    self.subject,
                    entry.body,
                    timeout=config.ack_timeout,
                    stream=config.stream,
                    headers=headers,
                )
            except (TimeoutError, NatsError, OSError) as exc:
                if isinstance(exc, APIError) and exc.err_code == WRONG_LAST_SEQUENCE:
                    # stored meanwhile (an acknowledgement lost, then a duplicate refused
                    # by the guard before the de-duplication), or another publisher's
                    # message is last: which, rule 4 says
                    position, last_seq = await self._position()
                    if position is not None and entry.end <= position:
                        self._stored(entry, duplicate=True)
                        return
                    if last_seq == self.last_seq:
                        log.info(
                            "stream %s's last message is another publisher's: one message "
                            "at a time from now on",
                            config.stream,
                        )
                        self.guarded = False  # another publisher shares the stream
                        headers.pop(EXPECTED_LAST_SEQUENCE, None)
                    self.last_seq = last_seq
                    continue
                if isinstance(exc, APIError) and not isinstance(exc, ServiceUnavailableError):
                    raise ReplicationError(
                        f"NATS stream {config.stream} refused the transaction ending at "
                        f"{format_lsn(entry.end)} ({len(entry.body)} bytes): {exc.description}"
                    ) from None
                self.stats.retries += 1
                log.warning(
                    "publishing the transaction ending at %s failed (%s); retrying in %.1fs",
                    format_lsn(entry.end),
                    exc or type(exc).__name__,
                    backoff,
                )
                await _pause(self.stream, backoff)
                backoff = min(backoff * 2, config.max_backoff)
                if await _stored_already(self.js, config.stream, self.subject, entry.end):
                    self._stored(entry, duplicate=True)
                    return
                continue
            self._stored(entry, bool(ack.duplicate))
            if not ack.duplicate:
                self.last_seq = int(ack.seq)
            return


def _expire(future: asyncio.Future[Any]) -> None:
    """No acknowledgement within ack_timeout: the publish counts as failed."""
    if not future.done():
        future.set_exception(TimeoutError("no acknowledgement from JetStream"))


async def _pause(stream: AsyncReplicationStream, seconds: float) -> None:
    """Sleep, in small steps, unless the run is stopped meanwhile."""
    left = seconds
    while left > 0:
        if stream.stopping:
            raise _Stopped
        await asyncio.sleep(min(left, 0.1))
        left -= 0.1
    if stream.stopping:
        raise _Stopped


async def _stored_already(js: JetStreamContext, stream: str, subject: str, end: Lsn) -> bool:
    """Rule 4 after a failure: whether the stream stored ``end`` after all (an
    acknowledgement lost, perhaps beyond the duplicate window)."""
    try:
        position = await _last_position(js, stream, subject)
    except ConfigError:
        raise
    except Exception as exc:  # the cluster is still away: publish again, later
        log.debug("cannot read the stream's last message yet: %s", exc)
        return False
    return position is not None and position.lsn >= end
