"""pgoutput messages, named after "Logical Replication Message Formats" in the PostgreSQL docs.

Timestamps stay as the wire's microseconds since 2000-01-01 (see ``walsender`` for converters);
LSNs stay plain ints. ``xid`` on Relation/Type/DML/Truncate/Message is set only inside a
streamed block (protocol 2+), where it is the (sub)transaction the change belongs to.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# TupleData column kinds, as the bytes the server sends.
KIND_NULL = 0x6E  # 'n'
KIND_UNCHANGED_TOAST = 0x75  # 'u'
KIND_TEXT = 0x74  # 't'
KIND_BINARY = 0x62  # 'b'

REPLICA_IDENTITY_DEFAULT = "d"
REPLICA_IDENTITY_NOTHING = "n"
REPLICA_IDENTITY_FULL = "f"
REPLICA_IDENTITY_INDEX = "i"

TRUNCATE_CASCADE = 1
TRUNCATE_RESTART_IDENTITY = 2


@dataclass(frozen=True, slots=True)
class TupleData:
    """Column values of one row: ``kinds`` has one of b"ntub" per column.

    ``values[i]`` holds the raw bytes for kinds 't' and 'b', None for 'n' and 'u'.
    """

    kinds: bytes
    values: tuple[bytes | None, ...]


@dataclass(frozen=True, slots=True)
class Column:
    """One column of a Relation message: name, type OID and modifier, and whether it is part of the
    replica identity key.
    """

    name: str
    type_oid: int
    type_modifier: int
    is_key: bool


@dataclass(frozen=True, slots=True)
class Begin:
    """Begin: a transaction starts; ``final_lsn`` is its commit LSN."""

    final_lsn: int
    commit_timestamp: int
    xid: int


@dataclass(frozen=True, slots=True)
class Message:
    """A logical decoding message (pg_logical_emit_message)."""

    xid: int | None
    transactional: bool
    lsn: int
    prefix: str
    content: bytes


@dataclass(frozen=True, slots=True)
class Commit:
    """Commit: the transaction's commit LSN, end LSN and timestamp."""

    flags: int
    commit_lsn: int
    end_lsn: int
    commit_timestamp: int


@dataclass(frozen=True, slots=True)
class Origin:
    """Origin: the transaction came from replication origin ``name``."""

    commit_lsn: int
    name: str


@dataclass(frozen=True, slots=True)
class Relation:
    """Relation: a table's description, sent before its first change and after schema changes."""

    xid: int | None
    relid: int
    namespace: str
    name: str
    replica_identity: str
    columns: tuple[Column, ...]


@dataclass(frozen=True, slots=True)
class Type:
    """Type: a custom type's OID and name (for a domain, its base type's)."""

    xid: int | None
    oid: int
    namespace: str
    name: str


@dataclass(frozen=True, slots=True)
class Insert:
    """Insert: a new row."""

    xid: int | None
    relid: int
    new: TupleData


@dataclass(frozen=True, slots=True)
class Update:
    """``old_kind`` is 'K' (key columns only), 'O' (the whole old row) or None (not sent)."""

    xid: int | None
    relid: int
    old_kind: Literal["K", "O"] | None
    old: TupleData | None
    new: TupleData


@dataclass(frozen=True, slots=True)
class Delete:
    """Delete: the old key ('K') or old row ('O')."""

    xid: int | None
    relid: int
    old_kind: Literal["K", "O"]
    old: TupleData


@dataclass(frozen=True, slots=True)
class Truncate:
    """Truncate of ``relids``; ``options`` carries CASCADE and RESTART IDENTITY."""

    xid: int | None
    options: int
    relids: tuple[int, ...]

    @property
    def cascade(self) -> bool:
        """TRUNCATE ... CASCADE."""
        return bool(self.options & TRUNCATE_CASCADE)

    @property
    def restart_identity(self) -> bool:
        """TRUNCATE ... RESTART IDENTITY."""
        return bool(self.options & TRUNCATE_RESTART_IDENTITY)


@dataclass(frozen=True, slots=True)
class StreamStart:
    """Stream Start: a block of an in-progress transaction follows."""

    xid: int
    first_segment: bool


@dataclass(frozen=True, slots=True)
class StreamStop:
    """Stream Stop: the block ends."""

    pass


@dataclass(frozen=True, slots=True)
class StreamCommit:
    """Stream Commit: a streamed transaction committed."""

    xid: int
    flags: int
    commit_lsn: int
    end_lsn: int
    commit_timestamp: int


@dataclass(frozen=True, slots=True)
class StreamAbort:
    """``abort_lsn``/``abort_timestamp`` are sent only with protocol 4 parallel streaming."""

    xid: int
    subxid: int
    abort_lsn: int | None = None
    abort_timestamp: int | None = None


@dataclass(frozen=True, slots=True)
class BeginPrepare:
    """Begin Prepare: a two-phase transaction starts."""

    prepare_lsn: int
    end_lsn: int
    prepare_timestamp: int
    xid: int
    gid: str


@dataclass(frozen=True, slots=True)
class Prepare:
    """Prepare: PREPARE TRANSACTION ``gid``."""

    flags: int
    prepare_lsn: int
    end_lsn: int
    prepare_timestamp: int
    xid: int
    gid: str


@dataclass(frozen=True, slots=True)
class CommitPrepared:
    """Commit Prepared: COMMIT PREPARED ``gid``."""

    flags: int
    commit_lsn: int
    end_lsn: int
    commit_timestamp: int
    xid: int
    gid: str


@dataclass(frozen=True, slots=True)
class RollbackPrepared:
    """Rollback Prepared: ROLLBACK PREPARED ``gid``."""

    flags: int
    prepare_end_lsn: int
    rollback_end_lsn: int
    prepare_timestamp: int
    rollback_timestamp: int
    xid: int
    gid: str


@dataclass(frozen=True, slots=True)
class StreamPrepare:
    """Stream Prepare: a streamed transaction was prepared."""

    flags: int
    prepare_lsn: int
    end_lsn: int
    prepare_timestamp: int
    xid: int
    gid: str


PgOutputMessage = (
    Begin
    | Message
    | Commit
    | Origin
    | Relation
    | Type
    | Insert
    | Update
    | Delete
    | Truncate
    | StreamStart
    | StreamStop
    | StreamCommit
    | StreamAbort
    | BeginPrepare
    | Prepare
    | CommitPrepared
    | RollbackPrepared
    | StreamPrepare
)
