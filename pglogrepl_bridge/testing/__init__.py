"""Throwaway PostgreSQL servers for tests, the demo and benchmarks (shipped: ``demo`` uses them)."""
