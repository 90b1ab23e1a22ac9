"""Benchmarks behind `make bench*` (sweep, heal sweep, peers). Only the CLI imports this package."""
