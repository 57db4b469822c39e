"""The snapshot's rules, pure: how tables split into chunks, and what a resumed run keeps.

Rules (enforced here and in ``sinks.sql``, argued in ``docs/snapshot.md``):

1. A table is read under one exported snapshot whose *anchor* is the LSN it was exported
   at: the copy holds exactly the transactions that committed before the anchor.
2. A table splits into chunks. One whose replica-identity key leads with an integer or
   uuid column, and that spans more than one chunk of pages, splits into ranges of that
   column's values (``KeyRanges``, chosen by the first run and stored with every progress
   row, so a resumed run splits it the same way). Any other table splits into ranges of
   ``CHUNK_PAGES`` heap pages by ctid, the last one open-ended. Under one snapshot either
   split partitions the table's rows.
3. A chunk's rows and its progress row (table, chunk, chunk count, anchor, key ranges)
   commit in one target transaction.
4. A resumed run keeps every committed chunk of a key-split table, each under its own anchor,
   and copies the other chunks under the new snapshot (the target first loses whatever it
   holds in their key ranges). A key range means the same rows under any snapshot, so
   "key k's row as of its chunk's anchor" holds for every key. A ctid-split table is kept
   only when all its chunks committed under one anchor; otherwise it is emptied and copied
   again whole (ctid ranges of a dead snapshot do not partition a new one: rows move).
5. The checkpoint written at the end is the lowest anchor. A change is skipped while its
   transaction's end LSN ≤ the anchor of the chunk that holds its key (for a ctid-split
   table, the table's anchor): that chunk's copy already holds it.
6. An update that moves a key between chunks of different anchors is applied only on the
   side not skipped: an insert of the new row, or a delete of the old key. Where the insert
   lacks a value (an unchanged TOASTed column, which pgoutput does not send), or a TRUNCATE
   falls between a table's anchors, the table is copied again while streaming (a request
   marker), which is exact on its own (``docs/snapshot.md``).
7. The source slot must not be past the lowest anchor, or changes between them are lost.
"""

from __future__ import annotations

import json
from bisect import bisect_right
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

#: the prefix of the logical decoding message that asks a running ``replicate`` on a slot to
#: copy tables again: content ``{"slot": S, "tables": ["schema.name", ...]}``
SNAPSHOT_REQUEST_PREFIX = "pglogrepl_bridge.snapshot"

#: heap pages per chunk: 32 MiB of table with the default 8 kB block size. Small enough
#: that a big table is copied by every worker, large enough that a chunk's setup is noise.
CHUNK_PAGES = 4096

#: the anchor of a table marked for copying: its changes are skipped until the copy is done
UNTIL_COPIED = 2**63 - 1


@dataclass(frozen=True, slots=True)
class KeyRanges:
    """A table split by the values of one key column (rule 2): chunk ``i`` holds the rows
    whose value ``v`` has ``bounds[i-1] <= v < bounds[i]``; the first and last chunks are
    open. Bounds are the values' PostgreSQL text, ascending."""

    column: str
    bounds: tuple[str, ...]

    @property
    def count(self) -> int:
        """The number of chunks."""
        return len(self.bounds) + 1

    def range_of(self, index: int) -> tuple[str | None, str | None]:
        """Chunk ``index``'s bounds: ``low <= v`` unless None, ``v < high`` unless None."""
        low = self.bounds[index - 1] if index > 0 else None
        high = self.bounds[index] if index < len(self.bounds) else None
        return low, high

    def spans(self, indexes: Iterable[int]) -> list[tuple[str | None, str | None]]:
        """The ranges of these chunks, adjacent ones merged: few conditions for a query."""
        out: list[tuple[str | None, str | None]] = []
        last = -2
        for i in sorted(set(indexes)):
            low, high = self.range_of(i)
            if i == last + 1 and out:
                out[-1] = (out[-1][0], high)
            else:
                out.append((low, high))
            last = i
        return out

    def encode(self) -> str:
        """The form stored with each progress row."""
        return json.dumps({"column": self.column, "bounds": list(self.bounds)})

    @staticmethod
    def decode(text: str | None) -> KeyRanges | None:
        """``encode``'s inverse; None for a ctid-split table (or an unreadable value)."""
        if not text:
            return None
        try:
            data = json.loads(text)
            return KeyRanges(str(data["column"]), tuple(str(b) for b in data["bounds"]))
        except (ValueError, KeyError, TypeError):
            return None


@dataclass(frozen=True, slots=True)
class Chunk:
    """A chunk of one table: pages ``[first_page, end_page)`` (``end_page`` None for the
    open-ended last chunk), or, with ``ranges``, key range ``ranges.range_of(index)``."""

    table: str
    index: int
    count: int
    first_page: int
    end_page: int | None
    ranges: KeyRanges | None = None


@dataclass(frozen=True, slots=True)
class ChunkDone:
    """A progress row read back from the target: a chunk that committed, under ``anchor``
    (``ranges``: the table's ``KeyRanges.encode()``, None when split by ctid)."""

    table: str
    index: int
    count: int
    anchor: int
    rows: int
    ranges: str | None = None


@dataclass(frozen=True, slots=True)
class TableCopy:
    """The committed chunks of one table: each one's anchor, by chunk index."""

    anchors: Mapping[int, int]
    count: int
    ranges: KeyRanges | None

    @property
    def complete(self) -> bool:
        """Whether every chunk committed."""
        return len(self.anchors) == self.count

    @property
    def lowest(self) -> int:
        """The oldest anchor: the stream must start at or before it (rule 7)."""
        return min(self.anchors.values())

    def skip(self) -> int | KeySkip:
        """Rule 5 for this table: one anchor, or the anchor of each key range (chunks not
        committed yet count as not copied: their changes wait for the copy)."""
        values = set(self.anchors.values())
        if self.ranges is None or (len(values) == 1 and self.complete):
            return max(values)
        anchors = tuple(self.anchors.get(i, UNTIL_COPIED) for i in range(self.count))
        return KeySkip(self.ranges, anchors)


@dataclass(frozen=True, slots=True)
class KeySkip:
    """Rule 5 for a table whose key ranges hold different anchors (a resumed copy)."""

    ranges: KeyRanges
    anchors: tuple[int, ...]  # by chunk index

    @property
    def highest(self) -> int:
        """The newest anchor: past it, nothing of the table is skipped."""
        return max(self.anchors)

    def anchor_at(self, bounds: Sequence[Any], value: Any) -> int:
        """The anchor of the chunk holding key ``value``; ``bounds`` are ``ranges.bounds``
        loaded as the stream loads the column, so they compare as PostgreSQL orders them."""
        return self.anchors[bisect_right(bounds, value)]


@dataclass(frozen=True, slots=True)
class ResumePlan:
    """What a run does with earlier progress (rule 4)."""

    kept: dict[str, TableCopy]  # complete tables
    to_copy: tuple[str, ...]  # tables with chunks to copy
    to_clear: tuple[str, ...]  # to copy whole, and holding rows of an interrupted copy
    partial: dict[str, TableCopy]  # to copy, keeping these committed chunks (key-split)


def chunks(table: str, pages: int, chunk_pages: int = CHUNK_PAGES) -> list[Chunk]:
    """The ctid chunks of a table of ``pages`` heap pages (rule 2); an empty table has one."""
    count = max(1, -(-pages // chunk_pages))
    return [
        Chunk(table, i, count, i * chunk_pages, None if i == count - 1 else (i + 1) * chunk_pages)
        for i in range(count)
    ]


def key_chunks(table: str, ranges: KeyRanges, skip: Iterable[int] = ()) -> list[Chunk]:
    """The key-range chunks of a table (rule 2), without the ``skip`` ones (committed)."""
    done = set(skip)
    return [
        Chunk(table, i, ranges.count, 0, None, ranges) for i in range(ranges.count) if i not in done
    ]


def ctid_bounds(chunk: Chunk) -> tuple[str, str | None]:
    """The chunk's bounds as tid literals: ``ctid >= low`` and, unless None, ``ctid < high``."""
    high = None if chunk.end_page is None else f"({chunk.end_page},0)"
    return f"({chunk.first_page},0)", high


def split_bounds(low: int, high: int, count: int) -> list[int]:
    """``count - 1`` ascending integer bounds spreading ``[low, high]`` over ``count`` chunks
    (fewer when the span is narrow)."""
    if count < 2 or high <= low:
        return []
    step = (high - low + 1) / count
    return sorted(b for b in {low + round(step * i) for i in range(1, count)} if low < b <= high)


def quantiles(sample: Sequence[str], count: int) -> list[str]:
    """``count - 1`` bounds picked evenly from an ascending sample of values (a histogram)."""
    if count < 2 or len(sample) < 2:
        return []
    picked = [sample[len(sample) * i // count] for i in range(1, count)]
    return list(dict.fromkeys(p for p in picked if p != sample[0]))


def resume(
    tables: Sequence[str],
    done: Iterable[ChunkDone],
    split_keys: Mapping[str, str | None] | None = None,
) -> ResumePlan:
    """Rule 4: what is kept of earlier progress. ``split_keys`` (table: the column it would
    split by now) drops a key split whose column is no longer the table's (schema change)."""
    by_table: dict[str, list[ChunkDone]] = defaultdict(list)
    for row in done:
        by_table[row.table].append(row)
    kept: dict[str, TableCopy] = {}
    partial: dict[str, TableCopy] = {}
    to_copy: list[str] = []
    to_clear: list[str] = []
    for table in tables:
        rows = by_table.get(table, [])
        marked = any(r.index < 0 for r in rows)  # a request: copy (again)
        chunk_rows = [r for r in rows if r.index >= 0]
        copy = _committed(chunk_rows)
        if (
            copy is not None
            and copy.ranges is not None
            and split_keys is not None
            and split_keys.get(table) != copy.ranges.column
        ):
            copy = None  # split by a column that is no longer the key's first
        if copy is not None and copy.complete and not marked:
            kept[table] = copy
            continue
        to_copy.append(table)
        if copy is not None and copy.ranges is not None:
            partial[table] = copy  # chunks under any anchors: kept (rule 4)
        elif rows:
            to_clear.append(table)
    return ResumePlan(kept, tuple(to_copy), tuple(to_clear), partial)


def _committed(rows: list[ChunkDone]) -> TableCopy | None:
    """The chunks of one consistent split, or None (none, or inconsistent rows)."""
    if not rows:
        return None
    count, encoded = rows[0].count, rows[0].ranges
    if any(r.count != count or r.ranges != encoded or not 0 <= r.index < count for r in rows):
        return None
    ranges = KeyRanges.decode(encoded)
    if encoded is not None and (ranges is None or ranges.count != count):
        return None
    anchors = {r.index: r.anchor for r in rows}
    if len(anchors) != len(rows):
        return None  # one chunk twice
    if ranges is None and len(set(anchors.values())) != 1:
        return None  # ctid chunks of different snapshots are not one copy
    return TableCopy(anchors, count, ranges)


def checkpoint(anchors: Iterable[int]) -> int:
    """Rule 5: where the stream resumes after the snapshot, the lowest anchor."""
    return min(anchors)


def skipped_until(done: Iterable[ChunkDone], start: int) -> dict[str, int | KeySkip]:
    """Rule 5: the tables whose changes the stream skips, from ``start``: a marked table
    until its copy is done, the others up to their anchors."""
    by_table: dict[str, list[ChunkDone]] = defaultdict(list)
    for row in done:
        by_table[row.table].append(row)
    out: dict[str, int | KeySkip] = {}
    for table, rows in by_table.items():
        if any(r.index < 0 for r in rows):
            out[table] = UNTIL_COPIED
            continue
        copy = _committed(rows)
        rule: int | KeySkip = UNTIL_COPIED if copy is None else copy.skip()
        if highest(rule) > start:
            out[table] = rule
    return out


def highest(rule: int | KeySkip) -> int:
    """The LSN past which a skip rule skips nothing."""
    return rule if isinstance(rule, int) else rule.highest
