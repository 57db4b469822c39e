"""Builders: message objects → the bytes pgoutput would send, for (bytes, expected) pairs.

Written from the "Logical Replication Message Formats" page, independently of the decoder, so
a round trip checks one reading of the docs against the other.
"""

from __future__ import annotations

import struct

from pglogrepl_bridge.pgoutput.messages import (
    Begin,
    BeginPrepare,
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


def _s(text: str) -> bytes:
    return text.encode() + b"\0"


def _xid(xid: int | None) -> bytes:
    return b"" if xid is None else struct.pack("!I", xid)


def tuple_bytes(tup: TupleData) -> bytes:
    out = [struct.pack("!H", len(tup.kinds))]
    for kind, value in zip(tup.kinds, tup.values, strict=True):
        out.append(bytes([kind]))
        if kind in b"tb":
            assert value is not None
            out.append(struct.pack("!i", len(value)) + value)
    return b"".join(out)


def encode(msg: PgOutputMessage) -> bytes:
    if isinstance(msg, Begin):
        return b"B" + struct.pack("!QqI", msg.final_lsn, msg.commit_timestamp, msg.xid)
    if isinstance(msg, Message):
        return (
            b"M"
            + _xid(msg.xid)
            + struct.pack("!BQ", int(msg.transactional), msg.lsn)
            + _s(msg.prefix)
            + struct.pack("!I", len(msg.content))
            + msg.content
        )
    if isinstance(msg, Commit):
        return b"C" + struct.pack(
            "!BQQq", msg.flags, msg.commit_lsn, msg.end_lsn, msg.commit_timestamp
        )
    if isinstance(msg, Origin):
        return b"O" + struct.pack("!Q", msg.commit_lsn) + _s(msg.name)
    if isinstance(msg, Relation):
        cols = b"".join(
            bytes([int(c.is_key)]) + _s(c.name) + struct.pack("!Ii", c.type_oid, c.type_modifier)
            for c in msg.columns
        )
        return (
            b"R"
            + _xid(msg.xid)
            + struct.pack("!I", msg.relid)
            + _s(msg.namespace)
            + _s(msg.name)
            + msg.replica_identity.encode()
            + struct.pack("!H", len(msg.columns))
            + cols
        )
    if isinstance(msg, Type):
        return b"Y" + _xid(msg.xid) + struct.pack("!I", msg.oid) + _s(msg.namespace) + _s(msg.name)
    if isinstance(msg, Insert):
        return b"I" + _xid(msg.xid) + struct.pack("!I", msg.relid) + b"N" + tuple_bytes(msg.new)
    if isinstance(msg, Update):
        old = b""
        if msg.old_kind is not None:
            assert msg.old is not None
            old = msg.old_kind.encode() + tuple_bytes(msg.old)
        return (
            b"U" + _xid(msg.xid) + struct.pack("!I", msg.relid) + old + b"N" + tuple_bytes(msg.new)
        )
    if isinstance(msg, Delete):
        return (
            b"D"
            + _xid(msg.xid)
            + struct.pack("!I", msg.relid)
            + msg.old_kind.encode()
            + tuple_bytes(msg.old)
        )
    if isinstance(msg, Truncate):
        return (
            b"T"
            + _xid(msg.xid)
            + struct.pack(f"!IB{len(msg.relids)}I", len(msg.relids), msg.options, *msg.relids)
        )
    if isinstance(msg, StreamStart):
        return b"S" + struct.pack("!IB", msg.xid, int(msg.first_segment))
    if isinstance(msg, StreamStop):
        return b"E"
    if isinstance(msg, StreamCommit):
        return b"c" + struct.pack(
            "!IBQQq", msg.xid, msg.flags, msg.commit_lsn, msg.end_lsn, msg.commit_timestamp
        )
    if isinstance(msg, StreamAbort):
        if msg.abort_lsn is None:
            return b"A" + struct.pack("!II", msg.xid, msg.subxid)
        assert msg.abort_timestamp is not None
        return b"A" + struct.pack("!IIQq", msg.xid, msg.subxid, msg.abort_lsn, msg.abort_timestamp)
    if isinstance(msg, BeginPrepare):
        return (
            b"b"
            + struct.pack("!QQqI", msg.prepare_lsn, msg.end_lsn, msg.prepare_timestamp, msg.xid)
            + _s(msg.gid)
        )
    if isinstance(msg, Prepare | StreamPrepare):
        tag = b"P" if isinstance(msg, Prepare) else b"p"
        return (
            tag
            + struct.pack(
                "!BQQqI", msg.flags, msg.prepare_lsn, msg.end_lsn, msg.prepare_timestamp, msg.xid
            )
            + _s(msg.gid)
        )
    if isinstance(msg, CommitPrepared):
        return (
            b"K"
            + struct.pack(
                "!BQQqI", msg.flags, msg.commit_lsn, msg.end_lsn, msg.commit_timestamp, msg.xid
            )
            + _s(msg.gid)
        )
    if isinstance(msg, RollbackPrepared):
        return (
            b"r"
            + struct.pack(
                "!BQQqqI",
                msg.flags,
                msg.prepare_end_lsn,
                msg.rollback_end_lsn,
                msg.prepare_timestamp,
                msg.rollback_timestamp,
                msg.xid,
            )
            + _s(msg.gid)
        )
    raise TypeError(msg)
