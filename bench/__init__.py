"""Benchmarks for vithybrid_fast: `python -m vithybrid_fast.bench` runs the suite (see bench/__main__.py)."""
