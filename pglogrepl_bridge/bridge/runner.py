"""``run_bridge``: committed transactions as WalEntry frames to replicas over TCP (optionally
TLS); their Acknowledges, once a quorum has them, become the slot's confirmed position.

Two threads: the caller's runs the replication stream and publishes entries; a network thread
(``bridge.network``) runs a selector over the replica connections. No signal handling here:
the CLI (or the embedding program) stops the stream through ``on_stream``.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field

from pglogrepl_bridge.bridge.network import Address, Network
from pglogrepl_bridge.errors import ConfigError
from pglogrepl_bridge.pgoutput.transaction import Transaction
from pglogrepl_bridge.postgres.stream import ReplicationStream, StreamOptions
from pglogrepl_bridge.progress import Progress
from pglogrepl_bridge.wire.hub import Hub, StepDown
from pglogrepl_bridge.wire.payload import PayloadFormat, encoder
from pglogrepl_bridge.wire.protocol import DEFAULT_MAX_FRAME, WalEntry, frame

log = logging.getLogger(__name__)


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
    buffer_entries: int = 10_000
    max_frame: int = DEFAULT_MAX_FRAME
    term: int = 1
    tls_client: ssl.SSLContext | None = None
    tls_server: ssl.SSLContext | None = None

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
    network once it listens.
    """
    if not config.replicas and config.listen is None:
        raise ConfigError("no replicas: add --replica HOST:PORT (repeatable) or --listen")
    if config.quorum() < 1:
        raise ConfigError("--ack-quorum must be at least 1")
    hub = Hub(
        node_id=config.node_id,
        quorum=config.quorum(),
        window=config.window,
        max_entries=config.buffer_entries,
        term=config.term,
    )
    stats = BridgeStats()
    encode = encoder(config.payload)
    seen_idle = [0]

    def on_idle() -> None:
        # PostgreSQL's keepalive moved on and there is nothing to send: tell the replicas
        idle = stream.feedback.idle_end
        if idle > seen_idle[0]:
            seen_idle[0] = idle
            network.heartbeat_now()

    stream = ReplicationStream(dsn, options, on_idle=on_idle)
    if on_stream is not None:
        on_stream(stream)
    with stream:  # closed whatever happens below: a --listen address in use leaks nothing
        stream.start()
        # everything after the confirmed position comes again from PostgreSQL; nothing older
        hub.floor = hub.last_lsn = stream.confirmed_lsn
        network = Network(hub, config, stream)
        network.thread.start()
        try:
            if ready is not None:
                ready(network)
            _publish(stream, hub, network, config, encode, stats, metrics_port)
        finally:
            network.stop_event.set()
            network.wake()
            network.thread.join(timeout=10)
    stats.confirmed = stream.confirmed_lsn
    stats.stepped_down = network.stepped_down
    return stats


def _publish(
    stream: ReplicationStream,
    hub: Hub,
    network: Network,
    config: BridgeConfig,
    encode: Callable[[Transaction], bytes],
    stats: BridgeStats,
    metrics_port: int | None,
) -> None:
    node_id = config.node_id
    lock = network.lock
    with Progress(stream, metrics_port=metrics_port):
        for txn in stream:
            stats.transactions += 1
            if not txn.changes:
                stats.empty += 1
                stream.ack(txn.end_lsn)  # nothing to send; the slot still advances
                continue
            entry = frame(WalEntry(node_id, txn.end_lsn, txn.timestamp_us, encode(txn)))
            with lock:
                while hub.full and not stream.stopping:
                    lock.wait(0.1)  # backpressure: a quorum must catch up first
                if txn.end_lsn > hub.last_lsn:  # not already buffered before a rewind
                    hub.publish(txn.end_lsn, entry)
                    stats.entries += 1
            network.wake()
