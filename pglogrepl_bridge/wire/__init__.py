"""The downstream ReplicationMessage protocol: the bincode codec, WalEntry payloads and the
hub's bookkeeping of replicas, acknowledgements and votes.

Rule: sans-IO like ``pgoutput``: bytes and objects in, bytes and decisions out.
"""
