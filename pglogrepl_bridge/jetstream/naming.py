"""What goes into the stream, pure: subjects, message ids, headers, and the resume rule.

Rules (the publisher follows them; ``docs/nats.md`` explains them to consumers):

1. One message per transaction that has changes, on subject ``<prefix>.txn``; the body is
   the transaction as the bridge's WalEntry carries it: the JSON line (``--payload json``,
   the shape of ``tail --format jsonl``) or the bincode ``ReplicationMessage::WalEntry``
   (``--payload bincode``, without the TCP protocol's u32 length frame).
2. ``Nats-Msg-Id`` is ``<system id>:<slot>:<end LSN, 16 hex digits>:<index>`` (index 0: the
   one message of the transaction), so a re-publish within the stream's duplicate window is
   dropped by JetStream.
3. Messages are published in commit order, up to ``--max-pending`` awaiting JetStream's
   acknowledgement. Each carries ``Nats-Expected-Last-Sequence``, the stream's sequence
   after the message before it, so JetStream stores it only right after that one: a message
   lost on the way (a timeout, a connection dropped with it) cannot be overtaken by the
   next. The stream therefore holds, for a (system, slot), a gapless prefix of the
   transactions in commit order, and the slot is confirmed to the end LSN of the last message
   acknowledged together with all before it. (The guard needs the stream to be ours alone:
   when its last message is another publisher's, messages go one at a time instead, each
   after the previous one was acknowledged.) After a failure, what the stream holds is
   read (rule 4) and the rest published again, one at a time, before the pipeline resumes.
   Each message names the end LSN of the slot's previous message in the stream
   (``Pglb-Prev-Lsn``); the first names the slot's confirmed position
   when publishing began (the stream holds every transaction after it). A chain: a consumer
   tells a transaction it was not delivered yet (a gap) from one that never existed, and
   whether the stream holds everything after a given position.
4. On start, and after any failed publish, the last message on ``<prefix>.txn`` says where
   the stream stands (headers ``Pglb-System-Id``, ``Pglb-Slot``, ``Pglb-Lsn``): transactions
   ending at or before its LSN are already stored and are skipped (and confirmed), however
   long ago that was, so a restart outside the duplicate window does not store them twice.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from pglogrepl_bridge.errors import ConfigError
from pglogrepl_bridge.lsn import Lsn, format_lsn
from pglogrepl_bridge.pgoutput.transaction import Transaction

#: header names (NATS headers are case-sensitive strings)
MSG_ID = "Nats-Msg-Id"
SYSTEM_ID = "Pglb-System-Id"
SLOT = "Pglb-Slot"
LSN = "Pglb-Lsn"
XID = "Pglb-Xid"
COMMIT_TIME = "Pglb-Commit-Time"
COMMIT_TIME_US = "Pglb-Commit-Time-Us"
ORIGIN = "Pglb-Origin"
CHANGES = "Pglb-Changes"
PAYLOAD = "Pglb-Payload"
RELATIONS = "Pglb-Relations"  # rule 5 (``entries``)
PREV_LSN = "Pglb-Prev-Lsn"  # rule 3
PUBLICATIONS = "Pglb-Publications"  # JSON list: what the slot streams (a snapshot copies)


def txn_subject(prefix: str) -> str:
    """Rule 1: the subject of transaction messages."""
    return f"{prefix}.txn"


def stream_subjects(prefix: str) -> list[str]:
    """The subjects a stream created by ``publish`` takes."""
    return [f"{prefix}.>"]


def publications_header(publications: Sequence[str]) -> str:
    """The ``Pglb-Publications`` value: a compact JSON list (names may hold any character)."""
    return json.dumps(list(publications), separators=(",", ":"))


def publications_of(found: Mapping[str, str]) -> tuple[str, ...] | None:
    """The publications a message says its slot streams (None: not said, or malformed)."""
    try:
        names = json.loads(found[PUBLICATIONS])
    except (KeyError, ValueError):
        return None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        return None
    return tuple(names)


def check_prefix(prefix: str) -> str:
    """A subject prefix is one or more NATS tokens: no spaces or wildcards, no empty token."""
    tokens = prefix.split(".")
    if not prefix or any(not t or any(c in t for c in " \t*>") for t in tokens):
        raise ConfigError(
            f"--subject-prefix {prefix!r}: use dot-separated tokens without spaces or "
            "wildcards, e.g. cdc or cdc.orders_db"
        )
    return prefix


def covers(patterns: list[str], subject: str) -> bool:
    """Whether one of a stream's subject patterns matches ``subject`` (``*`` one token,
    ``>`` the rest)."""
    want = subject.split(".")
    for pattern in patterns:
        have = pattern.split(".")
        for i, token in enumerate(have):
            if token == ">":
                if len(want) > i:
                    return True
                break
            if i >= len(want) or (token != "*" and token != want[i]):
                break
        else:
            if len(have) == len(want):
                return True
    return False


def msg_id(system_id: str, slot: str, end_lsn: int, index: int = 0) -> str:
    """Rule 2: the de-duplication id of a transaction's message."""
    return f"{system_id}:{slot}:{end_lsn:016X}:{index}"


def headers(
    txn: Transaction,
    system_id: str,
    slot: str,
    payload: str,
    relations: str,
    previous: Lsn,
    publications: str,
) -> dict[str, str]:
    """The message's headers: its id (rule 2), where it comes from and what it is, the
    message before it (rule 3) and the relations it touches (``relations``: rule 5's value)."""
    out = {
        MSG_ID: msg_id(system_id, slot, int(txn.end_lsn)),
        SYSTEM_ID: system_id,
        SLOT: slot,
        LSN: format_lsn(txn.end_lsn),
        PREV_LSN: format_lsn(previous),
        XID: str(txn.xid),
        COMMIT_TIME: txn.commit_time.isoformat(),
        COMMIT_TIME_US: str(txn.timestamp_us),
        CHANGES: str(len(txn.changes)),
        PAYLOAD: payload,
        RELATIONS: relations,
        PUBLICATIONS: publications,
    }
    if txn.origin:
        out[ORIGIN] = txn.origin
    return out


@dataclass(frozen=True, slots=True)
class StoredPosition:
    """Rule 4: what the last message of the stream says."""

    system_id: str
    slot: str
    lsn: Lsn


def stored_position(found: Mapping[str, str] | None) -> StoredPosition | None:
    """The position in a message's headers; None when they are not ours (no such headers)."""
    if not found or LSN not in found or SYSTEM_ID not in found or SLOT not in found:
        return None
    try:
        return StoredPosition(found[SYSTEM_ID], found[SLOT], Lsn.parse(found[LSN]))
    except ConfigError:
        return None


def resume_after(
    position: StoredPosition | None, system_id: str, slot: str, stream: str
) -> Lsn | None:
    """Rule 4: the LSN up to which the stream holds our transactions (None: nothing yet).
    Messages of another source or slot on our subject are refused: two publishers would
    interleave there."""
    if position is None:
        return None
    if (position.system_id, position.slot) != (system_id, slot):
        raise ConfigError(
            f"stream {stream} already holds transactions of another source on this subject "
            f"(system {position.system_id}, slot {position.slot}): use another --stream or "
            "--subject-prefix for this slot"
        )
    return position.lsn
