"""The links between the members of a bridge group, and the election over them.

A thread runs a selector over the peer links: it dials every ``--peer`` address (with
backoff) and accepts on ``--listen``, which in a group serves peers only (replicas are
dialled, ``--replica``). With ``--tls-cert/--tls-key/--tls-ca`` the links use TLS, mutual
when a CA is given, as the replica links do. Each link starts with a ``Heartbeat{own id,
last lsn}`` from both ends (a hello: it binds the link to the peer's id, and a member that
knows the master answers it with the master's ``Promotion``, so a newcomer follows at
once). Everything else is ``wire.election.Member``'s: this module feeds it messages and the
time, sends what it says, and tells the runner when this member becomes master or stops
being one.
"""

from __future__ import annotations

import contextlib
import logging
import random
import selectors
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from pglogrepl_bridge.errors import ProtocolError
from pglogrepl_bridge.wire.election import EVERY_PEER, Became, Member, Send
from pglogrepl_bridge.wire.protocol import (
    Acknowledge,
    FrameReader,
    Heartbeat,
    Promotion,
    ReplicationMessage,
    WalEntry,
    frame,
)

log = logging.getLogger(__name__)

Address = tuple[str, int]
#: the loop's longest sleep: elections are timed in tens of milliseconds
TICK = 0.01
#: the node id of ``status --peer``'s hello: no member, only asking (``_answer_observer``)
OBSERVER = 0
#: the master's newest entries a standby keeps, to hand replicas at once after a takeover
MAX_KEPT = 10_000
MAX_KEPT_BYTES = 64 * 1024 * 1024
#: bytes a standby's link may have waiting before the master drops it
MAX_BEHIND = 64 * 1024 * 1024


@dataclass
class _Link:
    sock: socket.socket
    address: Address | None  # dialled links: the --peer address
    reader: FrameReader = field(default_factory=FrameReader)
    out: bytearray = field(default_factory=bytearray)
    peer: int | None = None  # bound by its hello
    closing: str | None = None  # set from another thread: the loop closes it, with this why


class Group:
    """A member's peer links and election (``start``, then ``wait_until_master``)."""

    def __init__(
        self,
        node_id: int,
        listen: Address,
        peers: list[Address],
        *,
        heartbeat: float = 0.05,
        timeout: float = 0.15,
        rng: random.Random | None = None,
        tls_client: ssl.SSLContext | None = None,
        tls_server: ssl.SSLContext | None = None,
    ) -> None:
        #: the links' TLS, the replicas' contexts (``--tls-*``): with a CA, mutual
        self.tls_client, self.tls_server = tls_client, tls_server
        self.member = Member(
            node_id,
            frozenset(),
            rng or random.Random(),
            group_size=len(peers) + 1,
            heartbeat=heartbeat,
            timeout=timeout,
        )
        self.cond = threading.Condition()
        self.peers = peers
        self.on_step_down: Callable[[], None] | None = None
        #: every role change (metrics)
        self.on_change: Callable[[Became], None] | None = None
        #: while master: each replica's acknowledged position (for ``status --peer``)
        self.replica_positions: Callable[[], dict[int, int]] | None = None
        self.elections = 0
        self.last_change = self._quorum_seen = time.monotonic()
        self._sel = selectors.DefaultSelector()
        self._listener = socket.create_server(listen)
        self._listener.setblocking(False)
        self._sel.register(self._listener, selectors.EVENT_READ, None)
        self._links: dict[int, _Link] = {}
        self._next_dial: dict[Address, float] = dict.fromkeys(peers, 0.0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bridge-group", daemon=True)
        self._rounds = 0  # turns of the loop (``settle``)
        self._dialing: set[Address] = set()  # being connected to by a helper thread
        self._ready: list[tuple[socket.socket, Address | None]] = []  # connected, to register
        self._entries: deque[WalEntry] = deque()
        self._entries_bytes = 0
        self._entries_link: _Link | None = None

    @property
    def listen_address(self) -> Address:
        """Where the group listens (its port when 0 was asked)."""
        host, port = self._listener.getsockname()[:2]
        return host, port

    def start(self) -> None:
        """Begin: the election timer starts now."""
        with self.cond:
            self._act(self.member.start(time.monotonic()))
        self._thread.start()

    def stop(self) -> None:
        """Leave the group (any thread)."""
        self._stop.set()
        with self.cond:
            self.cond.notify_all()

    def close(self) -> None:
        """Stop and wait for the thread."""
        self.stop()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def wait_until_master(self, stopping: Callable[[], bool]) -> int | None:
        """Block until this member leads; its term (None: stopped first)."""
        with self.cond:
            while self.member.role != "master":
                if stopping() or self._stop.is_set():
                    return None
                self.cond.wait(0.1)
            return self.member.term

    def settle(self, timeout: float = 1.0) -> None:
        """Wait until the loop went round twice: whatever peers had said (a newer term, say)
        has been heard before the caller acts as master (takes the slot)."""
        with self.cond:
            target = self._rounds + 2
            deadline = time.monotonic() + timeout
            while self._rounds < target and not self._stop.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                self.cond.wait(left)

    def still_master(self, term: int) -> bool:
        """Whether this member still leads ``term`` (E8: may send its entries)."""
        with self.cond:
            return self.member.role == "master" and self.member.term == term

    def set_last_lsn(self, lsn: int) -> None:
        """How far this member's entries reach (for votes and heartbeats)."""
        with self.cond:
            self.member.last_lsn = max(self.member.last_lsn, lsn)

    # -- the loop --------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                self._dial(now)
                self._take_ready()
                for key, mask in self._sel.select(TICK):
                    if key.data is None:
                        self._accept()
                    else:
                        self._io(key.data, mask)
                with self.cond:
                    now = time.monotonic()
                    self._act(self.member.tick(now))
                    self._check_quorum(now)
                    self._rounds += 1
                    self.cond.notify_all()
                for link in list(self._links.values()):
                    self._send(link)
        except Exception as exc:
            log.error("bridge group loop failed: %s", exc)
            raise
        finally:
            for link in list(self._links.values()):
                self._close(link, "leaving the group")
            self._listener.close()
            self._sel.close()

    def _check_quorum(self, now: float) -> None:
        """E8: a master that reaches no majority of the group for two election timeouts
        steps down (under ``cond``)."""
        member = self.member
        linked = {link.peer for link in self._links.values() if link.peer is not None}
        if member.role != "master" or len(linked) + 1 >= member.majority:
            self._quorum_seen = now
            return
        if now - self._quorum_seen > 2 * member.timeout:
            log.warning(
                "member %d reaches %d of %d members: stepping down",
                member.node_id,
                len(linked) + 1,
                member.group_size,
            )
            self._act(member.step_down(now))

    def _dial(self, now: float) -> None:
        """Connect to the peers not linked (nor being connected to): in helper threads, so
        that a TLS handshake never blocks the loop (two members dialling each other at once
        would each wait for the other's loop to answer)."""
        connected = {link.address for link in self._links.values() if link.address}
        with self.cond:
            due = [a for a, at in self._next_dial.items()
                   if a not in connected and a not in self._dialing and now >= at]  # fmt: skip
            self._dialing.update(due)
        for address in due:
            threading.Thread(target=self._connect, args=(address,), daemon=True).start()

    def _connect(self, address: Address) -> None:
        try:
            sock = socket.create_connection(address, timeout=2)
            if self.tls_client is not None:
                sock = self.tls_client.wrap_socket(sock, server_hostname=address[0])
        except (OSError, ssl.SSLError) as exc:
            log.debug("member %s:%d not reachable (%s)", *address, exc)
            with self.cond:
                self._dialing.discard(address)
                self._next_dial[address] = time.monotonic() + 0.2
            return
        with self.cond:
            self._ready.append((sock, address))

    def _accept(self) -> None:
        try:
            sock, peer = self._listener.accept()
        except BlockingIOError:
            return
        if self.tls_server is None:
            self._register(sock, None)
            return
        threading.Thread(target=self._handshake, args=(sock, peer), daemon=True).start()

    def _handshake(self, sock: socket.socket, peer: object) -> None:
        """The server side of a TLS handshake, off the loop (see ``_dial``)."""
        assert self.tls_server is not None
        try:
            sock.settimeout(2)
            wrapped = self.tls_server.wrap_socket(sock, server_side=True)
        except (OSError, ssl.SSLError) as exc:
            log.warning("TLS handshake with %s failed: %s", peer, exc)
            sock.close()
            return
        with self.cond:
            self._ready.append((wrapped, None))

    def _take_ready(self) -> None:
        """Register the connections the helper threads finished."""
        with self.cond:
            ready, self._ready = self._ready, []
            for _, address in ready:
                if address is not None:
                    self._dialing.discard(address)
        for sock, address in ready:
            if self._stop.is_set():
                sock.close()
            else:
                self._register(sock, address)

    def _register(self, sock: socket.socket, address: Address | None) -> None:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        link = _Link(sock, address)
        self._links[sock.fileno()] = link
        self._sel.register(sock, selectors.EVENT_READ, link)
        with self.cond:  # the hello
            link.out += frame(Heartbeat(self.member.node_id, self.member.last_lsn))

    def _close(self, link: _Link, why: str) -> None:
        if link.peer is not None:
            log.info("link to member %d closed: %s", link.peer, why)
        self._links.pop(link.sock.fileno(), None)
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(link.sock)
        link.sock.close()
        if link.address is not None:
            with self.cond:
                self._next_dial[link.address] = time.monotonic() + 0.2

    def _io(self, link: _Link, mask: int) -> None:
        if mask & selectors.EVENT_READ:
            try:
                data = link.sock.recv(65536)
                while isinstance(link.sock, ssl.SSLSocket) and link.sock.pending():
                    data += link.sock.recv(link.sock.pending())
            except (BlockingIOError, ssl.SSLWantReadError):
                data = None
            except OSError as exc:
                self._close(link, str(exc))
                return
            if data == b"":
                self._close(link, "closed by the peer")
                return
            if data:
                try:
                    msgs = link.reader.feed(data)
                except ProtocolError as exc:
                    self._close(link, f"protocol error: {exc}")
                    return
                for msg in msgs:
                    if not self._receive(link, msg):
                        return
        if mask & selectors.EVENT_WRITE:
            self._send(link)

    def _receive(self, link: _Link, msg: ReplicationMessage) -> bool:
        with self.cond:
            if link.peer is None and isinstance(msg, Heartbeat) and msg.node_id == OBSERVER:
                self._answer_observer(link)
                return True
            if link.peer == OBSERVER:
                return True  # an observer says nothing more that counts
            if link.peer is None:  # the hello binds the link
                if not isinstance(msg, Heartbeat) or not self.member.learn(msg.node_id):
                    self._close(link, "not a member of this group (or this member itself)")
                    return False
                link.peer = msg.node_id
                log.info("linked to member %d", msg.node_id)
            if isinstance(msg, WalEntry):
                self._keep(link, msg)
                return True
            self._act(self.member.receive(msg, time.monotonic()))
        return True

    def _keep(self, link: _Link, entry: WalEntry) -> None:
        """A standby keeps the master's entries (under ``cond``). They come over one link
        in order, so the kept ones are gapless from the first; a new link starts a new run
        (what was sent while it was down is unknown), and only the master's count."""
        if link.peer != self.member.leader or self.member.role == "master":
            return
        if link is not self._entries_link:
            self._entries.clear()
            self._entries_bytes = 0
            self._entries_link = link
        if self._entries and entry.lsn <= self._entries[-1].lsn:
            return
        self._entries.append(entry)
        self._entries_bytes += len(entry.data)
        while len(self._entries) > MAX_KEPT or self._entries_bytes > MAX_KEPT_BYTES:
            self._entries_bytes -= len(self._entries.popleft().data)

    def kept_after(self, lsn: int) -> list[WalEntry]:
        """The master's entries this member kept that follow ``lsn``, when they reach back
        to it (gapless from there); else none: the stream re-reads them from the slot."""
        with self.cond:
            if not self._entries or self._entries[0].lsn > lsn:
                return []
            return [e for e in self._entries if e.lsn > lsn]

    def send_entry(self, entry_frame: bytes) -> None:
        """The master gives each standby every entry it publishes (any thread). A standby
        that falls ``MAX_BEHIND`` bytes behind loses its link (and starts a new run)."""
        with self.cond:
            given: set[int] = set()
            for link in list(self._links.values()):  # one link per peer, always the same
                if link.peer in (None, OBSERVER) or link.peer in given or link.closing:
                    continue
                given.add(link.peer)
                if len(link.out) > MAX_BEHIND:
                    link.closing = "too far behind the master's entries"
                    continue
                link.out += entry_frame

    def _answer_observer(self, link: _Link) -> None:
        """``status --peer``: this member's view (its hello went first: its id and last
        LSN), then ``Promotion{master, term}`` as it knows them (master 0: none known), then,
        from the master, ``Acknowledge{replica, lsn}`` for each replica's position."""
        link.peer = OBSERVER
        member = self.member
        link.out += frame(Promotion(member.leader or 0, member.term))
        if member.role == "master" and self.replica_positions is not None:
            for node, lsn in sorted(self.replica_positions().items()):
                link.out += frame(Acknowledge(node, lsn))

    def _act(self, actions: list[Send | Became]) -> None:
        """Send what the election says; note role changes (under ``cond``)."""
        for action in actions:
            if isinstance(action, Became):
                self._became(action)
                continue
            data = frame(action.msg)
            sent: set[int] = set()
            for link in self._links.values():
                if link.peer in (None, OBSERVER) or link.peer in sent:
                    continue
                if action.to in (EVERY_PEER, link.peer):
                    link.out += data
                    sent.add(link.peer)

    def _became(self, change: Became) -> None:
        now = time.monotonic()
        self.last_change = now
        if self.on_change is not None:
            self.on_change(change)
        if change.role == "candidate":
            self.elections += 1
            log.info("member %d asks for votes in term %d", self.member.node_id, change.term)
        elif change.master:
            log.warning(
                "member %d is master of term %d, %.0f ms after the last word of a master",
                self.member.node_id,
                change.term,
                (now - self.member.heard) * 1000,
            )
        else:
            log.warning(
                "member %d follows %s in term %d",
                self.member.node_id,
                change.leader if change.leader is not None else "nobody yet",
                change.term,
            )
            if self.on_step_down is not None:
                self.on_step_down()
        self.cond.notify_all()

    def _send(self, link: _Link) -> None:
        if link.closing is not None:
            self._close(link, link.closing)
            return
        problem: str | None = None
        with self.cond:  # the master's thread appends entries (``send_entry``)
            try:
                if link.out:
                    sent = link.sock.send(link.out)
                    del link.out[:sent]
                waiting = bool(link.out)
            except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
                waiting = True
            except OSError as exc:
                problem = str(exc) or type(exc).__name__
        if problem is not None:
            self._close(link, problem)
            return
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if waiting else 0)
        with contextlib.suppress(KeyError, ValueError):
            self._sel.modify(link.sock, events, link)
