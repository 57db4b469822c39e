"""Apply transactions to any SQLAlchemy database, exactly once, with SQLAlchemy Core only.

A checkpoint table maps (source system id, slot) to the last applied end LSN and is written in
the same target transaction as the changes, so after any crash the target and its checkpoint
agree; the stream resumes from the checkpoint and skips what the target holds.

Rules for tables (``_prepare``):

- A table with a replica-identity key (a primary key, or ``REPLICA IDENTITY USING INDEX``)
  gets that key as its primary key; rows are matched by it.
- A keyless table (``REPLICA IDENTITY FULL``, whose Relation marks every column as key, or no
  identity at all) is created without a primary key over its columns, plus a surrogate
  ``_pglb_rowid``: equal rows are legal in the source and NULLs are legal anywhere. An UPDATE
  or DELETE matches the old row on every column it carries, NULL-safely (``IS NOT DISTINCT
  FROM``), and changes exactly one of the equal rows (the first by surrogate).
- ``--conflict lww`` versions keyed rows (``sinks.lww``); keyless rows have no identity to
  version and are applied in stream order in both modes.

A batch goes in as one net change per row (``sinks.reduce``, ``apply``): rows are held as
the stream's bytes and converted only if written; ``reduce=False`` applies every change in
stream order, as ``--conflict lww`` always does.

Faults: a target that goes away (restart, network) raises ``TargetUnavailableError`` and the
batch is retried by ``run_replicate`` with backoff; anything else (a constraint, a value the
target cannot hold) stops the run naming the table and the key. Nothing is acknowledged past
what the target committed.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from functools import partial
from itertools import chain, islice
from operator import itemgetter
from typing import Any, Literal

import psycopg
import sqlalchemy as sa
from psycopg import sql as psql
from psycopg.pq import Format
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from pglogrepl_bridge.errors import ConfigError, SinkError, TargetUnavailableError
from pglogrepl_bridge.lsn import Lsn
from pglogrepl_bridge.pgoutput import _accel as accel
from pglogrepl_bridge.pgoutput.loaders import transformer
from pglogrepl_bridge.pgoutput.messages import Column, Message, TupleData
from pglogrepl_bridge.pgoutput.relcache import (
    Fused,
    RelationInfo,
    RowKey,
    key_indexes,
    key_reader,
)
from pglogrepl_bridge.pgoutput.transaction import RowChange, Transaction, TruncateChange
from pglogrepl_bridge.sinks import lww, sqlitetext
from pglogrepl_bridge.sinks.lww import NODE_COL, TS_COL, VERSION_COLS
from pglogrepl_bridge.sinks.reduce import Held, Reduction
from pglogrepl_bridge.sinks.sqltypes import (
    column_type,
    describe,
    loaders,
    text_is_driver_value,
    value_path,
)
from pglogrepl_bridge.snapshot.plan import (
    SNAPSHOT_REQUEST_PREFIX,
    UNTIL_COPIED,
    ChunkDone,
    KeySkip,
    TableCopy,
    highest,
    resume,
    skipped_until,
)

log = logging.getLogger(__name__)

CHECKPOINT_TABLE = "pglogrepl_bridge_checkpoint"
TOMBSTONE_TABLE = "pglogrepl_bridge_tombstone"
SNAPSHOT_TABLE = "pglogrepl_bridge_snapshot"  # the snapshot's chunks that committed
#: rows per executemany while copying a chunk: bounded memory, few round trips
COPY_BATCH = 2000
#: a group of at least this many inserts goes into PostgreSQL through COPY (a round trip
#: to set up); smaller ones through executemany
COPY_INSERTS_FROM = 16
#: a reduced batch (``sinks.reduce``) writes what it holds once it holds this many rows:
#: converted rows cost memory; later changes to them are then plain updates and deletes
HELD_ROWS = 2000
#: ... and writes them in groups of at most this many converted rows (they cost memory; rows
#: going into COPY as the stream's text do not)
GROUP_ROWS = 100
#: SQLite: rows per multi-row INSERT, and the parameter limit of its oldest builds
VALUES_ROWS = 100
SQLITE_MAX_PARAMS = 999
#: the chunk number of a "copy this table (again)" marker in the snapshot table; its
#: anchor is ``UNTIL_COPIED``: the table's changes are skipped until the copy is done
REQUESTED = -1
ROWID_COL = "_pglb_rowid"  # the surrogate key of a keyless table
__all__ = ["CHECKPOINT_TABLE", "NODE_COL", "TS_COL", "Conflict", "SqlSink", "base_columns"]

Conflict = Literal["source", "lww"]
#: SqlSink._hold for runs of changes, in C where built
_HOLD_ROWS = accel.row_holder(Held, RowChange)
_KEY = "_pglb_key_"  # bind-parameter prefix for a row's old key in UPDATE/DELETE


@dataclass
class _Target:
    table: sa.Table
    fused: Fused  # loaders giving Python values (for statements SQLAlchemy binds)
    driver_fused: Fused  # the same, then the column type's bind processing: driver values
    keys: tuple[str, ...]  # empty for a keyless table
    key_params: tuple[tuple[str, str], ...]  # (key column, its old-key bind parameter)
    keyless: bool = False
    statements: dict[tuple[str, tuple[str, ...]], _Statement] = field(default_factory=dict)
    #: a whole row of text values (None: NULL) to driver values in column order, in one
    #: psycopg ``load_sequence`` call plus the few per-column steps (``sqltypes.value_path``)
    row_values: Callable[[Sequence[bytes | None]], tuple[Any, ...]] | None = None
    #: a text TupleData at ``(buf, pos)`` as {column: driver value} through ``row_values``
    #: in C (``_accel.typed_row``); None where the Python walk must look (unchanged TOAST,
    #: binary values, a value that does not convert, no accelerator)
    fast_row: Callable[[bytes, int], dict[str, Any] | None] = lambda buf, pos: None
    #: the same values as a tuple in column order, where a C plan makes them (SQLite:
    #: ``_driver_plan``); None elsewhere
    driver_row: Callable[[bytes, int], tuple[Any, ...] | None] | None = None
    ncols: int = 0  # the relation's columns: a row with fewer left unchanged TOAST out
    names: tuple[str, ...] = ()  # the relation's column names, in its order
    #: a row's key values (one value, or a tuple of several; KeyError: one is missing) and
    #: those values as the old-key bind parameters (``key_params``)
    key_of: Callable[[Mapping[str, Any]], Any] = lambda row: None
    key_bind: Callable[[Any], dict[str, Any]] = lambda key: {}
    #: a row's key as raw bytes, and whether it sent every column (``relcache.row_key``)
    row_key: RowKey = lambda buf, pos: None
    #: (table name, key column indexes, column count) for ``_fastrow.hold_rows`` to read
    #: ``row_key``'s key itself; None for a keyless table
    hold: tuple[str, tuple[int, ...], int] | None = None


@dataclass(frozen=True)
class _Statement:
    """A Core statement compiled once for the dialect, run with driver-ready parameters.

    SQLAlchemy's per-row parameter processing (``construct_params``) was the largest cost of
    ``replicate``; rows are already converted by ``_Target.driver_fused``, so they go to
    ``exec_driver_sql`` as the tuples (or dicts) the driver's paramstyle wants."""

    sql: str
    params: Callable[[dict[str, Any]], Any]
    #: the parameters' names in the driver's order, when it takes a plain sequence
    order: tuple[str, ...] | None = None


def base_columns(rel: RelationInfo) -> tuple[Column, ...]:
    """The relation's columns with each type resolved by the one type registry: a domain
    column is typed, created and bound as its base type."""
    base = rel.loaders.base_oid
    return tuple(
        c if base(c.type_oid) == c.type_oid else replace(c, type_oid=base(c.type_oid))
        for c in rel.columns
    )


def target_name(rel: RelationInfo) -> str:
    """The target table's name for a relation (``schema_name`` outside public)."""
    return rel.name if rel.namespace in ("public", "") else f"{rel.namespace}_{rel.name}"


class SqlSink:
    """Applies transactions to any SQLAlchemy target, exactly once: each batch commits with its
    checkpoint (source system, slot) in one target transaction, and only then may the stream
    confirm it.
    """

    def __init__(
        self,
        url: str,
        *,
        source_id: str,
        slot: str,
        conflict: Conflict = "source",
        node_id: int = 0,
        reduce: bool = True,
    ) -> None:
        try:
            self.engine = sa.create_engine(url)
            self.dialect = self.engine.dialect.name
        except (SQLAlchemyError, ImportError, ValueError) as exc:
            raise ConfigError(f"invalid --target {_safe_url(url)}: {exc}") from None
        self.url = _safe_url(url)
        #: a SQLite database in memory: one per thread's connection, so used from one thread
        self.in_memory = self.dialect == "sqlite" and self.engine.url.database in (
            None,
            "",
            ":memory:",
        )
        self.source_id = source_id
        self.slot = slot
        self.conflict = conflict
        #: inserts go through COPY (``_copy_rows``): a PostgreSQL target through psycopg,
        #: rows in the source's order with no conflict handling
        self._copies_inserts = (
            self.dialect == "postgresql"
            and self.engine.dialect.driver == "psycopg"
            and conflict == "source"
        )
        self.node_id = node_id
        #: batches go in as one net change per row (``sinks.reduce``); LWW versions every
        #: change on its own
        self._reduces = reduce and conflict == "source"
        self.meta = sa.MetaData()
        self.checkpoints = sa.Table(
            CHECKPOINT_TABLE,
            self.meta,
            sa.Column("source_id", sa.String(64), primary_key=True),
            sa.Column("slot", sa.String(64), primary_key=True),
            sa.Column("end_lsn", sa.BigInteger, nullable=False),
            sa.Column("updated_at", sa.DateTime, nullable=False),
        )
        self.tombstones = sa.Table(
            TOMBSTONE_TABLE,
            self.meta,
            sa.Column("tbl", sa.String(128), primary_key=True),
            sa.Column("row_key", sa.String(255), primary_key=True),
            *lww.version_columns(),
        )
        self.snapshot_chunks = sa.Table(
            SNAPSHOT_TABLE,
            self.meta,
            sa.Column("source_id", sa.String(64), primary_key=True),
            sa.Column("slot", sa.String(64), primary_key=True),
            sa.Column("tbl", sa.String(255), primary_key=True),
            sa.Column("chunk", sa.Integer, primary_key=True, autoincrement=False),
            sa.Column("chunks", sa.Integer, nullable=False),
            sa.Column("anchor", sa.BigInteger, nullable=False),
            sa.Column("rows", sa.BigInteger, nullable=False),
            sa.Column("ranges", sa.Text, nullable=True),  # plan.KeyRanges of a key split
        )
        self._targets: dict[RelationInfo, _Target] = {}
        self._source_columns: dict[str, dict[str, Column]] = {}
        #: tables whose changes the stream skips up to their snapshot anchor (snapshot.plan)
        self._skip: dict[str, int | KeySkip] = {}
        #: a key split's bounds loaded as the stream loads the key (per relation and rule)
        self._bounds: dict[tuple[RelationInfo, KeySkip], list[Any]] = {}
        #: backfill: a snapshot request in the stream, or a table new to the target, marks
        #: the table to be copied (``requested``), and ``run_replicate`` copies it
        self.backfill = False
        self.requested = False
        self._batch_skip: dict[str, int] = {}  # marked in the batch being applied
        self._present: set[str] = set()  # tables known to exist in the target
        # SQLite has one writer: parallel snapshot workers take turns instead of timing out
        self._write_lock: AbstractContextManager[Any] = (
            threading.Lock() if self.dialect == "sqlite" else nullcontext()
        )
        try:
            self.meta.create_all(
                self.engine, tables=[self.checkpoints, self.tombstones, self.snapshot_chunks]
            )
            with self.engine.begin() as conn:  # tables of an older version
                present = {c["name"] for c in sa.inspect(conn).get_columns(TOMBSTONE_TABLE)}
                for name in VERSION_COLS:
                    if name not in present:
                        self._add_column(conn, TOMBSTONE_TABLE, sa.Column(name, sa.BigInteger))
                present = {c["name"] for c in sa.inspect(conn).get_columns(SNAPSHOT_TABLE)}
                if "ranges" not in present:
                    self._add_column(conn, SNAPSHOT_TABLE, sa.Column("ranges", sa.Text))
        except SQLAlchemyError as exc:
            if _transient(exc):
                raise TargetUnavailableError(
                    f"cannot reach the target {self.url}: {_reason(exc)}"
                ) from None
            raise SinkError(
                f"cannot reach or write the target {self.url}: {_reason(exc)}"
            ) from None

    # -- checkpoint ------------------------------------------------------------------------

    def checkpoint(self) -> Lsn | None:
        """The end LSN of the last transaction this target holds from (source, slot)."""
        query = sa.select(self.checkpoints.c.end_lsn).where(
            self.checkpoints.c.source_id == self.source_id, self.checkpoints.c.slot == self.slot
        )
        try:
            with self.engine.connect() as conn:
                value = conn.execute(query).scalar()
        except SQLAlchemyError as exc:
            raise SinkError(f"cannot read the checkpoint from {self.url}: {_reason(exc)}") from None
        return None if value is None else Lsn(int(value))

    def _write_checkpoint(self, conn: sa.Connection, end_lsn: int) -> None:
        cp = self.checkpoints
        now = datetime.now(UTC).replace(tzinfo=None)
        done = conn.execute(
            sa.update(cp)
            .where(cp.c.source_id == self.source_id, cp.c.slot == self.slot)
            .values(end_lsn=end_lsn, updated_at=now)
        )
        if done.rowcount == 0:
            conn.execute(
                sa.insert(cp).values(
                    source_id=self.source_id, slot=self.slot, end_lsn=end_lsn, updated_at=now
                )
            )

    # -- apply -----------------------------------------------------------------------------

    def apply(self, txns: Sequence[Transaction]) -> None:
        """Apply a batch in one target transaction, with the checkpoint of its last member.

        Reduced first (``sinks.reduce``); a batch the target refuses so is applied again in
        stream order, where a hand-made constraint may accept it, then row by row to name
        the row it refuses."""
        if not txns:
            return
        try:
            try:
                self._commit(txns, reduced=self._reduces)
            except SQLAlchemyError as exc:
                if not self._reduces or _transient(exc):
                    raise
                self._targets.clear()  # the rollback undid this batch's DDL too
                log.info(
                    "the target refused the reduced batch (%s): applying it in stream order",
                    _reason(exc),
                )
                self._commit(txns, reduced=False)
        except SinkError:
            self._targets.clear()
            raise
        except SQLAlchemyError as exc:
            # The rollback undid this batch's DDL too (tables created or altered): forget
            # what we knew of the tables, or the retry below would use tables that are gone.
            self._targets.clear()
            if _transient(exc):
                raise TargetUnavailableError(
                    f"the target {self.url} is unavailable: {_reason(exc)}"
                ) from None
            # Find the exact row: apply again, row by row; it fails at the culprit.
            self._pinpoint(txns, exc)

    def _commit(self, txns: Sequence[Transaction], *, reduced: bool) -> None:
        """One target transaction: the batch (reduced, or in stream order), its checkpoint,
        and the snapshot progress it makes history of."""
        end = int(txns[-1].end_lsn)  # a plain int for drivers
        past_snapshot = bool(self._skip) and end >= max(map(highest, self._skip.values()))
        self._batch_skip = {}
        with self.engine.begin() as conn:
            if reduced:
                self._apply_reduced(conn, txns)
            else:
                for txn in txns:
                    self._apply_txn(conn, txn, grouped=True)
            self._write_checkpoint(conn, end)
            if past_snapshot and not self._batch_skip:
                # every table's anchor passed: its progress is history
                sc = self.snapshot_chunks
                conn.execute(
                    sa.delete(sc).where(sc.c.source_id == self.source_id, sc.c.slot == self.slot)
                )
        if past_snapshot and not self._batch_skip:
            self._skip = {}
        if self._batch_skip:  # committed: the marked tables wait for their copy
            self._skip.update(self._batch_skip)
            self._present.update(self._batch_skip)
            self.requested = True

    def _pinpoint(self, txns: Sequence[Transaction], first: SQLAlchemyError) -> None:
        try:
            with self.engine.begin() as conn:
                for txn in txns:
                    self._apply_txn(conn, txn, grouped=False)
                raise _Rollback
        except _Rollback:
            pass
        except SinkError:
            raise
        except SQLAlchemyError as exc:
            if _transient(exc):
                raise TargetUnavailableError(
                    f"the target {self.url} is unavailable: {_reason(exc)}"
                ) from None
            raise SinkError(f"cannot write to the target {self.url}: {_reason(exc)}") from None
        finally:
            self._targets.clear()  # the row-by-row pass was rolled back, its DDL with it
        raise SinkError(f"cannot write to the target {self.url}: {_reason(first)}")

    def _apply_txn(self, conn: sa.Connection, txn: Transaction, *, grouped: bool) -> None:
        txn = self._screened(conn, txn)
        if self.conflict == "lww":
            for pos, change in enumerate(txn.changes):
                self._apply_lww(conn, txn, pos, change)
            return
        for target, op, rows, change in self._groups(conn, txn.changes, grouped):
            self._run(conn, target, op, rows, change, grouped=grouped)

    def _screened(self, conn: sa.Connection, txn: Transaction) -> Transaction:
        """The transaction as it applies: its snapshot requests and new tables marked for
        copying, its changes that a copy holds taken out."""
        if self.backfill:
            self._mark_requests(conn, txn)
        if self._skip or self._batch_skip:
            txn = self._unskipped(conn, txn)
        return txn

    def _run(
        self,
        conn: sa.Connection,
        target: _Target,
        op: str,
        rows: list[dict[str, Any]],
        change: Any,
        *,
        grouped: bool,
    ) -> None:
        try:
            self._execute(conn, target, op, rows)
        except DBAPIError as exc:
            if (grouped and len(rows) > 1) or _transient(exc):
                raise
            raise SinkError(_row_error(target, op, change, exc)) from None

    def _apply_reduced(self, conn: sa.Connection, txns: Sequence[Transaction]) -> None:
        """The batch as one net change per row (``sinks.reduce``); what cannot be reduced
        goes in stream order, after every row held before it. A row is held as its change
        (the raw row) and converted only if it is written; an update that left unchanged
        TOAST out is merged with the row before it, converted. Held rows are also written
        once ``HELD_ROWS`` are held."""
        reduction = Reduction(self._merge)
        held: dict[str, _Target] = {}  # the target each held table's rows were read for
        # _hold and Reduction.add for runs of changes in C; it leaves the rest to them
        take = None if _HOLD_ROWS is None else partial(_HOLD_ROWS, self._targets, held)
        for txn in txns:
            changes = self._screened(conn, txn).changes
            i, n = 0, len(changes)
            while i < n:
                if take is not None:
                    i = reduction.add_run(take, changes, i, HELD_ROWS)
                    if len(reduction) >= HELD_ROWS:
                        self._release(conn, reduction, held)
                        continue
                    if i == n:
                        break
                change = changes[i]
                i += 1
                if type(change) is RowChange and self._hold(conn, reduction, held, change):
                    if len(reduction) >= HELD_ROWS:
                        self._release(conn, reduction, held)
                    continue
                if isinstance(change, Message):
                    continue
                self._release(conn, reduction, held)
                for target, op, rows, last in self._groups(conn, (change,), True):
                    self._run(conn, target, op, rows, last, grouped=True)
        self._release(conn, reduction, held)

    def _hold(
        self,
        conn: sa.Connection,
        reduction: Reduction,
        held: dict[str, _Target],
        change: RowChange,
    ) -> bool:
        """Hold one row change in ``reduction``, keyed by its key's raw bytes; False when it
        cannot be (rule 3 there). The Python twin of ``_fastrow.hold_rows``, which takes the
        plain cases of a run of changes and leaves the others here."""
        rel = change.relation
        target = self._targets.get(rel) or self._target(conn, rel)
        name = target.table.name
        if target.keyless or held.setdefault(name, target) is not target:
            return False  # a keyless row, or the table's relation changed in the batch
        read, raw = target.row_key, change.raw
        if change.op == "delete":
            old = read(raw, change.old_at) if change.old_at >= 0 else None
            return old is not None and reduction.add(name, "delete", old[0], None, change)
        got = read(raw, change.new_at)
        if got is None:
            return False  # a key value not sent (unchanged TOAST), or irregular bytes
        key, complete = got
        if change.old_at >= 0:
            old = read(raw, change.old_at)
            if old is None or old[0] != key:
                return False  # the key changed
        new = change if complete else self._new_row(change)
        return reduction.add(name, change.op, key, new, change)

    def _new_row(self, row: RowChange | dict[str, Any]) -> dict[str, Any]:
        """A held row's new values as driver values (a held dict is already converted)."""
        if type(row) is dict:
            return row
        assert isinstance(row, RowChange)
        target = self._targets[row.relation]
        return target.fast_row(row.raw, row.new_at) or row.relation.row_at(
            row.raw, row.new_at, fused=target.driver_fused
        )

    def _merge(self, earlier: Any, later: Any) -> Any:
        """Rule 2 of ``sinks.reduce``: an update that sent every column replaces the row;
        one that left unchanged TOAST out (held converted) goes over the converted row."""
        if type(later) is RowChange:
            return later
        merged = dict(self._new_row(earlier))
        merged.update(later)
        return merged

    def _release(self, conn: sa.Connection, reduction: Reduction, held: dict[str, _Target]) -> None:
        """Write every held row (rule 4's order, consecutive rows of one shape together).
        Whole inserts into PostgreSQL stay unconverted: ``_execute`` makes COPY text of
        their bytes, or converts them."""
        raw_copy = self._copies_inserts and accel.copy_text is not None
        rows: list[Any] = []
        shape: tuple[Any, ...] = ()
        target: _Target | None = None
        op, last = "", None
        for name, this_op, row in reduction.drain():
            this = held[name]
            this_shape: tuple[Any, ...]
            bind: Any
            if this_op == "delete":
                if row.state == "delete":  # the key from the delete's old row
                    change = row.last
                    old = this.fast_row(change.raw, change.old_at) or change.relation.row_at(
                        change.raw, change.old_at, fused=this.driver_fused
                    )
                else:  # a replace: the key is the new row's
                    old = self._new_row(row.new)
                bind, this_shape = this.key_bind(this.key_of(old)), (this, this_op)
            elif (
                this_op == "insert"
                and type(row.new) is RowChange
                and (raw_copy or this.driver_row is not None)
            ):  # whole: COPY text from its bytes, or driver values made in C
                bind, this_shape = row.new, (this, this_op)
            else:
                new = self._new_row(row.new)
                full = len(new) == this.ncols
                if this_op == "insert":
                    bind = new
                else:
                    bind = this.key_bind(this.key_of(new))
                    bind.update(new)
                this_shape = (this, this_op) if full else (this, this_op, tuple(new))
            full_group = len(rows) >= (GROUP_ROWS if type(bind) is dict else HELD_ROWS)
            if rows and target is not None and (this_shape != shape or full_group):
                self._run(conn, target, op, rows, last, grouped=True)
                rows = []
            shape, target, op, last = this_shape, this, this_op, row.last
            rows.append(bind)
        if rows and target is not None:
            self._run(conn, target, op, rows, last, grouped=True)
        held.clear()

    def _groups(
        self, conn: sa.Connection, changes: Iterable[Any], grouped: bool
    ) -> Iterator[tuple[_Target, str, list[dict[str, Any]], Any]]:
        """Consecutive changes of one shape (table, op, columns) become one executemany."""
        rows: list[dict[str, Any]] = []
        targets = self._targets
        shape: tuple[Any, ...] = ()
        target: _Target | None = None
        op, last = "", None
        for change in changes:
            if isinstance(change, Message):
                continue
            if isinstance(change, TruncateChange):
                if rows and target is not None:
                    yield target, op, rows, last
                    rows = []
                for rel in change.relations:
                    if not rel.columns:  # known by name only: a truncate read without its
                        name = target_name(rel)  # definition (a replica's bincode payload)
                        if sa.inspect(conn).has_table(name):
                            bare = _Target(sa.Table(name, sa.MetaData()), (), (), (), ())
                            yield bare, "truncate", [{}], change
                        continue
                    yield self._target(conn, rel), "truncate", [{}], change
                continue
            this = targets.get(change.relation) or self._target(conn, change.relation)
            row, row_shape = self._row(this, change)
            if rows and target is not None and (row_shape != shape or not grouped):
                yield target, op, rows, last
                rows = []
            shape, target, op, last = row_shape, this, change.op, change
            rows.append(row)
        if rows and target is not None:
            yield target, op, rows, last

    def _row(self, target: _Target, change: RowChange) -> tuple[dict[str, Any], tuple[Any, ...]]:
        """The row's bind parameters (driver values; old key under _KEY names) and its shape:
        rows of one shape share a statement. A full row's shape needs no column list."""
        rel = change.relation
        op = change.op
        fused = target.driver_fused
        if target.keyless:
            return self._keyless_row(target, change)
        raw = change.raw
        if op == "delete":
            key = target.fast_row(raw, change.old_at) or rel.row_at(raw, change.old_at, fused=fused)
            return {pk: key[k] for k, pk in target.key_params if k in key}, (target, op)
        new = target.fast_row(raw, change.new_at) or rel.row_at(raw, change.new_at, fused=fused)
        full = len(new) == rel.ncols  # else unchanged-TOAST columns were left out
        if op == "insert":
            return new, (target, op) if full else (target, op, tuple(new))
        if change.old_at >= 0:  # the key changed, or REPLICA IDENTITY FULL
            key = target.fast_row(raw, change.old_at) or rel.row_at(raw, change.old_at, fused=fused)
        else:  # the key is in the new row
            key = new
        row = {pk: key[k] for k, pk in target.key_params if k in key}
        row.update(new)
        return row, (target, op) if full else (target, op, tuple(new))

    def _keyless_row(
        self, target: _Target, change: RowChange
    ) -> tuple[dict[str, Any], tuple[Any, ...]]:
        """A keyless table's row: the new values, and for an update or delete the old row's
        values (every column under FULL) under _KEY names, to match it by."""
        rel, fused = change.relation, target.driver_fused
        row: dict[str, Any] = {}
        if change.new_at >= 0:
            row.update(rel.row_at(change.raw, change.new_at, fused=fused))
        if change.op != "insert":
            if change.old_at < 0:
                raise SinkError(
                    f"cannot apply {change.op} to keyless table {target.table.name}: the source "
                    "sent no old row (set REPLICA IDENTITY FULL on it, or give it a key)"
                )
            old = rel.row_at(change.raw, change.old_at, fused=fused)
            row.update({_KEY + k: v for k, v in old.items()})
        return row, (target, change.op, tuple(row))

    def _execute(self, conn: sa.Connection, target: _Target, op: str, rows: list[Any]) -> None:
        """One group of rows of one shape: dicts of driver values, or for inserts also
        RowChanges (whole rows ``_release`` left unconverted)."""
        table = target.table
        if op == "truncate":
            conn.execute(sa.delete(table))
            return
        if target.keyless and op != "insert":
            for row in rows:
                self._keyless_change(conn, target, op, row)
            return
        if op == "insert" and len(rows) >= COPY_INSERTS_FROM and self._copies_inserts:
            self._copy_rows(conn, target, rows)
            return
        if op == "insert" and any(type(row) is RowChange for row in rows):
            if target.driver_row is not None and self._insert_whole(conn, target, rows):
                return
            rows = [self._new_row(row) for row in rows]
        stmt = self._statement(conn, target, op, tuple(rows[0]))
        if op == "insert" and stmt.order is not None and self.dialect == "sqlite":
            self._insert_many(conn, target, stmt.order, list(map(stmt.params, rows)))
            return
        done = conn.exec_driver_sql(stmt.sql, list(map(stmt.params, rows)))
        if op != "insert" and done.rowcount is not None and 0 <= done.rowcount < len(rows):
            log.warning(
                "%s on %s matched %d of %d rows (already absent in the target?)",
                op,
                table.name,
                done.rowcount,
                len(rows),
            )

    def _copy_rows(self, conn: sa.Connection, target: _Target, rows: list[Any]) -> None:
        """Inserts into PostgreSQL through ``COPY FROM STDIN``: psycopg writes the rows in C,
        where ``executemany`` spends about 20 µs a row in Python. Rows of one group have one
        shape (``_groups``), so the first row's columns are every row's (a RowChange's are
        all the relation's). A whole row held unconverted (``_release``) goes as COPY text
        made in C from its bytes (``_fastrow.copy_text``), when the connection speaks UTF-8
        as the stream does. A refused row fails the batch, which ``apply`` then retries row
        by row (plain INSERTs) to name it."""
        first = rows[0]  # a whole row: the relation's columns, in the order copy_text writes
        whole = type(first) is RowChange or len(first) == len(target.names)
        names = target.names if whole else tuple(first)
        columns = psql.SQL(", ").join(map(psql.Identifier, names))
        stmt = psql.SQL("COPY {} ({}) FROM STDIN").format(
            psql.Identifier(target.table.name), columns
        )
        values = itemgetter(*names) if len(names) > 1 else lambda row: (row[names[0]],)
        with (
            _driver(conn, f"COPY {target.table.name}") as driver,
            driver.cursor().copy(stmt) as copy,
        ):
            text = accel.copy_text if driver.info.encoding == "utf-8" else None
            ncols = target.ncols
            for row in rows:
                if type(row) is RowChange:
                    line = None if text is None else text(ncols, row.raw, row.new_at)
                    if line is not None:
                        copy.write(line)
                        continue
                    row = self._new_row(row)
                copy.write_row(values(row))

    def _insert_whole(self, conn: sa.Connection, target: _Target, rows: list[Any]) -> bool:
        """Whole rows (RowChanges ``_release`` held unconverted, and full dicts) inserted
        with their values made in C (``_Target.driver_row``): no dict, no Python frame per
        value; a row the C plan declines is converted in Python. False, having done
        nothing, where the dialect binds in another order than the relation's columns."""
        names = target.names
        stmt = self._statement(conn, target, "insert", names)
        make, params = target.driver_row, stmt.params
        if make is None or stmt.order != names:
            return False
        values: list[tuple[Any, ...]] = []
        for row in rows:
            made = make(row.raw, row.new_at) if type(row) is RowChange else None
            values.append(made if made is not None else params(self._new_row(row)))
        self._insert_many(conn, target, names, values)
        return True

    def _insert_many(
        self,
        conn: sa.Connection,
        target: _Target,
        names: tuple[str, ...],
        rows: list[tuple[Any, ...]],
    ) -> None:
        """Rows (tuples in ``names`` order) inserted; into SQLite as many rows per INSERT as
        its parameters allow (one statement stepped once for them all: about a third faster
        than ``executemany`` of one row each), the rest one row each."""
        per = 1
        if self.dialect == "sqlite":
            per = min(VALUES_ROWS, SQLITE_MAX_PARAMS // max(1, len(names)))
        done = 0
        if per > 1 and len(rows) >= per:
            many = self._values_statement(conn, target, names, per)
            if many is not None:
                done = len(rows) // per * per
                flat = [tuple(chain.from_iterable(rows[i : i + per])) for i in range(0, done, per)]
                conn.exec_driver_sql(many, flat)
        if done < len(rows):
            one = self._statement(conn, target, "insert", names)
            conn.exec_driver_sql(one.sql, rows[done:])

    def _values_statement(
        self, conn: sa.Connection, target: _Target, names: tuple[str, ...], per: int
    ) -> str | None:
        """A Core INSERT of ``per`` rows (multi-row VALUES), compiled once; None when the
        dialect does not bind its parameters row after row, in ``names`` order."""
        key = (f"insert*{per}", names)
        known = target.statements.get(key)
        if known is not None:
            return known.sql or None
        bound = [f"r{i}c{j}" for i in range(per) for j in range(len(names))]
        rows: list[dict[str, Any]] = [
            {c: sa.bindparam(f"r{i}c{j}") for j, c in enumerate(names)} for i in range(per)
        ]
        compiled = sa.insert(target.table).values(rows).compile(dialect=conn.dialect)
        usable = compiled.positiontup == bound and not compiled.escaped_bind_names
        target.statements[key] = _Statement(str(compiled) if usable else "", tuple)
        return str(compiled) if usable else None

    def _keyless_change(
        self, conn: sa.Connection, target: _Target, op: str, row: dict[str, Any]
    ) -> None:
        """Update or delete exactly one of the rows equal (NULL-safely) to the old row."""
        names = tuple(row)
        found = conn.exec_driver_sql(*self._bound(conn, target, "find", names, row)).first()
        if found is None:
            log.warning(
                "%s on %s matched no row (already absent in the target?)", op, target.table.name
            )
            return
        conn.exec_driver_sql(*self._bound(conn, target, op, names, {**row, ROWID_COL: found[0]}))

    def _bound(
        self,
        conn: sa.Connection,
        target: _Target,
        op: str,
        names: tuple[str, ...],
        row: dict[str, Any],
    ) -> tuple[str, Any]:
        stmt = self._statement(conn, target, op, names)
        return stmt.sql, stmt.params(row)

    def _statement(
        self, conn: sa.Connection, target: _Target, op: str, names: tuple[str, ...]
    ) -> _Statement:
        stmt = target.statements.get((op, names))
        if stmt is not None:
            return stmt
        table = target.table
        where = [table.c[k] == sa.bindparam(_KEY + k) for k in target.keys]
        if target.keyless:  # update/delete one row, found by its surrogate
            where = [table.c[ROWID_COL] == sa.bindparam(ROWID_COL)]
        core: sa.Insert | sa.Update | sa.Delete | sa.Select[Any]
        if op == "insert":
            core = sa.insert(table).values({c: sa.bindparam(c) for c in names})
        elif op == "find":  # keyless: the first row equal to the old one, NULL-safely
            matches = [
                table.c[k[len(_KEY) :]].is_not_distinct_from(sa.bindparam(k))
                for k in names
                if k.startswith(_KEY)
            ]
            core = sa.select(table.c[ROWID_COL]).where(*matches).order_by(table.c[ROWID_COL])
            core = core.limit(1)
        elif op == "delete":
            core = sa.delete(table).where(*where)
        else:
            cols = [k for k in names if not k.startswith(_KEY) and k != ROWID_COL]
            core = sa.update(table).where(*where).values({c: sa.bindparam(c) for c in cols})
        compiled = core.compile(dialect=conn.dialect)
        order = compiled.positiontup
        params: Callable[[dict[str, Any]], Any]
        escaped = dict(compiled.escaped_bind_names)  # odd column names, renamed for binding
        if order is None and escaped:  # a named paramstyle
            params = lambda row: {escaped.get(k, k): v for k, v in row.items()}  # noqa: E731
        elif order is None:
            params = dict
        elif len(order) == 1:
            only = order[0]
            params = lambda row: (row[only],)  # noqa: E731
        else:
            params = itemgetter(*order)
        # parameters the statement fixes itself (a LIMIT, an OFFSET): the row has no such keys
        fixed = {k: v for k, v in compiled.params.items() if k not in names and v is not None}
        if fixed:
            by_row = params
            params = lambda row: by_row({**fixed, **row})  # noqa: E731
        positional = tuple(order) if order is not None and not escaped and not fixed else None
        stmt = target.statements[(op, names)] = _Statement(str(compiled), params, positional)
        return stmt

    # -- snapshot (rules in snapshot.plan) ----------------------------------------------

    def snapshot_progress(self) -> list[ChunkDone]:
        """The chunks of an earlier snapshot of (source, slot) that committed."""
        sc = self.snapshot_chunks
        query = sa.select(
            sc.c.tbl, sc.c.chunk, sc.c.chunks, sc.c.anchor, sc.c.rows, sc.c.ranges
        ).where(sc.c.source_id == self.source_id, sc.c.slot == self.slot)
        try:
            with self.engine.connect() as conn:
                return [ChunkDone(*row) for row in conn.execute(query).all()]
        except SQLAlchemyError as exc:
            raise self._failure(exc, "read the snapshot's progress from") from None

    def start_snapshot(
        self,
        relations: Sequence[RelationInfo],
        interrupted: Iterable[str],
        partial: Mapping[str, TableCopy] | None = None,
    ) -> None:
        """Create the target tables of ``relations`` (the snapshot's workers then only insert),
        forget their earlier progress, and empty them: the copy is the table's whole content.
        A ``partial`` table (a resumed key split, ``snapshot.plan`` rule 4) keeps its
        committed chunks and their key ranges' rows: only the other ranges are emptied.

        Under ``--conflict lww`` other sources' rows stay: only the rows of this source's
        ``interrupted`` copy go (a keyed table's unversioned rows, a keyless table's rows)."""
        interrupted = set(interrupted)
        partial = partial or {}
        sc = self.snapshot_chunks
        try:
            with self._write_lock, self.engine.begin() as conn:
                for rel in relations:
                    target = self._target(conn, rel)
                    name = rel.qualified_name
                    kept = partial.get(name)
                    forget = sa.delete(sc).where(
                        sc.c.source_id == self.source_id,
                        sc.c.slot == self.slot,
                        sc.c.tbl == name,
                        sc.c.chunk != REQUESTED,  # a request's marker stays until it is done
                    )
                    if kept is not None:
                        forget = forget.where(sc.c.chunk.not_in(list(kept.anchors)))
                    conn.execute(forget)
                    self._present.add(name)
                    table = target.table
                    outside = self._outside(target, kept)
                    if self.conflict != "lww":
                        conn.execute(sa.delete(table).where(outside))
                    elif name in interrupted or kept is not None:
                        unversioned = sa.true() if target.keyless else table.c[TS_COL].is_(None)
                        conn.execute(sa.delete(table).where(unversioned, outside))
        except SQLAlchemyError as exc:
            self._targets.clear()
            raise self._failure(exc, "prepare the snapshot's tables in") from None

    def _outside(self, target: _Target, kept: TableCopy | None) -> sa.ColumnElement[bool]:
        """The rows outside the key ranges of ``kept``'s chunks (all rows when None)."""
        if kept is None or kept.ranges is None:
            return sa.true()
        column = target.table.c[kept.ranges.column]
        load = next(tload for name, tload, _ in target.fused if name == kept.ranges.column)
        inside = []
        for low, high in kept.ranges.spans(kept.anchors):
            cond = []
            if low is not None:
                cond.append(column >= load(low.encode()))
            if high is not None:
                cond.append(column < load(high.encode()))
            inside.append(sa.and_(sa.true(), *cond))
        return sa.not_(sa.or_(*inside))

    def copy_chunk(
        self, rel: RelationInfo, rows: Iterable[Sequence[bytes | None]], chunk: ChunkDone
    ) -> int:
        """Insert a chunk's rows (text values as pgoutput sends them, None for NULL) and its
        progress row in one target transaction; returns the number of rows.

        Values go through the same loaders as the stream's (``_Target.driver_fused``). Under
        ``--conflict lww`` a row is inserted only where its key holds nothing yet: a copied
        row has no commit time, so any streamed write wins over it."""
        done = 0
        try:
            with self._write_lock, self.engine.begin() as conn:
                target = self._target(conn, rel)
                names = tuple(name for name, _, _ in target.driver_fused)
                convert = target.row_values
                assert convert is not None
                source = iter(rows)
                while values := list(islice(source, COPY_BATCH)):
                    try:  # a batch in one pass; a row that does not convert: row by row
                        batch: list[Sequence[Any]] = list(map(convert, values))
                    except Exception:
                        batch = [self._copy_row(rel, target, names, row) for row in values]
                    done += self._copy_batch(conn, target, names, batch)
                self._record_chunk(conn, chunk, done)
        except SQLAlchemyError as exc:
            raise self._failure(exc, f"copy rows of {chunk.table} into") from None
        return done

    def _copy_row(
        self,
        rel: RelationInfo,
        target: _Target,
        names: tuple[str, ...],
        values: Sequence[bytes | None],
    ) -> Sequence[Any]:
        """One copied row's driver values; one that does not convert is reported and kept as
        text, as the stream's careful path does."""
        convert = target.row_values
        assert convert is not None
        try:
            return convert(values)
        except Exception:
            kinds = bytes(0x6E if v is None else 0x74 for v in values)
            careful = rel.row(TupleData(kinds, tuple(values)), target.driver_fused)
            return [careful.get(n) for n in names]

    def takes_copy_text(self, rel: RelationInfo) -> bool:
        """Whether ``copy_lines`` can take this relation's COPY text as it is: into a
        PostgreSQL target, whose columns are the source's types or text (``sqltypes``), so
        COPY's input functions give each value the meaning the stream's loaders give it."""
        return self.dialect == "postgresql" and self.conflict == "source"

    def copy_lines(self, rel: RelationInfo, lines: Iterable[bytes], chunk: ChunkDone) -> int:
        """``copy_chunk`` for a PostgreSQL target: the source's COPY text (blocks of whole
        rows) goes into the target's ``COPY FROM STDIN`` unparsed, then the progress row, in
        one transaction."""
        done = 0
        try:
            with self._write_lock, self.engine.begin() as conn:
                target = self._target(conn, rel)
                cols = psql.SQL(", ").join(psql.Identifier(c.name) for c in rel.columns)
                stmt = psql.SQL("COPY {} ({}) FROM STDIN").format(
                    psql.Identifier(target.table.name), cols
                )
                driver = conn.connection.driver_connection
                assert isinstance(driver, psycopg.Connection)
                with driver.cursor().copy(stmt) as copy:
                    for block in lines:  # whole rows; a newline inside a value is escaped
                        copy.write(block)
                        done += block.count(b"\n")
                self._record_chunk(conn, chunk, done)
        except psycopg.Error as exc:
            code = exc.sqlstate or ""
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            if code.startswith(("08", "57P")) or not code:
                raise TargetUnavailableError(
                    f"cannot copy rows of {chunk.table} into the target {self.url}: {reason}"
                ) from None
            raise SinkError(
                f"cannot copy a row of {target_name(rel)} into the target {self.url}: {reason}. "
                "Fix the target and run again: copied chunks are kept"
            ) from None
        except SQLAlchemyError as exc:
            raise self._failure(exc, f"copy rows of {chunk.table} into") from None
        return done

    def _record_chunk(self, conn: sa.Connection, chunk: ChunkDone, rows: int) -> None:
        conn.execute(
            sa.insert(self.snapshot_chunks).values(
                source_id=self.source_id,
                slot=self.slot,
                tbl=chunk.table,
                chunk=chunk.index,
                chunks=chunk.count,
                anchor=chunk.anchor,
                rows=rows,
                ranges=chunk.ranges,
            )
        )

    def _copy_batch(
        self,
        conn: sa.Connection,
        target: _Target,
        names: tuple[str, ...],
        rows: list[Sequence[Any]],
    ) -> int:
        """Insert rows of driver values (in ``names`` order) with one ``executemany``."""
        if self.conflict == "lww" and not target.keyless:
            table, tomb = target.table, self.tombstones
            at = [names.index(k) for k in target.keys]
            rows = [
                row
                for row in rows
                if lww.stored_version(
                    conn, table, tomb, {k: row[i] for k, i in zip(target.keys, at, strict=True)}
                )[0]
                is None
            ]
            if not rows:
                return 0
        stmt = self._statement(conn, target, "insert", names)
        try:
            if stmt.order == names:
                self._insert_many(conn, target, names, list(map(tuple, rows)))
            else:
                params = [stmt.params(dict(zip(names, row, strict=True))) for row in rows]
                conn.exec_driver_sql(stmt.sql, params)
        except DBAPIError as exc:
            if _transient(exc):
                raise
            raise SinkError(
                f"cannot copy a row of {target.table.name} into the target {self.url}: "
                f"{_reason(exc)}. Fix the target and run again: copied chunks are kept"
            ) from None
        return len(rows)

    def finish_snapshot(self, checkpoint: int | None, copied: Sequence[str] = ()) -> None:
        """Record the snapshot's end: the checkpoint the stream resumes from (the lowest
        anchor; None while streaming, when the checkpoint stays) and that the ``copied``
        tables' requests are done. The stream then skips each table's changes up to its
        own anchor."""
        sc = self.snapshot_chunks
        try:
            with self._write_lock, self.engine.begin() as conn:
                if checkpoint is not None:
                    self._write_checkpoint(conn, checkpoint)
                if copied:
                    conn.execute(
                        sa.delete(sc).where(
                            sc.c.source_id == self.source_id,
                            sc.c.slot == self.slot,
                            sc.c.tbl.in_(list(copied)),
                            sc.c.chunk == REQUESTED,
                        )
                    )
        except SQLAlchemyError as exc:
            raise self._failure(exc, "record the snapshot's end in") from None
        current = checkpoint if checkpoint is not None else self.checkpoint()
        self.load_skips(int(current or 0))
        self.requested = bool(self.pending_copies())

    def load_skips(self, checkpoint: int) -> None:
        """Skip, in the stream, each snapshotted table's changes up to its chunks' anchors
        (rule 5)."""
        self._skip = skipped_until(self.snapshot_progress(), checkpoint)
        self._bounds.clear()

    def _mark_requests(self, conn: sa.Connection, txn: Transaction) -> None:
        """Mark for copying, in this target transaction, the tables a snapshot request in
        ``txn`` names and the tables the target has never seen (added to a publication)."""
        tables: list[str] = []
        known = self._targets
        for change in txn.changes:
            if type(change) is RowChange:  # the common case, one dict lookup
                if change.relation in known:
                    continue
                rels: tuple[RelationInfo, ...] = (change.relation,)
            elif isinstance(change, Message):
                if change.prefix == SNAPSHOT_REQUEST_PREFIX:
                    tables += self._requested_tables(change)
                continue
            else:
                rels = change.relations if isinstance(change, TruncateChange) else ()
            for rel in rels:
                name = rel.qualified_name
                if rel in known or name in self._present or name in self._batch_skip:
                    continue
                if sa.inspect(conn).has_table(target_name(rel)):
                    self._present.add(name)
                else:
                    log.info("%s is new to the target: copying its rows", name)
                    tables.append(name)
        if tables:
            self._mark(conn, tables)

    def _requested_tables(self, message: Message) -> list[str]:
        try:
            request = json.loads(message.content)
            slot = request.get("slot")
            tables = [str(t) if "." in str(t) else f"public.{t}" for t in request["tables"]]
        except (ValueError, KeyError, TypeError, AttributeError):
            log.warning("ignored a malformed snapshot request: %r", bytes(message.content)[:200])
            return []
        if slot not in (None, self.slot):
            return []
        log.info("snapshot requested for %s", ", ".join(tables))
        return tables

    def _mark(self, conn: sa.Connection, tables: list[str]) -> None:
        """Mark tables for copying: the marker replaces the table's earlier progress (an
        older copy's chunks), so progress seen with a marker is always the new copy's."""
        sc = self.snapshot_chunks
        for name in dict.fromkeys(tables):
            conn.execute(
                sa.delete(sc).where(
                    sc.c.source_id == self.source_id,
                    sc.c.slot == self.slot,
                    sc.c.tbl == name,
                )
            )
            conn.execute(
                sa.insert(sc).values(
                    source_id=self.source_id,
                    slot=self.slot,
                    tbl=name,
                    chunk=REQUESTED,
                    chunks=0,
                    anchor=UNTIL_COPIED,
                    rows=0,
                )
            )
            self._batch_skip[name] = UNTIL_COPIED

    def pending_copies(self) -> list[str]:
        """Tables marked for copying, or whose copy was interrupted (``snapshot.plan``)."""
        done = self.snapshot_progress()
        return list(resume(sorted({c.table for c in done}), done).to_copy)

    def _unskipped(self, conn: sa.Connection, txn: Transaction) -> Transaction:
        """The transaction without its changes that a copy already holds (``snapshot.plan``
        rules 5 and 6)."""
        end = int(txn.end_lsn)
        kept: list[Any] = []
        for change in txn.changes:
            if isinstance(change, RowChange):
                rule = self._rule(change.relation)
                if rule is None or (type(rule) is int and rule < end):
                    kept.append(change)
                elif isinstance(rule, KeySkip):
                    kept += self._by_key(conn, change, rule, end)
            elif isinstance(change, TruncateChange):
                rels = []
                for rel in change.relations:
                    rule = self._rule(rel)
                    if isinstance(rule, KeySkip) and min(rule.anchors) < end <= rule.highest:
                        # chunks copied before the truncate and after it: copy it again
                        self._mark(conn, [rel.qualified_name])
                    elif rule is None or highest(rule) < end:
                        rels.append(rel)
                if rels:
                    kept.append(replace(change, relations=tuple(rels)))
            else:
                kept.append(change)
        return replace(txn, changes=tuple(kept))

    def _rule(self, rel: RelationInfo) -> int | KeySkip | None:
        name = rel.qualified_name
        marked = self._batch_skip.get(name)
        return marked if marked is not None else self._skip.get(name)

    def _by_key(
        self, conn: sa.Connection, change: RowChange, rule: KeySkip, end: int
    ) -> list[RowChange]:
        """Rules 5 and 6 for a table whose key ranges hold different anchors: the change as
        applied where its key's chunk does not hold it yet ([] when it does)."""
        rel = change.relation
        target = self._target(conn, rel)
        column = rule.ranges.column
        bounds = self._bounds.get((rel, rule))
        if bounds is None:
            load = next(tload for name, tload, _ in target.fused if name == column)
            bounds = self._bounds[(rel, rule)] = [load(b.encode()) for b in rule.ranges.bounds]

        def copied(at: int) -> bool:
            key = rel.row_at(change.raw, at, key_only=True, fused=target.fused)
            return rule.anchor_at(bounds, key.get(column)) >= end

        if change.op == "insert":
            return [] if copied(change.new_at) else [change]
        if change.op == "delete":
            return [] if copied(change.old_at) else [change]
        new_copied = copied(change.new_at)
        if change.old_at < 0 or change.old_kind != "K":  # the key stayed
            return [] if new_copied else [change]
        old_copied = copied(change.old_at)
        if old_copied == new_copied:
            return [] if new_copied else [change]
        if new_copied:  # the new row is in its chunk's copy; the old key's chunk still has it
            return [RowChange("delete", rel, change.raw, -1, change.old_at, "K")]
        if len(rel.row_at(change.raw, change.new_at, fused=target.fused)) < rel.ncols:
            # the new row's chunk needs it whole, but an unchanged TOASTed value is not sent
            log.info(
                "%s: a key moved between chunks of different snapshots without its TOASTed "
                "values: copying the table again",
                rel.qualified_name,
            )
            self._mark(conn, [rel.qualified_name])
            return []
        return [RowChange("insert", rel, change.raw, change.new_at, -1, None)]

    def _failure(self, exc: SQLAlchemyError, what: str) -> SinkError:
        if _transient(exc):
            return TargetUnavailableError(f"cannot {what} the target {self.url}: {_reason(exc)}")
        return SinkError(f"cannot {what} the target {self.url}: {_reason(exc)}")

    # -- last writer wins (rules in sinks.lww) --------------------------------------------

    def _apply_lww(self, conn: sa.Connection, txn: Transaction, pos: int, change: Any) -> None:
        if isinstance(change, Message):
            return
        if isinstance(change, TruncateChange):
            for rel in change.relations:
                conn.execute(sa.delete(self._target(conn, rel).table))
            return
        target = self._target(conn, change.relation)
        if target.keyless:  # no identity to version: stream order, as --conflict source
            row, _ = self._row(target, change)
            self._execute(conn, target, change.op, [row])
            return
        table, rel, tomb = target.table, change.relation, self.tombstones
        version = (txn.timestamp_us, self.node_id, int(txn.end_lsn), pos)
        old_at = change.old_at if change.old_at >= 0 else change.new_at
        key = rel.row_at(change.raw, old_at, key_only=True, fused=target.fused)
        if change.op == "delete":
            stored, _ = lww.stored_version(conn, table, tomb, key)
            if stored is None or stored < version:
                lww.delete_row(conn, table, tomb, key, version)
            return
        new = rel.row_at(change.raw, change.new_at, fused=target.fused)
        new_key = {k: new[k] for k in target.keys if k in new}
        carried: dict[str, Any] = {}
        if new_key and new_key != key:  # a key change moves the whole row (rule 3)
            stored, old_row = lww.stored_version(conn, table, tomb, key)
            if old_row is not None:
                carried = {c: old_row[c] for c in rel.names if c not in new and c in old_row}
            if stored is None or stored < version:
                lww.delete_row(conn, table, tomb, key, version)
            key = new_key
        stored, current = lww.stored_version(conn, table, tomb, key)
        if stored is not None and stored >= version:
            return  # a newer write holds this key (rule 2)
        values = {**carried, **new}
        lww.write_row(conn, table, tomb, key, values, version, exists=current is not None)

    # -- tables ----------------------------------------------------------------------------

    def _target(self, conn: sa.Connection, rel: RelationInfo) -> _Target:
        target = self._targets.get(rel)
        if target is None:
            target = self._targets[rel] = self._prepare(conn, rel)
        return target

    def _prepare(self, conn: sa.Connection, rel: RelationInfo) -> _Target:
        """Create the table on first sight, or use the existing one; follow schema changes.

        Binding uses the types this module maps, never reflected ones (reflection turns a
        Uuid into CHAR(32), a JSON into LONGTEXT): only the column names are read back.
        """
        name = target_name(rel)
        keyless = is_keyless(rel)
        keys = () if keyless else rel.key_names
        columns = base_columns(rel)
        inspector = sa.inspect(conn)
        if inspector.has_table(name):
            present = {c["name"] for c in inspector.get_columns(name)}
            if keyless and ROWID_COL not in present:
                raise SinkError(
                    f"target table {name} has no {ROWID_COL} column, which a table without a "
                    "key (REPLICA IDENTITY FULL) needs to update or delete one of several "
                    "equal rows: it was made by an older version with every column in its "
                    "primary key. Drop it and the checkpoint row, then replicate again"
                )
        else:
            self._create(conn, rel, name, keys, keyless=keyless)
            present = {c.name for c in rel.columns} | (
                set(VERSION_COLS) if self.conflict == "lww" and not keyless else set()
            )
            if keyless:
                present.add(ROWID_COL)
        for col in columns:
            if col.name not in present:
                self._add_column(
                    conn, name, sa.Column(col.name, column_type(col, self.dialect, is_key=False))
                )
        if self.conflict == "lww" and not keyless:
            for extra in VERSION_COLS:
                if extra not in present:
                    self._add_column(conn, name, sa.Column(extra, sa.BigInteger))
        self._note_schema(name, rel, present)
        cols = self._columns(columns, keys, keyless=keyless)
        table = sa.Table(name, sa.MetaData(), *cols)
        fused = tuple((c.name, *loaders(c, self.dialect)) for c in columns)
        dialect = conn.dialect
        # under LWW the copy looks keys up as Python values (sinks.lww), so a PostgreSQL
        # target's rows stay typed there; everywhere else its text goes through as it is
        typed = self.conflict == "lww" and self.dialect == "postgresql"
        passthrough = {
            c.name for c in columns if not typed and text_is_driver_value(c, self.dialect)
        }
        driver_fused = tuple(
            (
                name,
                # PostgreSQL's text is already what the driver stores: no parse, no re-format
                _decode if name in passthrough else _then_bind(tload, table.c[name].type, dialect),
                _then_bind(bload, table.c[name].type, dialect),
            )
            for name, tload, bload in fused
        )
        row_values = _row_values(columns, table, dialect, passthrough)
        plan = _driver_plan(columns, table, dialect, passthrough)
        return _Target(
            table,
            fused,
            driver_fused,
            keys,
            tuple((k, _KEY + k) for k in keys),
            keyless,
            row_values=row_values,
            fast_row=_fast_row(columns, row_values, plan),
            driver_row=None
            if plan is None or accel.driver_row is None
            else partial(accel.driver_row, plan),
            ncols=rel.ncols,
            names=rel.names,
            key_of=itemgetter(*keys) if keys else _Target.key_of,
            key_bind=_key_bind(tuple(_KEY + k for k in keys)),
            row_key=key_reader(rel, keys) if keys else _Target.row_key,
            hold=(name, key_indexes(rel, keys), rel.ncols) if keys else None,
        )

    def _columns(
        self, columns: tuple[Column, ...], keys: tuple[str, ...], *, keyless: bool
    ) -> list[sa.Column[Any]]:
        """The target table's columns: the source's (the key as primary key), the surrogate
        of a keyless table, the version columns of LWW."""
        cols: list[sa.Column[Any]] = [
            sa.Column(
                c.name,
                column_type(c, self.dialect, is_key=c.name in keys),
                primary_key=c.name in keys,
                autoincrement=False,
            )
            for c in columns
        ]
        if keyless:
            surrogate = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
            cols.append(sa.Column(ROWID_COL, surrogate, primary_key=True, autoincrement=True))
        elif self.conflict == "lww":
            cols += lww.version_columns()
        return cols

    def _note_schema(self, name: str, rel: RelationInfo, present: set[str]) -> None:
        """Report type changes and dropped columns seen in a re-sent Relation."""
        before = self._source_columns.get(name)
        now = {c.name: c for c in rel.columns}
        self._source_columns[name] = now
        dropped = (set(before) if before else present) - set(now) - {*VERSION_COLS, ROWID_COL}
        if dropped:
            log.info(
                "columns %s of %s are no longer sent by the source; kept, not written",
                sorted(dropped),
                name,
            )
        for col_name, col in now.items():
            old = (before or {}).get(col_name)
            if old is not None and (old.type_oid, old.type_modifier) != (
                col.type_oid,
                col.type_modifier,
            ):
                log.warning(
                    "type of %s.%s changed in the source (oid %d → %d); the target column "
                    "keeps its type, values are written as they come",
                    name,
                    col_name,
                    old.type_oid,
                    col.type_oid,
                )

    def _create(
        self,
        conn: sa.Connection,
        rel: RelationInfo,
        name: str,
        keys: tuple[str, ...],
        *,
        keyless: bool,
    ) -> sa.Table:
        # MariaDB/MySQL: text in PostgreSQL is UTF-8 of any plane; a server whose default
        # charset is latin1 (or utf8mb3) would refuse it. Given only there: the option loads
        # SQLAlchemy's MySQL dialect, which costs any other target startup time
        options: dict[str, Any] = (
            {"mysql_charset": "utf8mb4"} if self.dialect in ("mysql", "mariadb") else {}
        )
        table = sa.Table(
            name,
            sa.MetaData(),
            *self._columns(base_columns(rel), keys, keyless=keyless),
            **options,
        )
        table.create(conn)
        log.info("created target table %s", name)
        return table

    def _add_column(self, conn: sa.Connection, table: str, column: sa.Column[Any]) -> None:
        from alembic.migration import MigrationContext
        from alembic.operations import Operations

        Operations(MigrationContext.configure(conn)).add_column(table, column)
        log.info("added column %s to target table %s", column.name, table)


class _Rollback(Exception):
    pass


def _then_bind(
    load: Callable[[bytes], Any], type_: sa.types.TypeEngine[Any], dialect: sa.Dialect
) -> Callable[[bytes], Any]:
    """``load``, then the bind processing SQLAlchemy would apply for this column type."""
    process = type_.dialect_impl(dialect).bind_processor(dialect)
    if process is None:
        return load
    return lambda data: process(load(data))


def _decode(data: bytes) -> str:
    return bytes(data).decode()


_TEXT_OID = 25


def _chain(first: Callable[[Any], Any], then: Callable[[Any], Any]) -> Callable[[Any], Any]:
    return lambda value: then(first(value))


@contextmanager
def _driver(conn: sa.Connection, what: str) -> Iterator[psycopg.Connection[Any]]:
    """The psycopg connection under ``conn``; its errors raised as SQLAlchemy would have
    raised them from a statement (so ``apply`` retries, pinpoints and reports as usual)."""
    driver = conn.connection.driver_connection
    assert isinstance(driver, psycopg.Connection)
    try:
        yield driver
    except psycopg.Error as exc:
        raise DBAPIError.instance(what, None, exc, psycopg.Error) from None


def _key_bind(params: tuple[str, ...]) -> Callable[[Any], dict[str, Any]]:
    """``_Target.key_bind``: ``itemgetter`` gives one key column's value bare."""
    if len(params) == 1:
        (only,) = params
        return lambda key: {only: key}
    return lambda key: dict(zip(params, key, strict=True))


def _declined(values: Sequence[bytes | None]) -> Any:
    """``typed_row``'s binary row loader here: binary rows take the Python walk."""
    return None


def _fast_row(
    columns: tuple[Column, ...],
    row_values: Callable[[Sequence[bytes | None]], tuple[Any, ...]],
    plan: tuple[accel.DriverStep, ...] | None,
) -> Callable[[bytes, int], dict[str, Any] | None]:
    template = dict.fromkeys(c.name for c in columns)
    if plan is not None and accel.driver_dict is not None:
        return partial(accel.driver_dict, template, plan)
    if accel.typed_row is None:
        return _Target.fast_row
    return partial(accel.typed_row, template, row_values, _declined)


def _column_path(
    col: Column, table: sa.Table, dialect: sa.Dialect, passthrough: set[str]
) -> tuple[int | None, Callable[[Any], Any] | None]:
    """A column's way to its driver value: the OID whose psycopg loader reads its text (None:
    the text, decoded), then the step for a non-NULL loaded value (None: none), which is
    ``value_path``'s edit and the column type's bind processing."""
    oid, post = (None, None) if col.name in passthrough else value_path(col, dialect.name)
    impl = None if oid is None else table.c[col.name].type.dialect_impl(dialect)
    process = None if impl is None else impl.bind_processor(dialect)
    if dialect.name == "sqlite" and isinstance(impl, sa.LargeBinary):
        process = None  # sqlite3 binds bytes as the BLOB its Binary (a memoryview) makes
    if post is not None and process is not None:
        return oid, _chain(post, process)
    return oid, post if post is not None else process


def _row_values(
    columns: tuple[Column, ...], table: sa.Table, dialect: sa.Dialect, passthrough: set[str]
) -> Callable[[Sequence[bytes | None]], tuple[Any, ...]]:
    """``_Target.row_values``: the same values as ``driver_fused``, a row at a time."""
    paths = [_column_path(col, table, dialect, passthrough) for col in columns]
    steps = [(i, step) for i, (_, step) in enumerate(paths) if step is not None]
    rows = transformer()
    rows.set_loader_types([_TEXT_OID if oid is None else oid for oid, _ in paths], Format.TEXT)
    load = rows.load_sequence

    if not steps:
        return load

    def convert(values: Sequence[bytes | None]) -> tuple[Any, ...]:
        row = list(load(values))
        for i, step in steps:
            if row[i] is not None:
                row[i] = step(row[i])
        return tuple(row)

    return convert


#: loaded types whose values ``_fastrow.driver_row`` makes itself, when the column type binds
#: them as they are (SQLAlchemy's float processor returns a float as it is; its Boolean's
#: gives 1 or 0 on SQLite, as DRIVER_BOOL does)
_DRIVER_MODES = {
    **dict.fromkeys(("int2", "int4", "int8", "oid"), accel.DRIVER_INT),
    **dict.fromkeys(("float4", "float8"), accel.DRIVER_FLOAT),
    **dict.fromkeys(("text", "varchar", "bpchar", "name"), accel.DRIVER_TEXT),
    "bool": accel.DRIVER_BOOL,
    "bytea": accel.DRIVER_BYTEA,
}


def _driver_plan(
    columns: tuple[Column, ...], table: sa.Table, dialect: sa.Dialect, passthrough: set[str]
) -> tuple[accel.DriverStep, ...] | None:
    """``row_values`` as a plan for ``_fastrow.driver_row`` (SQLite): each column a mode
    that converts its text in C, or psycopg's loader and the step called from C. Into SQLite,
    where nearly every value is the source's text edited (``sqlitetext``), that makes a
    row's values with no Python frame; ``tests/test_sqlitetext.py`` holds the two equal."""
    if accel.driver_row is None or dialect.name != "sqlite":
        return None
    plan: list[accel.DriverStep] = []
    for col in columns:
        oid, step = _column_path(col, table, dialect, passthrough)
        mode: int | None = None
        if oid is None:  # the text, as it is or edited
            mode = accel.DRIVER_TEXT if step is None else sqlitetext.MODES.get(step)
        else:  # a loaded value, bound as it is (or as the mode binds it: bool, float)
            name = describe(col.type_oid)[0]
            if step is None or name in ("bool", "float4", "float8"):
                mode = _DRIVER_MODES.get(name or "")
        if mode is not None:
            plan.append(mode)
            continue
        load = transformer().get_loader(_TEXT_OID if oid is None else oid, Format.TEXT).load
        plan.append(load if step is None else _chain(load, step))
    return tuple(plan)


def is_keyless(rel: RelationInfo) -> bool:
    """Whether rows of ``rel`` have no identity to match them by in the target: REPLICA
    IDENTITY FULL (pgoutput then marks every column as key) or no key columns at all."""
    return rel.replica_identity in ("f", "n") or not rel.key_names


def _transient(exc: BaseException) -> bool:
    """Whether a failure means the target went away (restart, network) rather than refused
    the data: SQLAlchemy's own disconnect detection first, then the drivers' codes."""
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    orig = getattr(exc, "orig", None)
    sqlstate = getattr(orig, "sqlstate", None)
    if sqlstate is not None:  # psycopg: connection exceptions, shutdown, cannot connect now
        return str(sqlstate).startswith(("08", "57P"))
    if type(orig).__module__.startswith("psycopg") and isinstance(exc, sa.exc.OperationalError):
        return True  # libpq's own connection failures carry no SQLSTATE
    code = orig.args[0] if orig is not None and getattr(orig, "args", None) else None
    if type(orig).__module__.startswith("pymysql"):  # can't connect, gone away, lost
        return code in (2003, 2006, 2013, 2055)
    return "database is locked" in str(orig or "")  # SQLite: another writer holds it


def _reason(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None)
    text = str(orig if orig is not None else exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _row_error(target: _Target, op: str, change: Any, exc: BaseException) -> str:
    key = ""
    if isinstance(change, RowChange):
        try:
            key = f" key {change.key}"
        except Exception:
            key = ""
    return (
        f"cannot apply {op} to table {target.table.name}{key}: {_reason(exc)}. "
        "The transaction was not acknowledged; fix the target and restart to retry it."
    )


def _safe_url(url: str) -> str:
    try:
        return sa.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<invalid URL>"
