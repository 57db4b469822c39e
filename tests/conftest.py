"""Shared fixtures: a real PostgreSQL per server version, started by the tests themselves.

``make test`` runs every PostgreSQL-backed test on PostgreSQL 15, 16, 17 and 18: 15 from
Debian's package, 16-18 from the PyPI wheels the dev extra installs. Outside CI, the versions
found are used (a machine with only Python has 16-18); under ``CI=true`` all four must be
there. Choose versions with ``--pg-version 16`` (repeatable) or
``PGLOGREPL_TEST_PG_VERSIONS=15,16``. Under ``CI=true`` a PostgreSQL test that skips, or a
version with no passing test, fails the run.
"""

from __future__ import annotations

import itertools
import json
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa
from hypothesis import settings

from pglogrepl_bridge.testing.nats import NatsCluster, nats_cluster
from pglogrepl_bridge.testing.postgres import ENV_DSN, PostgresServer, find_bindirs, postgres_server

from .mariadb_server import mariadb_available, mariadb_server
from .streamkit import Conn, pg_url

# Shared 2-core machines stall now and then: no per-example deadlines (timing is the
# benchmarks' job, not the tests').
settings.register_profile("default", deadline=None)
settings.load_profile("default")

DEFAULT_VERSIONS = (15, 16, 17, 18)
REPORT = Path(__file__).resolve().parent.parent / ".pg-report.json"
_results: Counter[str] = Counter()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--pg-version",
        action="append",
        type=int,
        default=None,
        help="PostgreSQL major version to test against (repeatable; default 15, 16, 17 and 18)",
    )


def _versions(config: pytest.Config) -> list[int]:
    if os.environ.get(ENV_DSN):
        return [0]  # the external server, whatever its version
    chosen = config.getoption("--pg-version")
    if not chosen and os.environ.get("PGLOGREPL_TEST_PG_VERSIONS"):
        chosen = [int(v) for v in os.environ["PGLOGREPL_TEST_PG_VERSIONS"].split(",")]
    if chosen:
        return list(chosen)
    available = find_bindirs()
    found = [v for v in DEFAULT_VERSIONS if v in available]
    if os.environ.get("CI"):
        return list(DEFAULT_VERSIONS)  # a missing one must fail loudly in CI, not vanish
    return found or [max(available)] if available else list(DEFAULT_VERSIONS)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "pg" in metafunc.fixturenames:
        versions = _versions(metafunc.config)
        metafunc.parametrize(
            "pg",
            versions,
            indirect=True,
            scope="session",
            ids=[f"pg{v}" if v else "external" for v in versions],
        )


@pytest.fixture(scope="session")
def pg(request: pytest.FixtureRequest) -> Iterator[PostgresServer]:
    """A running server with wal_level=logical; removed at the end of the session."""
    with postgres_server(request.param or None) as server:
        yield server


@pytest.fixture
def pg_conn(pg: PostgresServer) -> Iterator[psycopg.Connection[tuple[object, ...]]]:
    with psycopg.connect(pg.dsn, autocommit=True) as conn:
        yield conn
    # a test's slots pin WAL and count against max_replication_slots: drop what it left
    with psycopg.connect(pg.dsn, autocommit=True) as conn:
        conn.execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE NOT active"
        )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    report = yield
    callspec = getattr(item, "callspec", None)
    counted = report.when == "call" or (report.when == "setup" and not report.passed)
    if counted and callspec is not None and callspec.params.get("target") == "mariadb":
        _results[f"mariadb:{'passed' if report.passed else report.outcome}"] += 1
    if callspec is not None and "pg" in callspec.params:
        version = callspec.params["pg"] or "external"
        if report.when == "call" or (report.when == "setup" and not report.passed):
            outcome = "passed" if report.passed else report.outcome
            _results[f"{version}:{outcome}"] += 1
            if os.environ.get("CI") and report.skipped:
                report.outcome = "failed"
                report.longrepr = f"PostgreSQL test skipped in CI: {report.longrepr}"
    return report


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    summary = dict(sorted(_results.items()))
    REPORT.write_text(json.dumps(summary, indent=1) + "\n")
    if os.environ.get("CI") and not session.config.getoption("collectonly"):
        expected = [str(v) if v else "external" for v in _versions(session.config)]
        missing = [v for v in expected if not _results.get(f"{v}:passed")]
        if missing:
            print(f"\nCI: no PostgreSQL test passed on: {', '.join(missing)}")
            session.exitstatus = pytest.ExitCode.TESTS_FAILED


_targets = itertools.count()


@pytest.fixture(scope="session")
def mariadb_url() -> Iterator[str]:
    """A MariaDB target. Without a server on this machine the MariaDB cases skip outside CI
    (a newcomer's ``make test`` passes); under ``CI=true`` they must run (``.ci/run``
    checks that they passed)."""
    if not os.environ.get("CI") and not mariadb_available():
        pytest.skip(
            "no MariaDB server here: apt-get install mariadb-server, or set "
            "PGLOGREPL_TEST_MARIADB_URL to run the MariaDB target tests"
        )
    with mariadb_server() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql", "mariadb"])
def target(
    request: pytest.FixtureRequest, pg: PostgresServer, pg_conn: Conn, tmp_path: Path
) -> Iterator[str]:
    kind = request.param
    if kind == "sqlite":
        yield f"sqlite:///{tmp_path / 'target.db'}"
    elif kind == "postgresql":
        name = f"target_{next(_targets)}"
        pg_conn.execute(f"CREATE DATABASE {name}")
        yield pg_url(pg.dsn, name).render_as_string(hide_password=False)
    else:
        url: str = request.getfixturevalue("mariadb_url")
        engine = sa.create_engine(url)
        with engine.begin() as conn:
            for (table,) in conn.execute(sa.text("SHOW TABLES")).all():
                conn.execute(sa.text(f"DROP TABLE `{table}`"))
        engine.dispose()
        yield url


@pytest.fixture(scope="session")
def nats() -> Iterator[NatsCluster]:
    """A three-node JetStream cluster on loopback, for the whole session (tests that stop or
    kill nodes start them again; each test uses its own stream and subjects)."""
    with nats_cluster(3) as cluster:
        yield cluster
