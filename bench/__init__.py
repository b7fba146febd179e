"""Benchmarks: ``python -m bench.run`` (``make bench``) and their parts."""
