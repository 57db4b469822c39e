"""``_fastrow.hold_rows`` (the SQL sink's reduction holds runs of row changes in C) against
its Python twin, ``SqlSink._hold`` change by change: on any consistent batch the sink writes
exactly the same statements with the same parameters, whichever holds the rows."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pglogrepl_bridge.pgoutput.assembly import TransactionAssembler
from pglogrepl_bridge.pgoutput.messages import (
    Begin,
    Column,
    Commit,
    Delete,
    Insert,
    Message,
    PgOutputMessage,
    Relation,
    TupleData,
    Update,
)
from pglogrepl_bridge.pgoutput.transaction import Transaction
from pglogrepl_bridge.sinks import sql
from pglogrepl_bridge.sinks.sql import SqlSink

from .pgoutput_builders import encode

pytestmark = pytest.mark.skipif(sql._HOLD_ROWS is None, reason="the C accelerator is not built")

INT4, TEXT = 23, 25
ONE = (Column("id", INT4, -1, True), Column("v", TEXT, -1, False), Column("big", TEXT, -1, False))
TWO = (Column("k1", INT4, -1, True), Column("k2", TEXT, -1, True), Column("v", TEXT, -1, False))
FULL = (Column("x", INT4, -1, True), Column("v", TEXT, -1, True))
#: one key column; a key of two; REPLICA IDENTITY FULL (keyless: never held)
RELATIONS = {
    21: Relation(None, 21, "public", "one", "d", ONE),
    22: Relation(None, 22, "public", "two", "d", TWO),
    23: Relation(None, 23, "public", "full", "f", FULL),
}
OTHER = ["message", "relation"]  # rarer: each sends the walk back to Python
KEYS = {21: 1, 22: 2, 23: 2}  # leading columns that identify a row in our generated rows


def _row(relid: int, key: int, value: str, toast: bool) -> TupleData:
    """A whole row; with ``toast``, its last column not sent (unchanged TOAST)."""
    key_values = [str(key).encode(), f"k{key % 2}".encode()][: KEYS[relid]]
    values = [*key_values, value.encode(), b"toast " * 3][: len(RELATIONS[relid].columns)]
    kinds = b"t" * len(values)
    if toast and relid != 23:
        kinds = kinds[:-1] + b"u"
        values[-1] = b""
    return TupleData(
        kinds, tuple(None if k == b"u"[0] else v for k, v in zip(kinds, values, strict=True))
    )


def _old(relid: int, key: int, value: str) -> tuple[str, TupleData]:
    """The old row a delete or key change sends: the key ('K'), or the whole row under FULL."""
    if relid == 23:
        return "O", _row(relid, key, value, False)
    whole = _row(relid, key, value, False)
    nkeys = KEYS[relid]
    kinds = whole.kinds[:nkeys] + b"n" * (len(whole.kinds) - nkeys)
    return "K", TupleData(kinds, whole.values[:nkeys] + (None,) * (len(kinds) - nkeys))


@st.composite
def _batch(draw: st.DrawFn) -> list[PgOutputMessage]:
    """A consistent transaction over the three tables: inserts of absent keys, updates
    (some leaving TOAST out, some changing the key) and deletes of present ones, a message,
    and a Relation sent again mid-batch."""
    present: dict[int, dict[int, str]] = {relid: {} for relid in RELATIONS}
    msgs: list[PgOutputMessage] = [Begin(900, 0, 7), *RELATIONS.values()]
    for _ in range(draw(st.integers(1, 50))):
        relid = draw(st.sampled_from([21, 21, 21, 22, 22, 23]))
        rows = present[relid]
        what = draw(st.sampled_from(["insert"] * 4 + ["update"] * 4 + ["delete"] * 2 + OTHER))
        value = draw(st.sampled_from(["a", "b", "é", ""]))
        if what == "message":
            msgs.append(Message(None, True, 0, "x", b"y"))
        elif what == "relation":
            msgs.append(RELATIONS[relid])
        elif what == "insert" or not rows:
            free = [k for k in range(6) if k not in rows]
            if not free:
                continue
            key = draw(st.sampled_from(free))
            rows[key] = value
            msgs.append(Insert(None, relid, _row(relid, key, value, False)))
        elif what == "update":
            key = draw(st.sampled_from(sorted(rows)))
            toast = draw(st.integers(0, 3)) == 0
            to = key
            free = [k for k in range(8) if k not in rows and k != key]
            if relid != 23 and free and draw(st.integers(0, 4)) == 0:  # the key changes
                to = draw(st.sampled_from(free))
            old_kind, old = _old(relid, key, rows.pop(key))
            rows[to] = value
            new = _row(relid, to, value, toast)
            if to == key and relid != 23:
                msgs.append(Update(None, relid, None, None, new))
            else:
                msgs.append(Update(None, relid, old_kind, old, new))  # type: ignore[arg-type]
        else:
            key = draw(st.sampled_from(sorted(rows)))
            old_kind, old = _old(relid, key, rows.pop(key))
            msgs.append(Delete(None, relid, old_kind, old))  # type: ignore[arg-type]
    return [*msgs, Commit(0, 900, 1000, 0)]


def _assemble(msgs: list[PgOutputMessage]) -> Transaction:
    asm = TransactionAssembler()
    events = [asm.feed(encode(m), 100 + n) for n, m in enumerate(msgs)]
    (txn,) = [e for e in events if isinstance(e, Transaction)]
    return txn


def _writes(path: Path, txn: Transaction) -> tuple[list[tuple[str, Any]], list[Any]]:
    """The statements the sink runs for ``txn`` (the checkpoint's aside), and what the
    tables hold after."""
    sink = SqlSink(f"sqlite:///{path}", source_id="s", slot="x")
    seen: list[tuple[str, Any]] = []

    def record(conn: Any, cursor: Any, statement: str, params: Any, *rest: Any) -> None:
        if sql.CHECKPOINT_TABLE not in statement:
            seen.append((statement, params))

    sa.event.listen(sink.engine, "before_cursor_execute", record)
    sink.apply([txn])
    with sink.engine.connect() as conn:
        tables = [t for t in ("one", "two", "full") if sa.inspect(conn).has_table(t)]
        rows = [conn.exec_driver_sql(f"SELECT * FROM {t} ORDER BY 1, 2").all() for t in tables]
    sink.engine.dispose()
    return seen, rows


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(_batch(), st.sampled_from([3, 7, 2000]))
def test_the_c_walk_writes_what_python_writes(
    tmp_path: Path, msgs: list[PgOutputMessage], held_rows: int
) -> None:
    """Same statements, same parameters, same rows in the end: with the C walk, and with
    ``_hold`` alone (``_HOLD_ROWS`` None). ``HELD_ROWS`` small makes the walk stop for room
    mid-run, and the sink write what it holds, many times a batch."""
    txn = _assemble(msgs)
    for p in tmp_path.glob("*.db"):
        p.unlink()
    walk, limit = sql._HOLD_ROWS, sql.HELD_ROWS
    assert walk is not None
    try:  # set per example: a monkeypatch would last for all of hypothesis's examples
        sql.HELD_ROWS = held_rows
        with_c = _writes(tmp_path / "c.db", txn)
        sql._HOLD_ROWS = None
        in_python = _writes(tmp_path / "py.db", txn)
    finally:
        sql._HOLD_ROWS, sql.HELD_ROWS = walk, limit
    assert with_c == in_python
