"""A custom sink: any object that applies a transaction durably, then acknowledges it.

    PGLOGREPL_DSN=... python examples/custom_sink.py SLOT PUBLICATION OUTFILE [UNTIL_LSN]

This one appends each transaction as a JSON line to a file and fsyncs before acknowledging,
so the slot is never confirmed past what the file holds.
"""

from __future__ import annotations

import os
import sys

from pglogrepl_bridge import Lsn, ReplicationStream, StreamOptions, Transaction
from pglogrepl_bridge.render.jsonl import JsonRenderer


class FileSink:
    def __init__(self, path: str) -> None:
        self.file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self.render = JsonRenderer("typed")

    def apply(self, txn: Transaction) -> None:
        self.file.write(self.render.transaction(txn) + "\n")
        self.file.flush()
        os.fsync(self.file.fileno())  # durable before the acknowledgement

    def close(self) -> None:
        self.file.close()


def main() -> None:
    slot, publication, path = sys.argv[1:4]
    until = Lsn.parse(sys.argv[4]) if len(sys.argv) > 4 else None
    sink = FileSink(path)
    options = StreamOptions(slot=slot, publications=(publication,), until_lsn=until)
    try:
        with ReplicationStream(os.environ.get("PGLOGREPL_DSN", ""), options) as stream:
            for txn in stream:
                sink.apply(txn)
                stream.ack(txn.end_lsn)
    finally:
        sink.close()


if __name__ == "__main__":
    main()
