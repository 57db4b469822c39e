"""``bridge``: committed transactions as WalEntry frames to replicas over TCP (optionally TLS);
their Acknowledges, once a quorum has them, become the slot's confirmed position.

Two threads: the caller's runs the replication stream and publishes entries; a network thread
runs a selector over the replica connections (dialled with --replica, accepted with --listen),
sends entries within each replica's window, heartbeats, and feeds replies to the ``Hub``.
"""

from __future__ import annotations

import contextlib
import logging
import selectors
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated

import typer

from . import cliapp as cli
from .errors import BridgeError, ConfigError, ProtocolError, ReplicationError
from .hub import Hub, Rewind, StepDown
from .payload import PayloadFormat, encoder
from .progress import Progress
from .protocol import DEFAULT_MAX_FRAME, FrameReader, WalEntry, frame
from .stream import ReplicationStream, StreamOptions

log = logging.getLogger(__name__)

Address = tuple[str, int]


def parse_address(text: str, option: str) -> Address:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{option} {text!r}: write HOST:PORT, e.g. 127.0.0.1:7000")
    return host.strip("[]") or "127.0.0.1", int(port)


@dataclass
class BridgeConfig:
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
        if self.ack_quorum is not None:
            return self.ack_quorum
        return len(self.replicas) // 2 + 1 if self.replicas else 1


@dataclass
class BridgeStats:
    transactions: int = 0
    entries: int = 0
    empty: int = 0
    confirmed: int = 0
    stepped_down: StepDown | None = None


class _Conn:
    def __init__(self, sock: socket.socket, address: Address | None, max_frame: int) -> None:
        self.sock = sock
        self.address = address  # set for connections we dial (and re-dial)
        self.reader = FrameReader(max_frame)
        self.out = bytearray()


class Network:
    """The selector loop: replica connections, frames in and out, heartbeats."""

    def __init__(self, hub: Hub, config: BridgeConfig, stream: ReplicationStream) -> None:
        self.hub = hub
        self.config = config
        self.stream = stream
        self.lock = threading.Condition()  # guards hub; publishers wait on it for room
        self.sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self.sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._wake_pending = False
        self.conns: dict[int, _Conn] = {}
        self._next_dial: dict[Address, float] = dict.fromkeys(config.replicas, 0.0)
        self._backoff: dict[Address, float] = dict.fromkeys(config.replicas, 0.1)
        self.stop_event = threading.Event()
        self.stepped_down: StepDown | None = None
        self._heartbeat_due = 0.0
        self.listener: socket.socket | None = None
        if config.listen is not None:
            self.listener = socket.create_server(config.listen)
            self.listener.setblocking(False)
            self.sel.register(self.listener, selectors.EVENT_READ, "listen")
        self.thread = threading.Thread(target=self._run, name="bridge-network", daemon=True)

    @property
    def listen_address(self) -> Address | None:
        if self.listener is None:
            return None
        host, port = self.listener.getsockname()[:2]
        return host, port

    def wake(self) -> None:
        """Make the loop look at the hub. One byte until the loop has seen it: a byte per
        transaction cost a syscall and a GIL hand-over each."""
        if self._wake_pending:
            return
        self._wake_pending = True
        with contextlib.suppress(BlockingIOError):
            self._wake_w.send(b"\0")

    def heartbeat_now(self) -> None:
        self._heartbeat_due = 0.0
        self.wake()

    # -- the loop --------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self.stop_event.is_set():
                now = time.monotonic()
                self._dial(now)
                timeout = max(0.0, min(self._heartbeat_due - now, 0.5))
                for key, mask in self.sel.select(timeout):
                    if key.data == "wake":
                        self._wake_pending = False  # before looking: later news wakes again
                        self._drain_wake()
                    elif key.data == "listen":
                        self._accept()
                    else:
                        self._io(key.data, mask)
                self._flush_all()
        except Exception as exc:  # the stream must not keep confirming with a dead network
            log.error("bridge network loop failed: %s", exc)
            self.stream.stop()
            raise
        finally:
            for conn in list(self.conns.values()):
                self._close(conn, "shutting down")
            if self.listener is not None:
                self.listener.close()
            self.sel.close()

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass

    def _dial(self, now: float) -> None:
        connected = {c.address for c in self.conns.values() if c.address}
        for address, due in self._next_dial.items():
            if address in connected or now < due:
                continue
            try:
                sock = socket.create_connection(address, timeout=1.0)
                if self.config.tls_client is not None:
                    sock = self.config.tls_client.wrap_socket(sock, server_hostname=address[0])
            except (OSError, ssl.SSLError) as exc:
                self._next_dial[address] = now + self._backoff[address]
                self._backoff[address] = min(self._backoff[address] * 2, 5.0)
                log.debug("replica %s:%d not reachable (%s)", *address, exc)
                continue
            self._backoff[address] = 0.1
            log.info("connected to replica %s:%d", *address)
            self._register(sock, address)

    def _accept(self) -> None:
        assert self.listener is not None
        try:
            sock, peer = self.listener.accept()
        except BlockingIOError:
            return
        try:
            if self.config.tls_server is not None:
                sock.settimeout(5)
                sock = self.config.tls_server.wrap_socket(sock, server_side=True)
        except (OSError, ssl.SSLError) as exc:
            log.warning("TLS handshake with %s failed: %s", peer, exc)
            sock.close()
            return
        log.info("replica connected from %s", peer)
        self._register(sock, None)

    def _register(self, sock: socket.socket, address: Address | None) -> None:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = _Conn(sock, address, self.config.max_frame)
        self.conns[sock.fileno()] = conn
        self.sel.register(sock, selectors.EVENT_READ, conn)
        with self.lock:
            self.hub.connect(id(conn))

    def _close(self, conn: _Conn, why: str) -> None:
        log.info("replica connection closed: %s", why)
        self.conns.pop(conn.sock.fileno(), None)
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(conn.sock)
        conn.sock.close()
        with self.lock:
            self.hub.disconnect(id(conn))
            self.lock.notify_all()
        if conn.address is not None:
            self._next_dial[conn.address] = time.monotonic() + self._backoff[conn.address]

    def _io(self, conn: _Conn, mask: int) -> None:
        if mask & selectors.EVENT_READ:
            try:
                data = conn.sock.recv(262144)
                while isinstance(conn.sock, ssl.SSLSocket) and conn.sock.pending():
                    data += conn.sock.recv(conn.sock.pending())
            except (BlockingIOError, ssl.SSLWantReadError):
                data = None
            except OSError as exc:
                self._close(conn, str(exc))
                return
            if data == b"":
                self._close(conn, "closed by the replica")
                return
            if data:
                try:
                    messages = conn.reader.feed(data)
                except ProtocolError as exc:
                    self._close(conn, f"protocol error: {exc}")
                    return
                actions = []
                with self.lock:
                    for msg in messages:
                        actions += self.hub.receive(id(conn), msg)
                    self.lock.notify_all()
                for action in actions:
                    self._act(action)
        if mask & selectors.EVENT_WRITE:
            self._send(conn)

    def _act(self, action: Rewind | StepDown) -> None:
        if isinstance(action, StepDown):
            log.error(
                "node %d was promoted at term %d: this bridge stops streaming (split-brain guard)",
                action.node_id,
                action.term,
            )
            self.stepped_down = action
            self.stream.stop()
            return
        try:
            self.stream.request_rewind(action.lsn)
        except ReplicationError as exc:
            log.error("RequestFrom cannot be served: %s", exc)
            return
        with self.lock:
            self.hub.reset_to(action.lsn)

    def _flush_all(self) -> None:
        now = time.monotonic()
        beat = now >= self._heartbeat_due
        if beat:
            self._heartbeat_due = now + self.config.heartbeat_interval
        with self.lock:
            # a bridge that lost PostgreSQL is not a healthy master: votes follow the rules
            self.hub.healthy = self.stream.connected and not self.stream.stopping
            heartbeat = self.hub.heartbeat() if beat else b""
            for conn in self.conns.values():
                conn.out += heartbeat
                for chunk in self.hub.pending(id(conn)):
                    conn.out += chunk
            quorum = self.hub.quorum_lsn
            self.lock.notify_all()
        if quorum:
            # every cycle: entries delivered after the quorum formed may already be covered
            # (a replica's RequestFrom on reconnect acknowledges what it holds)
            self.stream.ack(quorum, cumulative=True)
        for conn in list(self.conns.values()):
            self._send(conn)

    def _send(self, conn: _Conn) -> None:
        if conn.out:
            try:
                sent = conn.sock.send(conn.out)
                del conn.out[:sent]
            except (BlockingIOError, ssl.SSLWantWriteError):
                pass
            except OSError as exc:
                self._close(conn, str(exc))
                return
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if conn.out else 0)
        with contextlib.suppress(KeyError, ValueError):
            self.sel.modify(conn.sock, events, conn)


def run_bridge(
    dsn: str,
    options: StreamOptions,
    config: BridgeConfig,
    *,
    ready: Callable[[Network], None] | None = None,
    metrics_port: int | None = None,
) -> BridgeStats:
    """Stream, publish, confirm what a quorum acknowledged; returns when stopped."""
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

    stream = ReplicationStream(dsn, options, on_idle=on_idle, on_problem=cli.report_problem)
    stream.start()
    # everything after the confirmed position comes again from PostgreSQL; nothing older can
    hub.floor = hub.last_lsn = stream.confirmed_lsn
    network = Network(hub, config, stream)
    network.thread.start()
    if ready is not None:
        ready(network)
    node_id = config.node_id
    lock = network.lock
    try:
        with stream, cli.stop_on_signals(stream.stop), Progress(stream, metrics_port=metrics_port):
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
    finally:
        network.stop_event.set()
        network.wake()
        network.thread.join(timeout=10)
    stats.confirmed = stream.confirmed_lsn
    stats.stepped_down = network.stepped_down
    return stats


def tls_context(server: bool, cert: str | None, key: str | None, ca: str | None) -> ssl.SSLContext:
    purpose = ssl.Purpose.CLIENT_AUTH if server else ssl.Purpose.SERVER_AUTH
    ctx = ssl.create_default_context(purpose, cafile=ca)
    if cert:
        ctx.load_cert_chain(cert, key)
    if server and ca:
        ctx.verify_mode = ssl.CERT_REQUIRED  # a CA on the server side means mutual TLS
    return ctx


@cli.app.command()
def bridge(
    slot: cli.Slot,
    publication: cli.Publications,
    replica: Annotated[
        list[str], typer.Option("--replica", help="Replica to dial, HOST:PORT (repeatable).")
    ] = [],  # noqa: B006 - typer reads the default, never mutates it
    listen: Annotated[
        str | None,
        typer.Option(
            "--listen", help="Accept replicas on HOST:PORT (give 127.0.0.1 unless TLS protects it)."
        ),
    ] = None,
    node_id: Annotated[int, typer.Option("--node-id", help="This bridge's node id.")] = 1,
    ack_quorum: Annotated[
        int | None,
        typer.Option(
            "--ack-quorum",
            min=1,
            help="Replicas that must acknowledge "
            "before PostgreSQL is told (default: a majority of --replica).",
        ),
    ] = None,
    payload: Annotated[
        str, typer.Option("--payload", help="WalEntry data: json or bincode.")
    ] = "json",
    heartbeat_interval: Annotated[
        float, typer.Option("--heartbeat-interval", min=0.001, help="Seconds between heartbeats.")
    ] = 0.05,
    window: Annotated[
        int, typer.Option("--window", min=1, help="Unacknowledged entries per replica at most.")
    ] = 1000,
    term: Annotated[int, typer.Option("--term", min=0, help="This master's election term.")] = 1,
    tls_cert: Annotated[str | None, typer.Option("--tls-cert", help="PEM certificate.")] = None,
    tls_key: Annotated[str | None, typer.Option("--tls-key", help="PEM private key.")] = None,
    tls_ca: Annotated[
        str | None, typer.Option("--tls-ca", help="CA bundle to verify peers (enables TLS).")
    ] = None,
    dsn: cli.Dsn = "",
    create_slot: cli.CreateSlot = False,
    temporary: cli.Temporary = False,
    until_lsn: cli.UntilLsn = None,
    proto_version: cli.ProtoVersion = None,
    binary: cli.Binary = False,
    streaming: cli.Streaming = None,
    metrics_port: cli.MetricsPort = None,
    verbose: cli.Verbose = False,
) -> None:
    """Send transactions to replicas as WalEntry frames; confirm what a quorum acknowledged.

    While streaming it refuses every vote; a Promotion of another node at a term at least its
    own stops it (see docs/replication-message.md).
    """
    cli.setup_logging(verbose)
    with cli.handled():
        if payload not in ("json", "bincode"):
            raise ConfigError(f"--payload must be json or bincode, not {payload!r}")
        tls = tls_cert is not None or tls_ca is not None
        config = BridgeConfig(
            node_id=node_id,
            replicas=[parse_address(r, "--replica") for r in replica],
            listen=parse_address(listen, "--listen") if listen else None,
            ack_quorum=ack_quorum,
            payload=payload,  # type: ignore[arg-type]
            heartbeat_interval=heartbeat_interval,
            window=window,
            term=term,
            tls_client=tls_context(False, tls_cert, tls_key, tls_ca) if tls else None,
            tls_server=tls_context(True, tls_cert, tls_key, tls_ca) if tls else None,
        )
        if config.listen and config.listen[0] not in ("127.0.0.1", "::1", "localhost") and not tls:
            cli.log.warning(
                "--listen %s:%d without TLS: anyone who can reach it gets the data", *config.listen
            )
        options = cli.stream_options(
            slot,
            publication,
            create_slot=create_slot,
            temporary=temporary,
            start_lsn=None,
            proto_version=proto_version,
            binary=binary,
            streaming=streaming,
            until_lsn=cli.parse_lsn(until_lsn, "--until-lsn"),
        )
        stats = run_bridge(dsn, options, config, metrics_port=metrics_port)
        if stats.stepped_down is not None:
            raise BridgeError(
                f"stopped: node {stats.stepped_down.node_id} was promoted at term "
                f"{stats.stepped_down.term}; this bridge is no longer the master"
            )
        cli.err().print(
            f"bridged {stats.transactions} transactions ({stats.entries} WalEntries); "
            f"confirmed up to {stats.confirmed}",
            highlight=False,
        )
