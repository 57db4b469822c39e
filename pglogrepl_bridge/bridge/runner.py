"""``run_bridge``: committed transactions as WalEntry frames to replicas over TCP (optionally
TLS); their Acknowledges, once a quorum has them, become the slot's confirmed position.

Two threads: the caller's runs the replication stream and publishes entries; a network thread
(``bridge.network``) runs a selector over the replica connections. No signal handling here:
the CLI (or the embedding program) stops the stream through ``on_stream``.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from pglogrepl_bridge.bridge.group import Group
from pglogrepl_bridge.bridge.network import Address, Network
from pglogrepl_bridge.errors import ConfigError, SlotInUseError
from pglogrepl_bridge.lsn import Lsn, format_lsn
from pglogrepl_bridge.pgoutput.transaction import Transaction
from pglogrepl_bridge.postgres.admin import take_slot
from pglogrepl_bridge.postgres.stream import ReplicationStream, StreamOptions
from pglogrepl_bridge.progress import Metrics, Progress
from pglogrepl_bridge.wire.election import Became
from pglogrepl_bridge.wire.hub import Hub, StepDown
from pglogrepl_bridge.wire.payload import PayloadFormat, encoder
from pglogrepl_bridge.wire.protocol import DEFAULT_MAX_FRAME, WalEntry, frame

log = logging.getLogger(__name__)

# When the publishing thread wakes the network thread: after WAKE_AFTER entries, once the
# oldest unannounced entry is WAKE_WITHIN seconds old (checked as transactions arrive), and
# whenever the stream has caught up (on_idle). Why not per entry: each wake hands the GIL
# to the network thread and back, and under load that cost about a tenth of the bridge's
# time (py-spy, RESULTS.md); in a burst the stream pauses at most 10 ms, so no entry waits
# longer than that for its wake.
WAKE_AFTER = 16
WAKE_WITHIN = 0.002


@dataclass
class BridgeConfig:
    """How the bridge reaches and paces its replicas; ``ack_quorum`` (default a majority of
    ``replicas``) is how many must acknowledge before PostgreSQL is told.
    """

    node_id: int = 1
    replicas: list[Address] = field(default_factory=list)
    listen: Address | None = None
    ack_quorum: int | None = None  # None: a majority of --replica, or 1 with --listen only
    payload: PayloadFormat = "json"
    heartbeat_interval: float = 0.05
    window: int = 1000
    #: the replay buffer (for RequestFrom) keeps the newest entries within both bounds
    buffer_entries: int = 10_000
    buffer_bytes: int = 64 * 1024 * 1024
    max_frame: int = DEFAULT_MAX_FRAME
    term: int = 1
    tls_client: ssl.SSLContext | None = None
    tls_server: ssl.SSLContext | None = None
    #: the other members of this bridge's group (their --listen addresses); empty: alone
    peers: list[Address] = field(default_factory=list)

    def quorum(self) -> int:
        """Acknowledgements needed before a position is confirmed."""
        if self.ack_quorum is not None:
            return self.ack_quorum
        return len(self.replicas) // 2 + 1 if self.replicas else 1


@dataclass
class BridgeStats:
    """What ``run_bridge`` did, and whether it stepped down for another master."""

    transactions: int = 0
    entries: int = 0
    empty: int = 0
    confirmed: int = 0
    stepped_down: StepDown | None = None
    terms: list[int] = field(default_factory=list)  # a group member's terms as master


def run_bridge(
    dsn: str,
    options: StreamOptions,
    config: BridgeConfig,
    *,
    ready: Callable[[Network], None] | None = None,
    on_stream: Callable[[ReplicationStream], None] | None = None,
    metrics_port: int | None = None,
) -> BridgeStats:
    """Stream, publish, confirm what a quorum acknowledged; returns when stopped.

    ``on_stream`` receives the replication stream before it starts (the CLI attaches its
    signal handlers there: ``stream.stop()`` ends the run cleanly); ``ready`` receives the
    network once it listens. With ``config.peers`` this is one member of a group
    (``run_group``): it streams only while it is the elected master.
    """
    if not config.replicas and config.listen is None:
        raise ConfigError("no replicas: add --replica HOST:PORT (repeatable) or --listen")
    if config.quorum() < 1:
        raise ConfigError("--ack-quorum must be at least 1")
    if config.peers:
        return run_group(
            dsn, options, config, ready=ready, on_stream=on_stream, metrics_port=metrics_port
        )
    stats = BridgeStats()
    _serve(dsn, options, config, stats, ready=ready, on_stream=on_stream,
           metrics_port=metrics_port)  # fmt: skip
    return stats


def _serve(
    dsn: str,
    options: StreamOptions,
    config: BridgeConfig,
    stats: BridgeStats,
    *,
    ready: Callable[[Network], None] | None,
    on_stream: Callable[[ReplicationStream], None] | None,
    metrics_port: int | None = None,
    metrics: Metrics | None = None,
    group: Group | None = None,
) -> None:
    """One master's run: the stream, the replica network, until the stream stops (metrics
    served on ``metrics_port``, or into the group's ``metrics``)."""
    hub = Hub(
        node_id=config.node_id,
        quorum=config.quorum(),
        window=config.window,
        max_entries=config.buffer_entries,
        max_bytes=config.buffer_bytes,
        term=config.term,
        announce=group is not None,
    )
    encode = encoder(config.payload)
    seen_idle = [0]

    def on_idle() -> None:
        # caught up with PostgreSQL: what _publish buffered without a wake goes out now
        network.wake()
        # PostgreSQL's keepalive moved on and there is nothing to send: tell the replicas
        idle = stream.feedback.idle_end
        if idle > seen_idle[0]:
            seen_idle[0] = idle
            network.heartbeat_now()

    stream = ReplicationStream(dsn, options, on_idle=on_idle)
    if on_stream is not None:
        on_stream(stream)
    if group is not None:
        group.on_step_down = stream.stop  # E8: not one entry more under a lost term
        if not group.still_master(config.term):
            return
    with stream:  # closed whatever happens below: a --listen address in use leaks nothing
        stream.start()
        # everything after the confirmed position comes again from PostgreSQL; nothing older
        hub.floor = hub.last_lsn = stream.confirmed_lsn
        if group is not None:  # a takeover: what the old master sent, replicas get at once
            kept = group.kept_after(hub.last_lsn)
            for e in kept:
                entry = frame(WalEntry(config.node_id, e.lsn, e.timestamp, e.data))
                hub.publish(e.lsn, entry)
                group.send_entry(entry)
            if kept:
                log.info(
                    "took over with %d entries the old master had sent (up to %s): the stream "
                    "goes on after them",
                    len(kept),
                    format_lsn(Lsn(kept[-1].lsn)),
                )
        network = Network(hub, replace(config, listen=None) if group else config, stream)
        network.thread.start()
        if group is not None:

            def positions() -> dict[int, int]:
                with network.lock:
                    return dict(hub.acked_by_node)

            group.replica_positions = positions
        try:
            if ready is not None:
                ready(network)
            _publish(stream, hub, network, config, encode, stats, metrics_port, group, metrics)
        finally:
            if group is not None:
                group.replica_positions = None
            network.stop_event.set()
            network.wake()
            network.thread.join(timeout=10)
    stats.confirmed = stream.confirmed_lsn
    stats.stepped_down = network.stepped_down


class _Stopper:
    """What the CLI's signals stop in a group: the waiting, and the stream of the moment."""

    def __init__(self, group: Group) -> None:
        self.group = group
        self.stopped = False
        self.stream: ReplicationStream | None = None

    def stop(self) -> None:
        self.stopped = True
        if self.stream is not None:
            self.stream.stop()
        self.group.stop()


def run_group(
    dsn: str,
    options: StreamOptions,
    config: BridgeConfig,
    *,
    ready: Callable[[Network], None] | None = None,
    on_stream: Callable[[ReplicationStream], None] | None = None,
    metrics_port: int | None = None,
) -> BridgeStats:
    """One member of a bridge group (``config.peers``): elect (``bridge.group``); while
    master, fence the slot (terminate whatever walsender holds it, only after winning),
    stream and feed the replicas; when another member wins, stop at once and wait again.
    Returns when stopped (or ``until_lsn`` was reached)."""
    if config.listen is None:
        raise ConfigError(
            "a group member needs --listen HOST:PORT: the address its peers' --peer names"
        )
    if not config.replicas:
        raise ConfigError("a group member dials its replicas: add --replica HOST:PORT")
    group = Group(config.node_id, config.listen, config.peers,
                  heartbeat=config.heartbeat_interval, tls_client=config.tls_client,
                  tls_server=config.tls_server)  # fmt: skip
    stopper = _Stopper(group)
    if on_stream is not None:
        on_stream(stopper)  # type: ignore[arg-type]
    stats = BridgeStats()
    metrics = Metrics(metrics_port) if metrics_port is not None else None
    if metrics is not None:
        roles = {"standby": 0, "candidate": 1, "master": 2}

        def on_change(change: Became) -> None:
            metrics.group_term.set(change.term)
            metrics.group_role.set(roles[change.role])
            if change.role == "candidate":
                metrics.group_elections.inc()

        group.on_change = on_change
    group.start()
    try:
        while not stopper.stopped:
            term = group.wait_until_master(lambda: stopper.stopped)
            if term is None:
                break
            group.settle()  # anything peers said meanwhile (a newer term) is heard first
            if not group.still_master(term):
                continue
            if not take_slot(dsn, options.slot, lambda: stopper.stopped):
                continue
            stats.terms.append(term)

            def attach(stream: ReplicationStream) -> None:
                stopper.stream = stream
                if stopper.stopped:
                    stream.stop()

            try:
                _serve(dsn, options, replace(config, term=term), stats, ready=ready,
                       on_stream=attach, metrics=metrics, group=group)  # fmt: skip
            except SlotInUseError as exc:  # taken again before our start: fence again
                log.warning("%s", exc)
                continue
            if stopper.stopped or group.still_master(term):
                break  # stopped, or --until-lsn reached
            log.info("member %d stepped down from term %d", config.node_id, term)
    finally:
        group.close()
        if metrics is not None:
            metrics.close()
    return stats


def _publish(
    stream: ReplicationStream,
    hub: Hub,
    network: Network,
    config: BridgeConfig,
    encode: Callable[[Transaction], bytes],
    stats: BridgeStats,
    metrics_port: int | None,
    group: Group | None = None,
    metrics: Metrics | None = None,
) -> None:
    node_id = config.node_id
    lock = network.lock
    unwoken = 0  # entries published since the last wake (the stream's on_idle wakes too)
    first_unwoken = 0.0
    with Progress(stream, metrics_port=None if metrics else metrics_port, metrics=metrics):
        for txn in stream:
            stats.transactions += 1
            if not txn.changes:
                stats.empty += 1
                stream.ack(txn.end_lsn)  # nothing to send; the slot still advances
                continue
            entry = frame(WalEntry(node_id, txn.end_lsn, txn.timestamp_us, encode(txn)))
            with lock:
                if hub.full:
                    network.wake()  # what is buffered must go out for the acks to come
                while hub.full and not stream.stopping:
                    lock.wait(0.1)  # backpressure: a quorum must catch up first
                # not buffered before (a rewind, or what a takeover started with); and not
                # while a rewind is pending: it comes again after those the rewind resends
                published = txn.end_lsn > hub.last_lsn and not stream.rewind_pending
                if published:
                    hub.publish(txn.end_lsn, entry)
                    stats.entries += 1
            if not unwoken:
                first_unwoken = time.monotonic()
            unwoken += 1
            if unwoken >= WAKE_AFTER or time.monotonic() - first_unwoken >= WAKE_WITHIN:
                network.wake()
                unwoken = 0
            if group is not None:
                group.set_last_lsn(txn.end_lsn)
                if published:
                    group.send_entry(entry)
