"""A reference replica node for the ReplicationMessage protocol, over TCP.

It follows the protocol's semantics: apply a WalEntry only when its lsn is above the last
applied one, then ``Acknowledge{own id, lsn}``; on reconnecting, ``RequestFrom{last applied}``
so the master resends what it lacks (and counts what it has). Used by the tests and the
examples; a real replica would make ``apply`` durable before returning.
"""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from pglogrepl_bridge.wire.protocol import (
    Acknowledge,
    FrameReader,
    Heartbeat,
    Promotion,
    ReplicationMessage,
    RequestFrom,
    WalEntry,
    frame,
)


@dataclass
class ReplicaNode:
    """A replica's protocol logic, sans-IO: applies a WalEntry only if its lsn is past the last
    one, then acknowledges.
    """

    node_id: int
    apply: Callable[[WalEntry], None] = lambda entry: None
    last_lsn: int = 0
    applied: list[WalEntry] = field(default_factory=list)
    duplicates: list[int] = field(default_factory=list)  # lsns received again, not applied
    heartbeats: int = 0
    ack: bool = True  # False: a replica that never acknowledges (for tests)
    #: False: ``applied`` stays empty (``last_lsn`` still moves), for a long run that must
    #: not hold every entry it was sent, as the benchmark's replica
    keep: bool = True

    def handle(self, msg: ReplicationMessage) -> list[ReplicationMessage]:
        """The protocol rules; returns the messages to send back. Pure."""
        if isinstance(msg, WalEntry):
            if msg.lsn <= self.last_lsn:
                self.duplicates.append(msg.lsn)
                return []
            self.apply(msg)
            if self.keep:
                self.applied.append(msg)
            self.last_lsn = msg.lsn
            return [Acknowledge(self.node_id, msg.lsn)] if self.ack else []
        if isinstance(msg, Heartbeat):
            self.heartbeats += 1
        if isinstance(msg, Promotion):
            pass  # a plain replica just follows whoever is master
        return []

    def hello(self) -> ReplicationMessage | None:
        """On (re)connecting: ask for what follows the last applied entry, if any."""
        return RequestFrom(self.node_id, self.last_lsn) if self.last_lsn else None


class TcpReplica:
    """Serve a ReplicaNode on a socket, in a thread: ``listen`` for the bridge to dial, or
    ``dial`` the bridge's --listen address."""

    def __init__(self, node: ReplicaNode, *, tls: ssl.SSLContext | None = None) -> None:
        self.node = node
        self.tls = tls
        self._server: socket.socket | None = None
        self._conn: socket.socket | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lock = threading.Lock()
        self.connections = 0

    def listen(self, host: str = "127.0.0.1", port: int = 0) -> tuple[str, int]:
        """Accept the bridge's connections on host:port (0: any free port); returns the address."""
        srv = socket.create_server((host, port))
        srv.settimeout(0.2)
        self._server = srv
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)
        self._thread.start()
        addr = srv.getsockname()
        return addr[0], addr[1]

    def dial(self, host: str, port: int) -> None:
        """Connect to a bridge's --listen address (re-dialling when it drops)."""
        self._thread = threading.Thread(target=self._dial_loop, args=(host, port), daemon=True)
        self._thread.start()

    def _accept_loop(self) -> None:
        assert self._server is not None
        while not self._stop.is_set():
            try:
                conn, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if self.tls is not None:
                try:
                    conn = self.tls.wrap_socket(conn, server_side=True)
                except (ssl.SSLError, OSError):
                    conn.close()  # a peer without an acceptable certificate: refused
                    continue
            self._serve(conn)

    def _dial_loop(self, host: str, port: int) -> None:
        while not self._stop.is_set():
            try:
                conn = socket.create_connection((host, port), timeout=2)
            except OSError:
                self._stop.wait(0.1)
                continue
            if self.tls is not None:
                try:
                    conn = self.tls.wrap_socket(conn, server_hostname=host)
                except (ssl.SSLError, OSError):
                    conn.close()
                    self._stop.wait(0.5)
                    continue
            self._serve(conn)

    def _serve(self, conn: socket.socket) -> None:
        self.connections += 1
        self._conn = conn
        conn.settimeout(0.2)
        reader = FrameReader()
        try:
            with self.lock:
                hello = self.node.hello()
            if hello is not None:
                conn.sendall(frame(hello))
            while not self._stop.is_set():
                try:
                    data = conn.recv(65536)
                except (TimeoutError, ssl.SSLWantReadError):
                    continue
                if not data:
                    return
                replies = []
                for msg in reader.feed(data):
                    with self.lock:
                        replies += self.node.handle(msg)
                if replies:
                    conn.sendall(b"".join(frame(r) for r in replies))
        except OSError:
            return
        finally:
            conn.close()
            self._conn = None

    def send(self, msg: ReplicationMessage) -> None:
        """Send an extra message (a vote request, a promotion) on the current connection."""
        conn = self._conn
        if conn is None:
            raise ConnectionError("not connected")
        conn.sendall(frame(msg))

    def drop(self) -> None:
        """Break the current connection (the bridge reconnects or the replica re-dials)."""
        conn = self._conn
        if conn is not None:
            conn.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        """Stop serving and close every connection."""
        self._stop.set()
        if self._server is not None:
            self._server.close()
        if self._thread is not None:
            self._thread.join(timeout=5)
