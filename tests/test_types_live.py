"""Every common column type, decoded from a real server, in typed (text and binary) and text mode.

The expected values come from the same server over an ordinary query: psycopg's value for
typed mode, ``col::text`` for text mode. Also covers streaming and two-phase decoding of real
server output through the SQL decoding functions.
"""

from __future__ import annotations

import json
import math
from decimal import Decimal
from typing import Any

import psycopg
import pytest

from pglogrepl_bridge.pgoutput import _accel as accel
from pglogrepl_bridge.pgoutput.assembly import TransactionAssembler
from pglogrepl_bridge.pgoutput.relcache import RelationCache
from pglogrepl_bridge.pgoutput.transaction import (
    Event,
    PreparedOutcome,
    PreparedTransaction,
    RowChange,
    Transaction,
)
from pglogrepl_bridge.pgoutput.values import ValueLoaders
from pglogrepl_bridge.render.jsonl import JsonRenderer

Conn = psycopg.Connection[tuple[Any, ...]]

COLUMNS = {
    "c_int2": ("smallint", ["-32768", "0"]),
    "c_int4": ("integer", ["2147483647", "-1"]),
    "c_int8": ("bigint", ["9223372036854775807", "-9223372036854775808"]),
    "c_numeric": ("numeric", ["'NaN'", "123456789012345678901234567890.000000001"]),
    "c_float4": ("real", ["'Infinity'", "1.5"]),
    "c_float8": ("double precision", ["'-Infinity'", "'NaN'"]),
    "c_text": ("text", ["'quote '' and \\ backslash'", "'ünïcødé ✓'"]),
    "c_varchar": ("varchar(10)", ["'abc'", "''"]),
    "c_char": ("char(3)", ["'a'", "'xyz'"]),
    "c_bool": ("boolean", ["true", "false"]),
    "c_bytea": ("bytea", ["'\\x00ff10'::bytea", "''::bytea"]),
    "c_date": ("date", ["'2024-02-29'", "'0001-01-01'"]),
    "c_time": ("time", ["'23:59:59.999999'", "'00:00'"]),
    "c_timetz": ("timetz", ["'12:00+05:30'", "'00:00-08'"]),
    "c_ts": ("timestamp", ["'2024-01-01 10:00:00.123456'", "'1999-12-31 23:59:59'"]),
    "c_tstz": ("timestamptz", ["'2024-06-01 10:00:00+02'", "'2000-01-01 00:00:00Z'"]),
    "c_interval": ("interval", ["'1 day 02:03:04.5'", "'-3 hours'"]),
    "c_uuid": ("uuid", ["'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'", "gen_random_uuid()"]),
    "c_json": ("json", ["'{\"a\": [1, 2.5, null]}'", "'\"s\"'"]),
    "c_jsonb": ("jsonb", ['\'{"b": {"c": true}}\'', "'[]'"]),
    "c_int_arr": ("integer[]", ["'{1,NULL,3}'", "'{}'"]),
    "c_text_arr": ("text[]", [r"""'{"a,b",NULL,"NULL","q\"x"}'""", "'{{a,b},{c,d}}'"]),
    "c_inet": ("inet", ["'192.168.0.1/24'", "'::1'"]),
    "c_cidr": ("cidr", ["'10.0.0.0/8'", "'2001:db8::/32'"]),
    "c_macaddr": ("macaddr", ["'08:00:2b:01:02:03'", "'00:00:00:00:00:00'"]),
    "c_int4range": ("int4range", ["'[1,5)'", "'empty'"]),
    "c_tstzrange": ("tstzrange", ["'[2024-01-01 00:00+00,)'", "NULL"]),
    "c_point": ("point", ["'(1.5,2)'", "'(0,0)'"]),
    "c_money": ("money", ["12.34", "-1"]),
    "c_bit": ("bit varying(8)", ["B'1010'", "B''"]),
    "c_oid": ("oid", ["4294967295", "0"]),
    "c_xml": ("xml", ["'<a>1</a>'", "'<b/>'"]),
    "c_tsvector": ("tsvector", ["'a fat cat'", "''"]),
    "c_enum": ("mood", ["'happy'", "'sad'"]),
    "c_domain": ("posint", ["42", "1"]),
    "c_composite": ("pair", ["ROW(1, 'x y')", "ROW(NULL, '')"]),
}
# psycopg has no binary loader for these (custom types, and a few built-ins)
NO_BINARY_LOADER = {
    "c_enum",
    "c_composite",
    "c_macaddr",
    "c_point",
    "c_money",
    "c_bit",
    "c_xml",
    "c_tsvector",
}
SETUP = """
DROP TABLE IF EXISTS all_types;
DROP TYPE IF EXISTS mood; DROP DOMAIN IF EXISTS posint; DROP TYPE IF EXISTS pair;
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE DOMAIN posint AS integer CHECK (VALUE > 0);
CREATE TYPE pair AS (a int, b text);
"""


def _columns(conn: Conn) -> dict[str, tuple[str, list[str]]]:
    """COLUMNS, less xml where the server was built without libxml (pgserver's 16)."""
    try:
        with conn.transaction():
            conn.execute("SELECT '<a/>'::xml")
    except psycopg.errors.FeatureNotSupported:
        return {k: v for k, v in COLUMNS.items() if k != "c_xml"}
    return COLUMNS


def zoo_changes(conn: Conn, slot: str) -> dict[str, tuple[str, list[str]]]:
    """The type zoo's table and a slot on it, then two full rows, a row of NULLs, an update
    and a delete: what every output must carry alike. Returns the columns."""
    _setup(conn)
    conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (slot,))
    columns = _columns(conn)
    for i in range(2):
        values = ", ".join(v[i] for _, v in columns.values())
        conn.execute(f"INSERT INTO all_types ({', '.join(columns)}) VALUES ({values})")
    conn.execute("INSERT INTO all_types (id) VALUES (100)")  # NULLs everywhere
    conn.execute("UPDATE all_types SET c_text = 'changed', c_int4 = 7 WHERE id = 1")
    conn.execute("DELETE FROM all_types WHERE id = 2")
    return columns


def _setup(conn: Conn) -> None:
    conn.execute(SETUP)
    cols = ", ".join(f"{c} {t}" for c, (t, _) in _columns(conn).items())
    conn.execute(f"CREATE TABLE all_types (id serial PRIMARY KEY, {cols})")
    conn.execute("DROP PUBLICATION IF EXISTS types_pub")
    conn.execute("CREATE PUBLICATION types_pub FOR TABLE all_types")


def _decode(conn: Conn, slot: str, mode: str, binary: bool) -> list[RowChange]:
    opts = f"'proto_version', '1', 'publication_names', 'types_pub', 'binary', '{binary}'"
    data = conn.execute(
        f"SELECT lsn, data FROM pg_logical_slot_peek_binary_changes('{slot}', NULL, NULL, {opts})"
    ).fetchall()
    loaders = ValueLoaders(mode, type_map={"public.posint": "int4"})  # type: ignore[arg-type]
    asm = TransactionAssembler(RelationCache(loaders))
    events = [asm.feed(bytes(payload), 0) for _, payload in data]
    return [
        c
        for e in events
        if isinstance(e, Transaction)
        for c in e.changes
        if isinstance(c, RowChange)
    ]


def _is_nan(x: object) -> bool:
    return (isinstance(x, float) and math.isnan(x)) or (isinstance(x, Decimal) and x.is_nan())


def _same(a: object, b: object) -> bool:
    return (_is_nan(a) and _is_nan(b)) or a == b


@pytest.fixture
def typed_rows(pg_conn: Conn) -> tuple[Conn, str]:
    _setup(pg_conn)
    slot = "types_slot"
    pg_conn.execute(
        "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
        f"WHERE slot_name = '{slot}'"
    )
    pg_conn.execute(f"SELECT pg_create_logical_replication_slot('{slot}', 'pgoutput')")
    columns = _columns(pg_conn)
    for i in range(2):
        cols = ", ".join(columns)
        vals = ", ".join(v[i] for _, v in columns.values())
        pg_conn.execute(f"INSERT INTO all_types ({cols}) VALUES ({vals})")
    return pg_conn, slot


@pytest.mark.parametrize("binary", [False, True], ids=["text-format", "binary-format"])
def test_typed_values_match_psycopg(typed_rows: tuple[Conn, str], binary: bool) -> None:
    conn, slot = typed_rows
    changes = _decode(conn, slot, "typed", binary)
    assert len(changes) == 2
    cur = conn.execute("SELECT * FROM all_types ORDER BY id")
    names = [d.name for d in cur.description or ()]
    expected = [dict(zip(names, r, strict=True)) for r in cur.fetchall()]
    for change, want in zip(changes, expected, strict=True):
        got = change.new
        assert got is not None
        _assert_one_call_path_agrees(change, got)
        for col, value in want.items():
            if binary and col in NO_BINARY_LOADER:
                # psycopg has no loader for this type's binary form: its bytes are kept
                assert value is None or isinstance(got[col], bytes), col
                continue
            assert _same(got[col], value), (col, got[col], value)


def test_text_values_are_postgres_output(typed_rows: tuple[Conn, str]) -> None:
    conn, slot = typed_rows
    changes = _decode(conn, slot, "text", False)
    # concat() applies the type's output function, as pgoutput does (::text trims char(n))
    casts = ", ".join(
        f"CASE WHEN {c} IS DISTINCT FROM NULL THEN concat({c}) END" for c in _columns(conn)
    )
    expected = conn.execute(f"SELECT id::text, {casts} FROM all_types ORDER BY id").fetchall()
    for change, want in zip(changes, expected, strict=True):
        got = change.new
        assert got is not None
        _assert_one_call_path_agrees(change, got)
        assert list(got.values()) == list(want)


def _assert_one_call_path_agrees(change: RowChange, got: dict[str, Any]) -> None:
    """Where the C walk is built, it took these rows (no fallback), with the same values as
    the loader-per-value loop."""
    rel, raw, at = change.relation, change.raw, change.new_at
    looped = rel._row_loop(raw, at, rel.fused)
    assert looped.keys() == got.keys()
    assert all(_same(looped[k], got[k]) for k in got), [k for k in got if got[k] != looped[k]]
    if accel.typed_row is not None:
        assert rel.fast_row(raw, at) is not None


def _changes(conn: Conn, slot: str, opts: str) -> list[Event]:
    conn.execute("SET logical_decoding_work_mem = '64kB'")
    rows = conn.execute(
        f"SELECT lsn, data FROM pg_logical_slot_get_binary_changes('{slot}', NULL, NULL, {opts})"
    ).fetchall()
    asm = TransactionAssembler(spill_bytes=16 * 1024)
    events = [asm.feed(bytes(d), 0) for _, d in rows]
    assert not asm.in_transaction
    return [e for e in events if e is not None]


def test_streaming_a_transaction_larger_than_work_mem(pg_conn: Conn) -> None:
    pg_conn.execute("DROP TABLE IF EXISTS big; CREATE TABLE big (id int PRIMARY KEY, pad text)")
    pg_conn.execute("DROP PUBLICATION IF EXISTS big_pub; CREATE PUBLICATION big_pub FOR TABLE big")
    pg_conn.execute("SELECT pg_create_logical_replication_slot('stream_slot', 'pgoutput')")
    try:
        with pg_conn.transaction():
            pg_conn.execute(
                "INSERT INTO big SELECT g, repeat('p', 100) FROM generate_series(1, 5000) g"
            )
        pg_conn.execute("INSERT INTO big VALUES (0, 'small')")
        opts = "'proto_version', '2', 'publication_names', 'big_pub', 'streaming', 'on'"
        pg_conn.execute("SET logical_decoding_work_mem = '64kB'")
        streamed_chunks = pg_conn.execute(
            "SELECT count(*) FROM "
            f"pg_logical_slot_peek_binary_changes('stream_slot', NULL, NULL, {opts}) "
            "WHERE substr(data, 1, 1) = 'S'"
        ).fetchone()
        events = _changes(pg_conn, "stream_slot", opts)
    finally:
        pg_conn.execute("SELECT pg_drop_replication_slot('stream_slot')")
    assert streamed_chunks is not None and streamed_chunks[0] > 1  # really streamed
    txns = [e for e in events if isinstance(e, Transaction)]
    assert [len(t.changes) for t in txns] == [5000, 1]
    first = txns[0].changes
    assert [c.new["id"] for c in first if isinstance(c, RowChange) and c.new] == list(
        range(1, 5001)
    )


@pytest.mark.parametrize("surface", [False, True])
def test_two_phase_prepare_on_a_two_phase_slot(pg_conn: Conn, surface: bool) -> None:
    pg_conn.execute("DROP TABLE IF EXISTS tp; CREATE TABLE tp (id int PRIMARY KEY)")
    pg_conn.execute("DROP PUBLICATION IF EXISTS tp_pub; CREATE PUBLICATION tp_pub FOR TABLE tp")
    pg_conn.execute("SELECT pg_create_logical_replication_slot('tp_slot', 'pgoutput', false, true)")
    asm = TransactionAssembler(surface_prepares=surface)
    opts = "'proto_version', '3', 'publication_names', 'tp_pub', 'two_phase', 'on'"

    def consume() -> list[Event]:
        rows = pg_conn.execute(
            f"SELECT data FROM pg_logical_slot_get_binary_changes('tp_slot', NULL, NULL, {opts})"
        ).fetchall()
        return [e for (d,) in rows if (e := asm.feed(bytes(d), 0)) is not None]

    try:
        pg_conn.execute("BEGIN")
        pg_conn.execute("INSERT INTO tp VALUES (1), (2)")
        pg_conn.execute("PREPARE TRANSACTION 'tp_one'")
        at_prepare = consume()
        assert asm.in_transaction != surface  # held until its outcome, unless surfaced
        pg_conn.execute("COMMIT PREPARED 'tp_one'")
        at_commit = consume()
    finally:
        pg_conn.execute("SELECT pg_drop_replication_slot('tp_slot')")
    if surface:
        (prepared,) = at_prepare
        assert isinstance(prepared, PreparedTransaction) and prepared.gid == "tp_one"
        assert len(prepared.changes) == 2
        (outcome,) = at_commit
        assert isinstance(outcome, PreparedOutcome) and outcome.committed
    else:
        assert at_prepare == []
        (txn,) = at_commit
        assert isinstance(txn, Transaction) and txn.gid == "tp_one"
        assert [c.new for c in txn.changes if isinstance(c, RowChange)] == [{"id": 1}, {"id": 2}]
    assert not asm.in_transaction


@pytest.mark.parametrize(
    ("mode", "binary"), [("typed", False), ("typed", True), ("text", False)]
)  # text values need the text format: there is no PostgreSQL text in binary-format values
def test_every_type_renders_as_json(
    typed_rows: tuple[Conn, str], mode: str, binary: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    conn, slot = typed_rows
    renderer = JsonRenderer(mode)  # type: ignore[arg-type]
    opts = f"'proto_version', '1', 'publication_names', 'types_pub', 'binary', '{binary}'"
    data = conn.execute(
        f"SELECT data FROM pg_logical_slot_peek_binary_changes('{slot}', NULL, NULL, {opts})"
    ).fetchall()
    asm = TransactionAssembler()
    txns = [e for (d,) in data if isinstance(e := asm.feed(bytes(d), 0), Transaction)]
    lines = [renderer.transaction(t) for t in txns]
    for txn in txns:  # the row walker (C where built) took every row: no careful fallback
        change = txn.changes[0]
        assert isinstance(change, RowChange)
        assert renderer._shape(change.relation).row(change.raw, change.new_at) is not None
    monkeypatch.setattr(accel, "json_row", None)  # the pure-Python walker: the same text
    assert [JsonRenderer(mode).transaction(t) for t in txns] == lines  # type: ignore[arg-type]
    rows = [json.loads(line)["changes"][0]["new"] for line in lines]
    assert len(rows) == 2
    first, second = rows
    if mode == "text":
        assert first["c_numeric"] == "NaN" and first["c_int_arr"] == "{1,NULL,3}"
        return
    assert first["c_int4"] == 2147483647 and first["c_bool"] is True
    assert first["c_numeric"] == "NaN" and second["c_numeric"].startswith("1234567890")
    assert first["c_float4"] == "Infinity" or first["c_float4"] == "inf"
    assert first["c_bytea"] == "\\x00ff10"
    assert first["c_json"] == {"a": [1, 2.5, None]} and first["c_jsonb"] == {"b": {"c": True}}
    assert first["c_int_arr"] == [1, None, 3]
    assert first["c_text_arr"] == ["a,b", None, "NULL", 'q"x']
    assert first["c_tstz"] == "2024-06-01T08:00:00+00:00"
    assert first["c_date"] == "2024-02-29"
    assert first["c_uuid"] == "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"
    assert isinstance(first["c_interval"], str)
