"""Tail a publication to stdout through the Python API.

    PGLOGREPL_DSN="host=... dbname=..." python examples/tail_stdout.py SLOT PUBLICATION [UNTIL_LSN]

Prints one line per row change and acknowledges each transaction once printed.
"""

from __future__ import annotations

import os
import sys

from pglogrepl_bridge import Lsn, ReplicationStream, RowChange, StreamOptions


def main() -> None:
    slot, publication = sys.argv[1], sys.argv[2]
    until = Lsn.parse(sys.argv[3]) if len(sys.argv) > 3 else None
    options = StreamOptions(slot=slot, publications=(publication,), until_lsn=until)
    with ReplicationStream(os.environ.get("PGLOGREPL_DSN", ""), options) as stream:
        for txn in stream:
            for change in txn.changes:
                if isinstance(change, RowChange):
                    print(f"{txn.end_lsn} {change.op} {change.table} {change.new or change.old}")
            sys.stdout.flush()
            stream.ack(txn.end_lsn)  # printed: it may be confirmed


if __name__ == "__main__":
    main()
