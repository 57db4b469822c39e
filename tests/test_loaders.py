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

from pglogrepl_bridge.pgoutput import _accel
from pglogrepl_bridge.pgoutput.loaders import (
    _NETWORKS,
    _NETWORKS_MAX,
    _digit_run_py,
    _ipv4_int_py,
    json_loads,
    transformer,
)

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
        # psycopg's row loop may hand a memoryview
        assert _OURS.get_loader(oid, Format.TEXT).load(memoryview(text.encode())) == stock
        row = transformer()
        row.set_loader_types([oid], Format.TEXT)
        assert row.load_sequence([text.encode()]) == (stock,)


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


_QUADISH = st.lists(
    st.sampled_from(["0", "1", "01", "9", "25", "255", "256", "300", "1000", "", "a", "-1"]),
    min_size=1,
    max_size=6,
).map(lambda parts: ".".join(parts).encode())


@given(_QUADISH | st.binary(max_size=20))
@example(b"255.255.255.255")
@example(b"1.2.3.4/32")
@example(b"1.2.3.4 ")
@example("1.2.3.\u0664".encode())  # an Arabic-Indic digit: str.isdigit says yes, int() too
def test_the_c_dotted_quad_reader_equals_the_python_one(data: bytes) -> None:
    if _accel.ipv4_int is None:
        pytest.skip("the C accelerator is not built")
    assert _accel.ipv4_int(data) == _ipv4_int_py(data)
    assert _accel.ipv4_int(memoryview(data)) == _ipv4_int_py(data)


def test_cidr_networks_are_cached_within_a_bound() -> None:
    load = _OURS.get_loader(650, Format.TEXT).load
    first = load(b"10.7.0.0/16")
    assert load(memoryview(b"10.7.0.0/16")) is first  # the second load is the cached value
    for i in range(_NETWORKS_MAX + 10):
        network = ipaddress.ip_network((i << 8, 24))
        assert load(str(network).encode()) == network
    assert len(_NETWORKS) <= _NETWORKS_MAX
    assert load(b"10.7.0.0/16") == ipaddress.ip_network("10.7.0.0/16")


@given(
    st.text(alphabet="0123456789 .e-\u0664x", max_size=40) | st.binary(max_size=40),
    st.integers(0, 20),
)
@example("1234567890123456789", 19)
@example("123456789012345678", 19)
@example("\u0664" * 20, 1)  # not ASCII digits: no run
def test_the_c_digit_run_test_equals_the_python_one(data: str | bytes, length: int) -> None:
    if _accel.digit_run is None:
        pytest.skip("the C accelerator is not built")
    assert _accel.digit_run(data, length) == _digit_run_py(data, length)
    if isinstance(data, bytes):
        assert _accel.digit_run(memoryview(data), length) == _digit_run_py(data, length)
