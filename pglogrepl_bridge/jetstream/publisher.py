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
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pglogrepl_bridge.errors import ConfigError, ReplicationError
from pglogrepl_bridge.jetstream import client, naming
from pglogrepl_bridge.jetstream.entries import RelationsHeader, relations_of
from pglogrepl_bridge.lsn import Lsn, format_lsn
from pglogrepl_bridge.pgoutput.transaction import Transaction
from pglogrepl_bridge.postgres.aio import AsyncReplicationStream
from pglogrepl_bridge.postgres.connection import connect_waiting, identify_system
from pglogrepl_bridge.postgres.options import StreamOptions
from pglogrepl_bridge.progress import Metrics, Progress
from pglogrepl_bridge.wire.payload import PayloadFormat, encoder
from pglogrepl_bridge.wire.protocol import WalEntry, to_bincode

if TYPE_CHECKING:
    from nats.js import JetStreamContext

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
        described = RelationsHeader()
        publications = naming.publications_header(options.publications)
        stream = AsyncReplicationStream(dsn, options)
        if on_stream is not None:
            on_stream(stream)
        async with stream:
            previous = stored  # rule 3's chain
            with Progress(stream, metrics=metrics):
                try:
                    async for txn in stream:
                        stats.transactions += 1
                        end = txn.end_lsn
                        if stored is not None and end <= stored:
                            stats.skipped += 1  # rule 4: stored before the last run stopped
                        elif txn.changes:
                            if metrics is not None:
                                metrics.nats_pending.set(1)
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
                            await _publish_one(
                                js, stream, config, subject, encode(txn), headers, end, stats
                            )
                            stats.last_acked_lsn = previous = end
                            if metrics is not None:
                                metrics.nats_pending.set(0)
                                metrics.nats_published.inc()
                                metrics.nats_acked_lsn.set(end)
                        stream.ack(end)  # JetStream holds it (or there was nothing to hold)
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
    from nats.errors import NoRespondersError, TimeoutError
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


async def _publish_one(
    js: JetStreamContext,
    stream: AsyncReplicationStream,
    config: PublishConfig,
    subject: str,
    body: bytes,
    headers: dict[str, str],
    end: Lsn,
    stats: PublishStats,
) -> None:
    """Publish one transaction until JetStream acknowledges it (rule 3)."""
    from nats.errors import Error as NatsError
    from nats.js.errors import APIError, ServiceUnavailableError

    backoff = 0.1
    while True:
        try:
            ack = await js.publish(
                subject, body, timeout=config.ack_timeout, stream=config.stream, headers=headers
            )
        except (TimeoutError, NatsError, OSError) as exc:
            permanent = isinstance(exc, APIError) and not isinstance(exc, ServiceUnavailableError)
            if permanent:
                assert isinstance(exc, APIError)
                raise ReplicationError(
                    f"NATS stream {config.stream} refused the transaction ending at "
                    f"{format_lsn(end)} ({len(body)} bytes): {exc.description}"
                ) from None
            stats.retries += 1
            log.warning(
                "publishing the transaction ending at %s failed (%s); retrying in %.1fs",
                format_lsn(end),
                exc or type(exc).__name__,
                backoff,
            )
            await _pause(stream, backoff)
            backoff = min(backoff * 2, config.max_backoff)
            if await _stored_already(js, config.stream, subject, end):
                stats.duplicates += 1
                return
            continue
        if ack.duplicate:
            stats.duplicates += 1
        else:
            stats.published += 1
        return


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
