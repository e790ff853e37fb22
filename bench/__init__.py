"""Benchmarks for vithybrid_fast: `python -m bench` runs the suite (see bench/__main__.py)."""
