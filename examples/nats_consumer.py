"""A plain nats-py consumer of ``pglogrepl-bridge publish``: each transaction's changes into
SQLite, exactly once, across restarts.

    python examples/nats_consumer.py nats://127.0.0.1:4222 CDC cdc changes.db [IDLE_SECONDS]

A durable pull consumer on ``<prefix>.txn`` of stream CDC. Each message is one transaction
(JSON payload, docs/nats.md); its changes and its end LSN (header ``Pglb-Lsn``) are written
in one SQLite transaction, then the message is acknowledged. A redelivered message (the
consumer died between commit and ack) is recognised by its LSN and only acknowledged. With
IDLE_SECONDS, it exits once no message came for that long.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import sys

import nats


def lsn_value(text: str) -> int:
    high, _, low = text.partition("/")
    return (int(high, 16) << 32) | int(low, 16)


async def main(url: str, stream: str, prefix: str, path: str, idle: float | None) -> None:
    db = sqlite3.connect(path)
    db.execute(
        "CREATE TABLE IF NOT EXISTS changes "
        "(end_lsn TEXT, xid INTEGER, op TEXT, tbl TEXT, new TEXT, old TEXT)"
    )
    db.execute("CREATE TABLE IF NOT EXISTS position (id INTEGER PRIMARY KEY, lsn INTEGER)")
    row = db.execute("SELECT lsn FROM position WHERE id = 1").fetchone()
    applied = row[0] if row else 0
    nc = await nats.connect(url)
    js = nc.jetstream()
    sub = await js.pull_subscribe(f"{prefix}.txn", durable="sqlite_example", stream=stream)
    quiet = 0.0
    try:
        while idle is None or quiet < idle:
            try:
                batch = await sub.fetch(100, timeout=1)
            except TimeoutError:  # nats-py raises its own, or asyncio's, when nothing came
                quiet += 1
                continue
            quiet = 0.0
            for msg in batch:
                headers = msg.headers or {}
                lsn = lsn_value(headers["Pglb-Lsn"])
                if lsn > applied:  # else: a redelivery of what is already applied
                    txn = json.loads(msg.data)
                    with db:  # the changes and the position commit together
                        db.executemany(
                            "INSERT INTO changes VALUES (?, ?, ?, ?, ?, ?)",
                            [
                                (
                                    headers["Pglb-Lsn"],
                                    txn["xid"],
                                    c["op"],
                                    f"{c.get('schema')}.{c.get('table')}",
                                    json.dumps(c.get("new")),
                                    json.dumps(c.get("old")),
                                )
                                for c in txn["changes"]
                            ],
                        )
                        db.execute("INSERT OR REPLACE INTO position VALUES (1, ?)", (lsn,))
                    applied = lsn
                await msg.ack()
    finally:
        await nc.close()
        db.close()


if __name__ == "__main__":
    url, stream, prefix, path = sys.argv[1:5]
    idle = float(sys.argv[5]) if len(sys.argv) > 5 else None
    asyncio.run(main(url, stream, prefix, path, idle))
