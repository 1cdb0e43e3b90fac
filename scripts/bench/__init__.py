"""Helpers for scripts/bench_ingest.py (the callback ingest benchmark)."""
