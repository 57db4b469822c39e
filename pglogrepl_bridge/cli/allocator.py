"""The command line's malloc settings: keep freed heap for the next transaction.

A stream allocates and frees the same sizes again and again: a jsonl line of a transaction
(70 KB on the benchmark's realistic workload), a batch's rows, a WalEntry. With glibc's
defaults, the heap top is given back to the kernel as soon as 128 KB of it are free, and
taken again for the next transaction, and each page then faults in afresh. On the realistic
workload `tail --format jsonl` took 62,000 minor page faults for 200,000 changes, and
0.22-0.26 s of system CPU. With the heap kept (these settings) it takes 6,700 faults and
0.10-0.12 s (benchmarks/RESULTS.md, seventeenth session). Peak RSS is unchanged.

The settings are the process's, so only the console script applies them, never an import of
the library. Setting any of them turns off glibc's sliding mmap threshold, so that threshold
is set too, to 4 MiB: a jsonl line or a WalEntry of a large transaction stays on the heap
(with the trim settings alone the bridge faulted 30-60% more). A user's own malloc settings
(``GLIBC_TUNABLES`` naming malloc, or the ``MALLOC_*_`` variables) are left alone.
"""

from __future__ import annotations

import os
import sys

# mallopt's parameter numbers, from glibc's <malloc.h>
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3

#: (parameter, value): allocations under 4 MiB from the heap; 8 MiB of free heap top kept;
#: the heap grown 1 MiB beyond each request
SETTINGS = ((M_MMAP_THRESHOLD, 4 << 20), (M_TRIM_THRESHOLD, 8 << 20), (M_TOP_PAD, 1 << 20))


def user_tuned(environ: os._Environ[str] | dict[str, str]) -> bool:
    """Whether the environment already says how malloc should behave."""
    if "malloc" in environ.get("GLIBC_TUNABLES", ""):
        return True
    return any(name.startswith("MALLOC_") and name.endswith("_") for name in environ)


def keep_freed_heap() -> bool:
    """Apply ``SETTINGS`` on glibc; False where they were not applied (another C library,
    or the user's own settings)."""
    if not sys.platform.startswith("linux") or user_tuned(os.environ):
        return False
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION"):
            return False
    except (ValueError, OSError):  # the name is unknown where the C library is not glibc
        return False
    import ctypes  # 1.5 ms, paid only here

    libc = ctypes.CDLL(None)
    return all(libc.mallopt(param, value) == 1 for param, value in SETTINGS)


__all__ = ["SETTINGS", "keep_freed_heap", "user_tuned"]
