"""Snapshot: copy the rows a publication already holds, consistent with the stream that follows.

Rule: rows are read under a snapshot exported together with an LSN (its *anchor*): the slot
creation's, or a temporary slot's. Everything committed before the anchor is in the copy;
the stream applies what commits after it. ``plan`` holds the pure rules (chunks, resume),
``catalog`` and ``runner`` do the IO. The argument for exactness is ``docs/snapshot.md``.
"""
