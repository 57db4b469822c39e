"""Decode bytes captured from real PostgreSQL 15 and 16 (see tests/data/capture.py)."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from pglogrepl_bridge.pgoutput.assembly import TransactionAssembler
from pglogrepl_bridge.pgoutput.messages import Message
from pglogrepl_bridge.pgoutput.relcache import RelationCache
from pglogrepl_bridge.pgoutput.transaction import Event, RowChange, Transaction, TruncateChange
from pglogrepl_bridge.pgoutput.values import ValueLoaders

CAPTURES = Path(__file__).resolve().parent / "data" / "captures"
VERSIONS = [15, 16]
# the first row of the "basic" capture, each value as PostgreSQL's text output
FIRST_ITEM_AS_TEXT = {
    "id": "1",
    "name": "apple",
    "price": "1.50",
    "tags": '{red,"green apple",NULL}',
    "big": None,
    "feel": "happy",
}


def replay(version: int, name: str, **kwargs: object) -> tuple[list[Event], TransactionAssembler]:
    mode = kwargs.pop("mode", "typed")
    asm = TransactionAssembler(RelationCache(ValueLoaders(mode)), **kwargs)  # type: ignore[arg-type]
    events = []
    for line in (CAPTURES / f"pg{version}-{name}.jsonl").read_text().splitlines():
        row = json.loads(line)
        event = asm.feed(bytes.fromhex(row["data"]), row["lsn"])
        if event is not None:
            events.append(event)
    return events, asm


def rows(
    txn: Event,
) -> list[tuple[str, str, dict[str, Any] | None, dict[str, Any] | None, tuple[str, ...]]]:
    assert isinstance(txn, Transaction)
    return [
        (c.op, c.table, c.new, c.old, c.unchanged_toast)
        for c in txn.changes
        if isinstance(c, RowChange)
    ]


@pytest.mark.parametrize("version", VERSIONS)
def test_basic_workload(version: int) -> None:
    events, asm = replay(version, "basic")
    assert not asm.in_transaction
    assert all(isinstance(e, Transaction) for e in events)
    txns = [e for e in events if isinstance(e, Transaction)]
    assert len(txns) == 8
    ends = [t.end_lsn for t in txns]
    assert ends == sorted(ends) and len(set(ends)) == len(ends)
    assert rows(txns[0]) == [
        (
            "insert",
            "items",
            {
                "id": 1,
                "name": "apple",
                "price": Decimal("1.50"),
                "tags": ["red", "green apple", None],
                "big": None,
                "feel": "happy",
            },
            None,
            (),
        )
    ]
    big = txns[1].changes[0]
    assert isinstance(big, RowChange) and big.new is not None and big.new["big"] == "x" * 10000
    # the TOASTed column is unchanged: left out of new, listed instead
    (op, _, new, old, toast) = rows(txns[2])[0]
    assert op == "update" and toast == ("big",) and new is not None and "big" not in new
    assert old is None
    # key change: the old key is sent
    assert rows(txns[3])[0][3] == {"id": 2}
    assert rows(txns[3])[0][2]["id"] == 20  # type: ignore[index]
    assert rows(txns[4]) == [("delete", "items", None, {"id": 1}, ())]
    # REPLICA IDENTITY FULL: the whole old row
    assert rows(txns[5]) == [
        ("insert", "full_ident", {"id": 1, "note": "a"}, None, ()),
        ("update", "full_ident", {"id": 1, "note": "b"}, {"id": 1, "note": "a"}, ()),
        ("delete", "full_ident", None, {"id": 1, "note": "b"}, ()),
    ]
    (msg,) = txns[6].changes
    assert isinstance(msg, Message)
    assert (msg.prefix, msg.content, msg.transactional) == ("app", b"hello", True)
    (trunc,) = txns[7].changes
    assert isinstance(trunc, TruncateChange)
    assert [r.qualified_name for r in trunc.relations] == ["public.items", "public.full_ident"]
    assert trunc.restart_identity and not trunc.cascade
    assert txns[0].commit_time.year >= 2026 and txns[0].commit_time.utcoffset() is not None


@pytest.mark.parametrize("version", VERSIONS)
def test_text_mode_is_postgres_output(version: int) -> None:
    events, _ = replay(version, "basic", mode="text")
    assert rows(events[0])[0][2] == FIRST_ITEM_AS_TEXT


@pytest.mark.parametrize("version", VERSIONS)
def test_binary_format(version: int) -> None:
    (txn,), _ = replay(version, "binary")
    change = txn.changes[0]  # type: ignore[union-attr]
    assert isinstance(change, RowChange) and change.new_tuple is not None
    assert change.new_tuple.kinds[:4] == b"bbbb"
    assert change.new == {
        "id": 3,
        "name": "plum",
        "price": Decimal("3.75"),
        "tags": ["a", "b"],
        "big": None,
        "feel": b"sad",  # a custom type has no loader: binary stays bytes
    }


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("spill", [1 << 30, 4096])
def test_streamed_transactions(version: int, spill: int) -> None:
    events, asm = replay(version, "streaming", spill_bytes=spill)
    assert not asm.in_transaction
    txns = [e for e in events if isinstance(e, Transaction)]
    ids = [[c.new["id"] for c in t.changes if isinstance(c, RowChange) and c.new] for t in txns]
    assert ids[0] == list(range(100, 1100))
    # the rolled-back savepoint's rows are gone, the rest of the transaction is kept
    assert ids[1] == [*range(2000, 3000), 4000]
    # the aborted streamed transaction never appears
    assert ids[2] == [9999]
    assert len(txns) == 3
    assert [len(t.changes) for t in txns] == [1000, 1001, 1]
    if spill < 1 << 20:  # spilled: read back lazily from disk, not held in memory
        assert type(txns[0].changes).__name__ == "SpilledChanges"
        assert txns[0].changes[-1].new == {  # type: ignore[union-attr]
            "id": 1099,
            "name": "row 1099",
            "price": None,
            "tags": None,
            "big": None,
            "feel": None,
        }


@pytest.mark.parametrize("version", VERSIONS)
def test_two_phase_delivered_at_commit_prepared(version: int) -> None:
    events, asm = replay(version, "two_phase")
    assert not asm.in_transaction
    (txn,) = events
    assert isinstance(txn, Transaction) and txn.gid == "gx1"
    assert rows(txn) == [
        (
            "insert",
            "items",
            {
                "id": 7000,
                "name": "prepared",
                "price": None,
                "tags": None,
                "big": None,
                "feel": None,
            },
            None,
            (),
        ),
    ]


@pytest.mark.parametrize("version", VERSIONS)
def test_two_phase_surfaced(version: int) -> None:
    events, _ = replay(version, "two_phase", surface_prepares=True)
    kinds = [
        (type(e).__name__, getattr(e, "gid", None), getattr(e, "committed", None)) for e in events
    ]
    assert kinds == [
        ("PreparedTransaction", "gx1", None),
        ("PreparedOutcome", "gx1", True),
        ("PreparedTransaction", "gx2", None),
        ("PreparedOutcome", "gx2", False),
    ]
