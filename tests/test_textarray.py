"""``pgoutput.textarray``: PostgreSQL's text output of a one-dimensional array reads back
into its elements, by each of its paths (bare, quoted without escapes, escaped)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pglogrepl_bridge.pgoutput.textarray import elements

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
