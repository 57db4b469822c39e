"""Consume PostgreSQL logical replication and bridge it downstream."""

__version__ = "0.1.0"
