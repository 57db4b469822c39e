"""The bincode WalEntry payload, read back by a schema-driven bincode reader written from
bincode 1.x's rules and the Rust definitions in docs/replication-message.md."""

from __future__ import annotations

import json
import struct
from typing import Any

import pytest

from pglogrepl_bridge.payload import BincodeEncoder, encoder
from pglogrepl_bridge.transaction import Transaction

from .test_captures import VERSIONS, replay

# The Rust types, transcribed: field order is the wire order.
VALUE = ("enum", [("Text", ["string"]), ("Binary", ["bytes"])])
COLUMN = ("struct", [("name", "string"), ("value", ("option", VALUE))])
OP = ("enum", [("Insert", []), ("Update", []), ("Delete", [])])
CHANGE = (
    "enum",
    [
        (
            "Row",
            [
                ("op", OP),
                ("schema", "string"),
                ("table", "string"),
                ("new", ("option", ("vec", COLUMN))),
                ("old", ("option", ("vec", COLUMN))),
                ("unchanged_toast", ("vec", "string")),
            ],
        ),
        (
            "Truncate",
            [("relations", ("vec", "string")), ("cascade", "bool"), ("restart_identity", "bool")],
        ),
        ("Message", [("prefix", "string"), ("content", "bytes"), ("transactional", "bool")]),
    ],
)
TRANSACTION = (
    "struct",
    [
        ("xid", "u32"),
        ("lsn", "u64"),
        ("end_lsn", "u64"),
        ("commit_time_us", "i64"),
        ("origin", ("option", "string")),
        ("changes", ("vec", CHANGE)),
    ],
)
_FIXED = {"u32": "<I", "u64": "<Q", "i64": "<q"}


def read(schema: Any, buf: bytes, pos: int) -> tuple[Any, int]:
    if isinstance(schema, str):
        if schema in _FIXED:
            fmt = _FIXED[schema]
            return struct.unpack_from(fmt, buf, pos)[0], pos + struct.calcsize(fmt)
        if schema == "bool":
            assert buf[pos] in (0, 1)
            return bool(buf[pos]), pos + 1
        n, pos = read("u64", buf, pos)
        raw = buf[pos : pos + n]
        assert len(raw) == n
        return (raw.decode() if schema == "string" else raw), pos + n
    kind, spec = schema
    if kind == "option":
        tag, pos = buf[pos], pos + 1
        assert tag in (0, 1)
        return (None, pos) if tag == 0 else read(spec, buf, pos)
    if kind == "vec":
        n, pos = read("u64", buf, pos)
        items = []
        for _ in range(n):
            item, pos = read(spec, buf, pos)
            items.append(item)
        return items, pos
    if kind == "struct":
        out = {}
        for name, sub in spec:
            out[name], pos = read(sub, buf, pos)
        return out, pos
    index, pos = read("u32", buf, pos)
    variant, fields = spec[index]
    values = {}
    for f in fields:
        name, sub = f if isinstance(f, tuple) else (variant, f)
        values[name], pos = read(sub, buf, pos)
    return {variant: values}, pos


def decode(buf: bytes) -> dict[str, Any]:
    value, end = read(TRANSACTION, buf, 0)
    assert end == len(buf), "trailing bytes"
    return value  # type: ignore[no-any-return]


def columns(cols: list[dict[str, Any]] | None) -> dict[str, str | None] | None:
    if cols is None:
        return None
    return {c["name"]: None if c["value"] is None else c["value"]["Text"]["Text"] for c in cols}


@pytest.mark.parametrize("version", VERSIONS)
def test_bincode_payload_reads_back(version: int) -> None:
    events, _ = replay(version, "basic")
    txns = [e for e in events if isinstance(e, Transaction)]
    enc = BincodeEncoder()
    docs = [decode(enc.transaction(t)) for t in txns]
    first = docs[0]
    assert (first["xid"], first["lsn"], first["end_lsn"]) == (
        txns[0].xid,
        txns[0].commit_lsn,
        txns[0].end_lsn,
    )
    assert first["commit_time_us"] == txns[0].timestamp_us and first["origin"] is None
    row = first["changes"][0]["Row"]
    assert row["op"] == {"Insert": {}} and (row["schema"], row["table"]) == ("public", "items")
    assert columns(row["new"]) == {
        "id": "1",
        "name": "apple",
        "price": "1.50",
        "tags": '{red,"green apple",NULL}',
        "big": None,
        "feel": "happy",
    }
    assert row["old"] is None and row["unchanged_toast"] == []
    toast = docs[2]["changes"][0]["Row"]
    assert toast["unchanged_toast"] == ["big"] and "big" not in columns(toast["new"])  # type: ignore[operator]
    assert columns(docs[3]["changes"][0]["Row"]["old"]) == {"id": "2"}
    assert docs[6]["changes"][0] == {
        "Message": {"prefix": "app", "content": b"hello", "transactional": True}
    }
    assert docs[7]["changes"][0] == {
        "Truncate": {
            "relations": ["public.items", "public.full_ident"],
            "cascade": False,
            "restart_identity": True,
        }
    }


@pytest.mark.parametrize("version", VERSIONS)
def test_binary_values_are_binary(version: int) -> None:
    events, _ = replay(version, "binary")
    doc = decode(BincodeEncoder().transaction(events[0]))  # type: ignore[arg-type]
    new = doc["changes"][0]["Row"]["new"]
    assert new[0] == {"name": "id", "value": {"Binary": {"Binary": b"\0\0\0\x03"}}}


def test_json_payload_is_the_tail_line() -> None:
    events, _ = replay(16, "basic")
    data = encoder("json")(events[0])  # type: ignore[arg-type]
    assert json.loads(data)["changes"][0]["new"]["name"] == "apple"
