"""The console script's malloc settings (``cli.allocator``): the heap's pages stay."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from pglogrepl_bridge.cli.allocator import user_tuned

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not os.confstr("CS_GNU_LIBC_VERSION"),
    reason="the settings are glibc's",
)

#: a stream's shape: a transaction's worth of large buffers made, then all freed, over again
CHURN = """
import resource, sys
from pglogrepl_bridge.cli.allocator import keep_freed_heap
applied = keep_freed_heap() if sys.argv[1] == "tuned" else None
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(500):
    lines = [bytes(70_000) for _ in range(5)]
    del lines
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _churn(mode: str, **env: str) -> tuple[str, int]:
    out = subprocess.run(
        [sys.executable, "-c", CHURN, mode],
        env={k: v for k, v in os.environ.items() if not user_tuned({k: v})} | env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return out[0], int(out[1])


def test_freed_heap_is_kept_for_the_next_transaction() -> None:
    """Without the settings every round faults pages in again (28 per round of
    350 KB, here); with them, the first round's pages serve every later one."""
    applied, tuned = _churn("tuned")
    _, default = _churn("default")
    assert applied == "True"
    assert default > 500 * 10  # the churn this guards against is real here
    assert tuned < default / 20


def test_a_users_own_malloc_settings_are_left_alone() -> None:
    applied, _ = _churn("tuned", GLIBC_TUNABLES="glibc.malloc.trim_threshold=131072")
    assert applied == "False"
    applied, _ = _churn("tuned", MALLOC_ARENA_MAX_="2")
    assert applied == "False"
    assert not user_tuned({"GLIBC_TUNABLES": "glibc.rtld.optional_static_tls=512"})
