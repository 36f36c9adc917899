"""Benchmarks: each ``bench_*.py`` has ``main() -> dict``; ``python -m benchmarks.run`` runs them."""
