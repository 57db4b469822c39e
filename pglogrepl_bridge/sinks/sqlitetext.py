"""PostgreSQL's text output → the value SQLAlchemy's SQLite types store, without parsing it.

Why: into SQLite, a timestamp went through psycopg's loader (a ``datetime``) and then
SQLAlchemy's bind processor (back to text, ``2024-01-01 10:00:00.000000``); a uuid through
``uuid.UUID`` and back to its hex; an ``int[]`` through a list and ``json.dumps``. PostgreSQL's
own text (ISO DateStyle and UTC are set for every session we open) is already that value but
for a few characters, so each function here edits the text instead: string slicing, no
objects. A function returns exactly what the loader-and-processor path returns for the same
text (``tests/test_sqlitetext.py`` holds them to each other on values PostgreSQL printed), and
raises ValueError on anything it does not recognise (``infinity``, BC dates, a time zone
other than UTC, quoted array elements): the caller then takes that path for the row.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from pglogrepl_bridge.pgoutput import _accel as accel
from pglogrepl_bridge.pgoutput import textarray

Direct = Callable[[str], str]


def _refuse(text: str) -> ValueError:
    return ValueError(f"not a plain value: {text[:40]!r}")


def timestamp(text: str) -> str:
    """``YYYY-MM-DD HH:MM:SS[.f]`` → SQLite DATETIME's ``YYYY-MM-DD HH:MM:SS.ffffff``."""
    n = len(text)
    if n == 19 and text[4] == "-" and text[10] == " ":
        return text + ".000000"
    if 21 <= n <= 26 and text[19] == "." and text[4] == "-" and text[10] == " ":
        return text.ljust(26, "0")
    raise _refuse(text)


def timestamptz(text: str) -> str:
    """A UTC timestamp (``...+00``) → the naive UTC DATETIME text."""
    if text.endswith("+00"):
        return timestamp(text[:-3])
    raise _refuse(text)


def date(text: str) -> str:
    """``YYYY-MM-DD`` is SQLite DATE's text as it is."""
    if len(text) == 10 and text[4] == "-" and text[7] == "-":
        return text
    raise _refuse(text)


def time(text: str) -> str:
    """``HH:MM:SS[.f]`` → SQLite TIME's ``HH:MM:SS.ffffff`` (24:00:00 has no Python time)."""
    n = len(text)
    if text[:2] < "24" and text[2:3] == ":":
        if n == 8:
            return text + ".000000"
        if 10 <= n <= 15 and text[8] == ".":
            return text.ljust(15, "0")
    raise _refuse(text)


def timetz(text: str) -> str:
    """A time with an offset → the time, offset dropped (what the loader path stores)."""
    cut = max(text.rfind("+"), text.rfind("-"))
    if cut >= 8:
        return time(text[:cut])
    raise _refuse(text)


def uuid(text: str) -> str:
    """SQLAlchemy's Uuid on SQLite stores the 32 hex digits."""
    if len(text) == 36 and text[8] == "-":
        return text.replace("-", "")
    raise _refuse(text)


_INTEGER_ARRAY = re.compile(r"\{[-0-9,{}NUL]*")


def _integer_array(text: str) -> str:
    """``{1,NULL,{2}}`` → ``json.dumps([1, None, [2]])``: ``[1, null, [2]]``."""
    if _INTEGER_ARRAY.fullmatch(text) is None:  # explicit bounds ([0:1]={...}), quotes
        raise _refuse(text)
    return text.replace("{", "[").replace("}", "]").replace("NULL", "null").replace(",", ", ")


#: ``_integer_array``, in C where built (the same text, the same refusals)
integer_array: Direct = accel.int_array_json or _integer_array


def text_array(text: str) -> str:
    """A one-dimensional text array → ``json.dumps`` of its list, written directly."""
    return textarray.json_array(text, True, ", ")


#: type name (scalar) or ("[]", element name) → its edit of the text
_BY_TYPE: dict[str | tuple[str, str], Direct] = {
    "timestamp": timestamp,
    "timestamptz": timestamptz,
    "date": date,
    "time": time,
    "timetz": timetz,
    "uuid": uuid,
    **{("[]", name): integer_array for name in ("int2", "int4", "int8")},
    **{("[]", name): text_array for name in ("text", "varchar")},
}


#: each edit as ``_fastrow.driver_row`` does it in C (the same text, the same refusals)
MODES: dict[Direct, int] = {
    timestamp: accel.DRIVER_TIMESTAMP,
    timestamptz: accel.DRIVER_TIMESTAMPTZ,
    date: accel.DRIVER_DATE,
    time: accel.DRIVER_TIME,
    timetz: accel.DRIVER_TIMETZ,
    uuid: accel.DRIVER_UUID,
    integer_array: accel.DRIVER_INT_ARRAY,
    text_array: accel.DRIVER_TEXT_ARRAY,
}


def direct(name: str | None, element: str | None) -> Direct | None:
    """The text edit for a column of this type (``element`` for an array), if there is one."""
    return _BY_TYPE.get(("[]", element) if element is not None else (name or ""))
