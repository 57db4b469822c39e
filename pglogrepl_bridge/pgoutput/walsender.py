"""The walsender's CopyData framing: XLogData, Primary keepalive, Standby status update.

Pure functions over bytes, as in the "Streaming Replication Protocol" page of the PostgreSQL
docs. Times on this wire are microseconds since 2000-01-01 UTC; the caller passes them in.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from pglogrepl_bridge.errors import DecodeError

#: Seconds between the Unix epoch and PostgreSQL's epoch (2000-01-01).
PG_EPOCH_OFFSET_S = 946_684_800
PG_EPOCH_OFFSET_US = PG_EPOCH_OFFSET_S * 1_000_000
_PG_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)

_XLOGDATA = struct.Struct("!QQq")  # dataStart, walEnd, sendTime
#: Bytes before an XLogData's payload: the 'w' tag and _XLOGDATA (_fastrow.c's XLOG_HEADER too)
XLOGDATA_HEADER = 1 + _XLOGDATA.size
_KEEPALIVE = struct.Struct("!Qq?")  # walEnd, sendTime, replyRequested
_STATUS = struct.Struct("!cQQQq?")  # 'r', write, flush, apply, clock, replyRequested


@dataclass(frozen=True, slots=True)
class XLogData:
    """WAL data: ``payload`` is one pgoutput message starting at ``data_start``."""

    data_start: int
    wal_end: int
    send_time: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class PrimaryKeepalive:
    """The server's heartbeat; ``reply_requested`` asks for a status update at once."""

    wal_end: int
    send_time: int
    reply_requested: bool


@dataclass(frozen=True, slots=True)
class StandbyStatusUpdate:
    """Our feedback: how far WAL was received (write), made durable (flush) and applied."""

    write_lsn: int
    flush_lsn: int
    apply_lsn: int
    clock: int
    reply_requested: bool = False

    def to_bytes(self) -> bytes:
        """The CopyData message to send ('r')."""
        return _STATUS.pack(
            b"r", self.write_lsn, self.flush_lsn, self.apply_lsn, self.clock, self.reply_requested
        )


def parse_copy_data(buf: bytes | memoryview) -> XLogData | PrimaryKeepalive:
    """Parse one CopyData message of a START_REPLICATION stream."""
    if not buf:
        raise DecodeError("empty CopyData message", msg_type="CopyData")
    tag = buf[0]
    if tag == 0x77:  # 'w'
        if len(buf) < XLOGDATA_HEADER:
            raise DecodeError(
                f"XLogData header needs {XLOGDATA_HEADER} bytes, got {len(buf)}",
                msg_type="XLogData",
                offset=1,
            )
        start, end, sent = _XLOGDATA.unpack_from(buf, 1)
        return XLogData(start, end, sent, bytes(buf[XLOGDATA_HEADER:]))
    if tag == 0x6B:  # 'k'
        if len(buf) != 18:
            raise DecodeError(
                f"keepalive must be 18 bytes, got {len(buf)}", msg_type="Keepalive", offset=1
            )
        end, sent, reply = _KEEPALIVE.unpack_from(buf, 1)
        return PrimaryKeepalive(end, sent, reply)
    raise DecodeError(f"unknown CopyData tag {tag:#04x}", msg_type="CopyData")


def pg_time_to_datetime(pg_us: int) -> datetime:
    """A PostgreSQL timestamp (µs since 2000-01-01 UTC) as an aware datetime."""
    return _PG_EPOCH + timedelta(microseconds=pg_us)


def pg_time_to_unix_us(pg_us: int) -> int:
    """A PostgreSQL timestamp (µs since 2000-01-01) as µs since the Unix epoch."""
    return pg_us + PG_EPOCH_OFFSET_US


def unix_us_to_pg_time(unix_us: int) -> int:
    """µs since the Unix epoch as a PostgreSQL timestamp (µs since 2000-01-01)."""
    return unix_us - PG_EPOCH_OFFSET_US
