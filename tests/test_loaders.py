"""The package's faster loaders give exactly the values psycopg's stock loaders give."""

from __future__ import annotations

import ipaddress
import json
from typing import Any

import psycopg
import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from psycopg.adapt import Transformer
from psycopg.pq import Format

from pglogrepl_bridge.pgoutput.loaders import json_loads, transformer

_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(10**30), 10**30)  # beyond 64 bits too: orjson declines, json takes over
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4)
    ),
    max_leaves=12,
)
_STOCK = Transformer(psycopg.adapters)
_OURS = transformer()


@given(_JSON)
@example({"id": 1, "tags": ["a", "b"], "price": 1.5})
@example(123456789012345678901234567890)
def test_json_loads_equals_the_stock_one(value: Any) -> None:
    text = json.dumps(value)
    assert json_loads(text) == json.loads(text)
    assert json_loads(text.encode()) == json.loads(text)
    for oid in (114, 3802):  # json, jsonb
        ours = _OURS.get_loader(oid, Format.TEXT).load(text.encode())
        stock = _STOCK.get_loader(oid, Format.TEXT).load(text.encode())
        assert ours == stock and type(ours) is type(stock)


@given(st.ip_addresses(), st.none() | st.integers(0, 128))
@example(ipaddress.ip_address("10.1.2.3"), None)
@example(ipaddress.ip_address("0.0.0.0"), None)
@example(ipaddress.ip_address("::ffff:10.1.2.3"), None)
def test_inet_loader_equals_the_stock_one(address: Any, prefix: int | None) -> None:
    text = str(address)
    if prefix is not None:
        text += f"/{min(prefix, address.max_prefixlen)}"
    ours = _OURS.get_loader(869, Format.TEXT).load(text.encode())
    stock = _STOCK.get_loader(869, Format.TEXT).load(text.encode())
    assert ours == stock and type(ours) is type(stock)


@pytest.mark.parametrize("text", [b"010.1.2.3", b"1.2.3", b"256.1.1.1", b"1.2.3.4.5", b"a.b.c.d"])
def test_irregular_ipv4_text_goes_the_stock_way(text: bytes) -> None:
    def outcome(transformer: Any) -> object:
        try:
            return transformer.get_loader(869, Format.TEXT).load(text)
        except ValueError as exc:
            return type(exc)

    assert outcome(_OURS) == outcome(_STOCK)


@given(st.ip_addresses(v=4) | st.ip_addresses(v=6), st.integers(0, 128))
@example(ipaddress.ip_address("10.0.0.0"), 16)
@example(ipaddress.ip_address("0.0.0.0"), 0)
def test_cidr_loader_equals_the_stock_one(address: Any, prefix: int) -> None:
    network = ipaddress.ip_network(f"{address}/{min(prefix, address.max_prefixlen)}", strict=False)
    text = str(network).encode()  # PostgreSQL's cidr output: no host bits
    ours = _OURS.get_loader(650, Format.TEXT).load(text)
    stock = _STOCK.get_loader(650, Format.TEXT).load(text)
    assert ours == stock and type(ours) is type(stock)
