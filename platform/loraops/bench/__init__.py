"""Benchmarks behind ``loraops bench ...``: each prints a table, writes JSON figures, and compares
against a baseline measured in the same run (never a hard-coded number).

- :mod:`loraops.bench.serve`: latency and throughput of the summarization endpoint, nf4 vs merged.
- :mod:`loraops.bench.train`: training throughput, memory and eval loss of a recipe against the seed recipe.
- :mod:`loraops.bench.search`: the configured search (TPE + ASHA) against an equal-budget random
  search and the config's own recipe.
"""
