"""PostgreSQL column types → SQLAlchemy types per target dialect, and values to match.

What each dialect cannot hold natively degrades without loss of meaning: arrays become JSON
off PostgreSQL, numeric becomes its exact text on SQLite, aware timestamps become UTC.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, time
from decimal import Decimal
from typing import Any

import sqlalchemy as sa
from psycopg.postgres import types as pgtypes
from psycopg.pq import Format

from pglogrepl_bridge.pgoutput import bintext, values
from pglogrepl_bridge.pgoutput.loaders import transformer
from pglogrepl_bridge.pgoutput.messages import Column
from pglogrepl_bridge.sinks import sqlitetext

Adapt = Callable[[Any], Any]

_SIMPLE: dict[str, Callable[[], sa.types.TypeEngine[Any]]] = {
    "int2": sa.SmallInteger,
    "int4": sa.Integer,
    "int8": sa.BigInteger,
    "oid": sa.BigInteger,
    "bool": sa.Boolean,
    "float4": lambda: sa.Float(precision=24),
    "float8": sa.Double,
    "text": sa.Text,
    "name": lambda: sa.String(64),
    "date": sa.Date,
    "time": sa.Time,
    "timetz": lambda: sa.Time(timezone=True),
    "timestamp": sa.DateTime,
    "timestamptz": lambda: sa.DateTime(timezone=True),
    "uuid": sa.Uuid,
    "bytea": sa.LargeBinary,
}
#: Types whose psycopg value is what SQLAlchemy wants; everything else is stored as text.
MAPPED = {*_SIMPLE, "numeric", "varchar", "bpchar", "json", "jsonb"}


def describe(oid: int) -> tuple[str | None, str | None]:
    """(type name, None) for a built-in scalar; (None, element name) for a built-in array:
    the type registry's facts (``pgoutput.values.describe``)."""
    facts = values.describe(oid)
    return facts.name, facts.element


_MYSQL = ("mysql", "mariadb")


def column_type(col: Column, dialect: str, *, is_key: bool) -> sa.types.TypeEngine[Any]:
    """The SQLAlchemy column type for a PostgreSQL column on this dialect (through the type
    registry's base type).
    """
    made = _column_type(col, dialect, is_key=is_key)
    if dialect in _MYSQL:
        from sqlalchemy.dialects import mysql  # this dialect's types: imported when used

        # MariaDB's defaults lose data: DATETIME/TIME drop microseconds, TEXT/BLOB stop at 64 KiB
        if isinstance(made, sa.DateTime):
            return mysql.DATETIME(fsp=6)
        if isinstance(made, sa.Time):
            return mysql.TIME(fsp=6)
        if type(made) is sa.Text:
            return mysql.LONGTEXT()
        if isinstance(made, sa.LargeBinary):
            return mysql.LONGBLOB()
    return made


def _column_type(col: Column, dialect: str, *, is_key: bool) -> sa.types.TypeEngine[Any]:
    name, elem = describe(col.type_oid)
    if dialect == "postgresql" and (name == "jsonb" or (elem is not None and elem in MAPPED)):
        from sqlalchemy.dialects import postgresql  # as mysql's above: imported when used

        if name == "jsonb":
            return postgresql.JSONB()
        inner = column_type(Column(col.name, _oid(elem or ""), -1, False), dialect, is_key=False)
        return postgresql.ARRAY(inner)
    if elem is not None and elem in MAPPED:
        return sa.JSON()
    if name == "numeric":
        if dialect == "sqlite":
            return sa.Text()  # exact: SQLite's NUMERIC affinity would round through a double
        if col.type_modifier >= 4:
            mod = col.type_modifier - 4
            return sa.Numeric((mod >> 16) & 0xFFFF, mod & 0xFFFF)
        return sa.Numeric(65, 30) if dialect in _MYSQL else sa.Numeric()
    if name in ("varchar", "bpchar"):
        length = col.type_modifier - 4 if col.type_modifier >= 4 else None
        if length is None and dialect in _MYSQL and is_key:
            length = 255
        return sa.String(length) if length is not None else sa.Text()
    if name in ("json", "jsonb"):
        return sa.JSON()
    factory = _SIMPLE.get(name or "")
    if factory is not None:
        made = factory()
        if isinstance(made, sa.Text) and is_key and dialect in _MYSQL:
            return sa.String(255)  # MariaDB cannot index a TEXT key without a prefix length
        return made
    if is_key and dialect in _MYSQL:
        return sa.String(255)
    return sa.Text()  # anything unknown: PostgreSQL's text output


def _oid(name: str) -> int:
    info = pgtypes.get(name)
    assert info is not None
    return info.oid


def _utc_naive(value: Any) -> Any:
    if isinstance(value, datetime) and value.tzinfo is not None:
        return value.astimezone(UTC).replace(tzinfo=None)
    if isinstance(value, time) and value.tzinfo is not None:
        return value.replace(tzinfo=None)
    return value


def _jsonable(value: Any) -> Any:
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, bytes):
        return "\\x" + value.hex()
    if hasattr(value, "isoformat"):
        return value.isoformat()
    if value is None or isinstance(value, bool | int | float | str | dict):
        return value
    return str(value)


def text_is_driver_value(col: Column, dialect: str) -> bool:
    """Whether PostgreSQL's text output of this column is, as it is, the value the target's
    driver stores, so the SQL sink can pass it through without loading and re-formatting it:
    every column into PostgreSQL (the target column has the source's type, ``column_type``,
    and psycopg sends a str as an untyped literal, which the server reads with that type's
    own input function: the value PostgreSQL printed, read back by PostgreSQL); json/jsonb
    into a JSON column elsewhere (stored as JSON text; read back, the same value); numeric
    into SQLite's exact TEXT."""
    if dialect == "postgresql":
        return True
    name, _ = describe(col.type_oid)
    if name in ("json", "jsonb"):
        return True
    return name == "numeric" and dialect == "sqlite"


def loaders(col: Column, dialect: str) -> tuple[Adapt, Adapt]:
    """(text loader, binary loader) giving the value this column's target type accepts."""
    name, elem = describe(col.type_oid)
    transformer = _TRANSFORMER
    if (name in MAPPED) or (elem is not None and elem in MAPPED):
        tload = transformer.get_loader(col.type_oid, Format.TEXT).load
        bload = transformer.get_loader(col.type_oid, Format.BINARY).load
        post: Adapt | None = None
        if elem is not None and dialect != "postgresql":
            post = _jsonable
        elif name == "numeric" and dialect == "sqlite":
            post = str
        elif name in ("timestamptz", "timetz") and dialect != "postgresql":
            post = _utc_naive
        if post is not None:
            return _then(tload, post), _then(bload, post)
        return tload, bload
    return _decode, _binary_text(bintext.writer(name))


_JSON_NATIVE = frozenset({"int2", "int4", "int8", "float4", "float8", "bool", "text", "varchar"})


def value_path(col: Column, dialect: str) -> tuple[int | None, Adapt | None]:
    """How a whole row's values become driver values, in two steps that batch well: the type
    OID whose psycopg loader to use (None: keep the text, decoded), then what to apply to a
    non-NULL loaded value (None: nothing). Into SQLite, where PostgreSQL's text nearly is the
    stored value, the second step edits the text (``sqlitetext``) and stands for the loader
    and the bind processor both; it raises on text it does not know, and the caller then
    takes ``loaders`` and the bind processor, which give the same values."""
    name, elem = describe(col.type_oid)
    if not ((name in MAPPED) or (elem is not None and elem in MAPPED)):
        return None, None
    if dialect == "sqlite":
        edit = sqlitetext.direct(name, elem)
        if edit is not None:
            return None, edit
    if elem is not None and dialect != "postgresql":
        # lists of these are JSON as psycopg loads them (_jsonable returns them unchanged)
        return col.type_oid, None if elem in _JSON_NATIVE else _jsonable
    if name == "numeric" and dialect == "sqlite":
        return col.type_oid, str
    if name in ("timestamptz", "timetz") and dialect != "postgresql":
        return col.type_oid, _utc_naive
    return col.type_oid, None


def _then(load: Adapt, post: Adapt) -> Adapt:
    return lambda data: post(load(data))


def _decode(data: bytes) -> str:
    return bytes(data).decode()


def _hex(data: bytes) -> str:
    return "\\x" + bytes(data).hex()


def _binary_text(write: bintext.Writer | None) -> Adapt:
    """A binary value of a type stored as text: PostgreSQL's text of it (``bintext``), as a
    text stream gives it; ``\\x`` and the hex of the bytes for a type without a writer (an
    enum, a composite) or bytes the writer refuses."""
    if write is None:
        return _hex

    def text(data: bytes) -> str:
        try:
            return write(bytes(data))
        except ValueError:
            return _hex(data)

    return text


_TRANSFORMER = transformer()
