"""``run_replica``: the reference replica node as a command: the bridge's WalEntries into a
SQL target, exactly once (``pglogrepl-bridge replica``).

It listens; whichever bridge is master dials in (``bridge --replica HOST:PORT``). The rules
are ``wire.follower``'s: entries applied once in LSN order, ``Acknowledge`` only after the
target transaction holding them (and this node's position, in the checkpoint table)
committed, ``RequestFrom`` on each new connection, the highest term followed. The sink is
``replicate``'s, so tables, types and schema changes are mapped the same way, from either
payload: bincode (``wire.payloadread``) or JSON (``wire.jsonread``, whose ``relations``
member names the types and keys). Each connection is served by its own thread; one apply
runs at a time.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from pglogrepl_bridge.errors import (
    BridgeError,
    ConfigError,
    ProtocolError,
    TargetUnavailableError,
)
from pglogrepl_bridge.lsn import Lsn
from pglogrepl_bridge.pgoutput.transaction import Transaction
from pglogrepl_bridge.wire.follower import Follower
from pglogrepl_bridge.wire.jsonread import JsonPayloadReader
from pglogrepl_bridge.wire.payloadread import PayloadRelations, read_payload
from pglogrepl_bridge.wire.protocol import FrameReader, ReplicationMessage, WalEntry, frame

if TYPE_CHECKING:
    from pglogrepl_bridge.sinks.sql import SqlSink

log = logging.getLogger(__name__)

#: the checkpoint row of a replica node: (``REPLICA_SOURCE``, ``node-<id>``)
REPLICA_SOURCE = "replica"
PayloadChoice = Literal["auto", "bincode", "json"]


@dataclass
class ReplicaStats:
    """What a run did."""

    entries: int = 0  # applied
    duplicates: int = 0  # received again, not applied
    connections: int = 0
    resumed_from: Lsn | None = None
    last_lsn: Lsn | None = None
    term: int = 0


class ReplicaServer:
    """Listens, serves each master connection in a thread, applies through ``sink``."""

    def __init__(
        self,
        sink: SqlSink,
        follower: Follower,
        *,
        payload: PayloadChoice = "auto",
        until: Lsn | None = None,
        max_backoff: float = 5.0,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.sink = sink
        self.tls = tls  # accepted connections use TLS (mutual when the context has a CA)
        self.follower = follower
        self.payload = payload
        self.until = until
        self.max_backoff = max_backoff
        self.relations = PayloadRelations()
        self.json = JsonPayloadReader()
        self.stats = ReplicaStats()
        self.failure: BaseException | None = None
        self._state = threading.Lock()  # the follower's state
        self._apply = threading.Lock()  # one target transaction at a time
        self._stop = threading.Event()
        self._server: socket.socket | None = None
        self._threads: list[threading.Thread] = []

    def stop(self) -> None:
        """Stop accepting and serving (any thread); the run returns."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        """Whether ``stop`` was called."""
        return self._stop.is_set()

    def listen(self, host: str, port: int) -> tuple[str, int]:
        """Bind (0: a free port); returns the address."""
        try:
            srv = socket.create_server((host, port), reuse_port=False)
        except OSError as exc:
            raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        srv.settimeout(0.2)
        self._server = srv
        address = srv.getsockname()
        return address[0], address[1]

    def serve(self) -> ReplicaStats:
        """Accept until stopped, ``until`` is held, or a failure; returns what was done."""
        assert self._server is not None
        try:
            while not self._stop.is_set():
                try:
                    conn, peer = self._server.accept()
                except TimeoutError:
                    continue
                if self.tls is not None:
                    try:
                        conn.settimeout(5)
                        conn = self.tls.wrap_socket(conn, server_side=True)
                    except (OSError, ssl.SSLError) as exc:
                        log.warning("TLS handshake with %s failed: %s", peer, exc)
                        conn.close()
                        continue
                log.info("master connected from %s:%s", *peer[:2])
                thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
                self._threads.append(thread)
                thread.start()
        finally:
            self._server.close()
            for thread in self._threads:
                thread.join(timeout=5)
        if self.failure is not None:
            raise self.failure
        return self.stats

    def _serve(self, conn: socket.socket) -> None:
        conn_id = object()
        self.stats.connections += 1
        conn.settimeout(0.2)
        reader = FrameReader()
        try:
            with self._state:
                hello = self.follower.connected(conn_id)
            _send(conn, hello)
            while not self._stop.is_set():
                try:
                    data = conn.recv(1 << 16)
                except (TimeoutError, ssl.SSLWantReadError):
                    continue
                if not data:
                    return
                with self._state:
                    step = self.follower.receive(conn_id, list(reader.feed(data)))
                replies: list[ReplicationMessage] = list(step.replies)
                if step.entries:
                    replies += self._apply_entries(conn_id, step.entries)
                _send(conn, replies)
                if step.close:
                    log.warning("closing a connection from a master of an older term")
                    return
                if self.until is not None and self.follower.last_lsn >= self.until:
                    self.stop()
        except ProtocolError as exc:
            log.warning("closing a connection that spoke nonsense: %s", exc)
        except OSError as exc:
            log.info("connection lost: %s", exc)
        except BridgeError as exc:  # the target refused: stop, with the reason
            self.failure = exc
            self.stop()
        finally:
            with self._state:
                self.follower.disconnected(conn_id)
            conn.close()

    def _apply_entries(
        self, conn_id: object, entries: tuple[WalEntry, ...]
    ) -> list[ReplicationMessage]:
        """Apply in one target transaction (with this node's position), then acknowledge."""
        try:
            txns = [self._transaction(e) for e in entries]
            with self._apply:
                self._apply_retrying(txns)
        except BaseException:
            with self._state:
                self.follower.failed()
            raise
        with self._state:
            acks = self.follower.applied(conn_id, entries)
            self.stats.entries += len(entries)
            self.stats.duplicates = self.follower.duplicates
            self.stats.last_lsn = Lsn(self.follower.last_lsn)
            self.stats.term = self.follower.term
        return acks

    def _transaction(self, entry: WalEntry) -> Transaction:
        data = entry.data
        if self.payload == "json" or (self.payload == "auto" and is_json_payload(data)):
            txn = self.json.transaction(data)
        else:
            txn = read_payload(data, self.relations)
        if txn.end_lsn != entry.lsn:
            raise ProtocolError(
                f"WalEntry {entry.lsn} holds the transaction ending at {int(txn.end_lsn)}"
            )
        return txn

    def _apply_retrying(self, txns: list[Transaction]) -> None:
        backoff = 0.1
        while True:
            try:
                self.sink.apply(txns)
                return
            except TargetUnavailableError as exc:
                if self._stop.is_set():
                    raise
                log.warning("%s; retrying in %.1fs", exc, backoff)
                time.sleep(backoff)
                backoff = min(backoff * 2, self.max_backoff)


def is_json_payload(data: bytes) -> bool:
    """Whether a WalEntry's data is the JSON payload: the line ``tail`` prints always starts
    so; a bincode one starts with the xid's four little-endian bytes, of which the first may
    well be a "{"."""
    return data.startswith(b'{"xid":')


def _send(conn: socket.socket, msgs: list[ReplicationMessage]) -> None:
    if msgs:
        conn.sendall(b"".join(frame(m) for m in msgs))


def run_replica(
    node_id: int,
    listen: tuple[str, int],
    target: str,
    *,
    payload: PayloadChoice = "auto",
    until: Lsn | None = None,
    on_server: Callable[[ReplicaServer], None] | None = None,
    tls: ssl.SSLContext | None = None,
) -> ReplicaStats:
    """Serve as replica ``node_id`` on ``listen`` into ``target`` until stopped (or until
    the target holds ``until``); returns what was done."""
    from pglogrepl_bridge.sinks.sql import SqlSink

    sink = SqlSink(target, source_id=REPLICA_SOURCE, slot=f"node-{node_id}")
    try:
        checkpoint = sink.checkpoint()
        follower = Follower(node_id, last_lsn=int(checkpoint or 0))
        server = ReplicaServer(sink, follower, payload=payload, until=until, tls=tls)
        server.stats.resumed_from = checkpoint
        host, port = server.listen(*listen)
        log.info("replica %d listening on %s:%d, applied up to %s", node_id, host, port, checkpoint)
        if on_server is not None:
            on_server(server)
        if until is not None and checkpoint is not None and checkpoint >= until:
            return server.stats
        return server.serve()
    finally:
        sink.engine.dispose()
