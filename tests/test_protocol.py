"""The ReplicationMessage codec against the golden vectors of the real Rust crates."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pglogrepl_bridge.errors import ProtocolError
from pglogrepl_bridge.wire.protocol import (
    Acknowledge,
    FrameReader,
    Heartbeat,
    Promotion,
    ReplicationMessage,
    RequestFrom,
    VoteRequest,
    VoteResponse,
    WalEntry,
    frame,
    from_bincode,
    from_json,
    to_bincode,
    to_json,
)

# The golden vectors made by the real Rust crates (serde 1.0.152, bincode 1.3.3,
# serde_json 1.0.87), so the tests run from a clean clone.
VECTORS = json.loads(
    (Path(__file__).parent / "data" / "replication-message-vectors.json").read_text()
)


@pytest.mark.parametrize("vector", VECTORS, ids=[v["json"][:40] for v in VECTORS])
def test_golden_vectors_both_directions(vector: dict[str, str]) -> None:
    msg = from_json(vector["json"])
    assert to_json(msg) == vector["json"]
    assert to_bincode(msg).hex() == vector["bincode_hex"]
    assert frame(msg).hex() == vector["framed_hex"]
    assert from_bincode(bytes.fromhex(vector["bincode_hex"])) == msg
    assert FrameReader().feed(bytes.fromhex(vector["framed_hex"])) == [msg]


def test_vectors_cover_every_variant() -> None:
    names = {next(iter(json.loads(v["json"]))) for v in VECTORS}
    assert len(VECTORS) == 38 and len(names) == 7


u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
messages = st.one_of(
    st.builds(WalEntry, u32, u64, u64, st.binary(max_size=300)),
    st.builds(Heartbeat, u32, u64),
    st.builds(RequestFrom, u32, u64),
    st.builds(Acknowledge, u32, u64),
    st.builds(VoteRequest, u32, u64, u64),
    st.builds(VoteResponse, u32, u32, u64, st.booleans()),
    st.builds(Promotion, u32, u64),
)


@given(messages)
def test_round_trips(msg: ReplicationMessage) -> None:
    assert from_bincode(to_bincode(msg)) == msg
    assert from_json(to_json(msg)) == msg
    assert FrameReader().feed(frame(msg)) == [msg]


@given(st.lists(messages, max_size=8), st.data())
def test_frame_reader_any_split(msgs: list[ReplicationMessage], data: st.DataObject) -> None:
    stream = b"".join(frame(m) for m in msgs)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    reader = FrameReader()
    out: list[ReplicationMessage] = []
    prev = 0
    for cut in [*cuts, len(stream)]:
        out += reader.feed(stream[prev:cut])
        prev = cut
    assert out == msgs
    assert reader.buffered == 0


@settings(max_examples=500)
@given(st.binary(max_size=64))
def test_fuzzed_frames_only_raise_protocol_error(raw: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        FrameReader(max_frame=1024).feed(raw)


@settings(max_examples=300)
@given(messages, st.data())
def test_mutated_frames_only_raise_protocol_error(
    msg: ReplicationMessage, data: st.DataObject
) -> None:
    raw = bytearray(frame(msg))
    i = data.draw(st.integers(0, len(raw) - 1))
    raw[i] = data.draw(st.integers(0, 255))
    with contextlib.suppress(ProtocolError):
        FrameReader().feed(bytes(raw))


def test_strict_bincode_errors() -> None:
    with pytest.raises(ProtocolError, match="unknown ReplicationMessage variant tag 7"):
        from_bincode(b"\x07\0\0\0" + b"\0" * 16)
    bad_bool = bytearray(to_bincode(VoteResponse(1, 2, 3, True)))
    bad_bool[-1] = 2
    with pytest.raises(ProtocolError, match="invalid bool byte 0x02"):
        from_bincode(bytes(bad_bool))
    with pytest.raises(ProtocolError, match="truncated Heartbeat"):
        from_bincode(to_bincode(Heartbeat(1, 2))[:-1])
    with pytest.raises(ProtocolError, match="1 trailing bytes"):
        from_bincode(to_bincode(Heartbeat(1, 2)) + b"\0")
    # a WalEntry declaring 2^60 data bytes fails on the length check, allocating nothing
    huge = to_bincode(WalEntry(1, 2, 3, b""))[:-8] + (2**60).to_bytes(8, "little")
    with pytest.raises(ProtocolError, match="data declares"):
        from_bincode(huge)


def test_out_of_range_integers() -> None:
    with pytest.raises(ProtocolError, match="out of range for u32"):
        to_bincode(Heartbeat(2**32, 0))
    with pytest.raises(ProtocolError, match="out of range for u64"):
        to_json(Promotion(1, -1))
    with pytest.raises(ProtocolError, match="is not a u32"):
        from_json('{"Heartbeat":{"node_id":4294967296,"lsn":0}}')


def test_oversized_frame_is_refused_before_it_arrives() -> None:
    reader = FrameReader(max_frame=100)
    with pytest.raises(ProtocolError, match="exceeds the maximum of 100"):
        reader.feed((101).to_bytes(4, "little"))
    assert FrameReader().max_frame == 64 * 1024 * 1024


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ('{"Heartbeat":{"node_id":1.0,"lsn":0}}', "node_id"),
        ('{"VoteResponse":{"node_id":1,"voter_id":2,"term":3,"granted":1}}', "true or false"),
        ('{"WalEntry":{"node_id":1,"lsn":2,"timestamp":3,"data":"abc"}}', "array of integers"),
        ('{"WalEntry":{"node_id":1,"lsn":2,"timestamp":3,"data":[256]}}', "array of integers"),
        ('{"Heartbeat":{"node_id":1}}', "missing field 'lsn'"),
        ('{"Heartbeat":{"node_id":1,"lsn":2,"lsn":3}}', "duplicate field 'lsn'"),
        ('{"Heartbeat":{"node_id":-1,"lsn":0}}', "node_id"),
        ('{"Nope":{}}', "unknown variant"),
        ('{"Heartbeat":{"node_id":1,"lsn":2},"Promotion":{}}', "exactly one key"),
        ('{"Heartbeat":{"node_id":NaN,"lsn":0}}', "NaN"),
        ("[1,2", "invalid JSON"),
    ],
)
def test_strict_json(text: str, why: str) -> None:
    with pytest.raises(ProtocolError, match=why):
        from_json(text)


def test_json_integers_above_2_53_stay_exact() -> None:
    msg = from_json('{"Heartbeat":{"node_id":7,"lsn":9007199254740993}}')
    assert msg == Heartbeat(7, 9007199254740993)


def test_wal_entry_out_of_range() -> None:
    with pytest.raises(ProtocolError, match=r"WalEntry.lsn=-1 is out of range for u64"):
        to_bincode(WalEntry(1, -1, 0, b""))
