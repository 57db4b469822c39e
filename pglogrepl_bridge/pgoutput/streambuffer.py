"""The raw messages of one streamed (in-progress) transaction, bounded in memory.

Messages are kept as the bytes the server sent and decoded only at Stream Commit, the way
PostgreSQL's own apply worker does: that keeps Relation messages of the streamed transaction
out of the shared cache until it commits. Past ``spill_bytes`` they go to a temporary file.
A subtransaction abort truncates at that subtransaction's first message: later messages
belong to it or to its children, which the abort also discards.
"""

from __future__ import annotations

import struct
import tempfile
from collections.abc import Iterator
from typing import IO

_RECORD = struct.Struct("!QI")  # lsn, payload length

DEFAULT_SPILL_BYTES = 16 * 1024 * 1024


class StreamBuffer:
    """Messages are numbered in arrival order; truncation cuts at a message number."""

    __slots__ = (
        "_file",
        "_first",
        "_mem_base",
        "_memory",
        "_memory_bytes",
        "_meta",
        "_offsets",
        "count",
        "spill_bytes",
    )

    def __init__(self, spill_bytes: int = DEFAULT_SPILL_BYTES) -> None:
        self.spill_bytes = spill_bytes
        self._memory: list[tuple[int, bytes]] = []
        self._memory_bytes = 0
        self._mem_base = 0  # number of the first message in memory
        self._file: IO[bytes] | None = None
        self._first: dict[int, int] = {}  # subxid -> number of its first message
        self._offsets: dict[int, int] = {}  # spilled subxact starts: number -> file offset
        self._meta: list[tuple[int, int, bytes]] = []  # Relation/Type: (number, lsn, payload)
        self.count = 0

    @property
    def spilled(self) -> bool:
        """Whether the buffer moved to a temporary file."""
        return self._file is not None

    @property
    def changes(self) -> int:
        """Messages that are not Relation or Type: the transaction's changes."""
        return self.count - len(self._meta)

    @property
    def meta(self) -> list[tuple[int, bytes]]:
        """(lsn, payload) of the Relation and Type messages, in order, kept in memory."""
        return [(lsn, payload) for _, lsn, payload in self._meta]

    def append(self, subxid: int, lsn: int, payload: bytes) -> None:
        """Buffer one streamed message of subtransaction ``subxid``."""
        if payload[:1] in (b"R", b"Y"):
            self._meta.append((self.count, lsn, payload))
        if subxid not in self._first:
            self._first[subxid] = self.count
        self._memory.append((lsn, payload))
        self._memory_bytes += len(payload) + 64
        self.count += 1
        if self._memory_bytes > self.spill_bytes:
            self._spill()

    def _spill(self) -> None:
        if self._file is None:
            # closed in close(), which the assembler calls on commit, abort and reset
            self._file = tempfile.TemporaryFile(prefix="pglogrepl-bridge-stream-")  # noqa: SIM115
        starts = set(self._first.values())
        write = self._file.write
        for i, (lsn, payload) in enumerate(self._memory, self._mem_base):
            if i in starts:
                self._offsets[i] = self._file.tell()
            write(_RECORD.pack(lsn, len(payload)))
            write(payload)
        self._mem_base = self.count
        self._memory = []
        self._memory_bytes = 0

    def abort_subxact(self, subxid: int) -> None:
        """Drop ``subxid``'s messages and everything after them."""
        cut = self._first.get(subxid)
        if cut is None:
            return
        if cut >= self._mem_base:
            del self._memory[cut - self._mem_base :]
            self._memory_bytes = sum(len(p) + 64 for _, p in self._memory)
        else:
            assert self._file is not None
            offset = self._offsets[cut]
            self._file.truncate(offset)
            self._file.seek(offset)
            self._memory = []
            self._memory_bytes = 0
            self._mem_base = cut
        self.count = cut
        self._meta = [m for m in self._meta if m[0] < cut]
        self._first = {k: v for k, v in self._first.items() if v < cut}
        self._offsets = {k: v for k, v in self._offsets.items() if k < cut}

    def __iter__(self) -> Iterator[tuple[int, bytes]]:
        """(lsn, payload) in arrival order: the spilled part first, then memory."""
        if self._file is not None:
            end = self._file.tell()
            self._file.seek(0)
            read = self._file.read
            while self._file.tell() < end:
                lsn, length = _RECORD.unpack(read(_RECORD.size))
                yield lsn, read(length)
            self._file.seek(end)
        yield from self._memory

    def close(self) -> None:
        """Drop what is buffered (and its file)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        self._memory = []
        self._first = {}
        self._offsets = {}
        self._meta = []
