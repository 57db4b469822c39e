"""WAL positions: an int that prints and parses as PostgreSQL's ``X/Y``."""

from __future__ import annotations

from pglogrepl_bridge.errors import ConfigError

_MAX = 0xFFFF_FFFF_FFFF_FFFF


class Lsn(int):
    """A 64-bit WAL position; ordering and arithmetic are plain int ordering and arithmetic."""

    __slots__ = ()

    def __new__(cls, value: int | str = 0) -> Lsn:
        if isinstance(value, str):
            return cls.parse(value)
        if not 0 <= value <= _MAX:
            raise ConfigError(f"LSN {value} is outside 0..2^64-1")
        return super().__new__(cls, value)

    @classmethod
    def parse(cls, text: str) -> Lsn:
        """Parse ``X/Y`` (two hex numbers of up to 8 digits each), as PostgreSQL prints it."""
        hi, sep, lo = text.strip().partition("/")
        try:
            if not sep or not hi or not lo or len(hi) > 8 or len(lo) > 8:
                raise ValueError
            value = (int(hi, 16) << 32) | int(lo, 16)
        except ValueError:
            raise ConfigError(
                f"invalid LSN {text!r}: write it as PostgreSQL does, two hex numbers like 0/16B3748"
            ) from None
        return int.__new__(cls, value)

    def __str__(self) -> str:
        return f"{self >> 32:X}/{self & 0xFFFFFFFF:X}"

    def __repr__(self) -> str:
        return f"Lsn('{self}')"


def format_lsn(value: int) -> str:
    """``X/Y`` for a plain int, without building an Lsn (hot paths keep ints)."""
    return f"{value >> 32:X}/{value & 0xFFFFFFFF:X}"
