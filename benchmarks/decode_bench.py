"""Decoding micro-benchmark: a captured stream of changes → Transactions, every value typed.

    .venv/bin/python benchmarks/decode_bench.py [--changes 200000] [--version 15] [--smoke]
    .venv/bin/python benchmarks/decode_bench.py --workload realistic   # bench.py's real table

``basic`` is the narrow table alone (the figures since the first session); ``realistic`` is
bench.py's realistic workload (the narrow table and ``real``: jsonb, json, inet, cidr,
arrays, interval, numeric, timestamptz, date, time, uuid, bytea, ..., with NULLs and TOAST),
and reports typed values per second too. pypgoutput's typed reader knows a few column types
only (its catalog maps each to a pydantic field): on ``realistic`` only its decoders run.

Builds the workload on the embedded PostgreSQL, captures the pgoutput bytes once with
pg_logical_slot_get_binary_changes, then times (best of N, one core) our decoder with every
value converted, and pypgoutput's decoders on the same bytes when it is installed
(pip install --no-deps pypgoutput; its decoders need only the standard library).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psycopg
from bench import (  # benchmarks/ is on sys.path when run as a script
    ROWS_PER_TXN,
    realistic_workload,
    workload,
)

from pglogrepl_bridge.pgoutput.assembly import TransactionAssembler
from pglogrepl_bridge.pgoutput.transaction import RowChange, Transaction
from pglogrepl_bridge.testing.postgres import postgres_server


def capture(version: int, changes: int, kind: str = "basic") -> list[bytes]:
    """A workload of bench.py, captured once through the SQL interface."""
    with postgres_server(version) as pg, psycopg.connect(pg.dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_create_logical_replication_slot('bench', 'pgoutput')")
        if kind == "realistic":
            realistic_workload(conn, changes)
        else:
            workload(conn, changes, wide=False)
        rows = conn.execute(
            "SELECT data FROM pg_logical_slot_get_binary_changes('bench', NULL, NULL, "
            "'proto_version', '1', 'publication_names', 'bench_pub')"
        ).fetchall()
    return [bytes(r[0]) for r in rows]


def ours(payloads: list[bytes]) -> int:
    asm = TransactionAssembler()
    feed = asm.feed
    n = 0
    for p in payloads:
        txn = feed(p, 0)
        if isinstance(txn, Transaction):
            for c in txn.changes:
                if isinstance(c, RowChange):
                    c.new  # noqa: B018 - convert every value: that is the work measured
                    c.old  # noqa: B018
                    n += 1
    return n


def typed_values(payloads: list[bytes]) -> int:
    """How many non-NULL values ``ours`` converts (new and old rows; TOAST left out)."""
    asm = TransactionAssembler()
    n = 0
    for p in payloads:
        txn = asm.feed(p, 0)
        if isinstance(txn, Transaction):
            for c in txn.changes:
                if isinstance(c, RowChange):
                    for row in (c.new, c.old):
                        n += sum(v is not None for v in (row or {}).values())
    return n


def pypgoutput_decoders(payloads: list[bytes]) -> int:
    # Load pypgoutput's decoders module alone: its package __init__ needs psycopg2.
    spec = importlib.util.find_spec("pypgoutput")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("pypgoutput")
    path = Path(next(iter(spec.submodule_search_locations))) / "decoders.py"
    mod_spec = importlib.util.spec_from_file_location("pypgoutput_decoders", path)
    assert mod_spec is not None and mod_spec.loader is not None
    d = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(d)

    classes = {
        b"B": d.Begin,
        b"C": d.Commit,
        b"R": d.Relation,
        b"I": d.Insert,
        b"U": d.Update,
        b"D": d.Delete,
        b"T": d.Truncate,
    }
    n = 0
    for p in payloads:
        msg = classes[p[:1]](p)
        if p[:1] in b"IUD":
            n += 1
        del msg
    return n


def pypgoutput_reader(payloads: list[bytes]) -> int:
    """pypgoutput's own pipeline (pydantic messages and typed models), minus the network.

    Its reader asks the catalog for column types when a Relation arrives; that lookup is
    answered from a table here, so only the per-message work is timed.
    """
    import uuid
    from datetime import UTC, datetime

    import pydantic

    if pydantic.VERSION.startswith("2"):
        # pypgoutput was written for pydantic 1; pydantic 2 ships it as pydantic.v1
        sys.modules["pydantic"] = importlib.import_module("pydantic.v1")
    from pypgoutput import reader as r  # type: ignore[import-not-found]

    class Catalog:
        def fetch_column_type(self, type_id: int, atttypmod: int) -> str:
            return {23: "integer", 25: "text"}[type_id]

        def fetch_if_column_is_optional(self, **_: str) -> bool:
            return True

    rdr = object.__new__(r.LogicalReplicationReader)
    rdr.source_db_handler = Catalog()
    rdr.database = "bench"
    rdr.pg_types, rdr.table_models, rdr.key_only_table_models, rdr.table_schemas = {}, {}, {}, {}
    now = datetime.now(UTC)
    messages = (
        r.ReplicationMessage(
            message_id=uuid.uuid4(),
            data_start=0,
            payload=p,
            send_time=now,
            data_size=len(p),
            wal_end=0,
        )
        for p in payloads
    )
    with contextlib.redirect_stdout(io.StringIO()):  # it prints every key schema
        return sum(1 for _ in rdr.transform_raw(messages))


def best(fn: Callable[[list[bytes]], int], payloads: list[bytes], rounds: int) -> tuple[float, int]:
    times = []
    count = 0
    for _ in range(rounds):
        t0 = time.perf_counter()
        count = fn(payloads)
        times.append(time.perf_counter() - t0)
    return min(times), count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--changes", type=int, default=200_000)
    ap.add_argument("--version", type=int, default=15)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--smoke", action="store_true", help="tiny run, no figures worth keeping")
    ap.add_argument("--workload", choices=["basic", "realistic"], default="basic")
    args = ap.parse_args()
    if args.smoke:
        args.changes, args.rounds = 2_000, 1
    payloads = capture(args.version, args.changes, args.workload)
    print(
        f"captured {len(payloads)} pgoutput messages from PostgreSQL {args.version} "
        f"({args.workload} workload)"
    )
    t_ours, n_ours = best(ours, payloads, args.rounds)
    assert n_ours == args.changes // ROWS_PER_TXN * ROWS_PER_TXN, n_ours
    values = typed_values(payloads)
    print(
        f"{'pglogrepl_bridge (typed)':24}: {n_ours} changes in {t_ours:.3f}s = "
        f"{n_ours / t_ours:,.0f} changes/s, {values / t_ours:,.0f} typed values/s "
        f"({values:,} values)"
    )
    references: list[tuple[str, Callable[[list[bytes]], int]]] = [
        ("pypgoutput decoders only", pypgoutput_decoders)
    ]
    if args.workload == "basic":  # its typed reader's catalog knows integer and text only
        references.append(("pypgoutput reader (typed)", pypgoutput_reader))
    for label, fn in references:
        try:
            t_ref, n_ref = best(fn, payloads, args.rounds)
        except ImportError as exc:
            print(f"{label}: skipped ({exc}); pip install pypgoutput psycopg2-binary pydantic")
            continue
        assert n_ref == n_ours
        print(
            f"{label:24}: {n_ref} changes in {t_ref:.3f}s = {n_ref / t_ref:,.0f} changes/s"
            f" -> ours is {t_ref / t_ours:.1f}x faster"
        )


if __name__ == "__main__":
    main()
