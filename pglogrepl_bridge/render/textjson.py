"""PostgreSQL's text → the JSON value ``tail`` prints, by editing the text; pure.

Why: a ``timestamptz`` went through psycopg's loader (a ``datetime``) and ``isoformat``, a
``text[]`` through a list and a JSON dump of each element: a Python object per value and
per element, for JSON that differs from PostgreSQL's own text by a few characters
(``2026-01-01 00:01:00+00`` is ``"2026-01-01T00:01:00+00:00"``). Each edit gives exactly what
the loader path gives for the same text (``tests/test_textjson.py`` holds them to each other
on values PostgreSQL printed, in the session settings every stream uses: ISO dates, UTC) and
raises ValueError on anything it does not recognise (``infinity``, BC dates, ``24:00:00``,
an offset with seconds, nested arrays), for which the renderer takes the loader path.
"""

from __future__ import annotations

from collections.abc import Callable

from pglogrepl_bridge.pgoutput import textarray

Edit = Callable[[str], str]


def _refuse(text: str) -> ValueError:
    return ValueError(f"not a plain value: {text[:40]!r}")


def _clock(text: str) -> str:
    """``HH:MM:SS[.f]`` as ``time.isoformat``: six fraction digits, or none."""
    n = len(text)
    if text[:2] < "24" and text[2:3] == ":" and text[5:6] == ":":
        if n == 8:
            return text
        if 10 <= n <= 15 and text[8] == ".":
            return text.ljust(15, "0")
    raise _refuse(text)


def _offset(text: str) -> str:
    """``+HH`` or ``+HH:MM`` as ``isoformat`` writes a fixed offset: ``+HH:MM``."""
    if len(text) == 3:
        return text + ":00"
    if len(text) == 6 and text[3] == ":":
        return text
    raise _refuse(text)


def date(text: str) -> str:
    """``YYYY-MM-DD`` is ``date.isoformat`` as it is."""
    if len(text) == 10 and text[4] == "-" and text[7] == "-":
        return '"' + text + '"'
    raise _refuse(text)


def timestamp(text: str) -> str:
    """``YYYY-MM-DD HH:MM:SS[.f]`` → ``YYYY-MM-DDTHH:MM:SS[.ffffff]``."""
    if len(text) >= 19 and text[4] == "-" and text[10] == " ":
        return '"' + text[:10] + "T" + _clock(text[11:]) + '"'
    raise _refuse(text)


def timestamptz(text: str) -> str:
    """A UTC timestamp; psycopg gives other offsets in UTC, which only its loader does."""
    if text.endswith("+00") and len(text) >= 22 and text[4] == "-" and text[10] == " ":
        return '"' + text[:10] + "T" + _clock(text[11:-3]) + '+00:00"'
    raise _refuse(text)


def time(text: str) -> str:
    """``HH:MM:SS[.f]`` → ``time.isoformat``."""
    return '"' + _clock(text) + '"'


def timetz(text: str) -> str:
    """``HH:MM:SS[.f]+HH[:MM]`` → ``time.isoformat`` with its fixed offset."""
    cut = max(text.rfind("+"), text.rfind("-"))
    if cut < 8:
        raise _refuse(text)
    return '"' + _clock(text[:cut]) + _offset(text[cut:]) + '"'


def text_array(text: str) -> str:
    """A one-dimensional array of strings as a JSON array (non-ASCII kept, as ``tail``)."""
    return textarray.json_array(text, False, ",")


#: type name (scalar) or ("[]", element name) → its edit
_BY_TYPE: dict[str | tuple[str, str], Edit] = {
    "date": date,
    "timestamp": timestamp,
    "timestamptz": timestamptz,
    "time": time,
    "timetz": timetz,
    ("[]", "text"): text_array,
    ("[]", "varchar"): text_array,
}


def edit(name: str | None, element: str | None) -> Edit | None:
    """The edit for a value of this type (``element`` for an array), if there is one."""
    return _BY_TYPE.get(("[]", element) if element is not None else (name or ""))
