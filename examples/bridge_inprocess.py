"""The bridge with a replica in the same process: WalEntry frames over loopback TCP.

    PGLOGREPL_DSN=... python examples/bridge_inprocess.py SLOT PUBLICATION UNTIL_LSN

The replica applies each WalEntry whose lsn is above its last one, acknowledges it, and the
bridge confirms to PostgreSQL what the replica acknowledged.
"""

from __future__ import annotations

import os
import sys

from pglogrepl_bridge.bridge.replica import ReplicaNode, TcpReplica
from pglogrepl_bridge.bridge.runner import BridgeConfig, run_bridge
from pglogrepl_bridge.lsn import Lsn
from pglogrepl_bridge.postgres.stream import StreamOptions
from pglogrepl_bridge.wire.protocol import WalEntry


def show(entry: WalEntry) -> None:
    print(f"replica applied lsn={Lsn(entry.lsn)} ({len(entry.data)} bytes)", flush=True)


def main() -> None:
    slot, publication, until = sys.argv[1], sys.argv[2], Lsn.parse(sys.argv[3])
    replica = TcpReplica(ReplicaNode(node_id=2, apply=show))
    address = replica.listen()  # the bridge dials it
    try:
        stats = run_bridge(
            os.environ.get("PGLOGREPL_DSN", ""),
            StreamOptions(slot=slot, publications=(publication,), until_lsn=until),
            BridgeConfig(node_id=1, replicas=[address], payload="bincode"),
        )
    finally:
        replica.close()
    print(f"bridged {stats.entries} entries; slot confirmed up to {stats.confirmed}")


if __name__ == "__main__":
    main()
