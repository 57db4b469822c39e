"""The snapshot's rules, pure: how tables split into chunks, and what a resumed run keeps.

Rules (enforced here, argued in ``docs/snapshot.md``):

1. A table is read under one exported snapshot whose *anchor* is the LSN it was exported
   at: the copy holds exactly the transactions that committed before the anchor.
2. A table splits into chunks of ``CHUNK_PAGES`` heap pages by ctid range; the last chunk is
   open-ended, so rows on pages added after planning are read too. Under one snapshot every
   visible row has exactly one ctid, so the chunks partition the table's rows.
3. A chunk's rows and its progress row (table, chunk, chunk count, anchor) commit in one
   target transaction.
4. A table is *complete* when every chunk has a progress row, all with one anchor. A resumed
   run keeps complete tables; any other table is emptied in the target and copied again
   under the new snapshot (ctid ranges of a dead snapshot do not partition a new one).
5. The checkpoint written at the end is the lowest anchor. While the stream is below a
   table's own anchor, that table's changes are skipped: its copy already holds them.
6. The source slot must not be past the lowest anchor, or changes between them are lost.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

#: the prefix of the logical decoding message that asks a running ``replicate`` on a slot to
#: copy tables again: content ``{"slot": S, "tables": ["schema.name", ...]}``
SNAPSHOT_REQUEST_PREFIX = "pglogrepl_bridge.snapshot"

#: heap pages per chunk: 32 MiB of table with the default 8 kB block size. Small enough
#: that a big table is copied by every worker, large enough that a chunk's setup is noise.
CHUNK_PAGES = 4096


@dataclass(frozen=True, slots=True)
class Chunk:
    """A ctid range of one table: pages ``[first_page, end_page)``, ``end_page`` None for the
    open-ended last chunk."""

    table: str
    index: int
    count: int
    first_page: int
    end_page: int | None


@dataclass(frozen=True, slots=True)
class ChunkDone:
    """A progress row read back from the target: a chunk that committed, under ``anchor``."""

    table: str
    index: int
    count: int
    anchor: int
    rows: int


@dataclass(frozen=True, slots=True)
class ResumePlan:
    """What a run does with earlier progress: tables kept (their anchors), tables to copy."""

    kept: dict[str, int]
    to_copy: tuple[str, ...]
    to_clear: tuple[str, ...]  # to copy, and holding rows of an interrupted copy


def chunks(table: str, pages: int, chunk_pages: int = CHUNK_PAGES) -> list[Chunk]:
    """The chunks of a table of ``pages`` heap pages (rule 2); an empty table has one."""
    count = max(1, -(-pages // chunk_pages))
    return [
        Chunk(table, i, count, i * chunk_pages, None if i == count - 1 else (i + 1) * chunk_pages)
        for i in range(count)
    ]


def ctid_bounds(chunk: Chunk) -> tuple[str, str | None]:
    """The chunk's bounds as tid literals: ``ctid >= low`` and, unless None, ``ctid < high``."""
    high = None if chunk.end_page is None else f"({chunk.end_page},0)"
    return f"({chunk.first_page},0)", high


def resume(tables: Sequence[str], done: Iterable[ChunkDone]) -> ResumePlan:
    """Rule 4: complete tables are kept, the others are copied (and cleared if started)."""
    by_table: dict[str, list[ChunkDone]] = defaultdict(list)
    for row in done:
        by_table[row.table].append(row)
    kept: dict[str, int] = {}
    to_copy: list[str] = []
    to_clear: list[str] = []
    for table in tables:
        rows = by_table.get(table, [])
        if rows and _complete(rows):
            kept[table] = rows[0].anchor
        else:
            to_copy.append(table)
            if rows:
                to_clear.append(table)
    return ResumePlan(kept, tuple(to_copy), tuple(to_clear))


def _complete(rows: list[ChunkDone]) -> bool:
    count = rows[0].count
    anchors = {r.anchor for r in rows}
    return (
        len(anchors) == 1
        and all(r.count == count for r in rows)
        and {r.index for r in rows} == set(range(count))
    )


def checkpoint(anchors: Iterable[int]) -> int:
    """Rule 5: where the stream resumes after the snapshot, the lowest anchor."""
    return min(anchors)


def skipped_until(anchors: dict[str, int], start: int) -> dict[str, int]:
    """Rule 5: the tables whose changes the stream skips, up to their anchor, from ``start``."""
    return {table: anchor for table, anchor in anchors.items() if anchor > start}
