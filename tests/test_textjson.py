"""``render.textjson``: editing PostgreSQL's text gives exactly the JSON the loader path
gives, on values a real server printed through a session opened as the stream opens its own,
and declines what it does not know (the renderer then takes the loader path)."""

from __future__ import annotations

import pytest
from psycopg.postgres import types as pgtypes
from psycopg.pq import Format

from pglogrepl_bridge.pgoutput.loaders import transformer
from pglogrepl_bridge.pgoutput.values import describe
from pglogrepl_bridge.postgres.connection import connect
from pglogrepl_bridge.render import textjson
from pglogrepl_bridge.render.jsonl import JsonRenderer, _loaded
from pglogrepl_bridge.testing.postgres import PostgresServer

from .test_sqlitetext import CASES

EDITED = ["timestamp", "timestamptz", "date", "time", "timetz", "text[]", "varchar[]"]


@pytest.mark.parametrize("type_", EDITED)
def test_the_edit_is_the_loaders_json(pg: PostgresServer, type_: str) -> None:
    expr, edges = CASES[type_]
    info = pgtypes.get(type_.removesuffix("[]"))
    assert info is not None
    oid = info.array_oid if type_.endswith("[]") else info.oid
    facts = describe(oid)
    edit = textjson.edit(facts.name, facts.element)
    assert edit is not None
    slow = _loaded(transformer().get_loader(oid, Format.TEXT).load)
    with connect(pg.dsn, replication=False) as conn:
        plain = [
            r[0]
            for r in conn.execute(
                f"SELECT ({expr})::{type_}::text FROM generate_series(1, 300) g"
            ).fetchall()
        ]
        odd = [str(conn.execute(f"SELECT ({e})::{type_}::text").fetchall()[0][0]) for e in edges]
    for text in plain:
        assert edit(text) == slow(text.encode()), text
    declined = 0
    for text in odd:
        try:
            edited = edit(text)
        except ValueError:
            declined += 1
            continue
        assert edited == slow(text.encode()), text
    assert declined < len(odd) or type_ == "date", "no edge value was taken: test the edges"
    # and the renderer uses it: the same text renders the same either way
    renderer = JsonRenderer("typed")
    render = renderer._text_renderer(oid)
    assert [render(t.encode()) for t in plain + odd] == [slow(t.encode()) for t in plain + odd]


def test_input_postgresql_never_prints_is_declined() -> None:
    for edit, text in [
        (textjson.timestamptz, "2024-01-01 10:00:00+05:30"),
        (textjson.timetz, "10:00:00+05:30:15"),
        (textjson.time, "24:00:00"),
        (textjson.text_array, "{{a},{b}}"),
        (textjson.text_array, "[0:1]={a,b}"),
    ]:
        with pytest.raises(ValueError):
            edit(text)
