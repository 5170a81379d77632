"""Whether a model replica can read the registry: what ``/healthz`` and ``/v1/models`` say while it cannot.

A replica keeps serving what it holds while the registry database is unreachable, refusing or
silent (every call is bounded, :mod:`loraops.registry.bounds`), but it cannot follow a promotion or
a canary meanwhile: that is a problem (``degraded``) from the first failed check, stated with since
when and what is served, and gone at the first good check. The outage is logged once when it starts
and once when it ends, not at every poll.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import datetime, timezone

log = logging.getLogger("ray.serve")


class RegistryHealth:
    """The outcome of a replica's registry checks: None, or since when (wall clock) and why they fail."""

    def __init__(self, clock: Callable[[], float] = time.time):
        self.clock = clock
        self.since: float | None = None
        self.error: str | None = None

    def checked(self, error: Exception | None) -> None:
        """Record one poll's outcome: the database failure it met, or None when every read went through."""
        if error is None:
            if self.since is not None:
                log.info("the registry answers again after %.0f s: promotions and canary changes are followed again", self.clock() - self.since)
            self.since, self.error = None, None
            return
        if self.since is None:
            self.since = self.clock()
            log.warning("registry unreachable: %s; promotions and canary changes are not followed until it answers", error)
        self.error = str(error)

    def problem(self, serving: str) -> str | None:
        """The ``degraded`` reason while the registry cannot be read (``serving``: the version served), else None."""
        if self.since is None:
            return None
        since = datetime.fromtimestamp(self.since, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")
        return f"registry unreachable since {since}: promotions and canary changes are not followed; serving {serving} ({self.error})"
