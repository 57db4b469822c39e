"""PostgreSQL's text output of a value, written from its binary form (the type's ``send``
format); pure.

Why: a ``--binary`` stream carries every value in its binary form. The SQL sink stores the
types it does not map (inet, interval, ...) as PostgreSQL's text, which is what a text stream
gives it; from a binary stream it had only the bytes (kept as ``\\x`` and their hex). psycopg's
binary loaders do not help: they build Python objects whose ``str`` is not PostgreSQL's text
(an inet ``/32`` host, an IPv4-mapped IPv6 address) or that lose facts (an interval's months
become 30 days). Each writer here follows the server's own output function, for the session
settings every connection of ours uses (``IntervalStyle=postgres``), and is held to the
server by tests/test_bintext.py: PostgreSQL prints ``(v::text, <type>_send(v))`` for many
values and each pair must agree.

A writer raises ValueError for bytes its type never sends; the caller then keeps the bytes.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

Writer = Callable[[bytes], str]

_INTERVAL = struct.Struct("!qii")
_LSN = struct.Struct("!Q")
_BITS = struct.Struct("!i")

_AF_INET, _AF_INET6 = 2, 3  # PGSQL_AF_INET, PGSQL_AF_INET6 in network_send


def _ipv6(addr: bytes, bits: int) -> str:
    """``inet_net_ntop_ipv6``: the longest run of two or more zero words as ``::`` (the first
    of equal runs), an embedded IPv4 address dotted, ``/bits`` unless 128."""
    words = [addr[i] << 8 | addr[i + 1] for i in range(0, 16, 2)]
    best_base, best_len, cur_base, cur_len = -1, 0, -1, 0
    for i, word in enumerate(words):
        if word == 0:
            if cur_base == -1:
                cur_base, cur_len = i, 1
            else:
                cur_len += 1
        elif cur_base != -1:
            if best_base == -1 or cur_len > best_len:
                best_base, best_len = cur_base, cur_len
            cur_base = -1
    if cur_base != -1 and (best_base == -1 or cur_len > best_len):
        best_base, best_len = cur_base, cur_len
    if best_base != -1 and best_len < 2:
        best_base = -1
    out: list[str] = []
    for i in range(8):
        if best_base != -1 and best_base <= i < best_base + best_len:
            if i == best_base:
                out.append(":")
            continue
        if i != 0:
            out.append(":")
        if (
            i == 6
            and best_base == 0
            and (
                best_len == 6
                or (best_len == 7 and words[7] != 1)
                or (best_len == 5 and words[5] == 0xFFFF)
            )
        ):
            out.append(".".join(map(str, addr[12:16])))
            break
        out.append(f"{words[i]:x}")
    if best_base != -1 and best_base + best_len == 8:
        out.append(":")
    text = "".join(out)
    return text if bits == 128 else f"{text}/{bits}"


def inet(data: bytes) -> str:
    """``inet``/``cidr`` (``network_send``: family, bits, is_cidr, size, address): as
    ``network_out``, which always writes ``/bits`` for a cidr, and for an inet only when it
    is not the whole address."""
    if len(data) < 4:
        raise ValueError("an inet value is at least 4 bytes")
    family, bits, is_cidr, size = data[0], data[1], data[2], data[3]
    addr = bytes(data[4:])
    if family == _AF_INET and size == 4 == len(addr) and bits <= 32:
        text = ".".join(map(str, addr)) + ("" if bits == 32 else f"/{bits}")
        full = 32
    elif family == _AF_INET6 and size == 16 == len(addr) and bits <= 128:
        text = _ipv6(addr, bits)
        full = 128
    else:
        raise ValueError(f"not an inet value: family {family}, {size} address bytes")
    return f"{text}/{bits}" if is_cidr and bits == full else text


def macaddr(data: bytes) -> str:
    """``macaddr`` (6 bytes) or ``macaddr8`` (8 bytes): lowercase hex pairs joined by ``:``."""
    if len(data) not in (6, 8):
        raise ValueError("a macaddr is 6 bytes, a macaddr8 8")
    return ":".join(f"{b:02x}" for b in data)


def bits(data: bytes) -> str:
    """``bit``/``varbit`` (``varbit_send``: the bit count, then the bits, high first)."""
    if len(data) < 4:
        raise ValueError("a bit string starts with its length")
    (count,) = _BITS.unpack_from(data)
    if count < 0 or len(data) - 4 != (count + 7) // 8:
        raise ValueError("a bit string's length does not match its bytes")
    if count == 0:
        return ""
    value = int.from_bytes(data[4:], "big") >> (len(data) - 4) * 8 - count  # the pad bits
    return format(value, f"0{count}b")


def pg_lsn(data: bytes) -> str:
    """``pg_lsn`` (8 bytes): ``%X/%X``."""
    if len(data) != 8:
        raise ValueError("a pg_lsn is 8 bytes")
    (lsn,) = _LSN.unpack(data)
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def _seconds(sec: int, fsec: int) -> str:
    """``AppendSeconds`` with six digits of precision and zero fill: ``SS[.ffffff]`` with
    trailing zeros dropped."""
    text = f"{abs(sec):02d}"
    if fsec:
        text += "." + f"{abs(fsec):06d}".rstrip("0")
    return text


def _trunc_div(a: int, b: int) -> tuple[int, int]:
    """C's integer division (toward zero) and remainder (the dividend's sign)."""
    q = abs(a) // abs(b)
    q = q if (a >= 0) == (b >= 0) else -q
    return q, a - q * b


def interval(data: bytes) -> str:
    """``interval`` (``interval_send``: microseconds, days, months) as ``interval_out`` with
    ``IntervalStyle=postgres`` (``EncodeInterval``): ``1 year 2 mons -3 days +04:05:06.7``."""
    if len(data) != 16:
        raise ValueError("an interval is 16 bytes")
    time, day, month = _INTERVAL.unpack(data)
    year, mon = _trunc_div(month, 12)
    hour, rest = _trunc_div(time, 3_600_000_000)
    minute, rest = _trunc_div(rest, 60_000_000)
    sec, fsec = _trunc_div(rest, 1_000_000)
    out: list[str] = []
    is_zero, is_before = True, False
    for value, unit in ((year, "year"), (mon, "mon"), (day, "day")):
        if value == 0:
            continue
        plus = "+" if is_before and value > 0 else ""
        out.append(f"{'' if is_zero else ' '}{plus}{value} {unit}{'' if value == 1 else 's'}")
        is_before, is_zero = value < 0, False
    if is_zero or hour or minute or sec or fsec:
        minus = hour < 0 or minute < 0 or sec < 0 or fsec < 0
        sign = "-" if minus else ("+" if is_before else "")
        out.append(
            f"{'' if is_zero else ' '}{sign}{abs(hour):02d}:{abs(minute):02d}:"
            + _seconds(sec, fsec)
        )
    return "".join(out)


#: type name → its writer
WRITERS: dict[str, Writer] = {
    "inet": inet,
    "cidr": inet,
    "macaddr": macaddr,
    "macaddr8": macaddr,
    "bit": bits,
    "varbit": bits,
    "pg_lsn": pg_lsn,
    "interval": interval,
}


def writer(name: str | None) -> Writer | None:
    """The binary-to-text writer of a built-in type, if there is one."""
    return WRITERS.get(name or "")
