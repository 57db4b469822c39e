"""``pgoutput.bintext``: each writer gives, from a value's binary form, exactly the text
PostgreSQL prints for it. The server prints both (``format('%s', v)`` and ``<type>_send(v)``) for
values made to reach every branch: random ones and the edges."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from pglogrepl_bridge.pgoutput import bintext
from pglogrepl_bridge.postgres.stream import StreamOptions
from pglogrepl_bridge.sinks.replicate import run_replicate
from pglogrepl_bridge.testing.postgres import PostgresServer

from .streamkit import Conn, last_commit_end, pg_url
from .test_from_nats import _declared, _rows
from .test_types_live import zoo_changes

#: (type, send function, SQL giving a column ``v`` of many values of it)
_CASES = [
    (
        "inet",
        "inet_send",
        "SELECT (((random() * 255)::int) || '.' || ((random() * 255)::int) || '.' || "
        "((random() * 255)::int) || '.' || ((random() * 255)::int) || '/' || "
        "((random() * 32)::int))::inet AS v FROM generate_series(1, 500) "
        "UNION ALL SELECT v::inet FROM unnest(ARRAY['0.0.0.0', '255.255.255.255/32', "
        "'10.1.2.3/8', '::', '::1', '::/0', '1::', '1::1', '::ffff:1.2.3.4', "
        "'::ffff:1.2.3.4/120', '::1.2.3.4', '::0.0.0.2', '::ffff:0:1.2.3.4', '1:0:0:1::1', "
        "'1:0:0:1:0:0:1:0', '0:1:0:0:0:1:0:0', '0:0:1:0:0:0:0:1', 'fe80::1:2:3:4/64', "
        "'2001:db8::/32', '1:2:3:4:5:6:7:8/128', '::ffff:255.255.255.255']) v",
    ),
    (
        "inet (IPv6)",
        "inet_send",
        "SELECT (array_to_string(ARRAY(SELECT CASE WHEN random() < 0.5 THEN '0' ELSE "
        "to_hex((random() * 65535)::int) END FROM generate_series(1, 8) WHERE g > 0), ':') "
        "|| '/' || ((random() * 128)::int))::inet AS v FROM generate_series(1, 500) g",
    ),
    (
        "cidr",
        "cidr_send",
        "SELECT network(v)::cidr AS v FROM (SELECT (((random() * 255)::int) || '.' || "
        "((random() * 255)::int) || '.0.0/' || ((random() * 32)::int))::inet AS v "
        "FROM generate_series(1, 300) UNION ALL SELECT v::inet FROM unnest(ARRAY["
        "'10.0.0.0/8', '1.2.3.4/32', '::/0', '::1/128', '2001:db8::/32', "
        "'::ffff:1.2.3.0/120']) v) s",
    ),
    (
        "interval",
        "interval_send",
        "SELECT make_interval(months => (random() * 4000 - 2000)::int * "
        "(random() < 0.6)::int, days => (random() * 800 - 400)::int * (random() < 0.6)::int,"
        " secs => (random() * 4e6 - 2e6)::numeric(14, 6) * (random() < 0.7)::int) AS v "
        "FROM generate_series(1, 1000) UNION ALL SELECT v::interval FROM unnest(ARRAY["
        "'0', '1 mon', '-1 mon', '1 year -1 mon', '-1 year 1 mon', '1 day -1 sec', "
        "'-1 day 1 sec', '1 year 1 day', '0.000001 sec', '-0.5 sec', '100000 hours', "
        "'-1 year -2 mons -3 days -04:05:06.789', '1 mon -1 day +1 sec', "
        "'178000000 years', '-178000000 years', '1 day 00:00:00.1']) v",
    ),
    (
        "macaddr",
        "macaddr_send",
        "SELECT substr(md5(g::text), 1, 12)::macaddr AS v FROM generate_series(1, 200) g",
    ),
    (
        "macaddr8",
        "macaddr8_send",
        "SELECT substr(md5(g::text), 1, 16)::macaddr8 AS v FROM generate_series(1, 200) g",
    ),
    (
        "varbit",
        "varbit_send",
        "SELECT substr(repeat(((random() * 2147483647)::int)::bit(32)::text, 3), 1, "
        "(random() * 90)::int)::varbit AS v FROM generate_series(1, 300) "
        "UNION ALL SELECT ''::varbit",
    ),
    ("bit", "bit_send", "SELECT (g::bit(12)) AS v FROM generate_series(0, 300) g"),
    (
        "pg_lsn",
        "pg_lsn_send",
        "SELECT (to_hex((random() * 4e9)::bigint) || '/' || to_hex((random() * 4e9)::bigint))"
        "::pg_lsn AS v FROM generate_series(1, 200) UNION ALL SELECT '0/0'::pg_lsn "
        "UNION ALL SELECT 'FFFFFFFF/FFFFFFFF'::pg_lsn",
    ),
]


@pytest.mark.parametrize(("name", "send", "values"), _CASES, ids=[c[0] for c in _CASES])
def test_each_writer_prints_what_postgresql_prints(
    pg_conn: Conn, name: str, send: str, values: str
) -> None:
    pg_conn.execute("SELECT setseed(0.42)")
    # format() prints with the type's output function (inet's ::text cast keeps a /32)
    rows = pg_conn.execute(f"SELECT format('%s', v), {send}(v) FROM ({values}) s").fetchall()
    assert len(rows) > 100 or name in ("cidr",)
    write = bintext.writer(name.split()[0])
    assert write is not None
    wrong = [(text, bytes(raw).hex()) for text, raw in rows if write(bytes(raw)) != text]
    assert wrong == []


@pytest.mark.parametrize(
    ("name", "data"),
    [("inet", b"\x02\x20\x00"), ("inet", b"\x07\x20\x00\x04\x01\x02\x03\x04"),
     ("inet", b"\x02\x21\x00\x04\x01\x02\x03\x04"), ("macaddr", b"\x01" * 7),
     ("varbit", b"\x00\x00\x00\x09\x01"), ("pg_lsn", b"\x00"), ("interval", b"\x00" * 15)],
)  # fmt: skip
def test_bytes_a_type_never_sends_are_refused(name: str, data: bytes) -> None:
    write = bintext.writer(name)
    assert write is not None
    with pytest.raises(ValueError):
        write(data)


@pytest.mark.parametrize("target", ["sqlite", "postgresql"])
def test_a_binary_stream_lands_these_types_as_a_text_stream_does(
    pg: PostgresServer, pg_conn: Conn, tmp_path: Path, target: str
) -> None:
    """``replicate --binary`` stores inet, cidr, interval, macaddr and bit strings as the
    text PostgreSQL prints, value for value what a text stream stores (it kept ``\\x`` and
    the hex of the bytes before)."""
    slot = f"bintext_{target}"
    zoo_changes(pg_conn, slot)
    end = last_commit_end(pg_conn, slot, "types_pub")
    typnames: dict[str, str] = dict(
        pg_conn.execute(
            "SELECT a.attname, t.typname FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid"
            " WHERE a.attrelid = 'all_types'::regclass AND a.attnum > 0"
        ).fetchall()
    )
    written = {name for name, typ in typnames.items() if bintext.writer(typ) is not None}
    assert {"c_inet", "c_cidr", "c_interval", "c_macaddr", "c_bit"} <= written
    options = StreamOptions(slot=slot, publications=("types_pub",), no_ack=True)
    urls = {}
    for binary in (False, True):
        if target == "sqlite":
            urls[binary] = f"sqlite:///{tmp_path}/{binary}.db"
        else:
            pg_conn.execute(f"CREATE DATABASE bintext_{int(binary)}")
            url = pg_url(pg.dsn, f"bintext_{int(binary)}")
            urls[binary] = url.render_as_string(hide_password=False)
        run_replicate(pg.dsn, urls[binary], replace(options, binary=binary),
                      snapshot="never", until=end)  # fmt: skip
    names = [name for name, _ in _declared(urls[False])]
    as_text, as_binary = _rows(urls[False]), _rows(urls[True])
    assert len(as_text) == len(as_binary) == 2
    for a, b in zip(as_text, as_binary, strict=True):
        for name in written:
            i = names.index(name)
            assert a[i] == b[i], (name, a[i], b[i])
            assert a[i] is None or not str(a[i]).startswith("\\x")
