"""The bridge's network side: one selector thread over the replica connections.

It dials ``--replica`` addresses (and re-dials them with backoff), accepts on ``--listen``,
sends entries within each replica's window, heartbeats, and hands every reply to the ``Hub``
(sans-IO, in ``wire.hub``), whose decisions it carries out on the replication stream.
"""

from __future__ import annotations

import contextlib
import logging
import selectors
import socket
import ssl
import threading
import time
from typing import TYPE_CHECKING

from pglogrepl_bridge.errors import ConfigError, ProtocolError, ReplicationError
from pglogrepl_bridge.wire.hub import Drop, Hub, Rewind, StepDown
from pglogrepl_bridge.wire.protocol import FrameReader

if TYPE_CHECKING:
    from pglogrepl_bridge.bridge.runner import BridgeConfig
    from pglogrepl_bridge.postgres.stream import ReplicationStream

log = logging.getLogger(__name__)

Address = tuple[str, int]


def parse_address(text: str, option: str) -> Address:
    """``HOST:PORT`` (IPv6 in brackets) from an option, or a ConfigError naming it."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{option} {text!r}: write HOST:PORT, e.g. 127.0.0.1:7000")
    return host.strip("[]") or "127.0.0.1", int(port)


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
        """Where --listen actually listens (its port when 0 was asked)."""
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
        """Send a heartbeat at the next turn of the loop, not at the interval."""
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
                        # drained before the flag is cleared: a wake in between leaves its
                        # byte for the next turn (cleared first, its byte could be drained
                        # with the flag left set, and no wake would send a byte again)
                        self._drain_wake()
                        self._wake_pending = False
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
                        if any(isinstance(a, Drop) for a in actions):
                            break  # nothing more it says counts
                    self.lock.notify_all()
                for action in actions:
                    if isinstance(action, Drop):
                        self._close(conn, action.reason)
                        return
                    self._act(action)
        if mask & selectors.EVENT_WRITE:
            self._send(conn)

    def _act(self, action: Rewind | StepDown) -> None:  # Drop is handled by _io
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
            log.error(
                "a replica's replay cannot be served: %s; it gets nothing more from this "
                "bridge (never entries past a gap) until it is seeded again",
                exc,
            )
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
            rewinds = self.hub.take_rewinds()
            self.lock.notify_all()
        for rewind in rewinds:  # a replica lagged past the buffer: PostgreSQL sends it again
            log.warning(
                "a replica needs entries after %X, which the buffer no longer holds: "
                "restarting the PostgreSQL stream there",
                rewind.lsn,
            )
            self._act(rewind)
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


def tls_context(server: bool, cert: str | None, key: str | None, ca: str | None) -> ssl.SSLContext:
    """A TLS context for the replica links; a CA on the server side asks for client certificates
    (mutual TLS).
    """
    purpose = ssl.Purpose.CLIENT_AUTH if server else ssl.Purpose.SERVER_AUTH
    ctx = ssl.create_default_context(purpose, cafile=ca)
    if cert:
        ctx.load_cert_chain(cert, key)
    if server and ca:
        ctx.verify_mode = ssl.CERT_REQUIRED  # a CA on the server side means mutual TLS
    return ctx
