"""A throwaway MariaDB server for the replicate tests (Debian's mariadb-server).

Started the way the PostgreSQL provider starts its clusters: a temporary data directory, a
free loopback port, the unprivileged ``mysql`` user when we are root, removed afterwards.
``PGLOGREPL_TEST_MARIADB_URL`` names an external server instead.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pymysql

from pglogrepl_bridge.errors import ServerUnavailableError
from pglogrepl_bridge.testing.postgres import free_port

ENV_URL = "PGLOGREPL_TEST_MARIADB_URL"


def _binary(name: str) -> str | None:
    for candidate in (shutil.which(name), f"/usr/sbin/{name}", f"/usr/bin/{name}"):
        if candidate and Path(candidate).exists():
            return candidate
    return None


def mariadb_available() -> bool:
    """Whether a MariaDB server can be had: an external URL, or the server binaries."""
    server = _binary("mariadbd") or _binary("mysqld")
    install = _binary("mariadb-install-db") or _binary("mysql_install_db")
    return bool(os.environ.get(ENV_URL)) or (server is not None and install is not None)


@contextlib.contextmanager
def mariadb_server() -> Iterator[str]:
    """Yield a SQLAlchemy URL of an empty database ``target`` on a running MariaDB."""
    external = os.environ.get(ENV_URL)
    if external:
        yield external
        return
    mariadbd = _binary("mariadbd") or _binary("mysqld")
    install = _binary("mariadb-install-db") or _binary("mysql_install_db")
    if mariadbd is None or install is None:
        raise ServerUnavailableError(
            "MariaDB server binaries not found: apt-get install -y mariadb-server "
            f"(or set {ENV_URL})"
        )
    root = Path(tempfile.mkdtemp(prefix="pglogrepl-bridge-mariadb-"))
    datadir, sock, port = root / "data", root / "mysqld.sock", free_port()
    user = pwd.getpwnam("mysql") if os.geteuid() == 0 else None
    if user is not None:
        os.chown(root, user.pw_uid, user.pw_gid)
    as_user = ["--user=mysql"] if user is not None else []
    proc: subprocess.Popen[bytes] | None = None
    try:
        subprocess.run(
            [
                install,
                "--no-defaults",
                f"--datadir={datadir}",
                "--auth-root-authentication-method=normal",
                "--skip-test-db",
                *as_user,
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )
        proc = subprocess.Popen(
            [
                mariadbd,
                "--no-defaults",
                f"--datadir={datadir}",
                f"--socket={sock}",
                f"--port={port}",
                "--bind-address=127.0.0.1",
                "--skip-name-resolve",
                "--skip-log-bin",
                "--innodb-flush-log-at-trx-commit=2",
                f"--pid-file={root / 'mysqld.pid'}",
                f"--log-error={root / 'error.log'}",
                *as_user,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                conn = pymysql.connect(host="127.0.0.1", port=port, user="root", password="")
                break
            except pymysql.err.OperationalError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    log = (root / "error.log").read_text() if (root / "error.log").exists() else ""
                    raise ServerUnavailableError(
                        f"mariadbd did not start:\n{log[-2000:]}"
                    ) from None
                time.sleep(0.2)
        with conn.cursor() as cur:
            cur.execute("CREATE DATABASE target")
        conn.close()
        yield f"mysql+pymysql://root@127.0.0.1:{port}/target"
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(root, ignore_errors=True)
