"""``sinks.reduce``: a batch reduced to one net change per row writes what the batch in stream
order would have written. Pure bookkeeping, so checked here on any sequence hypothesis draws;
the SQL sink's own runs against real targets are in test_sink_correctness.py (its random
workloads) and test_replicate.py."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from pglogrepl_bridge.sinks.reduce import Reduction

COLUMNS = ("k", "a", "b", "c")
_values = st.none() | st.integers(0, 3)


@st.composite
def batches(draw: st.DrawFn) -> tuple[dict[int, dict[str, Any]], list[tuple[str, int, Any]]]:
    """Rows the target holds before the batch (the source held the same), and changes a
    consistent source could send: inserts of absent keys (whole rows), updates of present
    ones (any subset of the other columns: the rest were unchanged TOAST), deletes."""
    keys = st.integers(0, 5)
    before = {
        k: {"k": k, **{c: draw(_values) for c in COLUMNS[1:]}}
        for k in draw(st.sets(keys, max_size=4))
    }
    source = {k: dict(row) for k, row in before.items()}
    changes: list[tuple[str, int, Any]] = []
    for _ in range(draw(st.integers(0, 30))):
        k = draw(keys)
        if k not in source:
            row = {"k": k, **{c: draw(_values) for c in COLUMNS[1:]}}
            source[k] = row
            changes.append(("insert", k, dict(row)))
        elif draw(st.booleans()):
            cols = draw(st.lists(st.sampled_from(COLUMNS[1:]), unique=True))
            new = {"k": k, **{c: draw(_values) for c in cols}}
            source[k].update(new)
            changes.append(("update", k, new))
        else:
            del source[k]
            changes.append(("delete", k, None))
    return before, changes


def stream_order(
    before: dict[int, dict[str, Any]], changes: list[tuple[str, int, Any]]
) -> dict[int, dict[str, Any]]:
    rows = {k: dict(row) for k, row in before.items()}
    for op, k, new in changes:
        if op == "delete":
            del rows[k]
        elif op == "update":
            rows[k].update(new)
        else:
            rows[k] = dict(new)
    return rows


@given(batches())
def test_the_reduced_batch_writes_what_the_stream_order_writes(
    batch: tuple[dict[int, dict[str, Any]], list[tuple[str, int, Any]]],
) -> None:
    """Rules 1, 2 and 4: applied to the rows the target held, the net changes end where the
    changes in stream order end; each row is written at most twice (a replace), never
    more often than the batch changed it, and every write finds the row as SQL needs it
    (an update or delete finds it, an insert does not)."""
    before, changes = batch
    reduction = Reduction()
    for pos, (op, k, new) in enumerate(changes):
        assert reduction.add("t", op, k, None if new is None else dict(new), pos)
    target = {k: dict(row) for k, row in before.items()}
    writes: dict[int, int] = {}
    for table, op, held in reduction.drain():
        k = held.key
        assert table == "t"
        writes[k] = writes.get(k, 0) + 1
        assert held.last == max(i for i, c in enumerate(changes) if c[1] == k)
        if op == "delete":
            del target[k]  # KeyError: a delete of a row the target does not hold
        elif op == "update":
            target[k].update(held.new)
        else:
            assert k not in target, "an insert over a row the target still holds"
            target[k] = dict(held.new)
    assert target == stream_order(before, changes)
    assert len(reduction) == 0
    for k, n in writes.items():
        assert n <= min(2, sum(1 for c in changes if c[1] == k))


def test_what_cannot_be_reduced_is_refused_and_what_was_held_stays() -> None:
    """Rule 3: a pair the table lacks (a second insert of a key) holds nothing; the row
    held before it is still there, with its state, to be applied first."""
    reduction = Reduction()
    assert reduction.add("t", "insert", 1, {"k": 1, "a": 1}, "first")
    assert not reduction.add("t", "insert", 1, {"k": 1, "a": 2}, "second")
    assert reduction.add("t", "delete", 2, None, "gone")
    assert not reduction.add("t", "delete", 2, None, "twice")
    assert len(reduction) == 2
    drained = [(op, held.new, held.last) for _, op, held in reduction.drain()]
    assert drained == [("delete", {}, "gone"), ("insert", {"k": 1, "a": 1}, "first")]


def test_rows_come_out_table_by_table_deletes_updates_inserts() -> None:
    """Rule 4: tables in the order they first appear; within one, deletes (a replace's
    delete too), updates, inserts (a replace's insert too), each in last-change order."""
    reduction = Reduction()
    script: list[tuple[str, str, int, dict[str, Any] | None]] = [
        ("b", "insert", 1, {"k": 1}),
        ("a", "update", 7, {"k": 7, "x": 1}),
        ("a", "delete", 8, None),
        ("a", "insert", 8, {"k": 8, "x": 2}),  # replace: delete 8, then insert 8
        ("b", "delete", 2, None),
        ("a", "insert", 9, {"k": 9}),
        ("a", "update", 7, {"k": 7, "y": 3}),  # 7 again: last among the updates
        ("a", "update", 6, {"k": 6}),
        ("b", "insert", 3, {"k": 3}),
        ("b", "delete", 3, None),  # inserted and deleted: nothing
    ]
    for table, op, k, new in script:
        assert reduction.add(table, op, k, new, None)
    out = [(t, op, held.key) for t, op, held in reduction.drain()]
    assert out == [
        ("b", "delete", 2),
        ("b", "insert", 1),
        ("a", "delete", 8),
        ("a", "update", 7),
        ("a", "update", 6),
        ("a", "insert", 8),
        ("a", "insert", 9),
    ]
