"""Column values: typed through psycopg's own loaders (text and binary), or lossless text.

psycopg's loaders need no connection (a bare ``Transformer``), so this stays IO-free. Loaders
are looked up once per column when a Relation arrives, never per value, from the package's one
adapter context (``loaders.ADAPTERS``: psycopg's, with faster json and inet loaders).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from psycopg.postgres import types as builtin_types
from psycopg.pq import Format

from pglogrepl_bridge.pgoutput.loaders import ADAPTERS, transformer

log = logging.getLogger(__name__)

ValueMode = Literal["typed", "text"]
Load = Callable[[bytes], Any]
LoadRow = Callable[[Sequence[bytes | None]], tuple[Any, ...]]


@dataclass(frozen=True, slots=True)
class ValueProblem:
    """A value that could not be converted; the change keeps its text instead."""

    relation: str
    column: str
    type_oid: int
    text: str
    error: str


@dataclass(frozen=True, slots=True)
class TypeFacts:
    """What the registry knows of a built-in type: its name, and for an array the name of its
    element type (then ``name`` is None); both None for a type psycopg does not know."""

    name: str | None
    element: str | None


#: Type names whose text output is a JSON number as it is.
INTEGER_TYPES = frozenset({"int2", "int4", "int8", "oid", "xid", "xid8"})
FLOAT_TYPES = frozenset({"float4", "float8"})
JSON_TYPES = frozenset({"json", "jsonb"})
TEMPORAL_TYPES = frozenset({"date", "time", "timestamp", "timestamptz", "timetz"})
#: Element types whose arrays become JSON arrays of JSON values (others: PostgreSQL's text).
JSON_ARRAY_ELEMENTS = frozenset(
    {*INTEGER_TYPES - {"xid", "xid8"}, *FLOAT_TYPES, *JSON_TYPES, *TEMPORAL_TYPES}
    | {"numeric", "bool", "text", "varchar", "bpchar", "bytea", "uuid"}
)


def describe(oid: int) -> TypeFacts:
    """The facts of a built-in type OID (resolve a domain with ``ValueLoaders.base_oid``
    first). psycopg answers an array OID with its element's TypeInfo."""
    info = builtin_types.get(oid)
    if info is None:
        return TypeFacts(None, None)
    if info.oid == oid:
        return TypeFacts(info.name, None)
    return TypeFacts(None, info.name)


def _text(data: bytes) -> str:
    return data.decode()


def _raw(data: bytes) -> bytes:
    return bytes(data)


class ValueLoaders:
    """Chooses a loader per (type OID, format).

    ``type_map`` maps a custom type's qualified name (``schema.name``, as the stream's Type
    message says) to a built-in base type name, e.g. ``{"public.email": "text"}``: that is how
    domains load through their base type. Other unknown OIDs come out as their text.
    """

    def __init__(
        self,
        mode: ValueMode = "typed",
        *,
        type_map: Mapping[str, str] | None = None,
        on_problem: Callable[[ValueProblem], None] | None = None,
    ) -> None:
        self.mode = mode
        self._transformer = transformer()
        self._type_map = dict(type_map or {})
        self._custom: dict[int, str] = {}
        self._noted: dict[int, tuple[str, str]] = {}  # oid -> the Type message's names
        self.on_problem = on_problem or _log_problem

    def note_type(self, oid: int, namespace: str, name: str) -> None:
        """Record a Type message: custom OIDs are only known by name from the stream.

        For a domain, pgoutput names the *base* type (an empty namespace means pg_catalog),
        so a domain over a built-in type loads through that type with no configuration.
        """
        self._noted[oid] = (namespace, name)
        if not namespace and builtin_types.get(name) is not None:
            self._type_map.setdefault(f"pg_catalog.{name}#{oid}", name)
            self._custom[oid] = f"pg_catalog.{name}#{oid}"
        else:
            self._custom[oid] = f"{namespace}.{name}"

    def noted_type(self, oid: int) -> tuple[str, str] | None:
        """(namespace, name) as the stream's Type message gave them for ``oid``, if it did:
        what a consumer of a republished stream needs to load ``oid`` the same way."""
        return self._noted.get(oid)

    def type_name(self, oid: int) -> str:
        """The type's name as PostgreSQL or the stream named it."""
        info = builtin_types.get(oid)
        if info is not None:
            return info.name
        return self._custom.get(oid, str(oid)).split("#")[0]

    def base_oid(self, oid: int) -> int:
        """The OID whose meaning a value of ``oid`` has: a domain's base type (as the stream's
        Type message or ``type_map`` says), else ``oid`` itself. The one answer that
        ``RowChange`` values, the JSON renderer and the SQL sink all ask for, so a value
        means the same thing everywhere."""
        qualified = self._custom.get(oid)
        if qualified is not None and qualified in self._type_map:
            base = builtin_types.get(self._type_map[qualified])
            if base is not None:
                return base.oid
        return oid

    def text_loader(self, oid: int) -> Load:
        """The loader for text-format values of ``oid`` (through its base type for a domain)."""
        oid = self.base_oid(oid)
        if self.mode == "text" or ADAPTERS.get_loader(oid, Format.TEXT) is None:
            return _text  # lossless mode; or enums, composites, types psycopg doesn't know
        loader: Load = self._transformer.get_loader(oid, Format.TEXT).load
        return loader

    def binary_loader(self, oid: int) -> Load:
        """Binary values of a type psycopg has no binary loader for stay bytes."""
        oid = self.base_oid(oid)
        if self.mode == "text" or ADAPTERS.get_loader(oid, Format.BINARY) is None:
            return _raw
        loader: Load = self._transformer.get_loader(oid, Format.BINARY).load
        return loader

    def row_loader(self, oids: Sequence[int], fmt: Format) -> LoadRow:
        """All of a row's values (one format, None for NULL) converted in one call.

        psycopg's ``Transformer.load_sequence``, which its C implementation runs without a
        Python call per value; each column gets the loader ``text_loader``/``binary_loader``
        would choose, so the results are the same.
        """
        if fmt == Format.TEXT:
            chosen = [
                oid if self.text_loader(oid) is not _text else builtin_types["text"].oid
                for oid in map(self.base_oid, oids)
            ]
        else:
            chosen = [
                oid if self.binary_loader(oid) is not _raw else builtin_types["bytea"].oid
                for oid in map(self.base_oid, oids)
            ]
        rows = transformer()
        rows.set_loader_types(chosen, fmt)
        return rows.load_sequence


def _log_problem(problem: ValueProblem) -> None:
    log.warning(
        "cannot convert %s.%s (type oid %d) value %r: %s; keeping its text",
        problem.relation,
        problem.column,
        problem.type_oid,
        problem.text[:200],
        problem.error,
    )
