"""Capture real pgoutput bytes from PostgreSQL 15 and 16 into tests/data/captures/.

Run: .venv/bin/python tests/data/capture.py
Each capture is JSON Lines of {"lsn": int, "data": hex} from pg_logical_slot_get_binary_changes,
the same bytes the walsender sends as XLogData payloads. The workloads are in WORKLOADS; the
unit tests in test_captures.py assert what each capture must decode to.
"""

from __future__ import annotations

import json
from pathlib import Path

import psycopg

from pglogrepl_bridge.testing.postgres import find_bindirs, postgres_server

OUT = Path(__file__).resolve().parent / "captures"

SCHEMA = """
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE TABLE items (id int PRIMARY KEY, name text, price numeric(10,2), tags text[],
                    big text, feel mood);
ALTER TABLE items ALTER COLUMN big SET STORAGE EXTERNAL;
CREATE TABLE full_ident (id int, note text);
ALTER TABLE full_ident REPLICA IDENTITY FULL;
CREATE PUBLICATION cap_pub FOR ALL TABLES;
"""

# name -> (slot options, statements); each statement string runs as its own transaction
WORKLOADS: dict[str, tuple[dict[str, str], list[str]]] = {
    "basic": (
        {"proto_version": "1", "messages": "true"},
        [
            "INSERT INTO items VALUES (1, 'apple', 1.50, '{red,\"green apple\",NULL}', NULL, 'happy')",
            "INSERT INTO items VALUES (2, 'pear', NULL, NULL, repeat('x', 10000), 'ok');"
            "UPDATE items SET price = 2.25 WHERE id = 1",
            "UPDATE items SET name = 'big pear' WHERE id = 2",  # big is unchanged TOAST
            "UPDATE items SET id = 20 WHERE id = 2",  # key change: old key sent
            "DELETE FROM items WHERE id = 1",
            "INSERT INTO full_ident VALUES (1, 'a'); UPDATE full_ident SET note = 'b'; "
            "DELETE FROM full_ident",
            "SELECT pg_logical_emit_message(true, 'app', 'hello')",
            "TRUNCATE items, full_ident RESTART IDENTITY",
        ],
    ),
    "binary": (
        {"proto_version": "1", "binary": "true"},
        ["INSERT INTO items VALUES (3, 'plum', 3.75, '{a,b}', NULL, 'sad')"],
    ),
    "streaming": (
        {"proto_version": "2", "streaming": "on"},
        [
            # bigger than logical_decoding_work_mem (64kB): streamed in chunks
            "INSERT INTO items SELECT g, 'row ' || g FROM generate_series(100, 1099) g",
            # a streamed transaction with an aborted subtransaction
            "BEGIN; INSERT INTO items SELECT g, 's' FROM generate_series(2000, 2999) g; "
            "SAVEPOINT sp; INSERT INTO items SELECT g, 'gone' FROM generate_series(3000, 3999) g;"
            " ROLLBACK TO sp; INSERT INTO items VALUES (4000, 'kept'); COMMIT",
            # a streamed transaction that aborts entirely
            "BEGIN; INSERT INTO items SELECT g, 'x' FROM generate_series(5000, 6999) g; ROLLBACK",
            # a small commit flushes WAL, so the abort above is decoded too
            "INSERT INTO items VALUES (9999, 'tail')",
        ],
    ),
}

TWO_PHASE = [
    "BEGIN; INSERT INTO items VALUES (7000, 'prepared'); PREPARE TRANSACTION 'gx1'",
    "COMMIT PREPARED 'gx1'",
    "BEGIN; INSERT INTO items VALUES (7001, 'rolled back'); PREPARE TRANSACTION 'gx2'",
    "ROLLBACK PREPARED 'gx2'",
]


def _run(conn: psycopg.Connection[tuple[object, ...]], statements: list[str]) -> None:
    for stmt in statements:
        if stmt.startswith(("BEGIN;", "COMMIT PREPARED", "ROLLBACK PREPARED")):
            # explicit transaction control: autocommit connection, statements one by one
            for part in stmt.split(";"):
                if part.strip():
                    conn.execute(part)
        else:
            with conn.transaction():
                for part in stmt.split(";"):
                    if part.strip():
                        conn.execute(part)


def _fetch(
    conn: psycopg.Connection[tuple[object, ...]], slot: str, opts: dict[str, str]
) -> list[dict[str, object]]:
    args = ", ".join(f"'{k}', '{v}'" for k, v in {**opts, "publication_names": "cap_pub"}.items())
    conn.execute("SET logical_decoding_work_mem = '64kB'")
    rows = conn.execute(
        f"SELECT lsn::text, data FROM pg_logical_slot_get_binary_changes('{slot}', NULL, NULL, {args})"
    ).fetchall()
    out = []
    for lsn_text, data in rows:
        hi, lo = str(lsn_text).split("/")
        raw = bytes(data)  # type: ignore[call-overload]
        out.append({"lsn": (int(hi, 16) << 32) | int(lo, 16), "data": raw.hex()})
    return out


def capture(version: int) -> None:
    with postgres_server(version) as server, psycopg.connect(server.dsn, autocommit=True) as conn:
        conn.execute(SCHEMA)
        for name, (opts, statements) in WORKLOADS.items():
            conn.execute("TRUNCATE items, full_ident")
            conn.execute(f"SELECT pg_create_logical_replication_slot('cap_{name}', 'pgoutput')")
            _run(conn, statements)
            _write(version, name, _fetch(conn, f"cap_{name}", opts))
        conn.execute("TRUNCATE items, full_ident")
        conn.execute(
            "SELECT pg_create_logical_replication_slot('cap_2pc', 'pgoutput', false, true)"
        )
        _run(conn, TWO_PHASE)
        _write(
            version, "two_phase", _fetch(conn, "cap_2pc", {"proto_version": "3", "two_phase": "on"})
        )


def _write(version: int, name: str, rows: list[dict[str, object]]) -> None:
    path = OUT / f"pg{version}-{name}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"{path.name}: {len(rows)} messages")


if __name__ == "__main__":
    OUT.mkdir(exist_ok=True)
    for v in (15, 16):
        if v in find_bindirs():
            capture(v)
