"""Which way each metric is better: the one table the search (its Optuna direction, Tune's mode) and
promotion's ``--if-better`` both read.

Metrics whose name contains ``loss`` or ``perplexity`` are better when lower; every other metric
(ROUGE, accuracy, ...) is better when higher.
"""

from __future__ import annotations

from typing import Literal

#: Name fragments of metrics where lower is better; any other metric is better when higher.
LOWER_IS_BETTER = ("loss", "perplexity")

Mode = Literal["min", "max"]


def lower_is_better(metric: str) -> bool:
    """The default direction of ``--if-better`` and of a search's metric: loss / perplexity down, everything else up."""
    return any(fragment in metric.lower() for fragment in LOWER_IS_BETTER)


def mode_of(metric: str) -> Mode:
    """Ray Tune's ``mode`` for ``metric``: ``"min"`` when lower is better, else ``"max"``."""
    return "min" if lower_is_better(metric) else "max"
