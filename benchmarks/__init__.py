"""Measurements run by hand, grouped by subject; each writes a headed table to benchmarks/results/.

Run one from the repository root as ``python benchmarks/<group>/bench_x.py`` once the kit is
installed (``scripts/setup.sh`` runs ``pip install -e .``), or as
``python -m benchmarks.<group>.bench_x`` before that. The list: docs/benchmarks.md.
"""
