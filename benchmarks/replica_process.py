"""A loopback replica for the bridge benchmark, in its own process: applies and acknowledges.

python benchmarks/replica_process.py PORT      # prints "ready" once listening
"""

from __future__ import annotations

import sys
import threading

from pglogrepl_bridge.bridge.replica import ReplicaNode, TcpReplica


def main() -> None:
    replica = TcpReplica(ReplicaNode(node_id=2))
    replica.listen("127.0.0.1", int(sys.argv[1]))
    print("ready", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
