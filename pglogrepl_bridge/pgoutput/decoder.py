"""Bytes of one pgoutput message → one message object. Pure, no IO.

The only state is whether we are inside a streamed block (between Stream Start and Stream
Stop), because there the xid prefixes Relation, Type, DML, Truncate and Message. Every bad
input raises ``DecodeError`` naming the message type, offset and LSN.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from pglogrepl_bridge.errors import DecodeError
from pglogrepl_bridge.pgoutput.messages import (
    Begin,
    BeginPrepare,
    Column,
    Commit,
    CommitPrepared,
    Delete,
    Insert,
    Message,
    Origin,
    PgOutputMessage,
    Prepare,
    Relation,
    RollbackPrepared,
    StreamAbort,
    StreamCommit,
    StreamPrepare,
    StreamStart,
    StreamStop,
    Truncate,
    TupleData,
    Type,
    Update,
)

_u32 = struct.Struct("!I").unpack_from
_i32 = struct.Struct("!i").unpack_from
_u16 = struct.Struct("!H").unpack_from
_BEGIN = struct.Struct("!QqI")
_COMMIT = struct.Struct("!BQQq")
_STREAM_COMMIT = struct.Struct("!IBQQq")
_PREPARE_HEAD = struct.Struct("!BQQqI")  # flags, lsn, end lsn, timestamp, xid
_BEGIN_PREPARE_HEAD = struct.Struct("!QQqI")
_ROLLBACK_PREPARED_HEAD = struct.Struct("!BQQqqI")
_MESSAGE_HEAD = struct.Struct("!BQ")
_ORIGIN_HEAD = struct.Struct("!Q")
_STREAM_ABORT = struct.Struct("!II")
_STREAM_ABORT_PARALLEL = struct.Struct("!IIQq")
_COLUMN_TAIL = struct.Struct("!Ii")

_NAMES = {
    ord("B"): "Begin",
    ord("M"): "Message",
    ord("C"): "Commit",
    ord("O"): "Origin",
    ord("R"): "Relation",
    ord("Y"): "Type",
    ord("I"): "Insert",
    ord("U"): "Update",
    ord("D"): "Delete",
    ord("T"): "Truncate",
    ord("S"): "Stream Start",
    ord("E"): "Stream Stop",
    ord("c"): "Stream Commit",
    ord("A"): "Stream Abort",
    ord("b"): "Begin Prepare",
    ord("P"): "Prepare",
    ord("K"): "Commit Prepared",
    ord("r"): "Rollback Prepared",
    ord("p"): "Stream Prepare",
}


class _Bad(Exception):
    """Internal: a precise reason and offset, turned into DecodeError at the top."""

    def __init__(self, reason: str, offset: int) -> None:
        self.reason = reason
        self.offset = offset


def _need(buf: bytes, pos: int, n: int) -> None:
    if pos + n > len(buf):
        raise _Bad(f"truncated: needs {n} more bytes, {max(len(buf) - pos, 0)} left", pos)


def _string(buf: bytes, pos: int) -> tuple[str, int]:
    end = buf.find(b"\0", pos)
    if end < 0:
        raise _Bad("string without its terminating NUL byte", pos)
    try:
        return buf[pos:end].decode(), end + 1
    except UnicodeDecodeError:
        raise _Bad("string is not valid UTF-8", pos) from None


def parse_tuple(buf: bytes, pos: int) -> tuple[TupleData, int]:
    """TupleData at ``pos``; returns it and the offset after it. Hot path: keep it lean."""
    end = len(buf)
    if pos + 2 > end:
        raise _Bad("truncated TupleData column count", pos)
    ncols = (buf[pos] << 8) | buf[pos + 1]
    pos += 2
    kinds = bytearray(ncols)
    values: list[bytes | None] = [None] * ncols
    for i in range(ncols):
        if pos >= end:
            raise _Bad(f"truncated TupleData: column {i} of {ncols} missing", pos)
        kind = buf[pos]
        kinds[i] = kind
        if kind == 0x74 or kind == 0x62:  # 't' text, 'b' binary
            if pos + 5 > end:
                raise _Bad(f"truncated length of column {i}", pos + 1)
            (length,) = _i32(buf, pos + 1)
            pos += 5
            stop = pos + length
            if length < 0 or stop > end:
                raise _Bad(f"column {i} declares {length} bytes, {end - pos} left", pos - 4)
            values[i] = buf[pos:stop]
            pos = stop
        elif kind == 0x6E or kind == 0x75:  # 'n' null, 'u' unchanged TOAST
            pos += 1
        else:
            raise _Bad(f"unknown TupleData kind {kind:#04x} in column {i}", pos)
    return TupleData(bytes(kinds), tuple(values)), pos


def read_tuple(buf: bytes, pos: int, what: str = "TupleData") -> tuple[TupleData, int]:
    """``parse_tuple`` for callers outside this module: errors are DecodeError."""
    try:
        return parse_tuple(buf, pos)
    except _Bad as bad:
        raise DecodeError(bad.reason, msg_type=what, offset=bad.offset) from None


class PgOutputDecoder:
    """Decode pgoutput messages one at a time; tracks only the streamed-block state."""

    __slots__ = ("_dispatch", "in_stream")

    def __init__(self) -> None:
        self.in_stream = False
        self._dispatch: dict[int, Callable[[bytes], PgOutputMessage]] = {
            ord("B"): self._begin,
            ord("M"): self._message,
            ord("C"): self._commit,
            ord("O"): self._origin,
            ord("R"): self._relation,
            ord("Y"): self._type,
            ord("I"): self._insert,
            ord("U"): self._update,
            ord("D"): self._delete,
            ord("T"): self._truncate,
            ord("S"): self._stream_start,
            ord("E"): self._stream_stop,
            ord("c"): self._stream_commit,
            ord("A"): self._stream_abort,
            ord("b"): self._begin_prepare,
            ord("P"): self._prepare,
            ord("K"): self._commit_prepared,
            ord("r"): self._rollback_prepared,
            ord("p"): self._stream_prepare,
        }

    def reset(self) -> None:
        """Forget the streamed-block state, as after a reconnect."""
        self.in_stream = False

    def decode(self, buf: bytes, lsn: int | None = None) -> PgOutputMessage:
        """One pgoutput message (the XLogData payload) as its dataclass; ``lsn`` only locates
        errors.
        """
        if not buf:
            raise DecodeError("empty message", msg_type="(empty)", offset=0, lsn=lsn)
        parse = self._dispatch.get(buf[0])
        if parse is None:
            raise DecodeError(
                f"unknown message type byte {buf[0]:#04x}", msg_type="?", offset=0, lsn=lsn
            )
        try:
            return parse(buf)
        except _Bad as bad:
            raise DecodeError(
                bad.reason, msg_type=_NAMES[buf[0]], offset=bad.offset, lsn=lsn
            ) from None
        except (struct.error, IndexError, ValueError) as exc:
            raise DecodeError(
                f"malformed ({exc})", msg_type=_NAMES[buf[0]], offset=len(buf), lsn=lsn
            ) from None

    # Each parser gets the whole message; byte 0 is the type.

    def _xid(self, buf: bytes) -> tuple[int | None, int]:
        if self.in_stream:
            _need(buf, 1, 4)
            return _u32(buf, 1)[0], 5
        return None, 1

    def _begin(self, buf: bytes) -> Begin:
        _need(buf, 1, _BEGIN.size)
        return Begin(*_BEGIN.unpack_from(buf, 1))

    def _message(self, buf: bytes) -> Message:
        xid, pos = self._xid(buf)
        _need(buf, pos, _MESSAGE_HEAD.size)
        flags, lsn = _MESSAGE_HEAD.unpack_from(buf, pos)
        prefix, pos = _string(buf, pos + _MESSAGE_HEAD.size)
        _need(buf, pos, 4)
        (length,) = _u32(buf, pos)
        _need(buf, pos + 4, length)
        return Message(xid, bool(flags & 1), lsn, prefix, buf[pos + 4 : pos + 4 + length])

    def _commit(self, buf: bytes) -> Commit:
        _need(buf, 1, _COMMIT.size)
        return Commit(*_COMMIT.unpack_from(buf, 1))

    def _origin(self, buf: bytes) -> Origin:
        _need(buf, 1, 8)
        (lsn,) = _ORIGIN_HEAD.unpack_from(buf, 1)
        name, _ = _string(buf, 9)
        return Origin(lsn, name)

    def _relation(self, buf: bytes) -> Relation:
        xid, pos = self._xid(buf)
        _need(buf, pos, 4)
        (relid,) = _u32(buf, pos)
        namespace, pos = _string(buf, pos + 4)
        name, pos = _string(buf, pos)
        _need(buf, pos, 3)
        identity = chr(buf[pos])
        (ncols,) = _u16(buf, pos + 1)
        pos += 3
        columns = []
        for _ in range(ncols):
            _need(buf, pos, 1)
            flags = buf[pos]
            colname, pos = _string(buf, pos + 1)
            _need(buf, pos, 8)
            type_oid, typmod = _COLUMN_TAIL.unpack_from(buf, pos)
            pos += 8
            columns.append(Column(colname, type_oid, typmod, bool(flags & 1)))
        return Relation(xid, relid, namespace, name, identity, tuple(columns))

    def _type(self, buf: bytes) -> Type:
        xid, pos = self._xid(buf)
        _need(buf, pos, 4)
        (oid,) = _u32(buf, pos)
        namespace, pos = _string(buf, pos + 4)
        name, _ = _string(buf, pos)
        return Type(xid, oid, namespace, name)

    def _insert(self, buf: bytes) -> Insert:
        xid, pos = self._xid(buf)
        _need(buf, pos, 5)
        (relid,) = _u32(buf, pos)
        if buf[pos + 4] != 0x4E:  # 'N'
            raise _Bad(f"expected 'N' before the new tuple, got {buf[pos + 4]:#04x}", pos + 4)
        new, _ = parse_tuple(buf, pos + 5)
        return Insert(xid, relid, new)

    def _update(self, buf: bytes) -> Update:
        xid, pos = self._xid(buf)
        _need(buf, pos, 5)
        (relid,) = _u32(buf, pos)
        pos += 4
        marker = buf[pos]
        old = None
        old_kind: str | None = None
        if marker == 0x4B or marker == 0x4F:  # 'K' or 'O'
            old_kind = chr(marker)
            old, pos = parse_tuple(buf, pos + 1)
            _need(buf, pos, 1)
            marker = buf[pos]
        if marker != 0x4E:
            raise _Bad(f"expected 'K', 'O' or 'N' in Update, got {marker:#04x}", pos)
        new, _ = parse_tuple(buf, pos + 1)
        return Update(xid, relid, old_kind, old, new)  # type: ignore[arg-type]

    def _delete(self, buf: bytes) -> Delete:
        xid, pos = self._xid(buf)
        _need(buf, pos, 5)
        (relid,) = _u32(buf, pos)
        marker = buf[pos + 4]
        if marker != 0x4B and marker != 0x4F:
            raise _Bad(f"expected 'K' or 'O' in Delete, got {marker:#04x}", pos + 4)
        old, _ = parse_tuple(buf, pos + 5)
        return Delete(xid, relid, "K" if marker == 0x4B else "O", old)

    def _truncate(self, buf: bytes) -> Truncate:
        xid, pos = self._xid(buf)
        _need(buf, pos, 5)
        (count,) = _u32(buf, pos)
        options = buf[pos + 4]
        pos += 5
        _need(buf, pos, 4 * count)
        relids = struct.unpack_from(f"!{count}I", buf, pos)
        return Truncate(xid, options, relids)

    def _stream_start(self, buf: bytes) -> StreamStart:
        _need(buf, 1, 5)
        self.in_stream = True
        return StreamStart(_u32(buf, 1)[0], buf[5] == 1)

    def _stream_stop(self, buf: bytes) -> StreamStop:
        self.in_stream = False
        return StreamStop()

    def _stream_commit(self, buf: bytes) -> StreamCommit:
        _need(buf, 1, _STREAM_COMMIT.size)
        return StreamCommit(*_STREAM_COMMIT.unpack_from(buf, 1))

    def _stream_abort(self, buf: bytes) -> StreamAbort:
        if len(buf) >= 1 + _STREAM_ABORT_PARALLEL.size:
            return StreamAbort(*_STREAM_ABORT_PARALLEL.unpack_from(buf, 1))
        _need(buf, 1, _STREAM_ABORT.size)
        return StreamAbort(*_STREAM_ABORT.unpack_from(buf, 1))

    def _begin_prepare(self, buf: bytes) -> BeginPrepare:
        _need(buf, 1, _BEGIN_PREPARE_HEAD.size)
        lsn, end, ts, xid = _BEGIN_PREPARE_HEAD.unpack_from(buf, 1)
        gid, _ = _string(buf, 1 + _BEGIN_PREPARE_HEAD.size)
        return BeginPrepare(lsn, end, ts, xid, gid)

    def _prepare_like(self, buf: bytes) -> tuple[tuple[int, int, int, int, int], str]:
        _need(buf, 1, _PREPARE_HEAD.size)
        head = _PREPARE_HEAD.unpack_from(buf, 1)
        gid, _ = _string(buf, 1 + _PREPARE_HEAD.size)
        return head, gid

    def _prepare(self, buf: bytes) -> Prepare:
        head, gid = self._prepare_like(buf)
        return Prepare(*head, gid)

    def _commit_prepared(self, buf: bytes) -> CommitPrepared:
        head, gid = self._prepare_like(buf)
        return CommitPrepared(*head, gid)

    def _stream_prepare(self, buf: bytes) -> StreamPrepare:
        head, gid = self._prepare_like(buf)
        return StreamPrepare(*head, gid)

    def _rollback_prepared(self, buf: bytes) -> RollbackPrepared:
        _need(buf, 1, _ROLLBACK_PREPARED_HEAD.size)
        flags, prep_end, end, prep_ts, ts, xid = _ROLLBACK_PREPARED_HEAD.unpack_from(buf, 1)
        gid, _ = _string(buf, 1 + _ROLLBACK_PREPARED_HEAD.size)
        return RollbackPrepared(flags, prep_end, end, prep_ts, ts, xid, gid)
