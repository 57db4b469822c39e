"""``sinks.sqlitetext``: editing PostgreSQL's text gives exactly what the loader and
SQLAlchemy's bind processor give, on values a real server printed (through a session opened
the way the stream opens its own: ISO dates, UTC), and declines what it does not know."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import given
from hypothesis import strategies as st
from psycopg.postgres import types as pgtypes
from sqlalchemy.dialects import sqlite

from pglogrepl_bridge.pgoutput import _accel as accel
from pglogrepl_bridge.pgoutput.messages import Column, TupleData
from pglogrepl_bridge.postgres.connection import connect
from pglogrepl_bridge.sinks import sql, sqlitetext
from pglogrepl_bridge.sinks.sqltypes import (
    column_type,
    describe,
    loaders,
    text_is_driver_value,
    value_path,
)
from pglogrepl_bridge.testing.postgres import PostgresServer
from tests.pgoutput_builders import tuple_bytes

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


# -- the same values made in C: ``_fastrow.driver_row`` and the sink's plan for it ---------

#: scalar types the sink loads (or keeps as text) on SQLite: expressions over g, NULLs and
#: odd values included (NaN, infinities, long integers, empty and escaped bytea, non-ASCII)
LOADED: dict[str, str] = {
    "int2": "(g % 300 - 150)::int2",
    "int4": "CASE WHEN g = 1 THEN -2147483648 ELSE g * 7919 END",
    "int8": "CASE WHEN g = 1 THEN -9223372036854775808 ELSE g::bigint * 98765432101 END",
    "oid": "(g * 1000)::oid",
    "float4": "CASE g % 4 WHEN 0 THEN 'NaN'::float4 WHEN 1 THEN '-Infinity' ELSE g / 3.0 END",
    "float8": "CASE g % 5 WHEN 0 THEN 'Infinity'::float8 WHEN 1 THEN 1e308 ELSE g / 7.0 END",
    "bool": "g % 2 = 0",
    "bytea": "CASE WHEN g = 1 THEN ''::bytea ELSE decode(md5(g::text), 'hex') END",
    "text": "'naïve ✓ ' || g || e'\\ttab'",
    "varchar(8)": "('v' || g)::varchar(8)",
    "bpchar(5)": "('c' || (g % 10))::bpchar(5)",
    "numeric": "(g * 3.14159)::numeric(12, 2)",
    "jsonb": "jsonb_build_object('id', g, 'name', 'é ' || g)",
    "json": "json_build_object('g', g)",
    "inet": "('10.0.' || (g % 250) || '.1')::inet",
    "interval": "make_interval(hours => g)",
    "float8[]": "ARRAY[g / 2.0, NULL]",
    "bool[]": "ARRAY[g % 2 = 0]",
}


def _plan_and_path(oid: int) -> tuple[Any, Callable[[list[bytes | None]], tuple[Any, ...]]]:
    """One column of type ``oid`` on SQLite: the sink's C plan and its Python row path."""
    col = Column("c", oid, -1, False)
    dialect = sqlite.dialect()
    table = sa.Table("t", sa.MetaData(), sa.Column("c", column_type(col, "sqlite", is_key=False)))
    passthrough = {"c"} if text_is_driver_value(col, "sqlite") else set()
    plan = sql._driver_plan((col,), table, dialect, passthrough)
    return plan, sql._row_values((col,), table, dialect, passthrough)


def _typed(value: Any) -> tuple[type, Any]:
    """A value and its type: 1 is not True here; NaN equals NaN."""
    if isinstance(value, float) and math.isnan(value):
        return float, "nan"
    return type(value), value


@pytest.mark.skipif(accel.driver_row is None, reason="the C accelerator is not built")
@pytest.mark.parametrize("type_", [*CASES, *LOADED])
def test_the_c_row_is_the_python_row(pg: PostgresServer, type_: str) -> None:
    """``driver_row`` gives, value for value and type for type, what ``row_values`` (the
    loader and the bind processor, or the text edit) gives for every value PostgreSQL
    printed; it declines only what the Python edit declines, and then the sink takes the
    Python path."""
    assert accel.driver_row is not None
    if type_ in CASES:
        plain, odd = server_texts(pg, type_)
        oid = type_oid(type_)
    else:
        with connect(pg.dsn, replication=False) as conn:  # the output function's text
            cur = conn.execute(f"SELECT ({LOADED[type_]})::{type_} FROM generate_series(1, 200) g")
            result = cur.pgresult
            assert result is not None
            oid = result.ftype(0)
            got = [result.get_value(i, 0) for i in range(result.ntuples)]
        plain, odd = [bytes(v).decode() for v in got if v is not None], []
    plan, python_row = _plan_and_path(int(oid))
    assert plan is not None
    if type_ not in ("float8[]", "bool[]"):  # every common type converts without Python
        assert all(type(step) is int for step in plan), plan
    for text in [*plain, *odd, None]:
        value = None if text is None else text.encode()
        data = tuple_bytes(TupleData(b"n" if value is None else b"t", (value,)))
        made = accel.driver_row(plan, data, 0)
        try:
            expected = python_row([value])
        except ValueError:
            assert made is None, text
            continue
        assert made is not None, f"declined {text!r}"
        assert [_typed(v) for v in made] == [_typed(v) for v in expected], text


#: each C mode and what it stands for on any text: the edit, or the loader and processor
_MODE_TYPES = {
    "timestamp": accel.DRIVER_TIMESTAMP,
    "timestamptz": accel.DRIVER_TIMESTAMPTZ,
    "date": accel.DRIVER_DATE,
    "time": accel.DRIVER_TIME,
    "timetz": accel.DRIVER_TIMETZ,
    "uuid": accel.DRIVER_UUID,
    "int4[]": accel.DRIVER_INT_ARRAY,
    "text[]": accel.DRIVER_TEXT_ARRAY,
    "int8": accel.DRIVER_INT,
    "float8": accel.DRIVER_FLOAT,
    "bool": accel.DRIVER_BOOL,
    "bytea": accel.DRIVER_BYTEA,
    "text": accel.DRIVER_TEXT,
}


@pytest.mark.skipif(accel.driver_row is None, reason="the C accelerator is not built")
@given(
    st.sampled_from(list(_MODE_TYPES)),
    st.text(alphabet=st.sampled_from('0123456789-+:. TZ{},"\\NULaefnxitINFy é✓'), max_size=40)
    | st.sampled_from(["2024-01-01 10:00:00", "10:00:00.5+02", "\\x00ff", "-1e308", "t"])
    | st.sampled_from(["2024-01-01 10:00:00.25+05", "2024-01-01 10:00:00-08", "24:00:00"]),
)
def test_a_c_mode_declines_or_agrees_on_any_text(type_: str, text: str) -> None:
    """On text PostgreSQL would never print as much as on its own: a mode's value equals the
    Python path's (type included), or it declines (the sink then takes that path); where
    the edit refuses, the mode declines too."""
    assert accel.driver_row is not None
    _, python_row = _plan_and_path(type_oid(type_))
    value = text.encode()
    made = accel.driver_row((_MODE_TYPES[type_],), tuple_bytes(TupleData(b"t", (value,))), 0)
    try:
        expected: Any = python_row([value])
    except Exception:  # any refusal of the Python path
        assert made is None
        return
    if made is not None:
        assert [_typed(v) for v in made] == [_typed(v) for v in expected]


@pytest.mark.skipif(accel.driver_row is None, reason="the C accelerator is not built")
def test_the_c_row_declines_what_it_cannot_make() -> None:
    """Binary and unchanged-TOAST values, a wrong column count, cut-off bytes, and a step
    that raises: the whole row goes back to the Python path."""
    assert accel.driver_row is not None
    text = accel.DRIVER_TEXT

    def refuse(data: bytes) -> Any:
        raise ValueError("no")

    whole = tuple_bytes(TupleData(b"tn", (b"a", None)))
    assert accel.driver_row((text, text), whole, 0) == ("a", None)
    assert accel.driver_row(
        (text, lambda b: b[::-1]), tuple_bytes(TupleData(b"tt", (b"a", b"xy"))), 0
    ) == ("a", b"yx")
    for kinds, values in ((b"tb", (b"a", b"b")), (b"tu", (b"a", None))):
        assert accel.driver_row((text, text), tuple_bytes(TupleData(kinds, values)), 0) is None
    assert accel.driver_row((text,), whole, 0) is None
    assert accel.driver_row((text, text), whole[:-2], 0) is None
    assert accel.driver_row((text, refuse), whole[:-1] + b"t\0\0\0\0", 0) is None
    both = tuple_bytes(TupleData(b"tt", (b"a", b"b")))
    assert accel.driver_row((text, 99), both, 0) is None
    assert accel.driver_row((text,), tuple_bytes(TupleData(b"t", (b"\xff",))), 0) is None
