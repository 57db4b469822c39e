"""The downstream ``ReplicationMessage`` protocol: bincode 1.x and serde_json, byte for byte.

The Rust side is ``enum ReplicationMessage`` with serde derive; variant and field order are the
wire format (see docs/replication-message.md). Decoding is strict: every deviation raises
``ProtocolError``. Pure code: no sockets.
"""

from __future__ import annotations

import contextlib
import json
import struct
from dataclasses import dataclass, fields
from typing import Any, ClassVar

from pglogrepl_bridge.errors import ProtocolError

U32_MAX = 0xFFFF_FFFF
U64_MAX = 0xFFFF_FFFF_FFFF_FFFF
DEFAULT_MAX_FRAME = 64 * 1024 * 1024

_LEN = struct.Struct("<I")


@dataclass(frozen=True, slots=True)
class WalEntry:
    """One committed transaction for the replicas: ``lsn`` is its commit end LSN (what they
    acknowledge), ``timestamp`` its commit time in µs since the Unix epoch (last-writer-wins),
    ``data`` its payload.
    """

    TAG: ClassVar[int] = 0
    node_id: int
    lsn: int
    timestamp: int  # microseconds since the Unix epoch
    data: bytes


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """The master is alive and has sent everything up to ``lsn``; a node that misses these starts
    an election.
    """

    TAG: ClassVar[int] = 1
    node_id: int
    lsn: int


@dataclass(frozen=True, slots=True)
class RequestFrom:
    """A replica asks the master to resend every entry after ``lsn`` (it lost them, or is new)."""

    TAG: ClassVar[int] = 2
    node_id: int
    lsn: int


@dataclass(frozen=True, slots=True)
class Acknowledge:
    """A replica applied (durably) every entry up to ``lsn``; a quorum of these lets the slot
    advance.
    """

    TAG: ClassVar[int] = 3
    node_id: int
    lsn: int


@dataclass(frozen=True, slots=True)
class VoteRequest:
    """A candidate asks for a vote in ``term`` (its term + 1), saying how far its log reaches
    (``last_lsn``).
    """

    TAG: ClassVar[int] = 4
    node_id: int
    term: int
    last_lsn: int


@dataclass(frozen=True, slots=True)
class VoteResponse:
    """A voter's answer to a VoteRequest of ``node_id`` in ``term``."""

    TAG: ClassVar[int] = 5
    node_id: int
    voter_id: int
    term: int
    granted: bool


@dataclass(frozen=True, slots=True)
class Promotion:
    """``node_id`` won the election of ``term``: nodes at that term or below step down."""

    TAG: ClassVar[int] = 6
    node_id: int
    term: int


ReplicationMessage = (
    WalEntry | Heartbeat | RequestFrom | Acknowledge | VoteRequest | VoteResponse | Promotion
)


@dataclass(frozen=True)
class _Variant:
    cls: type[Any]
    names: tuple[str, ...]
    kinds: tuple[str, ...]  # "u32", "u64", "bool", "bytes"
    fixed: struct.Struct  # the fixed-width part after the tag (all but a trailing Vec<u8>)


_FMT = {"u32": "I", "u64": "Q", "bool": "B"}
_VARIANTS: list[_Variant] = []
for _cls, _kinds in (
    (WalEntry, ("u32", "u64", "u64", "bytes")),
    (Heartbeat, ("u32", "u64")),
    (RequestFrom, ("u32", "u64")),
    (Acknowledge, ("u32", "u64")),
    (VoteRequest, ("u32", "u64", "u64")),
    (VoteResponse, ("u32", "u32", "u64", "bool")),
    (Promotion, ("u32", "u64")),
):
    _fixed = "<" + "".join(_FMT[k] for k in _kinds if k != "bytes")
    if "bytes" in _kinds:
        _fixed += "Q"  # the Vec's u64 length
    _VARIANTS.append(
        _Variant(_cls, tuple(f.name for f in fields(_cls)), _kinds, struct.Struct(_fixed))
    )
_BY_NAME = {v.cls.__name__: v for v in _VARIANTS}
_WAL_HEAD = struct.Struct("<IIQQQ")
_FRAMED_WAL_HEAD = struct.Struct("<IIIQQQ")  # frame length, then _WAL_HEAD


# -- bincode ---------------------------------------------------------------------------------


def to_bincode(msg: ReplicationMessage) -> bytes:
    """``msg`` as bincode 1.x bytes, exactly as the Rust side's serde derive writes it."""
    if type(msg) is WalEntry:  # the hot path: struct checks the ranges
        try:
            return _WAL_HEAD.pack(0, msg.node_id, msg.lsn, msg.timestamp, len(msg.data)) + bytes(
                msg.data
            )
        except (struct.error, TypeError):
            _check_ranges(_VARIANTS[0], [msg.node_id, msg.lsn, msg.timestamp, msg.data])
            raise ProtocolError(f"WalEntry.data must be bytes, not {type(msg.data)}") from None
    variant = _VARIANTS[msg.TAG]
    values = [getattr(msg, n) for n in variant.names]
    _check_ranges(variant, values)
    return _LEN.pack(msg.TAG) + variant.fixed.pack(*values)


def from_bincode(buf: bytes | bytearray | memoryview) -> ReplicationMessage:
    """Decode one message that must fill ``buf`` exactly (trailing bytes are an error)."""
    view = memoryview(buf)
    if len(view) < 4:
        raise ProtocolError(f"truncated message: {len(view)} bytes, the variant tag needs 4")
    (tag,) = _LEN.unpack_from(view)
    if tag >= len(_VARIANTS):
        raise ProtocolError(f"unknown ReplicationMessage variant tag {tag} (known: 0..6)")
    variant = _VARIANTS[tag]
    need = 4 + variant.fixed.size
    if len(view) < need:
        raise ProtocolError(
            f"truncated {variant.cls.__name__}: {len(view)} bytes, needs at least {need}"
        )
    values = list(variant.fixed.unpack_from(view, 4))
    end = need
    if variant.kinds[-1] == "bytes":
        length = values.pop()
        if length > len(view) - need:  # checked before anything is allocated
            raise ProtocolError(
                f"truncated {variant.cls.__name__}: data declares {length} bytes, "
                f"{len(view) - need} present"
            )
        end = need + length
        values.append(bytes(view[need:end]))
    if end != len(view):
        raise ProtocolError(
            f"{len(view) - end} trailing bytes after a {variant.cls.__name__} inside its frame"
        )
    if variant.kinds[-1] == "bool":
        if values[-1] > 1:
            raise ProtocolError(f"invalid bool byte {values[-1]:#04x} in {variant.cls.__name__}")
        values[-1] = values[-1] == 1
    msg: ReplicationMessage = variant.cls(*values)
    return msg


def _check_ranges(variant: _Variant, values: list[Any]) -> None:
    for name, kind, value in zip(variant.names, variant.kinds, values, strict=True):
        if kind == "bool":
            if not isinstance(value, bool):
                raise ProtocolError(f"{variant.cls.__name__}.{name} must be a bool")
        elif kind != "bytes":
            top = U32_MAX if kind == "u32" else U64_MAX
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= top:
                raise ProtocolError(
                    f"{variant.cls.__name__}.{name}={value!r} is out of range for {kind}"
                )


# -- framing ---------------------------------------------------------------------------------


def frame(msg: ReplicationMessage) -> bytes:
    """u32 little-endian length, then the bincode bytes."""
    if type(msg) is WalEntry and type(msg.data) is bytes:  # the hot path: one copy of data
        with contextlib.suppress(struct.error):  # out of range: to_bincode says which field
            n = len(msg.data)
            head = _FRAMED_WAL_HEAD.pack(
                _WAL_HEAD.size + n, 0, msg.node_id, msg.lsn, msg.timestamp, n
            )
            return head + msg.data
    body = to_bincode(msg)
    return _LEN.pack(len(body)) + body


class FrameReader:
    """Incremental decoder: ``feed`` bytes as they arrive, get whole messages back.

    A declared frame length above ``max_frame`` is refused at once, and no buffer is sized
    from a declared length: memory grows only with bytes that actually arrived.
    """

    __slots__ = ("_buf", "max_frame")

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._buf = bytearray()

    @property
    def buffered(self) -> int:
        """Bytes received but not yet a whole frame."""
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> list[ReplicationMessage]:
        """Take bytes off the socket; return every message they complete (ProtocolError on
        nonsense).
        """
        buf = self._buf
        buf += data
        out: list[ReplicationMessage] = []
        pos = 0
        size = len(buf)
        while size - pos >= 4:
            (length,) = _LEN.unpack_from(buf, pos)
            if length > self.max_frame:
                raise ProtocolError(
                    f"frame of {length} bytes exceeds the maximum of {self.max_frame}: "
                    "the peer is not speaking this protocol, or raise BridgeConfig.max_frame"
                )
            if size - pos - 4 < length:
                break
            out.append(from_bincode(memoryview(buf)[pos + 4 : pos + 4 + length]))
            pos += 4 + length
        if pos:
            del buf[:pos]
        return out


# -- serde_json ------------------------------------------------------------------------------


def to_json(msg: ReplicationMessage) -> str:
    """Exactly serde_json's compact, externally tagged form."""
    variant = _VARIANTS[msg.TAG]
    parts = []
    for name, kind in zip(variant.names, variant.kinds, strict=True):
        value = getattr(msg, name)
        if kind == "bytes":
            text = "[" + ",".join(map(str, value)) + "]"
        elif kind == "bool":
            text = "true" if value else "false"
        else:
            text = str(int(value))
        parts.append(f'"{name}":{text}')
    _check_ranges(variant, [getattr(msg, n) for n in variant.names])
    return '{"' + variant.cls.__name__ + '":{' + ",".join(parts) + "}}"


class _Float(float):
    """Marks a JSON number written with a fraction or exponent: never an integer for serde."""


def _reject_constant(name: str) -> None:
    raise ProtocolError(f"{name} is not valid JSON")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ProtocolError(f"duplicate field {key!r}")
        out[key] = value
    return out


def from_json(text: str | bytes) -> ReplicationMessage:
    """Parse serde_json's form, as strictly as serde does (unknown fields are ignored, as
    serde does without ``deny_unknown_fields``)."""
    try:
        doc = json.loads(
            text,
            parse_float=_Float,
            parse_constant=_reject_constant,
            object_pairs_hook=_no_duplicates,
        )
    except ProtocolError:
        raise
    except (ValueError, RecursionError) as exc:
        raise ProtocolError(f"invalid JSON: {exc}") from None
    if not isinstance(doc, dict) or len(doc) != 1:
        raise ProtocolError("expected an object with exactly one key, the variant name")
    ((name, body),) = doc.items()
    variant = _BY_NAME.get(name)
    if variant is None:
        raise ProtocolError(f"unknown variant {name!r}")
    if not isinstance(body, dict):
        raise ProtocolError(f"{name} must be an object")
    values = []
    for field_name, kind in zip(variant.names, variant.kinds, strict=True):
        if field_name not in body:
            raise ProtocolError(f"missing field {field_name!r} in {name}")
        value = body[field_name]
        if kind == "bytes":
            if not isinstance(value, list) or not all(
                type(b) is int and 0 <= b <= 255 for b in value
            ):
                raise ProtocolError(f"{name}.{field_name} must be an array of integers 0..255")
            value = bytes(value)
        elif kind == "bool":
            if type(value) is not bool:
                raise ProtocolError(f"{name}.{field_name} must be true or false")
        else:
            top = U32_MAX if kind == "u32" else U64_MAX
            if type(value) is not int or not 0 <= value <= top:
                raise ProtocolError(f"{name}.{field_name}={value!r} is not a {kind}")
        values.append(value)
    msg: ReplicationMessage = variant.cls(*values)
    return msg
