"""A loopback replica for the bridge benchmark, in its own process: applies and acknowledges.

It keeps no entry it applied (a real replica writes them out): holding the 140 MB of the
realistic workload's entries cost it 33,000 page faults on the cores the bridge and the
walsender share.

python benchmarks/replica_process.py PORT      # prints "ready" once listening
"""

from __future__ import annotations

import sys
import threading

from pglogrepl_bridge.bridge.replica import ReplicaNode, TcpReplica


def main() -> None:
    replica = TcpReplica(ReplicaNode(node_id=2, keep=False))
    replica.listen("127.0.0.1", int(sys.argv[1]))
    print("ready", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
