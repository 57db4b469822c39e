"""One exception tree, so callers can catch everything this package raises with one clause.

Every message names the problem and what to do about it; none ever contains a password.
"""

from __future__ import annotations


class BridgeError(Exception):
    """Root of every error raised by pglogrepl_bridge."""


class ConfigError(BridgeError):
    """The user asked for something that cannot work (bad option, bad DSN, unsupported feature)."""


class ServerUnavailableError(BridgeError):
    """No PostgreSQL server could be started or reached."""


class DecodeError(BridgeError):
    """Bytes from the walsender could not be decoded.

    Carries the message type, the byte offset inside the message and the WAL position, so the
    offending message can be found again with pg_waldump or a capture.
    """

    def __init__(
        self, reason: str, *, msg_type: str = "?", offset: int = 0, lsn: int | None = None
    ) -> None:
        self.reason = reason
        self.msg_type = msg_type
        self.offset = offset
        self.lsn = lsn
        where = f"{msg_type!s} message at byte {offset}"
        if lsn is not None:
            where += f", WAL position {lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"
        super().__init__(
            f"cannot decode pgoutput {where}: {reason}. "
            "The stream is corrupt or from an unsupported protocol version; "
            "report it with the capture if it persists."
        )


class ProtocolError(BridgeError):
    """Bytes of the downstream ReplicationMessage protocol are malformed."""


class ReplicationError(BridgeError):
    """The replication stream failed (slot, publication, permissions, server settings)."""


class SlotInUseError(ReplicationError):
    """The slot is held by another walsender (SQLSTATE 55006): one consumer per slot."""


class SinkError(BridgeError):
    """A downstream store refused or lost a write; what was not committed is not confirmed."""


class TargetUnavailableError(SinkError):
    """The downstream store went away (restart, network): worth retrying the same batch."""
