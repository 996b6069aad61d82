"""Benchmark scripts (run each as `python benchmarks/<name>.py`, or `python -m
benchmarks.<name>` from the repository root) and their shared toolkit, `common`."""
