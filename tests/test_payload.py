"""The bincode WalEntry payload, read back by a schema-driven bincode reader written from
bincode 1.x's rules and the Rust definitions in docs/replication-message.md."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from pglogrepl_bridge.errors import DecodeError
from pglogrepl_bridge.pgoutput.transaction import RowChange, Transaction
from pglogrepl_bridge.wire.payload import BincodeEncoder, encoder

from .test_captures import FIRST_ITEM_AS_TEXT, VERSIONS, replay

# The Rust types, transcribed: field order is the wire order. A Row is a Vec<u8> of pgoutput
# TupleData, read by tuple_values below.
OP: tuple[str, Any] = ("enum", [("Insert", []), ("Update", []), ("Delete", [])])
COLUMN_DEF = ("struct", [("name", "string"), ("type_oid", "u32"), ("is_key", "bool")])
RELATION = ("struct", [("schema", "string"), ("table", "string"), ("columns", ("vec", COLUMN_DEF))])
CHANGE = (
    "enum",
    [
        (
            "Row",
            [
                ("op", OP),
                ("relation", "u32"),
                ("new", ("option", "row")),
                ("old", ("option", "row")),
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
        ("relations", ("vec", RELATION)),
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
        if schema == "row":
            return tuple_values(raw), pos + n
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


def tuple_values(raw: bytes) -> list[Any]:
    """pgoutput TupleData (Int16 count; per column 'n', 'u', or 't'/'b' + Int32 length +
    bytes, big-endian), as the Rust Row's try_from reads it: ("text", str), ("binary",
    bytes), None for NULL, "unchanged" for unchanged TOAST."""
    (count,) = struct.unpack_from("!H", raw, 0)
    pos, values = 2, list[object]()
    for _ in range(count):
        kind, pos = raw[pos : pos + 1], pos + 1
        if kind == b"n":
            values.append(None)
        elif kind == b"u":
            values.append("unchanged")
        else:
            assert kind in (b"t", b"b")
            (n,) = struct.unpack_from("!I", raw, pos)
            data = raw[pos + 4 : pos + 4 + n]
            assert len(data) == n
            values.append(("text", data.decode()) if kind == b"t" else ("binary", data))
            pos += 4 + n
    assert pos == len(raw), "trailing bytes in a Row"
    return values


def decode(buf: bytes) -> dict[str, Any]:
    value, end = read(TRANSACTION, buf, 0)
    assert end == len(buf), "trailing bytes"
    return value  # type: ignore[no-any-return]


def columns(doc: dict[str, Any], row: dict[str, Any], which: str) -> dict[str, Any] | None:
    """A Row's values by column name, as a consumer reads them through ``relations``."""
    values = row[which]
    if values is None:
        return None
    names = [c["name"] for c in doc["relations"][row["relation"]]["columns"]]
    assert len(names) == len(values)
    return {
        n: v[1] if isinstance(v, tuple) else v
        for n, v in zip(names, values, strict=True)
        if v is not None or which == "new"
    }


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
    assert first["relations"][0]["schema"] == "public"
    assert first["relations"][0]["table"] == "items"
    assert [(c["name"], c["is_key"]) for c in first["relations"][0]["columns"]][:2] == [
        ("id", True),
        ("name", False),
    ]
    row = first["changes"][0]["Row"]
    assert row["op"] == {"Insert": {}} and row["relation"] == 0
    assert columns(first, row, "new") == FIRST_ITEM_AS_TEXT
    assert row["old"] is None
    toast = docs[2]["changes"][0]["Row"]
    assert columns(docs[2], toast, "new")["big"] == "unchanged"  # type: ignore[index]
    assert columns(docs[3], docs[3]["changes"][0]["Row"], "old") == {"id": "2"}
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
    assert all(d["relations"] == [] for d in docs[6:8])  # no Row, no relation definitions


@pytest.mark.parametrize("version", VERSIONS)
def test_binary_values_are_binary(version: int) -> None:
    events, _ = replay(version, "binary")
    doc = decode(BincodeEncoder().transaction(events[0]))  # type: ignore[arg-type]
    new = doc["changes"][0]["Row"]["new"]
    assert new[0] == ("binary", b"\0\0\0\x03")


def test_a_tuple_with_the_wrong_column_count_is_refused() -> None:
    events, _ = replay(16, "basic")
    change = events[0].changes[0]  # type: ignore[union-attr]
    assert isinstance(change, RowChange)
    broken = replace(change, raw=change.raw[: change.new_at] + b"\x00\x01n")
    with pytest.raises(DecodeError, match="column count"):
        BincodeEncoder().row(broken, 0)


@pytest.mark.skipif(
    shutil.which("cargo") is None or not Path("/usr/share/cargo/registry/bincode-1.3.3").exists(),
    reason="needs cargo and Debian's librust-bincode-dev / librust-serde-derive-dev",
)
def test_rust_reads_the_payload_with_the_documented_definitions(tmp_path: Path) -> None:
    """tests/rust compiles the Rust block of docs/replication-message.md as it is."""
    events, _ = replay(16, "basic")
    txns = [e for e in events if isinstance(e, Transaction)]
    enc = BincodeEncoder()
    files = []
    for i, txn in enumerate(txns):
        files.append(tmp_path / f"{i}.bin")
        files[-1].write_bytes(enc.transaction(txn))
    crate = Path(__file__).parent / "rust"
    result = subprocess.run(
        ["cargo", "run", "--quiet", "--release", "--", *map(str, files)],
        cwd=crate,
        env={**os.environ, "CARGO_TARGET_DIR": str(tmp_path / "target")},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    first = txns[0]
    assert lines[0] == (
        f"txn {first.xid} {int(first.commit_lsn)} {int(first.end_lsn)} {first.timestamp_us} None"
    )
    assert lines[1].startswith("relation public.items id:23:true,name:25:false,")
    assert lines[2] == (
        'row Insert 0 new=text:1|text:apple|text:1.50|text:{red,"green apple",NULL}|null'
        "|text:happy old=-"
    )
    assert any("|unchanged|" in line for line in lines)  # the unchanged TOAST column
    assert "message app 5 true" in lines
    assert "truncate public.items,public.full_ident false true" in lines


def test_json_payload_is_the_tail_line() -> None:
    events, _ = replay(16, "basic")
    data = encoder("json")(events[0])  # type: ignore[arg-type]
    assert json.loads(data)["changes"][0]["new"]["name"] == "apple"
