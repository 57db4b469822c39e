"""Transaction assembly on synthetic streams built with the builders."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pglogrepl_bridge.errors import DecodeError
from pglogrepl_bridge.pgoutput.assembly import TransactionAssembler
from pglogrepl_bridge.pgoutput.messages import (
    Begin,
    Column,
    Commit,
    Insert,
    Message,
    Origin,
    PgOutputMessage,
    Relation,
    StreamAbort,
    StreamCommit,
    StreamStart,
    StreamStop,
    TupleData,
    Type,
)
from pglogrepl_bridge.pgoutput.relcache import RelationCache
from pglogrepl_bridge.pgoutput.transaction import Event, RowChange, Transaction
from pglogrepl_bridge.pgoutput.values import ValueLoaders, ValueProblem

from .pgoutput_builders import encode

REL = Relation(
    None, 10, "public", "t", "d", (Column("id", 23, -1, True), Column("v", 25, -1, False))
)


def row(i: int, v: str = "x") -> TupleData:
    return TupleData(b"tt", (str(i).encode(), v.encode()))


def feed(asm: TransactionAssembler, msgs: list[PgOutputMessage]) -> list[Event]:
    out = []
    for n, m in enumerate(msgs):
        event = asm.feed(encode(m), 1000 + n)
        if event is not None:
            out.append(event)
    return out


def ids(event: Event) -> list[int]:
    assert isinstance(event, Transaction)
    return [c.new["id"] for c in event.changes if isinstance(c, RowChange) and c.new]


def test_plain_transaction_with_origin() -> None:
    asm = TransactionAssembler()
    (txn,) = feed(
        asm,
        [
            Begin(500, 0, 7),
            Origin(1, "node_a"),
            REL,
            Insert(None, 10, row(1)),
            Commit(0, 500, 600, 1_000_000),
        ],
    )
    assert isinstance(txn, Transaction)
    assert (txn.xid, txn.commit_lsn, txn.end_lsn, txn.origin) == (7, 500, 600, "node_a")
    assert txn.timestamp_us == 946_684_801_000_000
    assert ids(txn) == [1]


def test_pending_lsn_tracks_the_open_transaction() -> None:
    asm = TransactionAssembler()
    assert asm.oldest_pending_lsn is None
    asm.feed(encode(Begin(500, 0, 7)), 450)
    assert asm.oldest_pending_lsn == 450 and asm.in_transaction
    asm.feed(encode(Commit(0, 500, 600, 0)), 500)
    assert asm.oldest_pending_lsn is None and not asm.in_transaction


def test_interleaved_streams_and_subxact_abort() -> None:
    asm = TransactionAssembler(spill_bytes=64)
    events = feed(
        asm,
        [
            StreamStart(1, True),
            Relation(1, 10, "public", "t", "d", REL.columns),
            Insert(1, 10, row(1)),
            Insert(11, 10, row(2)),
            StreamStop(),
            StreamStart(2, True),
            Relation(2, 10, "public", "t", "d", REL.columns),
            Insert(2, 10, row(100)),
            StreamStop(),
            StreamStart(1, False),
            Insert(11, 10, row(3)),
            Insert(12, 10, row(4)),
            StreamStop(),
            StreamAbort(1, 11),  # drops 2, 3 and the nested 4
            StreamStart(1, False),
            Insert(1, 10, row(5)),
            StreamStop(),
            StreamAbort(2, 2),  # the whole of xid 2
            StreamCommit(1, 0, 900, 950, 0),
        ],
    )
    assert [ids(e) for e in events] == [[1, 5]]
    assert not asm.in_transaction


def test_streamed_relation_waits_for_commit() -> None:
    asm = TransactionAssembler()
    feed(
        asm, [StreamStart(1, True), Relation(1, 10, "public", "t", "d", REL.columns), StreamStop()]
    )
    assert 10 not in asm.relations  # PostgreSQL's apply worker does the same


def test_non_transactional_message_is_delivered_at_once() -> None:
    asm = TransactionAssembler()
    msg = Message(None, False, 77, "audit", b"hi")
    assert feed(asm, [msg]) == [msg]


def test_unknown_relid_is_a_clear_error() -> None:
    asm = TransactionAssembler()
    with pytest.raises(DecodeError, match="relation id 99 before any Relation message"):
        feed(asm, [Begin(500, 0, 7), Insert(None, 99, row(1))])


def test_column_count_mismatch() -> None:
    asm = TransactionAssembler()
    (txn,) = feed(
        asm, [Begin(5, 0, 7), REL, Insert(None, 10, TupleData(b"t", (b"1",))), Commit(0, 5, 6, 0)]
    )
    assert isinstance(txn, Transaction)
    change = txn.changes[0]
    assert isinstance(change, RowChange)
    with pytest.raises(DecodeError, match="tuple has 1 columns"):
        _ = change.new


def test_commit_without_begin() -> None:
    with pytest.raises(DecodeError, match="Commit without a Begin"):
        feed(TransactionAssembler(), [Commit(0, 5, 6, 0)])


def test_bad_value_keeps_text_and_is_reported() -> None:
    problems: list[ValueProblem] = []
    asm = TransactionAssembler(RelationCache(ValueLoaders(on_problem=problems.append)))
    rel = Relation(
        None, 10, "public", "t", "d", (Column("id", 23, -1, True), Column("d", 1082, -1, False))
    )
    (txn,) = feed(
        asm,
        [
            Begin(5, 0, 7),
            rel,
            Insert(None, 10, TupleData(b"tt", (b"1", b"infinity"))),
            Commit(0, 5, 6, 0),
        ],
    )
    change = txn.changes[0]  # type: ignore[union-attr]
    assert isinstance(change, RowChange)
    assert change.new == {"id": 1, "d": "infinity"}
    assert len(problems) == 1 and problems[0].column == "d" and problems[0].text == "infinity"


def test_domain_loads_through_its_base_type() -> None:
    asm = TransactionAssembler(RelationCache(ValueLoaders(type_map={"public.posint": "int4"})))
    rel = Relation(
        None, 10, "public", "t", "d", (Column("a", 50000, -1, True), Column("b", 50001, -1, False))
    )
    (txn,) = feed(
        asm,
        [
            Begin(5, 0, 7),
            Type(None, 50000, "public", "posint"),
            Type(None, 50001, "public", "mood"),
            rel,
            Insert(None, 10, TupleData(b"tt", (b"42", b"happy"))),
            Commit(0, 5, 6, 0),
        ],
    )
    change = txn.changes[0]  # type: ignore[union-attr]
    assert isinstance(change, RowChange)
    assert change.new == {"a": 42, "b": "happy"}


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=40), st.sampled_from(b"IUD"))
def test_fuzzed_row_changes_only_raise_decode_error(body: bytes, tag: int) -> None:
    """Row values are parsed lazily: reading them must fail just as cleanly as feeding them."""
    asm = TransactionAssembler()
    feed(asm, [Begin(5, 0, 7), REL])
    payload = bytes([tag]) + b"\0\0\0\x0a" + body  # relid 10: known relation, random rest
    try:
        asm.feed(payload, 9)
        (txn,) = feed(asm, [Commit(0, 5, 6, 0)])
        for change in txn.changes:  # type: ignore[union-attr]
            assert isinstance(change, RowChange)
            for value in (change.new, change.old):
                assert value is None or set(value) <= {"id", "v"}
            _ = change.unchanged_toast
    except DecodeError:
        pass
