"""The ingress side of a canary: which version answers a request, and what each version's requests did.

    router = CanaryRouter(registry, "tiny", "production")
    router.refresh()                          # every poll interval: re-read the canary from the registry
    model = router.route(request_id)          # "tiny:7" for ~percent% of request ids, else None (the default)
    router.record(version, seconds, error, completion_tokens)
    router.flush()                            # every poll interval: upsert this process's totals, auto-abort

Routing is deterministic: sha256 of ``"{canary id}:{request id}"`` mapped to [0, 100) sends the
request to the candidate when below ``percent``, so a retry with the same id lands on the same
version, and a new canary reshuffles. Only requests that name no model are routed (the caller
decides that). ``record`` feeds the Ray metrics (:mod:`loraops.serve.metrics`) always, and the
canary totals while a canary runs and the version is its baseline or candidate.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import threading
import uuid

from loraops.registry.canary import RUNNING, CanaryState, Totals, judge
from loraops.registry.refs import DEFAULT_ALIAS, Bare, Ref
from loraops.serve.metrics import VersionMetrics

log = logging.getLogger(__name__)

#: Who aborts a canary when its figures cross the margin (the actor in its record).
AUTO_ACTOR = "auto"


def candidate_to_serve(registry, ref: str) -> str | None:
    """``NAME:VERSION`` of the running canary of ``ref``'s alias, which model replicas serving ``ref`` load next to it;
    None when there is none (always for a pinned ``NAME:VERSION``)."""
    parsed = Ref.parse(ref, bare=Bare.DEFAULT_ALIAS)
    if parsed.pinned:
        return None
    state = registry.canary(parsed.name)
    return f"{parsed.name}:{state.candidate}" if state is not None and state.state == RUNNING and state.alias == parsed.alias else None


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
        self._totals: dict[int, Totals] = {}

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

    def record(self, version: int, seconds: float, error: bool, completion_tokens: int) -> None:
        """Count one request answered (or failed) by ``version`` of this adapter."""
        self.metrics.record(self.name, version, seconds, error, completion_tokens)
        canary = self._canary
        if canary is None or version not in (canary.baseline, canary.candidate):
            return
        with self._lock:
            if self._canary is canary:
                self._totals.setdefault(version, Totals()).add(seconds, error, completion_tokens)

    def flush(self, judging: bool = True) -> str | None:
        """Upsert this process's totals into the registry, then abort the canary if :func:`judge` says so.

        Returns the abort reason when this call aborted the canary, else None.
        """
        with self._lock:
            canary = self._canary
            totals = {version: figures.copy() for version, figures in self._totals.items()}
        if canary is None:
            return None
        for version, figures in sorted(totals.items()):
            self.registry.record_canary_stats(canary.id, self.reporter, version, figures)
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
