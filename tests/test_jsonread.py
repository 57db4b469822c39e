"""``wire.jsonread``: the bridge's JSON payload reads back into the transaction it came from.

Pure: the recorded pgoutput captures of PostgreSQL 15 and 16 (every change kind, TOAST,
REPLICA IDENTITY FULL, truncates, messages, binary values, custom types) are encoded as the
bridge's ``--payload json`` and read back; every change must read the same values. Bytes cut
short or corrupted are a ProtocolError (a ConfigError where the relations member is gone),
nothing else.
"""

from __future__ import annotations

import contextlib
import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pglogrepl_bridge.errors import ConfigError, ProtocolError
from pglogrepl_bridge.wire.jsonread import JsonPayloadReader
from pglogrepl_bridge.wire.payload import encoder

from .test_captures import VERSIONS
from .test_entries import CAPTURES, _transactions, same_transaction


@pytest.mark.parametrize("name", CAPTURES)
@pytest.mark.parametrize("version", VERSIONS)
def test_every_transaction_reads_back_as_it_was_sent(version: int, name: str) -> None:
    txns = _transactions(version, name)
    assert txns
    encode, reader = encoder("json"), JsonPayloadReader()
    for txn in txns:
        same_transaction(reader.transaction(encode(txn)), txn)


def test_the_payload_is_tails_line_plus_the_relations() -> None:
    from pglogrepl_bridge.render.jsonl import JsonRenderer

    txn = _transactions(16, "basic")[0]
    doc = json.loads(encoder("json")(txn))
    relations = doc.pop("relations")
    assert doc == json.loads(JsonRenderer("typed").transaction(txn))
    assert [r[2] for r in relations] and all(len(r) == 5 for r in relations)


def test_malformed_payloads_are_protocol_errors() -> None:
    txns = _transactions(16, "basic")
    encode = encoder("json")
    rng = random.Random(5)
    for txn in txns[:20]:
        data = encode(txn)
        for cut in sorted(rng.sample(range(len(data)), min(15, len(data)))):
            with contextlib.suppress(ProtocolError, ConfigError):  # no relations: ConfigError
                JsonPayloadReader().transaction(data[:cut])
        for _ in range(15):
            flipped = bytearray(data)
            flipped[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
            with contextlib.suppress(ProtocolError, ConfigError):  # no relations: ConfigError
                JsonPayloadReader().transaction(bytes(flipped))
    line = encode(txns[0])
    doc = json.loads(line)
    del doc["relations"]
    with pytest.raises(ConfigError, match="no relations member"):
        JsonPayloadReader().transaction(json.dumps(doc).encode())
    with pytest.raises(ProtocolError, match="not an object"):
        JsonPayloadReader().transaction(b"[1]")
    with pytest.raises(ProtocolError, match="not JSON"):
        JsonPayloadReader().transaction(b'{"xid": NaN}')


def _plain(value: object) -> object:
    """The reader's parse as json.loads would give it."""
    from pglogrepl_bridge.wire.jsonread import _Array, _Number, _Object

    if isinstance(value, _Number):
        return json.loads(value)
    if isinstance(value, _Object):
        return {k: _plain(v) for k, v in value}
    if isinstance(value, _Array):
        return [_plain(v) for v in value]
    return value


@settings(deadline=None)
@given(
    st.recursive(
        st.none()
        | st.booleans()
        | st.integers()
        | st.floats(allow_nan=False, allow_infinity=False)
        | st.text(),
        lambda kids: (
            st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=5), kids, max_size=4)
        ),
        max_leaves=20,
    ),
    st.sampled_from([None, 0, 2]),
    st.booleans(),
)
def test_json_values_keep_the_text_they_were_written_with(
    value: object, indent: int | None, ascii_only: bool
) -> None:
    """J1, J2: the reader parses what json.loads parses, and keeps the text of every member
    and element as written (json keeps its whitespace; numbers keep their digits)."""
    from pglogrepl_bridge.wire.jsonread import _Array, _decode, _Object

    text = json.dumps(value, indent=indent, ensure_ascii=ascii_only)
    parsed = _decode(text)
    assert _plain(parsed) == json.loads(text)
    stack = [parsed]
    while stack:
        node = stack.pop()
        if isinstance(node, _Object):
            for key, member in node:
                assert _plain(_decode(node.raw[key])) == _plain(member)
                stack.append(member)
        elif isinstance(node, _Array):
            assert len(node.raw) == len(node)
            for member, raw in zip(node, node.raw, strict=True):
                assert _plain(_decode(raw)) == _plain(member)
                stack.append(member)
