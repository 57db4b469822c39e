"""The bridge to replica nodes: the network thread, the run loop and a replica to test with.

Rule: sockets and threads live here; protocol decisions are the sans-IO ``wire.hub``'s.
"""
