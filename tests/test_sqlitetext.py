"""``sinks.sqlitetext``: editing PostgreSQL's text gives exactly what the loader and
SQLAlchemy's bind processor give, on values a real server printed (through a session opened
the way the stream opens its own: ISO dates, UTC), and declines what it does not know."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import given
from hypothesis import strategies as st
from psycopg.postgres import types as pgtypes
from sqlalchemy.dialects import sqlite

from pglogrepl_bridge.pgoutput import _accel as accel
from pglogrepl_bridge.pgoutput.messages import Column
from pglogrepl_bridge.postgres.connection import connect
from pglogrepl_bridge.sinks import sqlitetext
from pglogrepl_bridge.sinks.sqltypes import column_type, describe, loaders, value_path
from pglogrepl_bridge.testing.postgres import PostgresServer

#: type → (an expression over g that varies its values, values it must decline or match)
CASES: dict[str, tuple[str, list[str]]] = {
    "timestamp": (
        "timestamp '1026-01-01' + g * interval '1213 days 1 minute 0.013707 s'",
        ["'infinity'", "'-infinity'", "'0044-03-15 10:00 BC'", "'2024-02-29 23:59:59.999999'"],
    ),
    "timestamptz": (
        "timestamptz '1999-12-31 23:00+00' + g * interval '17 hours 0.5 s'",
        ["'infinity'", "'2024-06-01 08:00:00+05:30'", "'0010-01-01 00:00+00 BC'"],
    ),
    "date": ("date '0001-01-01' + g * 4421", ["'infinity'", "'4713-01-01 BC'", "'10000-01-01'"]),
    "time": ("time '00:00' + g * interval '2 min 0.000321 s'", ["'24:00:00'", "'23:59:59.5'"]),
    "timetz": (
        "(time '00:00' + g * interval '7 min 0.25 s')::timetz",
        ["'10:00:00+05:30'", "'10:00:00-08'", "'24:00:00+00'", "'00:00:01.5-03:30'"],
    ),
    "uuid": ("md5(g::text)::uuid", ["'00000000-0000-0000-0000-000000000000'"]),
    "int4[]": (
        "ARRAY[g, -g, NULL, g * 1000]",
        ["'{}'", "'{{1,2},{3,NULL}}'", "'[0:1]={5,6}'", "'{-2147483648}'"],
    ),
    "int8[]": ("ARRAY[g::bigint * 100000000000]", ["'{{1},{2}}'"]),
    "text[]": (
        "ARRAY['red', 'grün ' || g, NULL, 'NULL', '', 'q\"x', 'b\\s', 'a,b', e'new\\nline']",
        ["'{}'", "'{{a,b},{c,d}}'", "'{\"{x}\"}'", "ARRAY[' lead', 'trail ', '✓']"],
    ),
    "varchar[]": ("ARRAY[('v' || g)::varchar, 'x y']", ["'{NULL}'"]),
}


def _slow(col: Column) -> Any:
    """The loader, then the column type's bind processor: what the edit stands for."""
    dialect = sqlite.dialect()
    load, _ = loaders(col, "sqlite")
    process = column_type(col, "sqlite", is_key=False).dialect_impl(dialect)
    bind = process.bind_processor(dialect)
    return (lambda text: bind(load(text))) if bind else load


def type_oid(type_: str) -> int:
    info = pgtypes.get(type_.removesuffix("[]"))
    assert info is not None
    return info.array_oid if type_.endswith("[]") else info.oid


def server_texts(pg: PostgresServer, type_: str) -> tuple[list[str], list[str]]:
    """CASES[type_] as PostgreSQL prints it, through a session opened as the stream opens
    its own: 300 ordinary values, then the edge values."""
    expr, edges = CASES[type_]
    with connect(pg.dsn, replication=False) as conn:
        query = f"SELECT ({expr})::{type_}::text FROM generate_series(1, 300) g"
        plain = [str(r[0]) for r in conn.execute(query).fetchall()]
        odd = [str(conn.execute(f"SELECT ({e})::{type_}::text").fetchall()[0][0]) for e in edges]
    return plain, odd


def assert_edits_match(
    edit: Callable[[str], Any], slow: Callable[[bytes], Any], pg: PostgresServer, type_: str
) -> list[str]:
    """Every ordinary value edited, to what the slow path gives; edge values edited the same
    or declined (and not all declined: then the edges test nothing). The texts, returned."""
    plain, odd = server_texts(pg, type_)
    for text in plain:
        assert edit(text) == slow(text.encode()), text
    declined = 0
    for text in odd:
        try:
            edited = edit(text)
        except ValueError:
            declined += 1
            continue
        assert edited == slow(text.encode()), text
    assert declined < len(odd) or type_ == "date", "no edge value was taken: test the edges"
    return plain + odd


@pytest.mark.parametrize("type_", list(CASES))
def test_the_edit_is_the_loader_and_bind_processor(pg: PostgresServer, type_: str) -> None:
    oid = type_oid(type_)
    col = Column("c", oid, -1, False)
    step = value_path(col, "sqlite")
    assert step[0] is None and step[1] is sqlitetext.direct(*describe(oid))
    assert step[1] is not None
    assert_edits_match(step[1], _slow(col), pg, type_)


def test_only_sqlite_edits_text() -> None:
    col = Column("c", pgtypes["timestamptz"].oid, -1, False)
    assert value_path(col, "sqlite")[0] is None
    assert value_path(col, "postgresql")[0] == col.type_oid
    assert value_path(col, "mysql")[0] == col.type_oid
    assert isinstance(column_type(col, "sqlite", is_key=False), sa.DateTime)


def test_input_that_postgresql_reads_but_never_prints_is_declined() -> None:
    """Array input may quote numbers and space elements (``wire.jsonread`` writes such
    literals); only PostgreSQL's own output shape is edited."""
    for text in ['{"1",NULL,"3"}', "{1, 2}", "{ 1}", "[0:1]={5,6}"]:
        with pytest.raises(ValueError):
            sqlitetext.integer_array(text)
    assert sqlitetext.integer_array("{{1,NULL},{-3,4}}") == "[[1, null], [-3, 4]]"


@pytest.mark.skipif(accel.int_array_json is None, reason="the C accelerator is not built")
@given(
    st.text(alphabet=st.sampled_from('{}-0123456789,NUL nul[]=:"é'), max_size=14)
    | st.text(alphabet=st.sampled_from("{}-0123456789,NUL"), max_size=14).map(lambda s: "{" + s)
)
def test_the_c_integer_array_edit_equals_the_python_one(text: str) -> None:
    """The same JSON text, and the same texts refused."""
    assert accel.int_array_json is not None
    try:
        expected: str | None = sqlitetext._integer_array(text)
    except ValueError:
        expected = None
    try:
        written: str | None = accel.int_array_json(text)
    except ValueError:
        written = None
    assert written == expected
