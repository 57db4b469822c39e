"""The benchmarks run in CI in smoke mode (tiny N, no timing assertions) so they cannot rot;
their own checks (slots confirmed to the end, counts matching) still apply."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.mark.parametrize("workload", ["basic", "realistic"])
def test_end_to_end_benchmark_smoke(workload: str) -> None:
    result = subprocess.run(
        [sys.executable, str(BENCH / "bench.py"), "--smoke", "--workload", workload],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for tool in (
        "pg_recvlogical",
        "tail --format null",
        "tail --format jsonl",
        "bridge --payload bincode",
        "replicate into SQLite",
    ):
        assert tool in result.stdout
    assert "checks: every slot confirmed" in result.stdout


def test_memory_benchmark_smoke() -> None:
    result = subprocess.run(
        [sys.executable, str(BENCH / "bench.py"), "--memory", "--smoke"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "peak RSS" in result.stdout


@pytest.mark.parametrize("workload", ["basic", "realistic"])
def test_decode_benchmark_smoke(workload: str) -> None:
    result = subprocess.run(
        [sys.executable, str(BENCH / "decode_bench.py"), "--smoke", "--workload", workload],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "changes/s" in result.stdout and "typed values/s" in result.stdout


def test_snapshot_benchmark_smoke() -> None:
    result = subprocess.run(
        [sys.executable, str(BENCH / "snapshot_bench.py"), "--smoke"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for tool in ("ours → SQLite", "ours → PostgreSQL", "pg_dump | psql"):
        assert tool in result.stdout
    assert "checks: every copy has the source's row counts" in result.stdout
