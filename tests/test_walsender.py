"""Walsender framing and LSNs."""

from __future__ import annotations

import struct
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pglogrepl_bridge.errors import ConfigError, DecodeError
from pglogrepl_bridge.lsn import Lsn, format_lsn
from pglogrepl_bridge.pgoutput.walsender import (
    PrimaryKeepalive,
    StandbyStatusUpdate,
    XLogData,
    parse_copy_data,
    pg_time_to_datetime,
    pg_time_to_unix_us,
)


def test_xlogdata() -> None:
    raw = b"w" + struct.pack("!QQq", 0x1_0000_0010, 0x1_0000_0020, 12345) + b"Bpayload"
    assert parse_copy_data(memoryview(raw)) == XLogData(
        0x1_0000_0010, 0x1_0000_0020, 12345, b"Bpayload"
    )


def test_keepalive() -> None:
    raw = b"k" + struct.pack("!Qq?", 99, 7, True)
    assert parse_copy_data(raw) == PrimaryKeepalive(99, 7, True)


@pytest.mark.parametrize("raw", [b"", b"w\0\0", b"k" + b"\0" * 10, b"x123"])
def test_bad_copy_data(raw: bytes) -> None:
    with pytest.raises(DecodeError):
        parse_copy_data(raw)


def test_standby_status_update_layout() -> None:
    raw = StandbyStatusUpdate(1, 2, 3, 4, True).to_bytes()
    assert raw == b"r" + struct.pack("!QQQq?", 1, 2, 3, 4, True)
    assert len(raw) == 34


def test_lsn_parse_print_order() -> None:
    a, b = Lsn.parse("0/16B3748"), Lsn.parse("1/0")
    assert str(a) == "0/16B3748"
    assert repr(b) == "Lsn('1/0')"
    assert a < b and b == 1 << 32
    assert Lsn("FFFFFFFF/FFFFFFFF") == 2**64 - 1
    assert format_lsn(0x2_0000_00FF) == "2/FF"


@given(st.integers(0, 2**64 - 1))
def test_lsn_round_trip(value: int) -> None:
    assert Lsn.parse(str(Lsn(value))) == value


@pytest.mark.parametrize("text", ["", "16B3748", "0/", "/1", "0/xyz", "123456789/0", "1/2/3"])
def test_bad_lsn_text(text: str) -> None:
    with pytest.raises(ConfigError, match="invalid LSN"):
        Lsn.parse(text)


def test_pg_time() -> None:
    assert pg_time_to_datetime(0) == datetime(2000, 1, 1, tzinfo=UTC)
    assert pg_time_to_unix_us(0) == 946_684_800_000_000
    assert pg_time_to_datetime(1_500_000) == datetime(2000, 1, 1, 0, 0, 1, 500_000, tzinfo=UTC)
