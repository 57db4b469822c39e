"""``render.textjson``: editing PostgreSQL's text gives exactly the JSON the loader path
gives, on values a real server printed through a session opened as the stream opens its own,
and declines what it does not know (the renderer then takes the loader path)."""

from __future__ import annotations

import pytest
from psycopg.pq import Format

from pglogrepl_bridge.pgoutput.loaders import transformer
from pglogrepl_bridge.pgoutput.values import describe
from pglogrepl_bridge.render import textjson
from pglogrepl_bridge.render.jsonl import JsonRenderer, _loaded
from pglogrepl_bridge.testing.postgres import PostgresServer

from .test_sqlitetext import assert_edits_match, type_oid

EDITED = ["timestamp", "timestamptz", "date", "time", "timetz", "text[]", "varchar[]"]


@pytest.mark.parametrize("type_", EDITED)
def test_the_edit_is_the_loaders_json(pg: PostgresServer, type_: str) -> None:
    oid = type_oid(type_)
    facts = describe(oid)
    edit = textjson.edit(facts.name, facts.element)
    assert edit is not None
    slow = _loaded(transformer().get_loader(oid, Format.TEXT).load)
    texts = assert_edits_match(edit, slow, pg, type_)
    # and the renderer uses it: the same text renders the same either way
    render = JsonRenderer("typed")._text_renderer(oid)
    assert [render(t.encode()) for t in texts] == [slow(t.encode()) for t in texts]


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
