"""Consume PostgreSQL logical replication (pgoutput) and bridge it downstream.

What a program needs is importable from here::

    from pglogrepl_bridge import ReplicationStream, StreamOptions

    with ReplicationStream(dsn, StreamOptions(slot="s", publications=("p",))) as stream:
        for txn in stream:
            ...
            stream.ack(txn.end_lsn)

The layers, each a sub-package with its rule in its ``__init__``: ``pgoutput`` (the sans-IO
core: ``ReplicationSession``), ``postgres`` (psycopg IO: the sync and async streams),
``render`` (JSON Lines, terminal), ``wire`` (the downstream ReplicationMessage protocol),
``bridge`` (replicas over TCP), ``sinks`` (SQL stores), ``cli`` (typer, nothing else) and
``testing`` (throwaway servers).
"""

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pglogrepl_bridge.errors import (
        BridgeError,
        ConfigError,
        DecodeError,
        ProtocolError,
        ReplicationError,
        ServerUnavailableError,
        SinkError,
        SlotInUseError,
        TargetUnavailableError,
    )
    from pglogrepl_bridge.lsn import Lsn
    from pglogrepl_bridge.pgoutput.messages import Message
    from pglogrepl_bridge.pgoutput.session import ReplicationSession
    from pglogrepl_bridge.pgoutput.transaction import (
        Change,
        Event,
        PreparedOutcome,
        PreparedTransaction,
        RowChange,
        Transaction,
        TruncateChange,
    )
    from pglogrepl_bridge.pgoutput.values import ValueProblem
    from pglogrepl_bridge.postgres.aio import AsyncReplicationStream
    from pglogrepl_bridge.postgres.options import StreamOptions
    from pglogrepl_bridge.postgres.stream import ReplicationStream
    from pglogrepl_bridge.wire.protocol import (
        Acknowledge,
        FrameReader,
        Heartbeat,
        Promotion,
        ReplicationMessage,
        RequestFrom,
        VoteRequest,
        VoteResponse,
        WalEntry,
        frame,
        from_bincode,
        from_json,
        to_bincode,
        to_json,
    )

# Loaded on first use: every command imports this package first, and start-up time counts in
# every short run (the CLI imports only what its command needs).
_LAZY = {
    "Acknowledge": "pglogrepl_bridge.wire.protocol",
    "AsyncReplicationStream": "pglogrepl_bridge.postgres.aio",
    "BridgeError": "pglogrepl_bridge.errors",
    "Change": "pglogrepl_bridge.pgoutput.transaction",
    "ConfigError": "pglogrepl_bridge.errors",
    "DecodeError": "pglogrepl_bridge.errors",
    "Event": "pglogrepl_bridge.pgoutput.transaction",
    "FrameReader": "pglogrepl_bridge.wire.protocol",
    "Heartbeat": "pglogrepl_bridge.wire.protocol",
    "Lsn": "pglogrepl_bridge.lsn",
    "Message": "pglogrepl_bridge.pgoutput.messages",
    "PreparedOutcome": "pglogrepl_bridge.pgoutput.transaction",
    "PreparedTransaction": "pglogrepl_bridge.pgoutput.transaction",
    "Promotion": "pglogrepl_bridge.wire.protocol",
    "ProtocolError": "pglogrepl_bridge.errors",
    "ReplicationError": "pglogrepl_bridge.errors",
    "ReplicationMessage": "pglogrepl_bridge.wire.protocol",
    "ReplicationSession": "pglogrepl_bridge.pgoutput.session",
    "ReplicationStream": "pglogrepl_bridge.postgres.stream",
    "RequestFrom": "pglogrepl_bridge.wire.protocol",
    "RowChange": "pglogrepl_bridge.pgoutput.transaction",
    "ServerUnavailableError": "pglogrepl_bridge.errors",
    "SinkError": "pglogrepl_bridge.errors",
    "SlotInUseError": "pglogrepl_bridge.errors",
    "TargetUnavailableError": "pglogrepl_bridge.errors",
    "StreamOptions": "pglogrepl_bridge.postgres.options",
    "Transaction": "pglogrepl_bridge.pgoutput.transaction",
    "TruncateChange": "pglogrepl_bridge.pgoutput.transaction",
    "ValueProblem": "pglogrepl_bridge.pgoutput.values",
    "VoteRequest": "pglogrepl_bridge.wire.protocol",
    "VoteResponse": "pglogrepl_bridge.wire.protocol",
    "WalEntry": "pglogrepl_bridge.wire.protocol",
    "frame": "pglogrepl_bridge.wire.protocol",
    "from_bincode": "pglogrepl_bridge.wire.protocol",
    "from_json": "pglogrepl_bridge.wire.protocol",
    "to_bincode": "pglogrepl_bridge.wire.protocol",
    "to_json": "pglogrepl_bridge.wire.protocol",
}


def __getattr__(name: str) -> Any:
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("pglogrepl_bridge")
        except PackageNotFoundError:  # pragma: no cover - a tree that was never installed
            return "0+unknown"
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "Acknowledge",
    "AsyncReplicationStream",
    "BridgeError",
    "Change",
    "ConfigError",
    "DecodeError",
    "Event",
    "FrameReader",
    "Heartbeat",
    "Lsn",
    "Message",
    "PreparedOutcome",
    "PreparedTransaction",
    "Promotion",
    "ProtocolError",
    "ReplicationError",
    "ReplicationMessage",
    "ReplicationSession",
    "ReplicationStream",
    "RequestFrom",
    "RowChange",
    "ServerUnavailableError",
    "SinkError",
    "SlotInUseError",
    "StreamOptions",
    "TargetUnavailableError",
    "Transaction",
    "TruncateChange",
    "ValueProblem",
    "VoteRequest",
    "VoteResponse",
    "WalEntry",
    "__version__",
    "frame",
    "from_bincode",
    "from_json",
    "to_bincode",
    "to_json",
]
