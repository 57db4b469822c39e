"""``pgoutput.textarray``: PostgreSQL's text output of a one-dimensional array reads back
into its elements, by each of its paths (bare, quoted without escapes, escaped)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pglogrepl_bridge.pgoutput import _accel as accel
from pglogrepl_bridge.pgoutput.textarray import elements, json_array

_SPACE = " \t\n\r\v\f"


def array_out(items: list[str | None]) -> str:
    """A text[] as PostgreSQL's array_out writes it."""

    def one(item: str | None) -> str:
        if item is None:
            return "NULL"
        needs = (
            item == "" or item.upper() == "NULL" or any(c in '{},"\\' or c in _SPACE for c in item)
        )
        if not needs:
            return item
        return '"' + item.replace("\\", "\\\\").replace('"', '\\"') + '"'

    return "{" + ",".join(map(one, items)) + "}"


@given(st.lists(st.none() | st.text(alphabet=st.sampled_from('ab,{} "\\\tNUL✓é'), max_size=6)))
def test_what_postgresql_prints_reads_back(items: list[str | None]) -> None:
    assert elements(array_out(items)) == items


@pytest.mark.parametrize(
    "text",
    ["{a,{b}}", "[0:1]={a,b}", '{"a"b}', "{a,,b}", "{,a}", '{"a",}', '{"a" ,"b"}', "{a b}", "x"],
)
def test_what_postgresql_never_prints_is_declined(text: str) -> None:
    with pytest.raises(ValueError):
        elements(text)


def _python_json(text: str, ascii: bool, separator: str) -> str | None:
    """``json_array`` by the pure-Python path (None where ``elements`` declines)."""
    quote = json.encoder.encode_basestring_ascii if ascii else json.encoder.encode_basestring
    try:
        found = elements(text)
    except ValueError:
        return None
    return "[" + separator.join("null" if e is None else quote(e) for e in found) + "]"


_TRICKY = st.sampled_from('ab,{} "\\\tNUL✓é\x00\x1f\x7f\u00a0\u2028😀\n')


@pytest.mark.skipif(accel.text_array_json is None, reason="the C accelerator is not built")
@given(
    st.one_of(
        st.lists(st.none() | st.text(alphabet=_TRICKY, max_size=6)).map(array_out),
        st.text(alphabet=_TRICKY, max_size=12).map(lambda s: "{" + s + "}"),
        st.text(alphabet=_TRICKY, max_size=12),
    ),
    st.booleans(),
    st.sampled_from([",", ", "]),
)
def test_the_c_writer_equals_the_python_one(text: str, ascii: bool, separator: str) -> None:
    """Same JSON (as ``json`` writes strings, both ways), and the same texts declined."""
    assert accel.text_array_json is not None
    written = accel.text_array_json(text, ascii, separator)
    assert written == _python_json(text, ascii, separator)
    if written is not None:
        assert json.loads(written) == elements(text)
        assert json_array(text, ascii, separator) == written
