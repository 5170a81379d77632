"""Benchmarks: each prints a table, writes JSON (and a plot) under benchmarks/results/, and compares
against a baseline measured in the same run.

- :mod:`loraops.bench.search`: ``loraops bench search``, the configured search (TPE + ASHA) against
  an equal-budget random search and the config's own recipe.
"""
