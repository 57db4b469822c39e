"""pgoutput messages → whole transactions. Pure: bytes and LSNs in, events out.

Like h11, the caller feeds what arrived and gets back what is complete::

    asm = TransactionAssembler()
    for lsn, payload in messages:
        event = asm.feed(payload, lsn)
        if event is not None:
            ...

Streamed transactions (protocol 2+) are buffered per top-level xid until Stream Commit and
spill to a temporary file past ``spill_bytes``. Two-phase transactions are held from PREPARE
until COMMIT PREPARED, or surfaced as ``PreparedTransaction`` when ``surface_prepares``.
"""

from __future__ import annotations

import itertools
import logging
import struct
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, overload

from pglogrepl_bridge.errors import DecodeError
from pglogrepl_bridge.lsn import Lsn
from pglogrepl_bridge.pgoutput import _accel as accel
from pglogrepl_bridge.pgoutput.decoder import PgOutputDecoder, parse_tuple
from pglogrepl_bridge.pgoutput.messages import (
    Begin,
    BeginPrepare,
    Commit,
    CommitPrepared,
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
    Type,
)
from pglogrepl_bridge.pgoutput.relcache import RelationCache
from pglogrepl_bridge.pgoutput.streambuffer import DEFAULT_SPILL_BYTES, StreamBuffer
from pglogrepl_bridge.pgoutput.transaction import (
    Change,
    Event,
    PreparedOutcome,
    PreparedTransaction,
    RowChange,
    Transaction,
    TruncateChange,
)

log = logging.getLogger(__name__)

_u32 = struct.Struct("!I").unpack_from
# Messages that carry the subtransaction xid at bytes 1..4 inside a streamed block.
_STREAMED_KINDS = frozenset(b"RYIUDTM")
_ROW_TAGS = frozenset(b"IUD")
_OLD: dict[int, Literal["K", "O"]] = {0x4B: "K", 0x4F: "O"}
# With the C accelerator, the row change of a message in one call (None: see _row)
_make_row = accel.row_change_maker(RowChange)


class SpilledChanges(Sequence[Change]):
    """The changes of a streamed transaction that spilled to disk, read as they are iterated.

    Memory stays bounded however large the transaction; each iteration reads the file again.
    Indexing walks to the position. The file goes when this object does.
    """

    def __init__(
        self, assembler: TransactionAssembler, buf: StreamBuffer, rels: RelationCache
    ) -> None:
        self._assembler = assembler
        self._buf = buf
        self._rels = rels
        self._len = buf.changes
        weakref.finalize(self, buf.close)

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[Change]:
        return self._assembler._decode_streamed(self._buf, self._rels.copy())

    @overload
    def __getitem__(self, index: int) -> Change: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[Change]: ...
    def __getitem__(self, index: int | slice) -> Change | Sequence[Change]:
        if isinstance(index, slice):
            return list(self)[index]
        if index < 0:
            index += self._len
        if not 0 <= index < self._len:
            raise IndexError(index)
        return next(itertools.islice(iter(self), index, None))

    def __repr__(self) -> str:
        return f"<{self._len} changes spilled to disk>"


@dataclass(slots=True)
class _Open:
    xid: int
    begin_lsn: int = 0
    origin: str | None = None
    changes: list[Change] = field(default_factory=list)


@dataclass(slots=True)
class _Held:
    xid: int
    origin: str | None
    changes: Sequence[Change]
    since: int  # where its first message arrived: confirming past it would lose it


class TransactionAssembler:
    """Turns pgoutput messages into whole transactions (see the module doc): plain, streamed
    (buffered, spilled past ``spill_bytes``) and two-phase (held until COMMIT PREPARED, or
    surfaced).
    """

    def __init__(
        self,
        relations: RelationCache | None = None,
        *,
        spill_bytes: int = DEFAULT_SPILL_BYTES,
        surface_prepares: bool = False,
    ) -> None:
        self.relations = relations if relations is not None else RelationCache()
        self.spill_bytes = spill_bytes
        self.surface_prepares = surface_prepares
        self._decoder = PgOutputDecoder()
        self._open: _Open | None = None
        self._streams: dict[int, StreamBuffer] = {}
        self._stream_xid: int | None = None
        # a streamed transaction's Origin arrives in its first block: kept until its commit
        self._stream_origins: dict[int, str] = {}
        self._held: dict[str, _Held] = {}
        # lsn of the first message of each unfinished transaction: feedback must stay below
        self._pending_since: dict[object, int] = {}
        self._handlers: dict[type, Callable[[Any, int], Event | None]] = {
            Begin: self._on_begin,
            BeginPrepare: self._on_begin,
            Commit: self._commit,
            Origin: self._on_origin,
            Relation: self._on_other,
            Type: self._on_other,
            Truncate: self._on_other,
            Message: self._on_other,
            StreamStart: self._on_stream_start,
            StreamStop: self._on_stream_stop,
            StreamCommit: self._on_stream_commit,
            StreamAbort: self._stream_abort,
            Prepare: self._on_prepare,
            StreamPrepare: self._on_stream_prepare,
            CommitPrepared: self._commit_prepared,
            RollbackPrepared: self._rollback_prepared,
        }

    @property
    def open_changes(self) -> list[Change] | None:
        """Where ``ReplicationSession``'s C shortcut may append a row change now: the open
        transaction's list. None inside a stream or between transactions, where every
        message goes through ``feed``."""
        if self._open is None or self._stream_xid is not None:
            return None
        return self._open.changes

    @property
    def in_transaction(self) -> bool:
        """Whether some transaction is partly received (open, streamed or prepared)."""
        return self._open is not None or bool(self._streams) or bool(self._held)

    @property
    def held_since(self) -> int | None:
        """Where the oldest held prepared transaction began. PostgreSQL sends a PREPARE once:
        the confirmed position must stay below it until COMMIT/ROLLBACK PREPARED."""
        return min((h.since for h in self._held.values()), default=None)

    @property
    def oldest_pending_lsn(self) -> int | None:
        """Where the oldest unfinished (open, streamed or prepared) transaction began."""
        return min(self._pending_since.values(), default=None)

    def reset(self) -> None:
        """Forget partial transactions, as after a reconnect: the server resends them."""
        for buf in self._streams.values():
            buf.close()
        self._streams.clear()
        self._stream_origins.clear()
        self._open = None
        self._stream_xid = None
        self._decoder.reset()
        self._held.clear()
        self._pending_since.clear()

    def feed(self, payload: bytes, lsn: int = 0) -> Event | None:
        """Take one pgoutput message (an XLogData payload and its dataStart)."""
        if not payload:
            raise DecodeError("empty message", msg_type="(empty)", lsn=lsn)
        tag = payload[0]
        if (
            self._stream_xid is not None
            and tag in _STREAMED_KINDS
            # a non-transactional Message is delivered at once, even inside a stream
            and (tag != 0x4D or len(payload) < 6 or payload[5] & 1)
        ):
            if len(payload) < 5:
                raise DecodeError("truncated xid", msg_type="streamed", offset=1, lsn=lsn)
            self._streams[self._stream_xid].append(_u32(payload, 1)[0], lsn, payload)
            return None
        if tag in _ROW_TAGS:  # the hot path: no message object, values stay bytes
            txn = self._open
            if txn is None:
                raise DecodeError("row change outside a transaction", msg_type="DML", lsn=lsn)
            txn.changes.append(self._row(payload, 1, lsn, self._decoder))
            return None
        msg = self._decoder.decode(payload, lsn)
        return self._handlers[type(msg)](msg, lsn)

    def _row(
        self,
        payload: bytes,
        pos: int,
        lsn: int,
        decoder: PgOutputDecoder,
        rels: RelationCache | None = None,
    ) -> RowChange:
        """Insert, Update or Delete as a RowChange over the message bytes."""
        rels = rels if rels is not None else self.relations  # an empty cache is falsy
        if _make_row is not None and (change := _make_row(rels.by_id, payload, pos)) is not None:
            return change  # the C row maker; None leaves the message to the code below
        tag = payload[0]
        try:
            rel = rels.get(_u32(payload, pos)[0])
            marker = payload[pos + 4]
            at = pos + 5
            if tag == 0x49 and marker == 0x4E:  # Insert 'N'
                return RowChange("insert", rel, payload, at, -1, None)
            if tag == 0x55:  # Update
                if marker == 0x4E:
                    return RowChange("update", rel, payload, at, -1, None)
                if marker == 0x4B or marker == 0x4F:
                    _, new_at = parse_tuple(payload, at)
                    if payload[new_at] == 0x4E:
                        return RowChange("update", rel, payload, new_at + 1, at, _OLD[marker])
            elif tag == 0x44 and (marker == 0x4B or marker == 0x4F):  # Delete
                return RowChange("delete", rel, payload, -1, at, _OLD[marker])
        except DecodeError:
            raise
        except Exception:
            pass
        # Malformed: let the full decoder say exactly where.
        decoder.decode(payload, lsn)
        raise DecodeError("malformed row change", msg_type=chr(tag), lsn=lsn)

    def _on_other(self, msg: PgOutputMessage, lsn: int) -> Event | None:
        return self._change(msg, self._open, lsn)

    def _on_begin(self, msg: Begin | BeginPrepare, lsn: int) -> None:
        self._begin(msg.xid, lsn)

    def _on_origin(self, msg: Origin, lsn: int) -> None:
        if self._stream_xid is not None:
            self._stream_origins[self._stream_xid] = msg.name
        elif self._open is not None:
            self._open.origin = msg.name

    def _on_stream_start(self, msg: StreamStart, lsn: int) -> None:
        self._stream_xid = msg.xid
        if msg.xid not in self._streams:
            self._streams[msg.xid] = StreamBuffer(self.spill_bytes)
            self._pending_since[("stream", msg.xid)] = lsn

    def _on_stream_stop(self, msg: StreamStop, lsn: int) -> None:
        self._stream_xid = None

    def _on_stream_commit(self, msg: StreamCommit, lsn: int) -> Transaction:
        changes = self._replay(msg.xid, lsn)
        origin = self._stream_origins.pop(msg.xid, None)
        return Transaction(
            msg.xid, Lsn(msg.commit_lsn), Lsn(msg.end_lsn), msg.commit_timestamp, origin, changes
        )

    def _on_prepare(self, msg: Prepare, lsn: int) -> PreparedTransaction | None:
        txn = self._take_open("Prepare", lsn)
        return self._prepared(msg, txn.xid, txn.origin, tuple(txn.changes), txn.begin_lsn)

    def _on_stream_prepare(self, msg: StreamPrepare, lsn: int) -> PreparedTransaction | None:
        since = self._pending_since.get(("stream", msg.xid), lsn)
        origin = self._stream_origins.pop(msg.xid, None)
        return self._prepared(msg, msg.xid, origin, self._replay(msg.xid, lsn), since)

    def _begin(self, xid: int, lsn: int) -> None:
        if self._open is not None:
            raise DecodeError(
                f"Begin of xid {xid} while xid {self._open.xid} is still open",
                msg_type="Begin",
                lsn=lsn,
            )
        self._open = _Open(xid, lsn)
        self._pending_since["open"] = lsn

    def _take_open(self, what: str, lsn: int) -> _Open:
        txn = self._open
        if txn is None:
            raise DecodeError(f"{what} without a Begin", msg_type=what, lsn=lsn)
        self._open = None
        del self._pending_since["open"]
        return txn

    def _commit(self, msg: Commit, lsn: int) -> Transaction:
        txn = self._take_open("Commit", lsn)
        return Transaction(
            txn.xid,
            Lsn(msg.commit_lsn),
            Lsn(msg.end_lsn),
            msg.commit_timestamp,
            txn.origin,
            tuple(txn.changes),
        )

    def _change(
        self,
        msg: PgOutputMessage,
        txn: _Open | None,
        lsn: int,
        rels: RelationCache | None = None,
    ) -> Event | None:
        rels = rels if rels is not None else self.relations  # an empty cache is falsy
        change: Change
        if isinstance(msg, Relation):
            rels.add_relation(msg)
            return None
        elif isinstance(msg, Type):
            rels.add_type(msg)
            return None
        elif isinstance(msg, Truncate):
            change = TruncateChange(
                tuple(rels.get(r) for r in msg.relids), msg.cascade, msg.restart_identity
            )
        elif isinstance(msg, Message):
            if not msg.transactional:
                return msg
            change = msg
        else:  # pragma: no cover - Insert/Update/Delete never get here (see _row)
            raise AssertionError(msg)
        if txn is None:
            raise DecodeError(
                "row change outside a transaction", msg_type=type(msg).__name__, lsn=lsn
            )
        txn.changes.append(change)
        return None

    def _replay(self, xid: int, lsn: int) -> Sequence[Change]:
        buf = self._streams.pop(xid, None)
        self._pending_since.pop(("stream", xid), None)
        if buf is None:
            # Possible only when the stream restarted mid-transaction and every streamed
            # chunk was confirmed earlier, which our feedback never does.
            raise DecodeError(
                f"Stream Commit/Prepare for xid {xid} whose streamed changes were never seen",
                msg_type="Stream Commit",
                lsn=lsn,
            )
        if buf.spilled:
            # Too big to hold: changes are read back from the file as they are iterated,
            # against the relations as they stood; the shared cache moves on at once.
            before = self.relations.copy()
            decoder = self._stream_decoder()
            for meta_lsn, payload in buf.meta:
                self._change(decoder.decode(payload, meta_lsn), None, meta_lsn)
            return SpilledChanges(self, buf, before)
        try:
            return tuple(self._decode_streamed(buf, self.relations))
        finally:
            buf.close()

    @staticmethod
    def _stream_decoder() -> PgOutputDecoder:
        decoder = PgOutputDecoder()
        decoder.in_stream = True
        return decoder

    def _decode_streamed(self, buf: StreamBuffer, rels: RelationCache) -> Iterator[Change]:
        decoder = self._stream_decoder()
        txn = _Open(0)
        for msg_lsn, payload in buf:
            if payload[0] in _ROW_TAGS:
                yield self._row(payload, 5, msg_lsn, decoder, rels)
            else:
                self._change(decoder.decode(payload, msg_lsn), txn, msg_lsn, rels)
                yield from txn.changes
                txn.changes.clear()

    def _stream_abort(self, msg: StreamAbort, lsn: int) -> None:
        buf = self._streams.get(msg.xid)
        if buf is None:
            return
        if msg.subxid == msg.xid:
            buf.close()
            del self._streams[msg.xid]
            self._stream_origins.pop(msg.xid, None)
            self._pending_since.pop(("stream", msg.xid), None)
        else:
            buf.abort_subxact(msg.subxid)

    def _prepared(
        self,
        msg: Prepare | StreamPrepare,
        xid: int,
        origin: str | None,
        changes: Sequence[Change],
        since: int,
    ) -> PreparedTransaction | None:
        if self.surface_prepares:
            return PreparedTransaction(
                xid,
                msg.gid,
                Lsn(msg.prepare_lsn),
                Lsn(msg.end_lsn),
                msg.prepare_timestamp,
                origin,
                changes,
            )
        self._held[msg.gid] = _Held(xid, origin, changes, since)
        self._pending_since[("prepared", msg.gid)] = since
        return None

    def _commit_prepared(self, msg: CommitPrepared, lsn: int) -> Event:
        if self.surface_prepares:
            return PreparedOutcome(msg.gid, msg.xid, True, Lsn(msg.end_lsn), msg.commit_timestamp)
        held = self._held.pop(msg.gid, None)
        self._pending_since.pop(("prepared", msg.gid), None)
        if held is None:
            log.warning(
                "COMMIT PREPARED %r (xid %d) without its PREPARE in this stream: its changes "
                "were delivered before; passing an empty transaction",
                msg.gid,
                msg.xid,
            )
            held = _Held(msg.xid, None, (), msg.commit_lsn)
        return Transaction(
            held.xid,
            Lsn(msg.commit_lsn),
            Lsn(msg.end_lsn),
            msg.commit_timestamp,
            held.origin,
            held.changes,
            gid=msg.gid,
        )

    def _rollback_prepared(self, msg: RollbackPrepared, lsn: int) -> PreparedOutcome | None:
        self._held.pop(msg.gid, None)
        self._pending_since.pop(("prepared", msg.gid), None)
        if self.surface_prepares:
            return PreparedOutcome(
                msg.gid, msg.xid, False, Lsn(msg.rollback_end_lsn), msg.rollback_timestamp
            )
        return None
