"""``status --peer``: ask the members of a bridge group what they see.

An observer connects to a member's ``--listen`` and says ``Heartbeat{node_id: 0}``; the
member (``bridge.group``) answers with its own hello (``Heartbeat{its id, last lsn}``),
``Promotion{master, term}`` as it knows them (master 0: none known) and, when it is the
master, ``Acknowledge{replica, lsn}`` for each replica's acknowledged position. Nothing an
observer says moves an election.
"""

from __future__ import annotations

import socket
import ssl
import time
from dataclasses import dataclass, field

from pglogrepl_bridge.bridge.group import OBSERVER
from pglogrepl_bridge.errors import ProtocolError
from pglogrepl_bridge.wire.protocol import (
    Acknowledge,
    FrameReader,
    Heartbeat,
    Promotion,
    frame,
)

Address = tuple[str, int]


@dataclass
class MemberView:
    """What one member answered (``error``: why it did not)."""

    address: Address
    node_id: int | None = None
    last_lsn: int = 0
    master: int | None = None
    term: int = 0
    replicas: dict[int, int] = field(default_factory=dict)
    error: str | None = None

    @property
    def is_master(self) -> bool:
        """Whether this member says it leads."""
        return self.node_id is not None and self.master == self.node_id


def ask(address: Address, *, tls: ssl.SSLContext | None = None, wait: float = 0.5) -> MemberView:
    """One member's view; the answers that came within ``wait`` seconds."""
    view = MemberView(address)
    try:
        sock = socket.create_connection(address, timeout=2)
        if tls is not None:
            sock = tls.wrap_socket(sock, server_hostname=address[0])
    except (OSError, ssl.SSLError) as exc:
        view.error = str(exc) or type(exc).__name__
        return view
    reader = FrameReader()
    try:
        sock.sendall(frame(Heartbeat(OBSERVER, 0)))
        deadline = time.monotonic() + wait
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            try:
                data = sock.recv(65536)
            except (TimeoutError, ssl.SSLWantReadError):
                break
            if not data:
                break
            for msg in reader.feed(data):
                if isinstance(msg, Heartbeat) and view.node_id is None:
                    view.node_id, view.last_lsn = msg.node_id, msg.lsn
                elif isinstance(msg, Promotion):
                    view.master = msg.node_id or None
                    view.term = msg.term
                elif isinstance(msg, Acknowledge):
                    view.replicas[msg.node_id] = msg.lsn
    except (OSError, ProtocolError) as exc:
        view.error = str(exc) or type(exc).__name__
    finally:
        sock.close()
    if view.node_id is None and view.error is None:
        view.error = "no answer (not a group member's --listen?)"
    return view
