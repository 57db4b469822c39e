"""docker-compose.yml cannot run here (no Docker engine), so check what it promises."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent


def _compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return data


def _settings(command: list[str]) -> dict[str, str]:
    pairs = [command[i + 1] for i, arg in enumerate(command) if arg == "-c"]
    return dict(p.split("=", 1) for p in pairs)


def test_postgres_service_is_set_up_for_logical_replication() -> None:
    pg = _compose()["services"]["postgres"]
    assert pg["image"].startswith("postgres:")
    settings = _settings(pg["command"])
    assert settings["wal_level"] == "logical"
    assert int(settings["max_wal_senders"]) >= 2
    assert int(settings["max_replication_slots"]) >= 2
    assert int(settings["max_prepared_transactions"]) > 0
    assert "pg_isready" in " ".join(pg["healthcheck"]["test"])


def test_bridge_service_runs_the_cli_against_the_demo_publication() -> None:
    compose = _compose()
    bridge = compose["services"]["bridge"]
    assert bridge["depends_on"]["postgres"]["condition"] == "service_healthy"
    command = " ".join(bridge["command"])
    assert "pglogrepl-bridge tail" in command
    assert "--publication demo_pub" in command
    # the publication it tails is created by the init script mounted into postgres
    volumes = compose["services"]["postgres"]["volumes"]
    script = next(v.split(":")[0] for v in volumes if "initdb" in v)
    assert "CREATE PUBLICATION demo_pub" in (ROOT / script).read_text()
    dsn = bridge["environment"]["PGLOGREPL_DSN"]
    assert "host=postgres" in dsn
