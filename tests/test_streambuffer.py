"""The streamed-transaction buffer behaves like a plain list, spilled or not."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from pglogrepl_bridge.pgoutput.streambuffer import StreamBuffer

ops = st.lists(
    st.one_of(
        st.tuples(st.just("append"), st.integers(1, 5), st.binary(max_size=50)),
        st.tuples(st.just("abort"), st.integers(1, 5), st.just(b"")),
    ),
    max_size=60,
)


@settings(max_examples=300)
@given(ops, st.sampled_from([0, 100, 1 << 30]))
def test_matches_list_model(operations: list[tuple[str, int, bytes]], spill: int) -> None:
    buf = StreamBuffer(spill_bytes=spill)
    model: list[tuple[int, int, bytes]] = []  # subxid, lsn, payload
    for n, (op, subxid, payload) in enumerate(operations):
        if op == "append":
            buf.append(subxid, n, payload)
            model.append((subxid, n, payload))
        else:
            first = next((i for i, m in enumerate(model) if m[0] == subxid), None)
            if first is not None:
                del model[first:]
            buf.abort_subxact(subxid)
        assert buf.count == len(model)
    assert list(buf) == [(lsn, p) for _, lsn, p in model]
    buf.close()


def test_spills_to_a_file_past_the_threshold() -> None:
    buf = StreamBuffer(spill_bytes=1000)
    for i in range(100):
        buf.append(1, i, b"x" * 100)
    assert buf.spilled
    assert [lsn for lsn, _ in buf] == list(range(100))
    buf.close()
