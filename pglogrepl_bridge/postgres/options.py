"""``StreamOptions``: what to stream and how, shared by the sync and the async stream."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pglogrepl_bridge.pgoutput.streambuffer import DEFAULT_SPILL_BYTES
from pglogrepl_bridge.pgoutput.values import ValueMode

#: Highest pgoutput protocol version per server major version (18 still refuses 5).
_PROTO_BY_MAJOR = {14: 2, 15: 3}


def max_proto_version(major: int) -> int:
    """The highest pgoutput ``proto_version`` a server of this major version accepts."""
    if major >= 16:
        return 4
    return _PROTO_BY_MAJOR.get(major, 1)


@dataclass(frozen=True)
class StreamOptions:
    """What to stream and how.

    The START_REPLICATION options (``proto_version`` … ``origin``) default to the most the
    server supports. ``start_lsn`` is the consumer's durable position, if it has one (e.g. a
    sink's checkpoint): transactions ending at or before it are not delivered. ``until_lsn``
    stops the stream once everything up to it is acknowledged.
    """

    slot: str
    publications: tuple[str, ...]
    proto_version: int | None = None  # None: the highest the server supports
    binary: bool = False
    messages: bool = False
    streaming: bool | Literal["parallel"] | None = None  # None: on when the protocol allows
    two_phase: bool = False
    origin: Literal["any", "none"] | None = None
    start_lsn: int | None = None
    #: stop once everything up to here is acknowledged (the slot's position already counts)
    until_lsn: int | None = None
    create_slot: bool = False
    temporary: bool = False
    no_ack: bool = False
    values: ValueMode = "typed"
    type_map: dict[str, str] = field(default_factory=dict)
    #: a streamed transaction larger than this is kept in a temporary file (16 MiB)
    spill_bytes: int = DEFAULT_SPILL_BYTES
    surface_prepares: bool = False
    status_interval: float = 10.0
    #: retry a dropped stream with backoff (a first connection is not retried: see below)
    reconnect: bool = True
    max_backoff: float = 30.0
    #: keep trying a first connection that fails for this many seconds (0: fail at once)
    wait_for_server: float = 0.0
    #: extra GUCs for the walsender session, e.g. {"logical_decoding_work_mem": "64kB"}
    session_settings: dict[str, str] = field(default_factory=dict)
    #: SO_RCVBUF of the replication socket: None fixes a small one for a server on this
    #: host (see connection.limit_receive_buffer), 0 keeps the kernel's autotuning
    recv_buffer: int | None = None
