"""Stream messages back into Transactions, for consumers that apply them; pure.

Rules (``publisher`` writes what ``EntryReader`` reads; ``docs/nats.md`` has them for others):

5. Every message carries the header ``Pglb-Relations``: the relations its transaction
   touches, as ``wire.relations`` describes them (compact JSON; the order of the bincode
   payload's ``relations`` first, then relations only truncated). The bincode payload has no
   room for modifiers, replica identity or custom type names, and its Rust definitions are
   fixed; the header adds them without changing the payload.
6. A consumer rebuilds a transaction from the bincode body and that header alone, into the
   objects the stream's own decoder makes: RowChange with the TupleData bytes untouched (the
   old row is 'O' under REPLICA IDENTITY FULL, else the key, 'K'), TruncateChange and
   Message (whose LSN is the transaction's commit LSN: the payload does not carry its own).
   So the SQL sink applies a message exactly as ``replicate`` applies the transaction.
"""

from __future__ import annotations

from pglogrepl_bridge.errors import ProtocolError
from pglogrepl_bridge.pgoutput.relcache import RelationInfo
from pglogrepl_bridge.pgoutput.transaction import Transaction
from pglogrepl_bridge.pgoutput.values import ValueLoaders
from pglogrepl_bridge.wire.payloadread import read_payload
from pglogrepl_bridge.wire.protocol import WalEntry, from_bincode
from pglogrepl_bridge.wire.relations import RelationReader


class EntryReader:
    """Rule 6: message bodies and ``Pglb-Relations`` headers → Transactions."""

    def __init__(self, loaders: ValueLoaders | None = None) -> None:
        self._relations = RelationReader(loaders)

    def relations(self, header: str) -> tuple[RelationInfo, ...]:
        """The relations a ``Pglb-Relations`` value describes."""
        return self._relations.read(header)

    def transaction(self, body: bytes, header: str | None) -> Transaction:
        """The transaction in a ``--payload bincode`` message (a bincode WalEntry)."""
        if header is None:
            raise ProtocolError(
                "a message without the Pglb-Relations header: it was not published by "
                "pglogrepl-bridge publish (of this version)"
            )
        try:
            entry = from_bincode(body)
        except Exception as exc:
            raise ProtocolError(
                f"the message body is not a bincode WalEntry ({exc}): was the stream "
                "published with --payload bincode?"
            ) from None
        if not isinstance(entry, WalEntry):
            raise ProtocolError(f"the message holds a {type(entry).__name__}, not a WalEntry")
        txn = read_payload(entry.data, self.relations(header))
        if txn.end_lsn != entry.lsn:
            raise ProtocolError(
                f"the WalEntry's lsn {entry.lsn} is not its transaction's end LSN "
                f"{int(txn.end_lsn)}"
            )
        return txn
