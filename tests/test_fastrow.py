"""The C walks over TupleData (``_fastrow``) against their pure-Python twins, on any bytes."""

from __future__ import annotations

import contextlib
import os
import struct
from collections.abc import Callable, Iterator, Sequence

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from psycopg._copy_base import format_row_text
from psycopg.adapt import Transformer

from pglogrepl_bridge.errors import DecodeError
from pglogrepl_bridge.pgoutput import _accel as accel
from pglogrepl_bridge.pgoutput import assembly
from pglogrepl_bridge.pgoutput.assembly import TransactionAssembler
from pglogrepl_bridge.pgoutput.decoder import PgOutputDecoder, _Bad, parse_tuple
from pglogrepl_bridge.pgoutput.messages import Column, Relation
from pglogrepl_bridge.pgoutput.relcache import RelationCache, row_key
from pglogrepl_bridge.pgoutput.transaction import RowChange
from pglogrepl_bridge.render import textjson
from pglogrepl_bridge.render._jsoncompile import (
    ColumnRender,
    compile_json_row,
    compile_json_row_python,
    compile_json_rows,
)
from pglogrepl_bridge.render.jsonl import _edited

needs_c = pytest.mark.skipif(accel.typed_row is None, reason="the C accelerator is not built")


def test_the_accelerator_is_built_in_ci() -> None:
    """CI must exercise the C paths, not quietly fall back to Python everywhere."""
    if not os.environ.get("CI"):
        pytest.skip("only CI insists on the C accelerator")
    assert accel.typed_row is not None and accel.json_row is not None


def _text_render(data: bytes) -> str:
    if data.startswith(b"!"):
        raise ValueError("a renderer that fails: the walk steps aside")
    return "<" + data.hex() + ">"


def _binary_render(data: bytes) -> str:
    return str(len(data))


_value = st.one_of(
    st.text(max_size=6).map(str.encode),  # quotes, backslashes, controls, non-ASCII
    st.binary(max_size=6),  # and bytes that are not UTF-8
    st.sampled_from([b"12", b"-7", b"!x", b'"', b"\\", b"\x00", b"\xc3\xa9", b"\xc3"]),
)


@st.composite
def _tuple_bytes(draw: st.DrawFn) -> tuple[int, bytes]:
    """A TupleData of mostly valid columns, with some garbage kinds, bad lengths and cuts."""
    ncols = draw(st.integers(0, 6))
    out = bytearray(struct.pack("!H", ncols + draw(st.sampled_from([0, 0, 0, 0, 1, -1])) & 0xFFFF))
    for _ in range(ncols):
        kind = draw(st.sampled_from(b"ttttttnbbbu?"))
        out.append(kind)
        if kind in b"tb":
            value = draw(_value)
            size = len(value) + draw(st.sampled_from([0] * 12 + [1, 1000, 2**31]))
            out += struct.pack("!I", size) + value
    cut = draw(st.one_of(st.none(), st.none(), st.none(), st.integers(0, len(out))))
    tail = draw(st.sampled_from([b"", b"t", b"\x00\x00\x00\x01x"]))
    return ncols, bytes(out[:cut] if cut is not None else out) + tail


_EDGES = [
    (2, b"\x00\x02t\x00\x00\x00\x04a\x1f\\bt\x00\x00\x00\x02!x"),  # escapes; a failing call
    (2, b'\x00\x02t\x00\x00\x00\x04a\x1f\\"t\x00\x00\x00\x02\xc3\xa9'),  # UTF-8 as is
    (1, b"\x00\x01t\x00\x00\x00\x01\xc3"),  # not UTF-8
    (2, b"\x00\x02t\x00\x00\x00\x01\xc3t\x00\x00\x00\x01\xa9"),  # split é: still not UTF-8
    (1, b"\x00\x01t\x00\x00\x00\x03ab"),  # the length overshoots by one byte
    (1, b"\x00\x01t\x00\x00\x00"),  # cut inside the length
    (2, b"\x00\x02t\x00\x00\x00\x01au"),  # unchanged TOAST
    (1, b"\x00\x01b\x00\x00\x00\x00"),  # an empty binary value
    (1, b"\x00\x01t\x00\x00\x00\x07\x08\x0c\n\r\t\x7f\x00"),  # short escapes, DEL, NUL
]


def _edges(test: Callable[..., None]) -> Callable[..., None]:
    for case in _EDGES:
        test = example(case, None)(test)
    return test


@needs_c
@settings(max_examples=400)
@given(_tuple_bytes(), st.data())
@_edges
def test_json_row_equals_the_python_walk(case: tuple[int, bytes], data: st.DataObject) -> None:
    ncols, buf = case
    assert accel.json_row is not None
    modes = [(True, False), (False, False), (False, True)]  # quote, call, raw
    columns = []
    for i in range(ncols):
        quote, raw = modes[i % 3] if data is None else data.draw(st.sampled_from(modes))
        included = True if data is None else data.draw(st.booleans())
        key = f'"c{i}\\"":'
        columns.append(
            ColumnRender(key, _text_render, _binary_render, quote, raw, included=included)
        )
    python = compile_json_row_python(columns)
    c, c_utf8 = compile_json_rows(columns)  # the C walk, where built (needs_c)
    assert type(c) is not type(python)
    for pos in (0, 1):
        text = python(buf, pos)
        assert c(buf, pos) == text
        assert c_utf8(buf, pos) == (None if text is None else text.encode())


def _as_text(values: Sequence[bytes | None]) -> tuple[object, ...]:
    return tuple(("text", v) for v in values)


def _as_binary(values: Sequence[bytes | None]) -> tuple[object, ...]:
    return tuple(("binary", v) for v in values)


def _one_too_many(values: Sequence[bytes | None]) -> tuple[object, ...]:
    return (*values, None)


@needs_c
@settings(max_examples=400)
@given(_tuple_bytes(), st.integers(0, 2))
@example(_EDGES[4], 0)
@example(_EDGES[5], 0)
@example(_EDGES[6], 0)
def test_typed_row_equals_the_parser(case: tuple[int, bytes], pos: int) -> None:
    ncols, buf = case
    assert accel.typed_row is not None
    names = dict.fromkeys(f"c{i}" for i in range(ncols))
    assert accel.typed_row(names, _one_too_many, _one_too_many, buf, pos) is None
    got = accel.typed_row(names, _as_text, _as_binary, buf, pos)
    assert names == dict.fromkeys(names)  # the template is copied, never filled in
    try:
        tup, _ = parse_tuple(buf, pos)
    except _Bad:
        assert got is None
        return
    kinds = set(tup.kinds)
    if len(tup.kinds) != ncols or b"u"[0] in kinds or {b"t"[0], b"b"[0]} <= kinds:
        assert got is None  # wrong count, unchanged TOAST, or text and binary mixed
        return
    fmt = "binary" if b"b"[0] in kinds else "text"
    assert got == {name: (fmt, v) for name, v in zip(names, tup.values, strict=True)}


@needs_c
def test_c_walks_reject_bad_arguments() -> None:
    assert accel.json_row is not None and accel.typed_row is not None
    with pytest.raises(ValueError, match="bad column plan"):
        accel.json_row([('"a":', 9, None, _binary_render)])
    with pytest.raises(TypeError):
        accel.json_row([('"a":', 2, None, _binary_render, 1)])  # type: ignore[list-item]
    one = {"a": None}
    assert accel.typed_row(one, _as_text, _as_binary, b"\x00\x01n", -1) is None
    with pytest.raises(TypeError, match="template"):
        accel.typed_row(("a",), _as_text, _as_binary, b"\x00\x01n", 0)  # type: ignore[arg-type]

    def bad_value(values: Sequence[bytes | None]) -> tuple[object, ...]:
        raise ValueError("not a number")

    assert accel.typed_row(one, bad_value, bad_value, b"\x00\x01n", 0) is None
    row = accel.json_row([('"a":', accel.CALL, _text_render, _binary_render)])

    def interrupted(data: bytes) -> str:
        raise KeyboardInterrupt

    with pytest.raises(TypeError, match="once"):
        row.__init__([])  # type: ignore[misc,call-arg,unused-ignore]
    stops = accel.json_row([('"a":', accel.CALL, interrupted, _binary_render)])
    buf = b"\x00\x01t\x00\x00\x00\x02ok"
    assert row(buf, 0) == '{"a":<6f6b>}'
    with pytest.raises(KeyboardInterrupt):  # only Exception makes the walk step aside
        stops(buf, 0)


def _relations() -> RelationCache:
    cache = RelationCache()
    cols = (Column("id", 23, -1, True), Column("v", 25, -1, False))
    cache.add_relation(Relation(None, 7, "public", "t", "d", cols))
    return cache


@st.composite
def _row_message(draw: st.DrawFn) -> bytes:
    """Insert/Update/Delete messages, mostly well formed, some with wrong markers, unknown
    relations, bad old tuples or cuts."""
    tag = draw(st.sampled_from(b"IUDIUDX"))
    relid = draw(st.sampled_from([7, 7, 7, 8]))
    out = bytearray([tag]) + struct.pack("!I", relid)
    marker = draw(st.sampled_from(b"NNKOKOZ"))
    out.append(marker)
    out += draw(_tuple_bytes())[1]
    if draw(st.booleans()):
        out.append(draw(st.sampled_from(b"NNNZ")))
        out += draw(_tuple_bytes())[1]
    cut = draw(st.one_of(st.none(), st.none(), st.integers(1, len(out))))  # feed drops b""
    return bytes(out[:cut] if cut is not None else out)


@contextlib.contextmanager
def _python_rows() -> Iterator[None]:
    saved, assembly._make_row = assembly._make_row, None
    try:
        yield
    finally:
        assembly._make_row = saved


@needs_c
@settings(max_examples=500)
@given(_row_message())
@example(b"U\x00\x00\x00\x07K\x00\x01t\x00\x00\x00\x011N\x00\x01n")
@example(b"D\x00\x00\x00\x07O\x00\x01t\x00\x00\x00\x011")
@example(b"I\x00\x00\x00\x08N\x00\x00")
def test_row_change_equals_the_python_path(payload: bytes) -> None:
    asm = TransactionAssembler(_relations())
    maker = accel.row_change_maker(RowChange)
    assert maker is not None
    fast = maker(asm.relations.by_id, payload, 1)
    try:
        with _python_rows():  # _row tries the C maker first: compare against the Python code
            slow = asm._row(payload, 1, 0, PgOutputDecoder())
    except DecodeError:
        assert fast is None
        return
    # well formed: the C side must have made it, field for field the same
    assert fast == slow and type(fast) is RowChange
    assert (fast.op, fast.new_at, fast.old_at, fast.old_kind) == (
        slow.op,
        slow.new_at,
        slow.old_at,
        slow.old_kind,
    )
    assert fast.relation is slow.relation and fast.raw is payload


@needs_c
def test_row_change_binds_only_object_slots() -> None:
    assert accel.row_change_maker(RowChange) is not None

    class Plain:  # the same names, but class attributes, not slots
        op = relation = raw = new_at = old_at = old_kind = None

    with pytest.raises(TypeError, match="not an object slot"):
        accel.row_change_maker(Plain)
    assert accel.row_change_maker(RowChange) is not None  # bound back for the other tests


@needs_c
@settings(max_examples=500)
@given(_row_message(), st.sampled_from([b"w", b"w", b"w", b"k"]), st.integers(0, 3))
@example(b"I\x00\x00\x00\x07N\x00\x02t\x00\x00\x00\x011n", b"w", 0)
def test_put_row_equals_the_python_path(payload: bytes, kind: bytes, cut: int) -> None:
    """put_row on a whole CopyData message (a memoryview, as psycopg gives it) appends what
    feed would, or declines and leaves the message to feed."""
    header = kind + struct.pack("!QQq", 1, 2, 3)
    message = memoryview(header[: len(header) - cut] + payload)
    asm = TransactionAssembler(_relations())
    rows: list[object] = ["before"]
    put_row = accel.row_putter(RowChange)  # what ReplicationSession.receive calls first
    assert put_row is not None
    taken = put_row(asm.relations.by_id, rows, message)
    if kind != b"w" or cut:
        assert not taken and rows == ["before"]
        return
    try:
        with _python_rows():
            slow = asm._row(payload, 1, 0, PgOutputDecoder())
    except DecodeError:
        assert not taken and rows == ["before"]
        return
    assert taken and rows[0] == "before" and len(rows) == 2
    fast = rows[1]
    assert type(fast) is RowChange and fast == slow
    assert (fast.op, fast.new_at, fast.old_at, fast.old_kind) == (
        slow.op,
        slow.new_at,
        slow.old_at,
        slow.old_kind,
    )
    assert fast.raw == payload and type(fast.raw) is bytes


def test_open_changes_only_inside_a_plain_transaction() -> None:
    """Where the stream may put rows directly: the open transaction's list, and nowhere else."""
    asm = TransactionAssembler(_relations())
    assert asm.open_changes is None
    asm.feed(b"B" + struct.pack("!QqI", 100, 0, 9), 1)
    rows = asm.open_changes
    assert rows is not None and rows == []
    asm.feed(b"I\x00\x00\x00\x07N\x00\x02t\x00\x00\x00\x011n", 2)
    assert len(rows) == 1 and asm.open_changes is rows
    txn = asm.feed(b"C\x00" + struct.pack("!QQq", 100, 120, 0), 3)
    assert txn is not None and asm.open_changes is None
    asm.feed(b"S" + struct.pack("!IB", 11, 1), 4)  # Stream Start: rows go to the stream
    assert asm.open_changes is None


_NATIVE = [
    (accel.DATE, textjson.date),
    (accel.TIME, textjson.time),
    (accel.TIMESTAMP, textjson.timestamp),
    (accel.TIMESTAMPTZ, textjson.timestamptz),
]


def _loaded_marker(data: bytes) -> str:
    return '"loaded ' + bytes(data).hex() + '"'


@st.composite
def _temporal_text(draw: st.DrawFn) -> bytes:
    """What PostgreSQL prints for dates, times and timestamps (fractions of 0 to 6 digits,
    ``+00``), those cut or bent, and any text of their characters."""
    clock = draw(st.sampled_from(["00", "09", "19", "23", "24", "29", "3x"])) + ":59:07"
    clock += draw(st.sampled_from(["", ".", ".5", ".123", ".123456", ".1234567"]))
    day = draw(st.sampled_from(["2026-01-31", "0001-12-01", "2026/01/31", "12345-01-01"]))
    shapes = [day, clock, f"{day} {clock}", f"{day} {clock}+00", f"{day} {clock}+02"]
    made = draw(st.sampled_from([*shapes, f"{day}T{clock}"]))
    text = draw(
        st.one_of(
            st.just(made),
            st.just(made[: draw(st.integers(0, len(made)))]),
            st.text(alphabet=st.sampled_from("0123456789-: .+Té"), max_size=30),
        )
    )
    return text.encode()


@needs_c
@settings(max_examples=400)
@given(st.sampled_from(_NATIVE), st.lists(st.none() | _temporal_text(), min_size=1, max_size=4))
def test_the_temporal_edits_written_in_c_equal_the_python_ones(
    native: tuple[int, Callable[[str], str]], values: list[bytes | None]
) -> None:
    """The C walk's own temporal modes give what the Python edit gives, and take the text
    renderer (edit, else loader) for every text the edit's shape does not match."""
    mode, edit = native
    buf = struct.pack("!H", len(values)) + b"".join(
        b"n" if v is None else b"t" + struct.pack("!I", len(v)) + v for v in values
    )
    text = _edited(edit, _loaded_marker)
    columns = [
        ColumnRender(f'"c{i}":', text, _binary_render, edit=mode) for i in range(len(values))
    ]
    assert compile_json_row(columns)(buf, 0) == compile_json_row_python(columns)(buf, 0)


# the modes for jsonl's other renderers: (type oid, what PostgreSQL prints and text around it)
_MODE_TYPES = {
    16: ["t", "f", "", "true", "x"],  # bool
    701: ["0", "-0", "1.5", "1e+300", "-1.5e-07", "NaN", "Infinity", "-Infinity", "01", "1.", ".5"],
    3802: ['{"a": 1}', '{"a": "x\\ny"}', "[]", '"é"', "1", "null"],  # jsonb
    114: ['{"a" :\n 1}', '{"b": 2}\r', " [1, 2] ", '{"é": "\\u0000"}'],  # json, line breaks kept
    1007: ["{1,NULL,-3}", "{{1,2},{3,4}}", "{}", "[0:1]={1,2}", "{NULL}", "{NNULL}"],  # int4[]
    1009: [  # text[]
        "{}",
        "{a,b}",
        '{"a b",NULL,"NULL"}',
        '{"x\\"y","\\\\"}',
        "{é,naïve}",
        "{a,,b}",
        "{,}",
        '{"a"b}',
        "{{a}}",
        "{a\u00a0b}",
        "{a\u2028b}",
        "{\x01\x1f}",
        '{"\x01\t\n"}',
        "{a\x1cb}",
        "{a,b",
        "{NULL,null}",
        '{"é\\\\",x}',
    ],
}


@needs_c
@settings(max_examples=400)
@given(
    st.sampled_from(sorted(_MODE_TYPES)).flatmap(
        lambda oid: st.tuples(
            st.just(oid),
            st.lists(
                st.none()
                | st.sampled_from(_MODE_TYPES[oid]).map(str.encode)
                | st.text(
                    alphabet=st.sampled_from('{}",\\ NULabé01-.e\n\u00a0\u2028\x1c'), max_size=12
                ).map(str.encode)
                | st.binary(max_size=6),
                min_size=1,
                max_size=4,
            ),
        )
    )
)
def test_the_c_modes_of_jsonl_renderers_equal_the_renderers(
    case: tuple[int, list[bytes | None]],
) -> None:
    """Each of the C walk's modes for bool, float8, json, jsonb, int4[] and text[] writes what
    the column's text renderer writes (else calls it), or steps aside on text that is not
    UTF-8, as the quoted mode does."""
    from pglogrepl_bridge.render.jsonl import JsonRenderer

    oid, values = case
    render, mode = JsonRenderer()._text_plan(oid)
    assert mode >= accel.BOOL
    buf = struct.pack("!H", len(values)) + b"".join(
        b"n" if v is None else b"t" + struct.pack("!I", len(v)) + v for v in values
    )
    native = [
        ColumnRender(f'"c{i}":', render, _binary_render, edit=mode) for i in range(len(values))
    ]
    called = [ColumnRender(f'"c{i}":', render, _binary_render) for i in range(len(values))]
    walk, walk_utf8 = compile_json_rows(native)
    ours, theirs = walk(buf, 0), compile_json_row(called)(buf, 0)
    if ours is None:  # stepped aside: only for bytes that are not UTF-8
        with pytest.raises(UnicodeDecodeError):
            b"".join(v for v in values if v is not None).decode()
    else:
        assert ours == theirs
    assert walk_utf8(buf, 0) == (None if ours is None else ours.encode())


@needs_c
@settings(max_examples=600)
@given(
    st.one_of(
        st.text().map(lambda t: t.encode("utf-8", "surrogatepass")),
        st.binary(max_size=12),
        st.lists(
            st.sampled_from(
                [
                    b"a",
                    b"\xc3",
                    b"\xa9",
                    b"\xe0",
                    b"\xa0",
                    b"\x80",
                    b"\xed",
                    b"\x9f",
                    b"\xbf",
                    b"\xf0",
                    b"\x90",
                    b"\xf4",
                    b"\x8f",
                    b"\xf5",
                    b"\xc0",
                    b"\xc2",
                ]
            ),
            max_size=8,
        ).map(b"".join),
    )
)
@example("\ud800".encode("utf-8", "surrogatepass"))  # a surrogate: not UTF-8 for Python
@example(b"\xf4\x90\x80\x80")  # past U+10FFFF
@example(b"\xe0\x80\xaf")  # overlong
def test_the_utf8_walk_takes_exactly_what_python_decodes(value: bytes) -> None:
    """JsonRow.utf8 validates its output itself: the same texts as Python's strict decoder."""
    buf = struct.pack("!H", 1) + b"t" + struct.pack("!I", len(value)) + value
    column = ColumnRender('"c":', _text_render, _binary_render, quote_text=True)
    walk, walk_utf8 = compile_json_rows([column])
    try:
        value.decode()
    except UnicodeDecodeError:
        assert walk_utf8(buf, 0) is None and walk(buf, 0) is None
    else:
        text = walk(buf, 0)
        assert text is not None and walk_utf8(buf, 0) == text.encode()


@needs_c
@settings(max_examples=400)
@given(
    _tuple_bytes(),
    st.one_of(  # mostly ascending indexes, as the sink passes them; sometimes anything
        *[st.sets(st.integers(0, 6), min_size=1, max_size=3).map(sorted)] * 3,
        st.lists(st.integers(-1, 6), max_size=3),
    ),
    st.integers(0, 2),
)
@example(_EDGES[6], [0], 0)  # unchanged TOAST outside the key
@example((2, b"\x00\x02ut\x00\x00\x00\x0212"), [1], 0)  # ... before it
@example(_EDGES[6], [1], 0)  # the key not sent
@example((3, b"\x00\x03t\x00\x00\x00\x011nt\x00\x00\x00\x012"), [0, 2], 0)
@example((3, b"\x00\x03t\x00\x00\x00\x011nt\x00\x00\x00\x012"), [2, 0], 0)  # not ascending
def test_row_key_equals_the_python_twin(case: tuple[int, bytes], keys: list[int], pos: int) -> None:
    """The C ``row_key`` (the SQL sink's reduction reads each row's key with it) answers
    exactly as ``relcache.row_key``, on any bytes and any index tuple."""
    ncols, buf = case
    assert accel.row_key is not None
    indexes = tuple(keys)
    assert accel.row_key(indexes, ncols, buf, pos) == row_key(indexes, ncols, buf, pos)
    try:
        tup, _ = parse_tuple(buf, pos)
    except _Bad:
        return
    got = row_key(indexes, ncols, buf, pos)
    if got is not None:  # the twin itself against the parser
        key, complete = got
        values = [tup.values[i] for i in indexes]
        assert key == (values[0] if len(values) == 1 else tuple(values))
        assert complete == (b"u"[0] not in tup.kinds)


def _psycopg_copy_line(row: list[str | None]) -> bytes:
    """The line ``Copy.write_row`` writes for ``row`` (psycopg's own text formatter)."""
    out = bytearray()
    format_row_text(row, Transformer(), out)
    return bytes(out)


@needs_c
@settings(max_examples=400)
@given(_tuple_bytes(), st.integers(0, 2))
@example((2, b"\x00\x02t\x00\x00\x00\x07a\\b\tc\nnt"), 0)  # escapes; then a cut value
@example((3, b"\x00\x03t\x00\x00\x00\x03\x08\x0b\x0cnt\x00\x00\x00\x02\r\xc3"), 0)
@example((1, b"\x00\x01t\x00\x00\x00\x04\x0b\x0c\x08\r"), 0)
def test_copy_text_is_the_line_psycopg_writes(case: tuple[int, bytes], pos: int) -> None:
    """``_fastrow.copy_text`` (whole inserts into a PostgreSQL target go as COPY text made
    from their bytes) writes the line psycopg's ``Copy.write_row`` writes for the values as
    str, and declines binary values, unchanged TOAST and irregular bytes."""
    ncols, buf = case
    assert accel.copy_text is not None
    got = accel.copy_text(ncols, buf, pos)
    try:
        tup, _ = parse_tuple(buf, pos)
    except _Bad:
        assert got is None
        return
    if len(tup.kinds) != ncols or not ncols or set(tup.kinds) - {b"t"[0], b"n"[0]}:
        assert got is None
        return
    # each byte as one character (latin-1): psycopg escapes characters, the C walk bytes;
    # the escapes are ASCII, so the two lines agree byte for byte, UTF-8 or not
    row = [None if v is None else bytes(v).decode("latin-1") for v in tup.values]
    if any(v is not None and "\x00" in v for v in row):
        assert got is None  # no text value holds a NUL; psycopg refuses one
        return
    assert got == _psycopg_copy_line(row).decode().encode("latin-1")
