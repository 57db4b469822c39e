"""Replicate a publication into a SQLite file, exactly once (resumes from its checkpoint).

PGLOGREPL_DSN=... python examples/replicate_sqlite.py SLOT PUBLICATION DBFILE [UNTIL_LSN]
"""

from __future__ import annotations

import os
import sys

from pglogrepl_bridge.lsn import Lsn
from pglogrepl_bridge.postgres.stream import StreamOptions
from pglogrepl_bridge.sinks.replicate import run_replicate


def main() -> None:
    slot, publication, dbfile = sys.argv[1:4]
    until = Lsn.parse(sys.argv[4]) if len(sys.argv) > 4 else None
    stats = run_replicate(
        os.environ.get("PGLOGREPL_DSN", ""),
        f"sqlite:///{dbfile}",
        StreamOptions(slot=slot, publications=(publication,)),
        until=until,
    )
    print(f"{stats.transactions} transactions, {stats.changes} changes; at {stats.last_lsn}")


if __name__ == "__main__":
    main()
