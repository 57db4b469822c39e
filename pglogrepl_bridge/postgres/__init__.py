"""psycopg IO: connecting, slot and publication administration, the sync and async streams.

Rule: the only package that holds a PostgreSQL connection; the streams are thin loops around
``pgoutput.session.ReplicationSession``.
"""
