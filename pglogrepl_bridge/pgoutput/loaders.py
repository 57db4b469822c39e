"""The adapters every conversion in the package uses: psycopg's, with faster loaders for the
types whose stock loader dominates a row's cost, same values out.

Why: a jsonb value costs 2-4 µs through ``json.loads`` and an inet 5-10 µs through
``ipaddress``'s string parsing, against 0.2 µs for an int (benchmarks/RESULTS.md, fifth
session). Both are replaced here, in one ``AdaptersMap`` that ``values.ValueLoaders``, the
JSON renderer and the SQL sink's types all take their ``Transformer`` from, so a value means
the same thing in every output:

- json/jsonb: ``orjson.loads`` where installed, and ``json.loads`` for what orjson reads
  differently or refuses (integers beyond 64 bits, which orjson makes floats; 1e400), so
  nothing changes but the speed. A property test holds the two to each other. The text
  formats go through ``JsonTextLoader``, whose ``load`` is that function itself.
- inet and cidr (text): an IPv4 address without a prefix, and an IPv4 network, are built
  from their four octets (read in C where built) instead of parsed by ``ipaddress``;
  anything else goes the stock way. PostgreSQL's output is canonical, so the shortcut sees
  only dotted quads. cidr networks are also cached (few distinct values per column).
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg import abc
from psycopg.adapt import AdaptersMap, Loader, Transformer
from psycopg.postgres import types as builtin_types
from psycopg.types.json import set_json_loads

from pglogrepl_bridge.pgoutput import _accel

try:
    import orjson
except ImportError:  # pragma: no cover - a dependency; json.loads is the fallback
    orjson = None  # type: ignore[assignment]

__all__ = ["ADAPTERS", "json_loads", "transformer"]


# orjson reads an integer beyond 64 bits as a float (json.loads keeps it exact): any run of
# 19+ digits goes the stock way, costing a scan of the text, not a different value.
def _digit_run_py(data: str | bytes | bytearray | memoryview, length: int) -> bool:
    """``_fastrow.digit_run`` in Python."""
    if isinstance(data, str):
        return re.search(f"[0-9]{{{length}}}", data) is not None
    return re.search(b"[0-9]{%d}" % length, bytes(data)) is not None


#: N ASCII digits in a row? One C pass where built: the regex cost more than orjson's parse
_digit_run: Callable[[str | bytes | bytearray | memoryview, int], bool] = (
    _accel.digit_run or _digit_run_py
)


def _json_loads_fast(data: str | bytes) -> Any:
    if _digit_run(data, 19):
        return json.loads(data)
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return json.loads(data)  # what orjson declines (1e400, ...), the stock way


json_loads: Callable[[str | bytes], Any] = json.loads if orjson is None else _json_loads_fast


def _json_load_buffer(data: abc.Buffer) -> Any:
    """``json_loads`` of the bytes-like value psycopg hands a loader, without a copy where
    orjson reads it."""
    if orjson is None or _digit_run(data, 19):
        return json.loads(bytes(data))
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return json.loads(bytes(data))


class JsonTextLoader(Loader):
    """json and jsonb text to Python values through ``json_loads``. Why not psycopg's own
    loader with ``set_json_loads``: its ``load`` is a Python method that copies the value and
    then calls ours; psycopg's C row loop calls ``load`` once per value, and that second frame
    cost 15-20 ms per 200k realistic changes (benchmarks/RESULTS.md, fifteenth session)."""

    load = staticmethod(_json_load_buffer)


def _ipv4_int_text(text: str) -> int | None:
    """A dotted quad as its integer, or None for anything else (left to ``ipaddress``)."""
    parts = text.split(".")
    if len(parts) != 4:
        return None
    value = 0
    for part in parts:
        if not part.isdigit() or len(part) > 3 or (part[0] == "0" and len(part) > 1):
            return None  # ipaddress refuses leading zeros: so does this
        octet = int(part)
        if octet > 255:
            return None
        value = value << 8 | octet
    return value


def _ipv4_int_py(data: bytes | memoryview) -> int | None:
    """``_fastrow.ipv4_int`` in Python: the bytes of a plain dotted quad as its integer."""
    try:
        text = bytes(data).decode("ascii")
    except UnicodeDecodeError:
        return None
    return _ipv4_int_text(text)


#: a plain dotted quad (bytes-like) → its integer, else None: one C pass where built
ipv4_int: Callable[[bytes | memoryview], int | None] = _accel.ipv4_int or _ipv4_int_py


class InetLoader(Loader):
    """inet text to ``ipaddress`` objects, as psycopg's own ``InetLoader`` does, faster for
    IPv4 addresses without a prefix (read from the bytes, not parsed by ``ipaddress``)."""

    def load(self, data: Any) -> ipaddress.IPv4Address | ipaddress.IPv6Address | Any:
        """An ``IPv4Address``/``IPv6Address``, or an interface when there is a prefix."""
        packed = ipv4_int(data)
        if packed is not None:
            return ipaddress.IPv4Address(packed)
        text = bytes(data).decode()
        if "/" in text:
            return ipaddress.ip_interface(text)
        return ipaddress.ip_address(text)


#: cidr text → its network, for the networks seen last (cleared when full). Why a cache: a
#: network costs about 1 µs to build even from its integer, and a cidr column holds few
#: distinct networks (subnets, not hosts); a hit costs a dict lookup. The objects are the
#: immutable values ``ipaddress`` hands out anyway, so rows may share one.
_NETWORKS: dict[bytes, ipaddress.IPv4Network | ipaddress.IPv6Network] = {}
_NETWORKS_MAX = 4096


def _network(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    address, slash, prefix = text.partition("/")
    if slash and prefix.isdigit() and (packed := _ipv4_int_text(address)) is not None:
        return ipaddress.IPv4Network((packed, int(prefix)))
    return ipaddress.ip_network(text)


class CidrLoader(Loader):
    """cidr text to ``ipaddress`` networks, as psycopg's own ``CidrLoader`` does, faster: an
    IPv4 network is built from its integer and prefix, not parsed, and the last few thousand
    networks are kept (``_NETWORKS``)."""

    def load(self, data: Any) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
        """An ``IPv4Network`` or ``IPv6Network``."""
        key = bytes(data)
        network = _NETWORKS.get(key)
        if network is None:
            network = _network(key.decode())
            if len(_NETWORKS) >= _NETWORKS_MAX:
                _NETWORKS.clear()
            _NETWORKS[key] = network
        return network


#: The one adapter context of the package (see the module doc).
ADAPTERS = AdaptersMap(psycopg.adapters)
set_json_loads(json_loads, ADAPTERS)  # the binary formats (jsonb's carries a version byte)
ADAPTERS.register_loader(builtin_types["json"].oid, JsonTextLoader)
ADAPTERS.register_loader(builtin_types["jsonb"].oid, JsonTextLoader)
ADAPTERS.register_loader(builtin_types["inet"].oid, InetLoader)
ADAPTERS.register_loader(builtin_types["cidr"].oid, CidrLoader)


def transformer() -> abc.Transformer:
    """A Transformer over ``ADAPTERS``: loaders without a connection."""
    return Transformer(ADAPTERS)
