"""``jetstream.entries``: a published message reads back into the transaction it came from.

Pure: the recorded pgoutput captures of PostgreSQL 15 and 16 (every change kind, TOAST,
REPLICA IDENTITY FULL, truncates, messages, binary values, custom types) go through the
publisher's encoding (bincode WalEntry + ``Pglb-Relations``) and back through ``EntryReader``;
every change must read the same. Bytes cut short or corrupted are a ProtocolError, nothing else.
"""

from __future__ import annotations

import contextlib
import json
import random
from typing import Any

import pytest

from pglogrepl_bridge.errors import ProtocolError
from pglogrepl_bridge.jetstream.entries import EntryReader
from pglogrepl_bridge.pgoutput.messages import Message
from pglogrepl_bridge.pgoutput.relcache import RelationInfo
from pglogrepl_bridge.pgoutput.transaction import RowChange, Transaction, TruncateChange
from pglogrepl_bridge.wire.payload import BincodeEncoder
from pglogrepl_bridge.wire.payloadread import PayloadRelations, read_payload
from pglogrepl_bridge.wire.protocol import WalEntry, to_bincode
from pglogrepl_bridge.wire.relations import RelationWriter, relations_of

from .test_captures import VERSIONS, replay

CAPTURES = ["basic", "binary", "streaming", "two_phase"]


def _published(txns: list[Transaction]) -> list[tuple[bytes, str]]:
    """What ``publish --payload bincode`` stores: the WalEntry body and the header."""
    enc, header = BincodeEncoder(), RelationWriter()
    return [
        (
            to_bincode(WalEntry(1, t.end_lsn, t.timestamp_us, enc.transaction(t))),
            header(relations_of(t)),
        )
        for t in txns
    ]


def _relation(rel: RelationInfo) -> tuple[Any, ...]:
    return (rel.relid, rel.qualified_name, rel.replica_identity, rel.columns)


def _change(change: Any) -> tuple[Any, ...]:
    if isinstance(change, RowChange):
        return (
            change.op,
            _relation(change.relation),
            change.new,
            change.old,
            change.old_kind,
            change.unchanged_toast,
            change.key,
        )
    if isinstance(change, TruncateChange):
        return (
            "truncate",
            tuple(map(_relation, change.relations)),
            change.cascade,
            change.restart_identity,
        )
    assert isinstance(change, Message)
    return ("message", change.prefix, change.content, change.transactional)


def same_transaction(back: Transaction, txn: Transaction) -> None:
    """A transaction read back is the one sent: its fields, and every change's values."""
    assert (back.xid, back.commit_lsn, back.end_lsn, back.origin) == (
        txn.xid,
        txn.commit_lsn,
        txn.end_lsn,
        txn.origin,
    )
    assert back.commit_timestamp == txn.commit_timestamp
    assert [_change(c) for c in back.changes] == [_change(c) for c in txn.changes]


def _transactions(version: int, name: str) -> list[Transaction]:
    events, _ = replay(version, name)
    return [e for e in events if isinstance(e, Transaction) and e.changes]


@pytest.mark.parametrize("name", CAPTURES)
@pytest.mark.parametrize("version", VERSIONS)
def test_every_transaction_reads_back_as_it_was_published(version: int, name: str) -> None:
    txns = _transactions(version, name)
    assert txns
    reader = EntryReader()
    for txn, (body, header) in zip(txns, _published(txns), strict=True):
        same_transaction(reader.transaction(body, header), txn)


def test_one_relation_object_per_description() -> None:
    """A sink prepares a target per RelationInfo: messages of one relation share it."""
    txns = _transactions(16, "basic")
    reader = EntryReader()
    seen: dict[str, set[int]] = {}
    for body, header in _published(txns):
        for change in reader.transaction(body, header).changes:
            if isinstance(change, RowChange):
                seen.setdefault(change.relation.qualified_name, set()).add(id(change.relation))
    assert seen and all(len(ids) == 1 for ids in seen.values())


def test_the_header_describes_what_the_payload_cannot() -> None:
    """Type modifiers, replica identity and truncated-only relations are in the header."""
    txns = _transactions(16, "basic")
    header = RelationWriter()
    docs = [json.loads(header(relations_of(t))) for t in txns]
    identities = {doc[2]: doc[3] for d in docs for doc in d}
    assert identities["full_ident"] == "f" and identities["items"] == "d"
    truncate = next(t for t in txns if any(isinstance(c, TruncateChange) for c in t.changes))
    names = [doc[2] for doc in json.loads(header(relations_of(truncate)))]
    assert names == ["items", "full_ident"]
    assert all(ord(ch) < 128 for d in docs for ch in json.dumps(d))


@pytest.mark.parametrize("version", VERSIONS)
def test_bytes_cut_short_or_flipped_are_a_decode_error(version: int) -> None:
    rng = random.Random(version)
    published = _published(_transactions(version, "basic"))
    for body, header in published:
        for cut in range(0, len(body), max(1, len(body) // 40)):
            with pytest.raises(ProtocolError):
                EntryReader().transaction(body[:cut], header)
        for _ in range(30):
            flipped = bytearray(body)
            at = rng.randrange(len(flipped))
            flipped[at] ^= 1 << rng.randrange(8)
            # a ProtocolError, or it still reads: a flipped value byte is another value
            with contextlib.suppress(ProtocolError):
                EntryReader().transaction(bytes(flipped), header)
    body, header = published[0]
    with pytest.raises(ProtocolError, match="Pglb-Relations"):
        EntryReader().transaction(body, None)
    with pytest.raises(ProtocolError, match="malformed Pglb-Relations"):
        EntryReader().transaction(body, "[[1, 2]]")
    with pytest.raises(ProtocolError, match="header describes 0"):
        EntryReader().transaction(body, "[]")
    with pytest.raises(ProtocolError, match="not a bincode WalEntry"):
        EntryReader().transaction(b'{"xid": 1}', header)


@pytest.mark.parametrize("name", CAPTURES)
@pytest.mark.parametrize("version", VERSIONS)
def test_a_payload_reads_back_from_its_own_definitions(version: int, name: str) -> None:
    """Without ``Pglb-Relations`` (a replica fed over TCP): the same rows, keys and values;
    only what the payload has no room for is lost (type modifiers, relation ids)."""
    txns = _transactions(version, name)
    enc, own = BincodeEncoder(), PayloadRelations()
    for txn in txns:
        back = read_payload(enc.transaction(txn), own)
        assert (back.xid, back.end_lsn, back.commit_timestamp) == (
            txn.xid,
            txn.end_lsn,
            txn.commit_timestamp,
        )
        for a, b in zip(back.changes, txn.changes, strict=True):
            if isinstance(b, RowChange):
                assert isinstance(a, RowChange)
                assert (a.op, a.relation.qualified_name, a.relation.names) == (
                    b.op,
                    b.relation.qualified_name,
                    b.relation.names,
                )
                assert (a.new, a.old, a.key, a.unchanged_toast) == (
                    b.new,
                    b.old,
                    b.key,
                    b.unchanged_toast,
                )
                full = b.relation.replica_identity == "f"
                assert (a.relation.replica_identity == "f") == full
            elif isinstance(b, TruncateChange):
                assert isinstance(a, TruncateChange)
                assert [r.qualified_name for r in a.relations] == [
                    r.qualified_name for r in b.relations
                ]
            else:
                assert _change(a) == _change(b)
