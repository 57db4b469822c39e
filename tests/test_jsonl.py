"""JSON Lines rendering of transactions (tail --format jsonl, bridge --payload json)."""

from __future__ import annotations

import base64
import json

import pytest

from pglogrepl_bridge.jsonl import JsonRenderer, py_json
from pglogrepl_bridge.transaction import Transaction

from .test_captures import VERSIONS, replay


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
def test_text_values(version: int) -> None:
    events, _ = replay(version, "basic", mode="text")
    doc = json.loads(JsonRenderer("text").transaction(events[0]))  # type: ignore[arg-type]
    assert doc["changes"][0]["new"] == {
        "id": "1",
        "name": "apple",
        "price": "1.50",
        "tags": '{red,"green apple",NULL}',
        "big": None,
        "feel": "happy",
    }


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
