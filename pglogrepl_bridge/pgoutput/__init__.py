"""The sans-IO core: walsender CopyData and pgoutput bytes in, transactions and feedback out.

Rule: nothing here opens a socket, waits, sleeps or reads the clock (time is passed in), and
nothing queries the catalog: relations and types come only from the stream's own messages.
``session.ReplicationSession`` is the one object that owns a stream's state; IO layers
(``postgres.stream``) feed it bytes and send what it produces.
"""
