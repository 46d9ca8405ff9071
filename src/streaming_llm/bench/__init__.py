"""Benchmarks: per-token latency and memory per method and cache size, reports, hardware facts."""
