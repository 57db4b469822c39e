"""How a snapshot's progress is shown: a live bar per table on a terminal, log lines otherwise."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from pglogrepl_bridge.snapshot.runner import ChunkCopied

log = logging.getLogger("pglogrepl_bridge.progress")


class SnapshotProgress:
    """Receives ``ChunkCopied`` events (from the workers' threads) and shows them."""

    def __init__(self, live: Any | None) -> None:
        self._live = live
        self._tasks: dict[str, Any] = {}
        self._started = time.monotonic()

    def __call__(self, event: ChunkCopied) -> None:
        """Show one committed chunk."""
        total = event.estimate if event.estimate >= 0 else None
        if self._live is None:
            rate = event.table_rows / max(time.monotonic() - self._started, 1e-6)
            log.info(
                "snapshot table=%s chunk=%d/%d rows=%d estimate=%s rows_per_s=%.0f",
                event.table,
                event.index + 1,
                event.count,
                event.table_rows,
                total if total is not None else "unknown",
                rate,
            )
            return
        task = self._tasks.get(event.table)
        if task is None:
            task = self._tasks[event.table] = self._live.add_task(event.table, total=total)
        if total is not None and event.table_rows > total:
            self._live.update(task, total=event.table_rows)  # the estimate was low
        self._live.update(task, completed=event.table_rows)

    def close(self) -> None:
        """End the live display (the stream's own reporting takes over)."""
        if self._live is not None:
            self._live.stop()
            self._live = None


@contextmanager
def snapshot_progress() -> Iterator[SnapshotProgress]:
    """A progress display for the block: rich bars on a terminal, log lines otherwise."""
    if not sys.stderr.isatty():
        yield SnapshotProgress(None)
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    from pglogrepl_bridge.cli.app import err

    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=err(), transient=False) as live:
        yield SnapshotProgress(live)
