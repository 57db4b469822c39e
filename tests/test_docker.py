"""The container image and docker-compose.yml. There is no Docker engine here (nor the compose
plugin), so what can be checked without one is: the image's install steps, run exactly as its
builder stage runs them, on a read-only copy of the source; and what the Dockerfile and the
compose file promise, read as data. An actual ``docker build`` and ``docker compose up`` are
not run by these tests."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
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


def _stages() -> list[list[str]]:
    stages: list[list[str]] = []
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.startswith("FROM "):
            stages.append([])
        if stages and line and not line.startswith("#"):
            stages[-1].append(line)
    return stages


def test_dockerfile_builds_with_a_compiler_and_runs_slim_as_a_user() -> None:
    build, runtime = _stages()
    assert build[0].endswith(" AS build") and "gcc" in "\n".join(build)
    assert any("container/build-wheel.sh /src /wheels" in line for line in build)
    assert runtime[0].startswith("FROM python:3.11-slim")
    assert "gcc" not in "\n".join(runtime)  # the compiler stays in the builder
    user = next(line.split()[1] for line in runtime if line.startswith("USER "))
    assert user not in ("root", "0")
    assert 'ENTRYPOINT ["pglogrepl-bridge"]' in runtime
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored


def test_the_image_install_steps_work_from_a_read_only_source(tmp_path: Path) -> None:
    """container/build-wheel.sh on a read-only copy gives a wheel with the C accelerator, which
    installs and runs. Read-only is enforced for root too where the filesystem allows: the
    copy is made immutable (``chattr +i``, which root cannot write through either); in every
    case the copy must be unchanged afterwards."""
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    source, wheels, home = tmp_path / "src", tmp_path / "wheels", tmp_path / "home"
    for name in files:
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    wheels.mkdir()
    home.mkdir()
    for path in [source, *source.rglob("*")]:
        path.chmod(path.stat().st_mode & ~0o222)
    before = _listing(source)
    # root writes through modes: where the filesystem allows, make the copy immutable
    immutable = os.geteuid() != 0 or _chattr(source, "+i")
    try:
        if immutable:
            with contextlib.suppress(OSError):  # proof that the source cannot be written
                (source / "probe").write_text("x")
                raise AssertionError("the source copy is writable")
        _build(source, wheels, home, tmp_path)
    finally:
        if os.geteuid() == 0:
            _chattr(source, "-i")
    assert _listing(source) == before  # and, enforced or not, nothing was written there


def _chattr(path: Path, flag: str) -> bool:
    """chattr -R on ``path``; False where the filesystem has no such attribute (overlayfs)."""
    done = subprocess.run(["chattr", "-R", flag, str(path)], capture_output=True, check=False)
    return done.returncode == 0


def _listing(root: Path) -> dict[str, tuple[int, float]]:
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime) for p in root.rglob("*")
    }


def _build(source: Path, wheels: Path, home: Path, tmp_path: Path) -> None:
    env = {**os.environ, "HOME": str(home), "TMPDIR": str(home), "PYTHON": sys.executable}
    env["PIP_NO_CACHE_DIR"] = "1"
    built = subprocess.run(
        ["sh", str(ROOT / "container" / "build-wheel.sh"), str(source), str(wheels)],
        capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert built.returncode == 0, built.stdout + built.stderr
    assert not (source / "build").exists() and not list(source.glob("*.egg-info"))
    (wheel,) = wheels.glob("pglogrepl_bridge-*.whl")
    target = tmp_path / "installed"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target",
         str(target), str(wheel)],
        check=True, timeout=300,
    )  # fmt: skip
    probe = subprocess.run(
        [sys.executable, "-c",
         "import pglogrepl_bridge, pglogrepl_bridge.pgoutput._fastrow as f; "
         "print(pglogrepl_bridge.__file__); print(f.__file__)"],
        capture_output=True, text=True, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(target)}, check=True,
    ).stdout.split()  # fmt: skip
    assert all(p.startswith(str(target)) for p in probe), probe
    version = subprocess.run(
        [sys.executable, "-m", "pglogrepl_bridge", "--version"],
        capture_output=True, text=True, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(target)}, check=True,
    ).stdout  # fmt: skip
    assert version.startswith("pglogrepl-bridge ")


def test_compose_covers_the_demo_story_with_the_image() -> None:
    compose = _compose()
    services = compose["services"]
    pg = services["postgres"]
    assert pg["image"].startswith("postgres:")
    settings = _settings(pg["command"])
    assert settings["wal_level"] == "logical"
    assert int(settings["max_wal_senders"]) >= 2
    assert int(settings["max_replication_slots"]) >= 2
    assert "max_slot_wal_keep_size" in settings  # so that doctor reports all clear
    assert "pg_isready" in " ".join(pg["healthcheck"]["test"])
    # the publication the services use is created by the init script mounted into postgres
    script = next(v.split(":")[0] for v in pg["volumes"] if "initdb" in v)
    assert "CREATE PUBLICATION demo_pub" in (ROOT / script).read_text()
    commands = {}
    for name in ("doctor", "tail", "replicate"):
        service = services[name]
        assert service["build"] == "." and service["image"] == "pglogrepl-bridge"
        assert service["depends_on"]["postgres"]["condition"] == "service_healthy"
        assert "host=postgres" in service["environment"]["PGLOGREPL_DSN"]
        commands[name] = service["command"]
    assert commands["doctor"][0] == "doctor"
    slots = {commands[n][commands[n].index("--slot") + 1] for n in ("tail", "replicate")}
    assert len(slots) == 2  # one slot per consumer
    target = commands["replicate"][commands["replicate"].index("--target") + 1]
    mount = services["replicate"]["volumes"][0].split(":")[1]
    assert target == f"sqlite:///{mount}/demo.db"
    assert "mkdir /data && chown bridge /data" in (ROOT / "Dockerfile").read_text()
    assert "INSERT INTO accounts" in " ".join(services["workload"]["command"])
