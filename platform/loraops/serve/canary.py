"""The ingress side of a canary: which version answers a request, and what each version's requests did.

    router = CanaryRouter(registry, "tiny", "production")
    router.refresh()                          # every poll interval: re-read the canary from the registry
    model = router.route(request_id)          # "tiny:7" for ~percent% of request ids, else None (the default)
    router.record(version, seconds, error, completion_tokens, split=True, intended=None)
    router.flush()                            # every poll interval: upsert this process's totals, auto-abort

Routing is deterministic: sha256 of ``"{canary id}:{request id}"`` mapped to [0, 100) sends the
request to the candidate when below ``percent``, so a retry with the same id lands on the same
version, and a new canary reshuffles. Only requests that name no model are routed (the caller
decides that). ``record`` feeds the Ray metrics (:mod:`loraops.serve.metrics`) always, and the
canary totals while a canary runs and the version is its baseline or candidate: the split's
requests in the figures compared, explicitly named ones apart, and the split's candidate
requests answered by another version (the candidate not loaded) as missed.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import threading
import uuid

from loraops.registry.canary import MISSED, NAMED, RUNNING, CanaryState, Totals, judge
from loraops.registry.refs import DEFAULT_ALIAS
from loraops.serve.metrics import VersionMetrics

log = logging.getLogger(__name__)

#: Who aborts a canary when its figures cross the margin (the actor in its record).
AUTO_ACTOR = "auto"


def bucket(canary_id: int, request_id: str) -> float:
    """Where a request falls in [0, 100) for a canary: stable across processes and restarts."""
    digest = hashlib.sha256(f"{canary_id}:{request_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 * 100


class CanaryRouter:
    """Routes the requests of ``name@alias`` during a canary and reports per-version figures to the registry.

    ``reporter`` names this process in the statistics table (default ``host:pid:random``); two
    routers must never share one, or they would overwrite each other's totals.
    """

    def __init__(self, registry, name: str, alias: str = DEFAULT_ALIAS, reporter: str | None = None, metrics: VersionMetrics | None = None):
        self.registry = registry
        self.name = name
        self.alias = alias
        self.reporter = reporter or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.metrics = metrics or VersionMetrics()
        self._lock = threading.Lock()
        self._canary: CanaryState | None = None
        self._totals: dict[str, dict[int, Totals]] = {}  # by reporter suffix ("" for the split's requests), then version

    @property
    def canary(self) -> CanaryState | None:
        """The running canary as last read by :meth:`refresh`."""
        return self._canary

    def refresh(self) -> CanaryState | None:
        """Re-read the running canary (one query). When it changed, the old one's totals are flushed first."""
        state = self.registry.canary(self.name)
        if state is not None and state.alias != self.alias:
            state = None
        current = self._canary
        if current is not None and (state is None or state.id != current.id):
            self.flush(judging=False)
        with self._lock:
            if state is None or current is None or state.id != current.id:
                self._totals = {}
            self._canary = state
        return state

    def route(self, request_id: str) -> str | None:
        """The reference to serve a request that named no model with: the candidate's, or None for the default."""
        canary = self._canary
        if canary is None or canary.state != RUNNING:
            return None
        return f"{self.name}:{canary.candidate}" if bucket(canary.id, request_id) < canary.percent else None

    def record(self, version: int, seconds: float, error: bool, completion_tokens: int, split: bool = True, intended: int | None = None) -> None:
        """Count one request answered (or failed) by ``version`` of this adapter. ``split``: the request named no
        version, the split chose (to send it to ``intended``, a version, or to the default: None)."""
        self.metrics.record(self.name, version, seconds, error, completion_tokens)
        canary = self._canary
        if canary is None or version not in (canary.baseline, canary.candidate):
            return
        with self._lock:
            if self._canary is not canary:
                return
            totals = self._totals.setdefault("" if split else NAMED, {})
            totals.setdefault(version, Totals()).add(seconds, error, completion_tokens)
            if split and intended == canary.candidate and version != canary.candidate:
                self._totals.setdefault(MISSED, {}).setdefault(canary.candidate, Totals()).add(seconds, error, completion_tokens)

    def flush(self, judging: bool = True) -> str | None:
        """Upsert this process's totals into the registry, then abort the canary if :func:`judge` says so.

        Returns the abort reason when this call aborted the canary, else None.
        """
        with self._lock:
            canary = self._canary
            totals = {(kind, version): figures.copy() for kind, versions in self._totals.items() for version, figures in versions.items()}
        if canary is None:
            return None
        for (kind, version), figures in sorted(totals.items()):
            self.registry.record_canary_stats(canary.id, self.reporter + kind, version, figures)
        if not judging:
            return None
        status = self.registry.canary_status(self.name)
        if status.canary.id != canary.id or status.canary.state != RUNNING:
            return None
        reason = judge(status)
        if reason is None:
            return None
        if self.registry.abort_canary(self.name, actor=AUTO_ACTOR, reason=reason, canary_id=canary.id) is None:
            return None  # someone else ended it first
        log.warning("canary of %s:%d aborted: %s", self.name, canary.candidate, reason)
        self.refresh()
        return reason
