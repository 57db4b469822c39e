"""A batch's changes reduced to one net change per row, before the SQL sink applies them.

A batch commits in one target transaction with its checkpoint (``sinks.sql``), so nobody
sees the target between two of its changes: only each row's state at the end counts. A row
inserted, updated and deleted in one batch costs the target nothing; a row updated five times
costs one UPDATE. This is the sink's ``--conflict source`` mode; ``--no-reduce`` turns it
off, for targets whose triggers must see every change.

Rules (enforced here, by ``_NEXT``):

1. A row is its table plus its replica-identity key. Each row in the batch holds a net
   state: ``insert`` (it is new: the source inserted it), ``update`` (it existed before the
   batch; columns to set), ``delete`` (it existed before the batch; gone now), ``replace`` (it
   existed, was deleted, and a new row took its key: delete, then insert) or ``gone``
   (inserted and deleted within the batch: nothing to write).
2. The state moves only as ``_NEXT`` says, from the row's state and the change's operation.
   An update adds its columns over the row's earlier ones (``merge``), so columns an update
   did not carry (unchanged TOAST) keep the values of the insert or update before it.
3. Anything else cannot be reduced: a pair ``_NEXT`` lacks (which a consistent source never
   sends), an update that changes the key, a key that is not all there, a keyless table, a
   truncate. The sink then applies every held row first and that change after it, in stream
   order (``Reduction.add`` returns False; ``drain`` empties it).
4. Held rows come out table by table, in the order the tables first appeared; within a
   table, deletes (``replace`` too), then updates, then inserts (``replace`` too), each in
   the order of the rows' last changes. Different rows of one table never share a key, so
   the target's primary keys see no conflict the stream would not have had.

Other constraints of a target made by hand (a foreign key, a second unique index) can see
an order the stream never had; the sink then applies the batch again unreduced, in stream
order (``SqlSink.apply``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

State = Literal["insert", "update", "delete", "replace", "gone"]
Op = Literal["insert", "update", "delete"]

#: a walk holding a run of changes: (tables, transitions, merge, changes, start, room) →
#: (index of the first change not taken, rows added)
Take = Callable[
    [dict[str, dict[Any, "Held"]], dict[Any, Any], Callable[[Any, Any], Any], Any, int, int],
    tuple[int, int],
]

#: (the row's net state, or None when the batch has not touched it; the change's operation)
#: → the row's next net state. A pair missing here cannot be reduced (rule 3).
_NEXT: dict[tuple[State | None, str], State] = {
    (None, "insert"): "insert",
    (None, "update"): "update",
    (None, "delete"): "delete",
    ("insert", "update"): "insert",
    ("insert", "delete"): "gone",
    ("update", "update"): "update",
    ("update", "delete"): "delete",
    ("delete", "insert"): "replace",
    ("replace", "update"): "replace",
    ("replace", "delete"): "delete",
    ("gone", "insert"): "insert",
}


def merge_dicts(earlier: Any, later: Any) -> Any:
    """Rule 2 for rows held as dicts: the later columns over the earlier ones."""
    return {**earlier, **later}


@dataclass(slots=True)
class Held:
    """One row's net change: its state, its new values as ``add`` was given them (merged), its
    key, and the last change that made it."""

    state: State
    new: Any
    key: Any
    last: Any


class Reduction:
    """Net changes per row of one batch; pure bookkeeping. A row's new values are opaque
    here but for ``merge(earlier, later)``, which lays an update's values over the row's:
    the sink holds unconverted rows and converts only what it writes."""

    def __init__(self, merge: Callable[[Any, Any], Any] = merge_dicts) -> None:
        self._merge = merge
        #: table → {key: held row}, each dict in the order of its rows' last changes
        self._tables: dict[str, dict[Any, Held]] = {}
        self._held = 0

    def __len__(self) -> int:
        """Rows held (a row inserted and deleted again counts until drained)."""
        return self._held

    def add(self, table: str, op: str, key: Any, new: Any, last: Any) -> bool:
        """Hold one change to the row ``key`` (its key's values, hashable) of ``table``:
        ``new`` its new values (None for a delete). False when the change cannot be reduced
        (rule 3): nothing was held, and the caller drains first."""
        rows = self._tables.get(table)
        if rows is None:
            rows = self._tables[table] = {}
        held = rows.pop(key, None)  # popped: put back last, rows stay in change order
        state = _NEXT.get((held.state if held is not None else None, op))
        if state is None:
            if held is not None:
                rows[key] = held  # where it was is lost; it is drained next anyway
            return False
        if held is None:
            rows[key] = Held(state, {} if new is None else new, key, last)
            self._held += 1
            return True
        if op == "update" and new is not None:  # rule 2: over the earlier columns
            held.new = self._merge(held.new, new)
        elif op == "insert" and new is not None:  # a new row in a deleted one's place
            held.new = new
        held.state, held.last = state, last
        rows[key] = held
        return True

    def add_run(self, take: Take, changes: Sequence[Any], start: int, limit: int) -> int:
        """Hold changes from ``changes[start]`` on through ``take``, a walk that reads each
        change's table and key and applies ``add`` to it itself (``_fastrow.hold_rows``: this
        very table and ``_NEXT``), until it leaves one to its caller or ``limit`` rows are
        held; returns the index of the first change not taken."""
        index, added = take(self._tables, _NEXT, self._merge, changes, start, limit - self._held)
        self._held += added
        return index

    def drain(self) -> Iterator[tuple[str, Op, Held]]:
        """Every held row's writes in rule 4's order, and forget them."""
        tables, self._tables, self._held = self._tables, {}, 0
        for table, rows in tables.items():
            for held in rows.values():
                if held.state in ("delete", "replace"):
                    yield table, "delete", held
            for held in rows.values():
                if held.state == "update":
                    yield table, "update", held
            for held in rows.values():
                if held.state in ("insert", "replace"):
                    yield table, "insert", held
