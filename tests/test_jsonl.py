"""JSON Lines rendering of transactions (tail --format jsonl, bridge --payload json)."""

from __future__ import annotations

import base64
import json
import struct
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from psycopg.adapt import Transformer
from psycopg.pq import Format

from pglogrepl_bridge.pgoutput.messages import Column, Relation, TupleData
from pglogrepl_bridge.pgoutput.relcache import RelationCache, RelationInfo
from pglogrepl_bridge.pgoutput.transaction import Transaction
from pglogrepl_bridge.render.jsonl import JsonRenderer, _loaded, py_json

from .pgoutput_builders import tuple_bytes
from .test_captures import FIRST_ITEM_AS_TEXT, VERSIONS, replay


@pytest.mark.parametrize("version", VERSIONS)
def test_basic_capture_as_json_lines(version: int) -> None:
    events, _ = replay(version, "basic")
    renderer = JsonRenderer("typed")
    lines = [renderer.transaction(t) for t in events if isinstance(t, Transaction)]
    assert all("\n" not in line for line in lines)
    docs = [json.loads(line) for line in lines]
    first = docs[0]
    assert set(first) == {"xid", "lsn", "end_lsn", "commit_time", "origin", "changes"}
    assert first["commit_time"].endswith("+00:00")
    assert first["changes"] == [
        {
            "op": "insert",
            "schema": "public",
            "table": "items",
            "new": {
                "id": 1,
                "name": "apple",
                "price": "1.50",
                "tags": ["red", "green apple", None],
                "big": None,
                "feel": "happy",
            },
            "old": None,
            "unchanged_toast": [],
        }
    ]
    toast = docs[2]["changes"][0]
    assert toast["unchanged_toast"] == ["big"] and "big" not in toast["new"]
    assert docs[3]["changes"][0]["old"] == {"id": 2}
    assert docs[4]["changes"][0] == {
        "op": "delete",
        "schema": "public",
        "table": "items",
        "new": None,
        "old": {"id": 1},
        "unchanged_toast": [],
    }
    message = docs[6]["changes"][0]
    assert message == {
        "op": "message",
        "prefix": "app",
        "content": base64.b64encode(b"hello").decode(),
        "transactional": True,
    }
    assert docs[7]["changes"][0] == {
        "op": "truncate",
        "relations": ["public.items", "public.full_ident"],
        "cascade": False,
        "restart_identity": True,
    }
    assert docs[0]["end_lsn"] == str(events[0].end_lsn)  # type: ignore[union-attr]


@pytest.mark.parametrize("version", VERSIONS)
def test_the_inlined_hot_path_renders_each_change_as_change_utf8_does(version: int) -> None:
    """``changes_utf8`` inlines inserts of known tables: on a capture with TOAST, old rows,
    deletes, messages and truncates, and twice (first unseen tables, then cached shapes),
    it must give exactly ``change_utf8``'s bytes."""
    events, _ = replay(version, "basic")
    txns = [t for t in events if isinstance(t, Transaction)]
    inlined, one_by_one = JsonRenderer("typed"), JsonRenderer("typed")
    hot = 0
    for _ in range(2):
        for txn in txns:
            got = inlined.changes_utf8(txn.changes)
            assert got == [one_by_one.change_utf8(c) for c in txn.changes]
            assert inlined.line(txn) == one_by_one.line(txn, got)
            hot += sum(b.endswith(b',"old":null,"unchanged_toast":[]}') for b in got)
    assert hot > 0  # the inlined path was taken


@pytest.mark.parametrize("version", VERSIONS)
def test_text_values(version: int) -> None:
    events, _ = replay(version, "basic", mode="text")
    doc = json.loads(JsonRenderer("text").transaction(events[0]))  # type: ignore[arg-type]
    assert doc["changes"][0]["new"] == FIRST_ITEM_AS_TEXT


@pytest.mark.parametrize("version", VERSIONS)
def test_binary_values_render_like_text_ones(version: int) -> None:
    events, _ = replay(version, "binary")
    doc = json.loads(JsonRenderer("typed").transaction(events[0]))  # type: ignore[arg-type]
    assert doc["changes"][0]["new"] == {
        "id": 3,
        "name": "plum",
        "price": "3.75",
        "tags": ["a", "b"],
        "big": None,
        "feel": "\\x736164",  # no binary loader for an enum: its bytes, as bytea is shown
    }


def test_py_json_rules() -> None:
    from datetime import UTC, datetime
    from decimal import Decimal

    assert py_json(Decimal("1.10")) == '"1.10"'
    assert py_json(float("nan")) == '"nan"'
    assert py_json(b"\x00\xff") == '"\\\\x00ff"'
    assert py_json(datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)) == '"2024-01-02T03:04:05+00:00"'
    assert py_json([1, None, [True]]) == "[1,null,[true]]"
    assert py_json({"a": 1}) == '{"a":1}'


_TYPES = {"text": 25, "int4": 23, "bool": 16, "numeric": 1700, "jsonb": 3802, "date": 1082}


@st.composite
def _relation_and_tuple(draw: st.DrawFn) -> tuple[RelationInfo, bytes]:
    """A relation with awkward column names and a tuple of text, NULL and binary values that
    its renderers accept (so the compiled path must produce exactly the careful one's text)."""
    names = draw(st.lists(st.text(min_size=1, max_size=8), min_size=1, max_size=6, unique=True))
    types = [draw(st.sampled_from(sorted(_TYPES))) for _ in names]
    keys = [draw(st.booleans()) for _ in names]
    samples = {
        "text": st.text(max_size=12).map(str.encode),
        "int4": st.integers(-(2**31), 2**31 - 1).map(lambda i: str(i).encode()),
        "bool": st.sampled_from([b"t", b"f"]),
        "numeric": st.sampled_from([b"1.50", b"-0.001", b"NaN"]),
        "jsonb": st.sampled_from([b'{"a": [1, "x"]}', b"null", b'"s"']),
        "date": st.sampled_from([b"2024-02-29", b"1999-12-31"]),
    }
    kinds, values = bytearray(), list[bytes | None]()
    for t in types:
        if draw(st.booleans()):
            kinds.append(0x74)
            values.append(draw(samples[t]))
        elif t == "int4" and draw(st.booleans()):
            kinds.append(0x62)
            values.append(struct.pack("!i", draw(st.integers(-5, 5))))
        else:
            kinds.append(0x6E)
            values.append(None)
    relation = Relation(
        None,
        1,
        "public",
        "t",
        "d",
        tuple(Column(n, _TYPES[t], -1, k) for n, t, k in zip(names, types, keys, strict=True)),
    )
    info = RelationCache().add_relation(relation)
    return info, b"I" + tuple_bytes(TupleData(bytes(kinds), tuple(values)))


@given(_relation_and_tuple(), st.booleans())
def test_compiled_rows_equal_the_careful_path(case: tuple[RelationInfo, bytes], key: bool) -> None:
    rel, raw = case
    renderer = JsonRenderer("typed")
    fast = renderer.row(rel, raw, 1, key_only=key)
    careful = renderer._careful(rel, raw, 1, key)[0]
    assert fast == careful
    expected = {c.name for c in rel.columns if c.is_key or not key}
    assert set(json.loads(fast)) == expected


def test_compiled_rows_step_aside_for_unchanged_toast_and_bad_bytes() -> None:
    relation = Relation(
        None, 1, "s", "t", "d", (Column("id", 23, -1, True), Column("big", 25, -1, False))
    )
    rel = RelationCache().add_relation(relation)
    renderer = JsonRenderer("typed")
    shape = renderer._shape(rel)
    toast = tuple_bytes(TupleData(b"tu", (b"7", None)))
    assert shape.row(toast, 0) is None  # the careful path reports the TOAST column
    assert renderer.row(rel, toast, 0) == '{"id":7}'
    assert shape.row(b"\x00\x02t\x00\x00\x00\x09" + b"7", 0) is None  # length overshoots
    assert shape.row(b"\x00\x03", 0) is None  # wrong column count


def _pg_array_text(value: Any) -> str:
    if isinstance(value, list):
        return "{" + ",".join(_pg_array_text(v) for v in value) + "}"
    return "NULL" if value is None else str(value)


_INT_ARRAYS = st.lists(st.none() | st.integers(-(2**63), 2**63 - 1), max_size=5) | st.lists(
    st.lists(st.none() | st.integers(-1000, 1000), min_size=2, max_size=2), min_size=1, max_size=3
)


@given(_INT_ARRAYS, st.sampled_from([1005, 1007, 1016]))
@example([1, None, 3], 1007)
@example([], 1007)
def test_integer_arrays_render_as_the_loaded_ones_do(value: list[Any], oid: int) -> None:
    """The text shortcut for integer arrays (brackets for braces) equals loading and
    rendering; arrays with explicit bounds take the loader."""
    limit = {1005: 2**15, 1007: 2**31, 1016: 2**63}[oid]  # int2, int4, int8

    def fit(v: Any) -> Any:
        if isinstance(v, list):
            return [fit(w) for w in v]
        return None if v is None else (v + limit // 2) % limit - limit // 2  # signed range

    value = fit(value)
    renderer = JsonRenderer()
    text = _pg_array_text(value).encode()
    shortcut = renderer._text_renderer(oid)
    loaded = _loaded(Transformer().get_loader(oid, Format.TEXT).load)
    assert shortcut(text) == loaded(text)
    assert json.loads(shortcut(text)) == value
    bounded = b"[0:1]={1,2}"
    assert shortcut(bounded) == loaded(bounded)
