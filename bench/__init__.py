"""Benchmarks of the training step, the input pipeline and whole runs (see docs/PERFORMANCE.md)."""
