"""PostgreSQL's text output of a one-dimensional array, split into its elements; pure.

Outputs that want an array's elements but no typed values (the SQLite sink stores an array
as JSON text, ``tail`` prints it as a JSON array of strings) read them straight from the
text: a bare element, or a quoted one with backslash escapes (PostgreSQL quotes an element
that is empty, holds a delimiter, brace, quote, backslash or space, or reads NULL); a bare
NULL is SQL NULL. Anything else (nested arrays, explicit bounds, input PostgreSQL never
prints) raises ValueError, and the caller takes psycopg's array loader instead.
"""

from __future__ import annotations

import re

_ELEMENT = re.compile(r'(?:"((?:[^"\\]|\\.)*)"|([^,"{}\\\s]+))(,|\Z)', re.S)
_ESCAPED = re.compile(r"\\(.)", re.S)


def elements(text: str) -> list[str | None]:
    """The elements of ``{a,"b c",NULL}``: ``["a", "b c", None]``."""
    if text == "{}":
        return []
    if text[:1] != "{" or text[-1:] != "}":
        raise ValueError(f"not a one-dimensional array: {text[:40]!r}")
    inner = text[1:-1]
    if '"' not in inner and "\\" not in inner:  # bare elements only: the commas split them
        if "{" in inner or "}" in inner or "" in (bare := inner.split(",")):
            raise ValueError(f"not a one-dimensional array: {text[:40]!r}")
        return [None if e == "NULL" else e for e in bare]
    at, items = 0, list[str | None]()
    while True:
        found = _ELEMENT.match(inner, at)
        if found is None:
            raise ValueError(f"not a one-dimensional array: {text[:40]!r}")
        quoted, plain, comma = found.groups()
        if quoted is None:
            items.append(None if plain == "NULL" else plain)
        else:
            items.append(_ESCAPED.sub(r"\1", quoted) if "\\" in quoted else quoted)
        at = found.end()
        if not comma:
            return items
