"""pgoutput decoding: round trips through independent builders, exact errors, fuzzing."""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pglogrepl_bridge.errors import DecodeError
from pglogrepl_bridge.pgoutput.decoder import PgOutputDecoder
from pglogrepl_bridge.pgoutput.messages import (
    Begin,
    BeginPrepare,
    Column,
    Commit,
    CommitPrepared,
    Delete,
    Insert,
    Message,
    Origin,
    PgOutputMessage,
    Prepare,
    Relation,
    RollbackPrepared,
    StreamAbort,
    StreamCommit,
    StreamPrepare,
    StreamStart,
    StreamStop,
    Truncate,
    TupleData,
    Type,
    Update,
)

from .pgoutput_builders import encode

u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
i64 = st.integers(-(2**63), 2**63 - 1)
name = st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters="\0"), max_size=20)


@st.composite
def tuples(draw: st.DrawFn, ncols: int | None = None) -> TupleData:
    n = draw(st.integers(0, 8)) if ncols is None else ncols
    kinds = draw(st.lists(st.sampled_from(b"ntub"), min_size=n, max_size=n))
    values = tuple(draw(st.binary(max_size=30)) if k in b"tb" else None for k in kinds)
    return TupleData(bytes(kinds), values)


columns = st.builds(Column, name, u32, st.integers(-(2**31), 2**31 - 1), st.booleans())


def top_level(xid: st.SearchStrategy[int | None]) -> st.SearchStrategy[PgOutputMessage]:
    old_kind = st.sampled_from(["K", "O"])
    return st.one_of(
        st.builds(Message, xid, st.booleans(), u64, name, st.binary(max_size=40)),
        st.builds(
            Relation,
            xid,
            u32,
            name,
            name,
            st.sampled_from("dnfi"),
            st.lists(columns, max_size=5).map(tuple),
        ),
        st.builds(Type, xid, u32, name, name),
        st.builds(Insert, xid, u32, tuples()),
        st.builds(Update, xid, u32, st.none(), st.none(), tuples()),
        st.builds(Update, xid, u32, old_kind, tuples(), tuples()),
        st.builds(Delete, xid, u32, old_kind, tuples()),
        st.builds(Truncate, xid, st.integers(0, 3), st.lists(u32, max_size=5).map(tuple)),
    )


others = st.one_of(
    st.builds(Begin, u64, i64, u32),
    st.builds(Commit, st.integers(0, 255), u64, u64, i64),
    st.builds(Origin, u64, name),
    st.builds(StreamCommit, u32, st.integers(0, 255), u64, u64, i64),
    st.builds(StreamAbort, u32, u32),
    st.builds(StreamAbort, u32, u32, u64, i64),
    st.builds(BeginPrepare, u64, u64, i64, u32, name),
    st.builds(Prepare, st.integers(0, 255), u64, u64, i64, u32, name),
    st.builds(CommitPrepared, st.integers(0, 255), u64, u64, i64, u32, name),
    st.builds(RollbackPrepared, st.integers(0, 255), u64, u64, i64, i64, u32, name),
    st.builds(StreamPrepare, st.integers(0, 255), u64, u64, i64, u32, name),
)


@given(st.one_of(top_level(st.none()), others))
def test_round_trip_outside_stream(msg: PgOutputMessage) -> None:
    assert PgOutputDecoder().decode(encode(msg)) == msg


@given(top_level(u32))
def test_round_trip_inside_stream_carries_xid(msg: PgOutputMessage) -> None:
    decoder = PgOutputDecoder()
    assert decoder.decode(encode(StreamStart(7, True))) == StreamStart(7, True)
    assert decoder.in_stream
    assert decoder.decode(encode(msg)) == msg
    assert decoder.decode(b"E") == StreamStop()
    assert not decoder.in_stream


def test_insert_bytes_known_answer() -> None:
    raw = bytes.fromhex("49000040074e0006740000000437303030740000000870726570617265646e6e6e6e")
    msg = PgOutputDecoder().decode(raw)
    assert msg == Insert(None, 0x4007, TupleData(b"ttnnnn", (b"7000", b"prepared") + (None,) * 4))


def test_relation_typmod_is_signed() -> None:
    rel = Relation(None, 1, "public", "t", "d", (Column("c", 23, -1, True),))
    raw = encode(rel)
    assert raw.endswith(struct.pack("!Ii", 23, -1))
    decoded = PgOutputDecoder().decode(raw)
    assert isinstance(decoded, Relation)
    assert decoded.columns[0].type_modifier == -1


@pytest.mark.parametrize(
    ("raw", "msg_type", "offset"),
    [
        (b"B\0\0", "Begin", 1),
        (b"I\0\0\0\1X", "Insert", 5),
        (b"I\0\0\0\1N\0\1t\0\0\0\x09ab", "Insert", 9),
        (b"I\0\0\0\1N\0\2n", "Insert", 9),
        (b"I\0\0\0\1N\0\1z", "Insert", 8),
        (b"Y\0\0\0\1pub", "Type", 5),
        (b"D\0\0\0\1N\0\0", "Delete", 5),
    ],
)
def test_malformed_input_names_type_offset_and_lsn(raw: bytes, msg_type: str, offset: int) -> None:
    with pytest.raises(DecodeError) as info:
        PgOutputDecoder().decode(raw, lsn=0x1_0000_00AB)
    err = info.value
    assert err.msg_type == msg_type
    assert err.offset == offset
    assert "1/AB" in str(err)
    assert msg_type in str(err)


def test_unknown_type_byte() -> None:
    with pytest.raises(DecodeError, match="unknown message type byte 0x7a"):
        PgOutputDecoder().decode(b"z123")


def test_empty_message() -> None:
    with pytest.raises(DecodeError):
        PgOutputDecoder().decode(b"")


def test_huge_declared_length_does_not_allocate() -> None:
    # a column declaring 2 GiB must fail fast on the length check
    raw = b"I\0\0\0\1N\0\1t" + struct.pack("!i", 2**31 - 1) + b"x"
    with pytest.raises(DecodeError, match="declares"):
        PgOutputDecoder().decode(raw)


valid_messages = st.one_of(top_level(st.none()), others).map(encode)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=80), st.booleans())
def test_fuzz_random_bytes_only_raise_decode_error(raw: bytes, in_stream: bool) -> None:
    decoder = PgOutputDecoder()
    decoder.in_stream = in_stream
    with contextlib.suppress(DecodeError):
        decoder.decode(raw)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(valid_messages, st.data())
def test_fuzz_mutated_messages_only_raise_decode_error(raw: bytes, data: st.DataObject) -> None:
    mutated = bytearray(raw)
    action = data.draw(st.sampled_from(["truncate", "flip", "extend"]))
    if action == "truncate":
        del mutated[data.draw(st.integers(0, len(mutated))) :]
    elif action == "flip" and mutated:
        i = data.draw(st.integers(0, len(mutated) - 1))
        mutated[i] = data.draw(st.integers(0, 255))
    else:
        mutated += data.draw(st.binary(min_size=1, max_size=8))
    with contextlib.suppress(DecodeError):
        PgOutputDecoder().decode(bytes(mutated))
