"""A snapshot destination that hands the copied rows on, for ``tail --snapshot`` and callers.

Rows are re-encoded as pgoutput TupleData (``'t'`` + length + text, ``'n'`` for NULL), so
whoever reads them uses the one row reader (``RelationInfo.row_at``) and the JSON renderer
exactly as for streamed rows. Nothing is recorded: there is no progress to resume from.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence

from pglogrepl_bridge.pgoutput.relcache import RelationInfo
from pglogrepl_bridge.snapshot.plan import ChunkDone, TableCopy

_u16 = struct.Struct("!H").pack
_u32 = struct.Struct("!I").pack

#: rows per batch handed on (and per JSON line of ``tail --snapshot``)
BATCH_ROWS = 1000

OnRows = Callable[[RelationInfo, ChunkDone, list[bytes]], None]


def tuple_data(values: Sequence[bytes | None]) -> bytes:
    """Values as the TupleData pgoutput would send for them in text format."""
    parts = [_u16(len(values))]
    for value in values:
        if value is None:
            parts.append(b"n")
        else:
            parts.append(b"t" + _u32(len(value)))
            parts.append(value)
    return b"".join(parts)


class ReadRows:
    """Calls ``on_rows(relation, chunk, tuples)`` for each batch of copied rows, one batch at
    a time (the workers take turns), each tuple a TupleData for ``relation.row_at(t, 0)``."""

    def __init__(self, on_rows: OnRows, batch: int = BATCH_ROWS) -> None:
        self.on_rows = on_rows
        self.batch = batch
        self._lock = threading.Lock()

    def snapshot_progress(self) -> list[ChunkDone]:
        """Nothing is kept between runs."""
        return []

    def start_snapshot(
        self,
        relations: Sequence[RelationInfo],
        interrupted: Iterable[str],
        partial: Mapping[str, TableCopy],
    ) -> None:
        """Nothing to prepare."""

    def copy_chunk(
        self, rel: RelationInfo, rows: Iterable[Sequence[bytes | None]], chunk: ChunkDone
    ) -> int:
        """Hand the chunk's rows on in batches; returns how many."""
        done = 0
        batch: list[bytes] = []
        for values in rows:
            batch.append(tuple_data(values))
            if len(batch) >= self.batch:
                done += self._hand_on(rel, chunk, batch)
                batch = []
        if batch:
            done += self._hand_on(rel, chunk, batch)
        return done

    def _hand_on(self, rel: RelationInfo, chunk: ChunkDone, batch: list[bytes]) -> int:
        with self._lock:
            self.on_rows(rel, chunk, batch)
        return len(batch)

    def takes_copy_text(self, rel: RelationInfo) -> bool:
        """Rows are handed on parsed."""
        return False

    def copy_lines(self, rel: RelationInfo, lines: Iterable[bytes], chunk: ChunkDone) -> int:
        """Not used (``takes_copy_text`` is False)."""
        raise NotImplementedError

    def finish_snapshot(self, checkpoint: int | None, copied: Sequence[str] = ()) -> None:
        """Nothing to record."""
