"""An exported snapshot and its LSN: the point where the copy ends and the stream begins.

PostgreSQL exports a snapshot when it creates a logical slot: it sees exactly the
transactions that committed before the slot's consistent point, and the slot decodes exactly
those committing at or after it. For a new slot that point is the slot's own start. For a
slot that already exists, a temporary slot created alongside gives a snapshot and an LSN with
the same property; the existing slot, which is behind it, skips up to it (rule 5 of ``plan``).
The snapshot lives until the replication connection runs another command or closes, so
workers import it (``SET TRANSACTION SNAPSHOT``) before ``release``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from types import TracebackType

import psycopg

from pglogrepl_bridge.lsn import Lsn
from pglogrepl_bridge.postgres import admin
from pglogrepl_bridge.postgres.connection import Conn, connect, server_error


@dataclass(frozen=True, slots=True)
class Anchor:
    """An exported snapshot's name and the LSN it is consistent with."""

    lsn: Lsn
    snapshot: str
    slot: str  # the slot whose creation exported it


class ExportedSnapshot:
    """Creates ``slot`` (or a temporary slot) exporting its snapshot; ``release`` (or leaving
    the block) ends the export. A temporary slot goes with its connection."""

    def __init__(self, dsn: str, *, slot: str | None = None, two_phase: bool = False) -> None:
        self.dsn = dsn
        self.slot = slot
        self.two_phase = two_phase
        self._conn: Conn | None = None

    def __enter__(self) -> Anchor:
        conn = self._conn = connect(self.dsn, replication=True)
        name = self.slot or f"pglogrepl_bridge_snapshot_{conn.info.backend_pid}_{os.getpid()}"
        query = admin.create_slot_query(
            name,
            conn.info.server_version // 10000,
            temporary=self.slot is None,
            two_phase=self.two_phase and self.slot is not None,
            snapshot="export",
        )
        try:
            row = conn.execute(query).fetchone()
        except psycopg.Error as exc:
            self.release()
            raise server_error(exc, slot=name, publications=()) from None
        assert row is not None
        return Anchor(Lsn.parse(str(row[1])), str(row[2]), str(row[0]))

    def release(self) -> None:
        """End the export (and drop a temporary slot): imported snapshots stay valid."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()
