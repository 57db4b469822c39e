"""What consumers receive: whole transactions of row changes, truncates and messages."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from .lsn import Lsn
from .messages import Message, TupleData
from .relcache import RelationInfo
from .walsender import pg_time_to_datetime, pg_time_to_unix_us

Op = Literal["insert", "update", "delete"]


@dataclass(frozen=True, slots=True)
class RowChange:
    """One row's insert, update or delete. Values convert on access, so filters stay cheap.

    ``old`` is the replica-identity key (``old_kind`` 'K') or the whole old row ('O', under
    REPLICA IDENTITY FULL); PostgreSQL sends it for deletes, and for updates only when the key
    changed or the identity is FULL.
    """

    op: Op
    relation: RelationInfo
    new_tuple: TupleData | None
    old_tuple: TupleData | None
    old_kind: Literal["K", "O"] | None

    @property
    def schema(self) -> str:
        return self.relation.namespace or "pg_catalog"

    @property
    def table(self) -> str:
        return self.relation.name

    @property
    def new(self) -> dict[str, Any] | None:
        """New row values, without unchanged-TOAST columns (see ``unchanged_toast``)."""
        tup = self.new_tuple
        return None if tup is None else self.relation.row(tup)

    @property
    def old(self) -> dict[str, Any] | None:
        tup = self.old_tuple
        if tup is None:
            return None
        return self.relation.row(tup, key_only=self.old_kind == "K")

    @property
    def unchanged_toast(self) -> tuple[str, ...]:
        tup = self.new_tuple
        return () if tup is None else self.relation.unchanged_toast(tup)

    @property
    def key(self) -> dict[str, Any]:
        """The replica-identity key of the row as it was before (or is, for inserts)."""
        if self.old_tuple is not None:
            return self.relation.row(self.old_tuple, key_only=True)
        assert self.new_tuple is not None
        return self.relation.row(self.new_tuple, key_only=True)


@dataclass(frozen=True, slots=True)
class TruncateChange:
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
    changes: tuple[Change, ...]
    gid: str | None = None

    @property
    def commit_time(self) -> datetime:
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
    changes: tuple[Change, ...]


@dataclass(frozen=True, slots=True)
class PreparedOutcome:
    """COMMIT PREPARED or ROLLBACK PREPARED of a transaction surfaced as PreparedTransaction."""

    gid: str
    xid: int
    committed: bool
    end_lsn: Lsn
    timestamp: int


Event = Transaction | PreparedTransaction | PreparedOutcome | Message
