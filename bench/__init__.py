"""Benchmarks: each writes its own section of docs/benchmarks.md (bench_verification: docs/verification.md)."""
