"""Per-version request metrics, exported with Ray's metrics API (Prometheus format on Ray's metrics endpoint).

- ``loraops_requests_total`` (counter; tags ``adapter``, ``version``, ``outcome`` = ``ok`` | ``error``)
- ``loraops_request_latency_seconds`` (histogram; tags ``adapter``, ``version``; buckets
  :data:`loraops.registry.canary.LATENCY_BOUNDS_S`, the ones the canary status reads)
- ``loraops_generated_tokens_total`` (counter; tags ``adapter``, ``version``)

Ray's Prometheus exporter prefixes them with ``ray_`` (``ray_loraops_requests_total``, ...).
The Ray metric objects are created on the first record, and only in a process connected to Ray;
elsewhere (unit tests, a CLI) only the in-memory counts are kept, which every process keeps too.
"""

from __future__ import annotations

import sys
import threading
from dataclasses import dataclass
from typing import Any

from loraops.registry.canary import LATENCY_BOUNDS_S

REQUESTS = "loraops_requests_total"
LATENCY = "loraops_request_latency_seconds"
TOKENS = "loraops_generated_tokens_total"


@dataclass
class Counts:
    """What this process has recorded for one (adapter, version)."""

    ok: int = 0
    errors: int = 0
    tokens: int = 0
    seconds: float = 0.0


class VersionMetrics:
    """Requests, errors, latency and generated tokens per adapter version, in Ray metrics and in memory."""

    def __init__(self) -> None:
        self.counts: dict[tuple[str, int], Counts] = {}
        self._lock = threading.Lock()
        self._ray: tuple[Any, Any, Any] | None = None

    def record(self, adapter: str, version: int, seconds: float, error: bool, completion_tokens: int) -> None:
        """Count one answered (or failed) request of ``adapter`` version ``version``."""
        with self._lock:
            counts = self.counts.setdefault((adapter, version), Counts())
            counts.errors += int(error)
            counts.ok += int(not error)
            counts.tokens += max(0, completion_tokens)
            counts.seconds += max(0.0, seconds)
        ray_metrics = self._ray_metrics()
        if ray_metrics is None:
            return
        requests, latency, tokens = ray_metrics
        tags = {"adapter": adapter, "version": str(version)}
        requests.inc(1, tags | {"outcome": "error" if error else "ok"})
        latency.observe(max(0.0, seconds), tags)
        if completion_tokens > 0:
            tokens.inc(completion_tokens, tags)

    def _ray_metrics(self) -> tuple[Any, Any, Any] | None:
        """Ray's metric objects, created once this process is connected to Ray (never importing Ray itself)."""
        if self._ray is None:
            ray = sys.modules.get("ray")
            if ray is None or not ray.is_initialized():
                return None
            from ray.util.metrics import Counter, Histogram

            with self._lock:
                if self._ray is None:
                    self._ray = (
                        Counter(REQUESTS, "Requests answered, per adapter version and outcome", tag_keys=("adapter", "version", "outcome")),
                        Histogram(LATENCY, "Request latency (s), per adapter version", boundaries=list(LATENCY_BOUNDS_S), tag_keys=("adapter", "version")),
                        Counter(TOKENS, "Completion tokens generated, per adapter version", tag_keys=("adapter", "version")),
                    )
        return self._ray
