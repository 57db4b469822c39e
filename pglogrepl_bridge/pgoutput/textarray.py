"""PostgreSQL's text output of a one-dimensional array, split into its elements; pure.

Outputs that want an array's elements but no typed values (the SQLite sink stores an array
as JSON text, ``tail`` prints it as a JSON array of strings) read them straight from the
text: a bare element, or a quoted one with backslash escapes (PostgreSQL quotes an element
that is empty, holds a delimiter, brace, quote, backslash or space, or reads NULL); a bare
NULL is SQL NULL. Anything else (nested arrays, explicit bounds, input PostgreSQL never
prints) raises ValueError, and the caller takes psycopg's array loader instead.
"""

from __future__ import annotations

import json
import re

from pglogrepl_bridge.pgoutput import _accel as accel

_ELEMENT = re.compile(r'(?:"((?:[^"\\]|\\.)*)"|([^,"{}\\\s]+))(,|\Z)', re.S)
_ESCAPED = re.compile(r"\\(.)", re.S)


_NOT_BARE = re.compile(r'[{}"\\\s]')


def _bare(segment: str, text: str) -> list[str | None]:
    """Comma-separated bare elements (each non-empty, no brace, quote, backslash or space)."""
    found = segment.split(",")
    if "" in found or _NOT_BARE.search(segment):
        raise ValueError(f"not a one-dimensional array: {text[:40]!r}")
    return [None if e == "NULL" else e for e in found]


def _quoted_plainly(inner: str, text: str) -> list[str | None]:
    """Elements when some are quoted but none holds an escape: splitting on the quotes
    alternates between the text around quoted elements and their contents."""
    parts = inner.split('"')
    last = len(parts) - 1
    if last % 2:
        raise ValueError(f"not a one-dimensional array: {text[:40]!r}")
    items: list[str | None] = []
    for i, part in enumerate(parts):
        if i % 2:
            items.append(part)
        elif part == ("," if 0 < i < last else ""):
            continue  # nothing but the separator between quoted elements
        else:
            lead, trail = i > 0, i < last
            if (lead and part[:1] != ",") or (trail and part[-1:] != ","):
                raise ValueError(f"not a one-dimensional array: {text[:40]!r}")
            items += _bare(part[lead : len(part) - trail], text)
    return items


def elements(text: str) -> list[str | None]:
    """The elements of ``{a,"b c",NULL}``: ``["a", "b c", None]``."""
    if text == "{}":
        return []
    if text[:1] != "{" or text[-1:] != "}":
        raise ValueError(f"not a one-dimensional array: {text[:40]!r}")
    inner = text[1:-1]
    if "\\" not in inner:
        return _bare(inner, text) if '"' not in inner else _quoted_plainly(inner, text)
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


#: JSON string writers (C): non-ASCII as ``\\u`` escapes (``json.dumps``'s default), or kept
_QUOTE = {True: json.encoder.encode_basestring_ascii, False: json.encoder.encode_basestring}


def json_array(text: str, ascii: bool, separator: str) -> str:
    """The elements of a one-dimensional array as a JSON array of strings and nulls, written
    as ``json`` writes strings (``ascii``: non-ASCII escaped), joined by ``separator``. In C
    where built (one pass, no list of elements); it declines what ``elements`` refuses."""
    if accel.text_array_json is not None:
        written = accel.text_array_json(text, ascii, separator)
        if written is not None:
            return written
    quote = _QUOTE[ascii]
    return "[" + separator.join(["null" if e is None else quote(e) for e in elements(text)]) + "]"
