"""Destinations that make transactions durable: the SQL sink (any SQLAlchemy target) and the
``run_replicate`` loop that acknowledges only what the target committed.
"""
