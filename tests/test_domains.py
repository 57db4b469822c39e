"""One meaning per value: a domain over int reads as an int everywhere (the one type registry).

The stream's Type message names a domain's base type; ``pgoutput.values.ValueLoaders.base_oid``
is the one place that resolves it, and ``RowChange`` values, the JSON renderer (tail and the
bridge's JSON payload) and the SQL sink's column types and binds all ask it.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys

import sqlalchemy as sa

from pglogrepl_bridge import ReplicationStream, RowChange
from pglogrepl_bridge.render.jsonl import JsonRenderer
from pglogrepl_bridge.sinks.replicate import run_replicate
from pglogrepl_bridge.testing.postgres import PostgresServer

from .streamkit import Conn, Source, make_source

_n = itertools.count()


def _domain_source(conn: Conn) -> Source:
    domain = f"posint_{next(_n)}"  # test_types_live has its own posint
    conn.execute(f"CREATE DOMAIN {domain} AS int CHECK (VALUE > 0)")
    src = make_source(conn, extra=f", n {domain}")
    src.conn.execute(f"INSERT INTO {src.table} VALUES (1, 'one', 42)")
    return src


def test_domain_over_int_is_an_int_in_row_changes_and_json(
    pg: PostgresServer, pg_conn: Conn
) -> None:
    src = _domain_source(pg_conn)
    end = src.end()
    with ReplicationStream(pg.dsn, src.options(until_lsn=end, no_ack=True)) as stream:
        txns = []
        for txn in stream:
            txns.append(txn)
            stream.ack(txn.end_lsn)  # until_lsn counts acknowledged transactions
    (txn,) = txns
    (change,) = txn.changes
    assert isinstance(change, RowChange) and change.new is not None
    assert change.new["n"] == 42 and type(change.new["n"]) is int
    # the bridge's --payload json is this renderer
    rendered = json.loads(JsonRenderer().transaction(txn))
    assert rendered["changes"][0]["new"] == {"id": 1, "v": "one", "n": 42}
    out = subprocess.run(
        [sys.executable, "-m", "pglogrepl_bridge", "tail", "--dsn", pg.dsn, "--slot", src.slot,
         "--publication", src.publication, "--format", "jsonl", "--no-ack",
         "--until-lsn", str(end)],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    (line,) = out.stdout.splitlines()
    new = json.loads(line)["changes"][0]["new"]
    assert new["n"] == 42 and isinstance(new["n"], int)


def test_domain_over_int_is_an_integer_column_in_every_target(
    pg: PostgresServer,
    pg_conn: Conn,
    target: str,
) -> None:
    src = _domain_source(pg_conn)
    run_replicate(pg.dsn, target, src.options(), until=src.end())
    engine = sa.create_engine(target)
    try:
        with engine.connect() as conn:
            name = src.table  # public tables keep their name in the target
            columns = {c["name"]: c["type"] for c in sa.inspect(conn).get_columns(name)}
            assert isinstance(columns["n"], sa.Integer), columns["n"]
            (value,) = conn.execute(sa.text(f"SELECT n FROM {name}")).one()
    finally:
        engine.dispose()
    assert value == 42 and type(value) is int
