"""What consumers receive: whole transactions of row changes, truncates and messages."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, cast

from pglogrepl_bridge.lsn import Lsn
from pglogrepl_bridge.pgoutput.decoder import read_tuple
from pglogrepl_bridge.pgoutput.messages import Message, TupleData
from pglogrepl_bridge.pgoutput.relcache import RelationInfo
from pglogrepl_bridge.pgoutput.walsender import pg_time_to_datetime, pg_time_to_unix_us

Op = Literal["insert", "update", "delete"]


@dataclass(frozen=True, slots=True, init=False)
class RowChange:
    """One row's insert, update or delete, kept as the message's bytes until read.

    Values are parsed and converted on access (``new``, ``old``), in one pass, so a consumer
    that filters, counts or forwards changes pays nothing for values; a malformed tuple
    raises DecodeError when first read. ``new_at``/``old_at`` are the offsets of the
    TupleData inside ``raw`` (-1: absent).

    ``old`` is the replica-identity key (``old_kind`` 'K') or the whole old row ('O', under
    REPLICA IDENTITY FULL); PostgreSQL sends it for deletes, and for updates only when the key
    changed or the identity is FULL.
    """

    op: Op
    relation: RelationInfo
    raw: bytes
    new_at: int
    old_at: int
    old_kind: Literal["K", "O"] | None

    def __init__(
        self,
        op: Op,
        relation: RelationInfo,
        raw: bytes,
        new_at: int,
        old_at: int,
        old_kind: Literal["K", "O"] | None,
    ) -> None:
        # One RowChange per row: the frozen dataclass __init__ (object.__setattr__ per field)
        # cost a third of the decoding time; slot setters keep it frozen at a third the cost.
        _set_op(self, op)
        _set_relation(self, relation)
        _set_raw(self, raw)
        _set_new_at(self, new_at)
        _set_old_at(self, old_at)
        _set_old_kind(self, old_kind)

    @property
    def schema(self) -> str:
        """The relation's schema (pgoutput sends an empty one for pg_catalog)."""
        return self.relation.namespace or "pg_catalog"

    @property
    def table(self) -> str:
        """The relation's name."""
        return self.relation.name

    @property
    def new(self) -> dict[str, Any] | None:
        """New row values, without unchanged-TOAST columns (see ``unchanged_toast``)."""
        at = self.new_at
        if at < 0:
            return None
        rel = self.relation
        # the C walk directly (one Python frame less per row); else row_at's loop (the
        # explicit loaders send row_at straight there, without trying fast_row again)
        fast = rel.fast_row(self.raw, at)
        return fast if fast is not None else rel.row_at(self.raw, at, fused=rel.fused)

    @property
    def old(self) -> dict[str, Any] | None:
        """The old key (``old_kind`` 'K') or old row ('O'); None when PostgreSQL sent neither."""
        at = self.old_at
        if at < 0:
            return None
        return self.relation.row_at(self.raw, at, key_only=self.old_kind == "K")

    @property
    def new_tuple(self) -> TupleData | None:
        """The new TupleData as sent (kinds and raw values), to convert yourself."""
        return None if self.new_at < 0 else read_tuple(self.raw, self.new_at)[0]

    @property
    def old_tuple(self) -> TupleData | None:
        """The old TupleData as sent, or None."""
        return None if self.old_at < 0 else read_tuple(self.raw, self.old_at)[0]

    @property
    def unchanged_toast(self) -> tuple[str, ...]:
        """Columns whose TOASTed value did not change: left out of ``new``."""
        if self.new_at < 0:
            return ()
        return self.relation.unchanged_toast(read_tuple(self.raw, self.new_at)[0])

    @property
    def key(self) -> dict[str, Any]:
        """The replica-identity key of the row as it was before (or is, for inserts)."""
        at = self.old_at if self.old_at >= 0 else self.new_at
        return self.relation.row_at(self.raw, at, key_only=True)


_Setter = Callable[[RowChange, Any], None]
_set_op, _set_relation, _set_raw, _set_new_at, _set_old_at, _set_old_kind = (
    cast(_Setter, vars(RowChange)[name].__set__)
    for name in ("op", "relation", "raw", "new_at", "old_at", "old_kind")
)


@dataclass(frozen=True, slots=True)
class TruncateChange:
    """TRUNCATE of one or more relations, with its CASCADE and RESTART IDENTITY flags."""

    relations: tuple[RelationInfo, ...]
    cascade: bool
    restart_identity: bool


Change = RowChange | TruncateChange | Message


@dataclass(frozen=True, slots=True)
class Transaction:
    """A committed transaction. ``end_lsn`` is what to acknowledge once it is durable.

    ``commit_timestamp`` is PostgreSQL's wire value (µs since 2000-01-01 UTC); ``gid`` is set
    for two-phase transactions delivered at COMMIT PREPARED.
    """

    xid: int
    commit_lsn: Lsn
    end_lsn: Lsn
    commit_timestamp: int
    origin: str | None
    changes: Sequence[Change]  # a tuple; lazily read from disk for a spilled huge transaction
    gid: str | None = None

    @property
    def commit_time(self) -> datetime:
        """The commit time as an aware datetime (UTC)."""
        return pg_time_to_datetime(self.commit_timestamp)

    @property
    def timestamp_us(self) -> int:
        """Commit time in microseconds since the Unix epoch."""
        return pg_time_to_unix_us(self.commit_timestamp)


@dataclass(frozen=True, slots=True)
class PreparedTransaction:
    """Surfaced at PREPARE TRANSACTION when asked for; COMMIT/ROLLBACK PREPARED follow later."""

    xid: int
    gid: str
    prepare_lsn: Lsn
    end_lsn: Lsn
    prepare_timestamp: int
    origin: str | None
    changes: Sequence[Change]


@dataclass(frozen=True, slots=True)
class PreparedOutcome:
    """COMMIT PREPARED or ROLLBACK PREPARED of a transaction surfaced as PreparedTransaction."""

    gid: str
    xid: int
    committed: bool
    end_lsn: Lsn
    timestamp: int


Event = Transaction | PreparedTransaction | PreparedOutcome | Message
