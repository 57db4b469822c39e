"""TupleData → JSON object text through a function made once for one relation's columns.

The per-column walk over a TupleData is the hot path of ``tail --format jsonl`` and of the
bridge's JSON payload. Where the C accelerator is built (``accel``), ``_fastrow.JsonRow`` does
the walk, about 5x faster. Otherwise the walk is written out as straight-line Python for the
relation's columns (the way ``dataclasses`` and ``namedtuple`` generate their methods): about
20% faster than a general loop, with no per-column dispatch and one f-string per object.
Both quote text exactly as ``json``'s ``encode_basestring`` does.

The generated source holds only generated identifiers; column names and renderers are passed
in as globals, so nothing from the server is ever compiled. Anything irregular (an
unchanged-TOAST column, a malformed tuple, text that is not UTF-8) returns None, and the
caller takes the careful path, which says what is wrong.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pglogrepl_bridge.pgoutput import _accel as accel
from pglogrepl_bridge.pgoutput._accel import RowRender, RowRenderUtf8

try:
    from _json import encode_basestring as _encode  # type: ignore[import-not-found,unused-ignore]
except ImportError:  # pragma: no cover - every CPython has it
    from json.encoder import encode_basestring as _encode

quote: Callable[[str], str] = _encode  # a str as a JSON string, non-ASCII kept as is

Render = Callable[[bytes], str]

_u32 = struct.Struct("!I").unpack_from


@dataclass(frozen=True, slots=True)
class ColumnRender:
    """How one column of a relation is rendered to JSON, and whether it is included."""

    key: str  # '"name":', already JSON
    text: Render  # PostgreSQL text → JSON value
    binary: Render  # binary send format → JSON value
    quote_text: bool = False  # text is a JSON string of the text as it is: inlined
    raw_text: bool = False  # text is already the JSON value (integers): inlined
    included: bool = True  # False: parsed over but left out (non-key column of a key tuple)
    #: ``text`` is ``render.textjson``'s edit of this temporal type (``accel.DATE`` ...,
    #: 0: none): the C walk writes it itself for the shapes the edit accepts
    edit: int = 0


def compile_json_row(columns: Sequence[ColumnRender]) -> RowRender:
    """A function ``(buf, pos) -> JSON object | None`` for TupleData at ``buf[pos:]``."""
    return compile_json_rows(columns)[0]


def compile_json_rows(columns: Sequence[ColumnRender]) -> tuple[RowRender, RowRenderUtf8]:
    """The row renderer as str and as UTF-8 bytes (the same JSON). Why both: ``tail`` and
    the bridge write bytes, and the C walk's bytes skip decoding the row into a str and
    encoding it back (with one non-ASCII character, a str of 2 or 4 bytes per character)."""
    if accel.json_row is None:
        row = compile_json_row_python(columns)

        def encoded(buf: bytes, pos: int) -> bytes | None:
            text = row(buf, pos)
            return None if text is None else text.encode()

        return row, encoded
    walk = accel.json_row(
        [
            (
                col.key if col.included else None,
                accel.QUOTE
                if col.quote_text
                else accel.RAW
                if col.raw_text
                else col.edit or accel.CALL,
                col.text,
                col.binary,
            )
            for col in columns
        ]
    )
    return walk, walk.utf8


def compile_json_row_python(columns: Sequence[ColumnRender]) -> RowRender:
    """The pure-Python walk, generated for these columns."""
    env: dict[str, object] = {"u32": _u32, "q": quote, "n_cols": len(columns)}
    body = [
        "def render(b, p):",
        "  try:",
        "    if (b[p] << 8) | b[p + 1] != n_cols: return None",
        "    p += 2",
    ]
    parts = []
    for i, col in enumerate(columns):
        env[f"k{i}"], env[f"t{i}"], env[f"b{i}"] = col.key, col.text, col.binary
        if col.quote_text:
            text_value = "q(b[s:p].decode())"
        elif col.raw_text:
            text_value = "b[s:p].decode()"
        else:
            text_value = f"t{i}(b[s:p])"
        body += [
            "    k = b[p]",
            "    if k == 116:",  # 't'
            "      s = p + 5; p = s + u32(b, p + 1)[0]",
            f"      v{i} = {text_value}" if col.included else "      pass",
            "    elif k == 110:",  # 'n'
            f"      p += 1; v{i} = 'null'",
            "    elif k == 98:",  # 'b'
            "      s = p + 5; p = s + u32(b, p + 1)[0]",
            f"      v{i} = b{i}(b[s:p])" if col.included else "      pass",
            "    else: return None",  # 'u' (unchanged TOAST) or garbage
        ]
        if col.included:
            parts.append(f"{{k{i}}}{{v{i}}}")
    body += [
        "    if p > len(b): return None",  # a bogus length overshot the message
        "  except Exception:",
        "    return None",
        f"  return f'{{{{{','.join(parts)}}}}}'",
    ]
    exec("\n".join(body), env)  # generated from identifiers only, see the module docstring
    return env["render"]  # type: ignore[return-value]
