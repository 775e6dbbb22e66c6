"""aiodbenv's benchmarks: ``python -m benchmarks`` runs them all (see run.py)."""
