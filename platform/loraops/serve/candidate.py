"""A model replica's side of a canary: serve the running canary's candidate next to the default reference.

Every registry poll the replica re-reads the canary of its default reference's alias
(:meth:`CandidateLoader.follow`): it loads the candidate when a canary starts, unloads it when the
canary ends, and when the candidate cannot be loaded (a file that fails its checksums, a refused
training config) keeps answering the canary's share with the default, says so (``problem``: in
``/healthz``, ``/v1/models``) and tries again on later polls, waiting twice as long after each
failure (from the poll interval up to :data:`MAX_RETRY_S`). Each change (loaded, failed and why) is
written to the registry for ``loraops canary status``, which is how a canary whose candidate no
replica can load gets aborted (:func:`loraops.registry.canary.judge`); every other poll writes a
heartbeat, so a replica that died is shown as gone and not counted as loaded.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from loraops.registry.canary import RUNNING
from loraops.registry.refs import parse_ref

log = logging.getLogger("ray.serve")

#: The longest wait between two tries to load a candidate that failed.
MAX_RETRY_S = 30.0


class CandidateLoader:
    """The canary candidate of one replica: loaded (``loaded``), or failing (``failure``), with its retry schedule."""

    def __init__(self, registry, adapters, replica: str):
        self.registry, self.adapters, self.replica = registry, adapters, replica
        self.loaded: str | None = None
        #: The candidate that failed: {"canary", "ref", "error", "attempts", "retry_at"}.
        self.failure: dict[str, Any] | None = None
        self._reported: tuple[int, str | None] | None = None

    def _running(self):
        """The running canary of the default reference's alias, or None (always for a pinned default)."""
        name, alias, _ = parse_ref(self.adapters.default.ref)
        if alias is None:
            return None
        state = self.registry.canary(name)
        return state if state is not None and state.state == RUNNING and state.alias == alias else None

    def follow(self, hold, poll_s: float) -> None:
        """Serve the running canary's candidate; stop when the canary ends; retry a failed load once its wait is over."""
        state = self._running()
        wanted = f"{state.name}:{state.candidate}" if state is not None else None
        if self.loaded is not None and wanted != self.loaded:
            self.adapters.unload(self.loaded, hold)
            log.info("canary ended: %s no longer served", self.loaded)
            self.loaded = None
        if self.failure is not None and (state is None or self.failure["canary"] != state.id):
            self.failure = None  # the canary changed or ended: a later one, even of the same version, is tried afresh
        if state is None:
            return
        if self.adapters.find(wanted) is not None:  # loaded, or configured
            self._report(state.id, None, poll_s)
            return
        if self.failure is not None and time.monotonic() < self.failure["retry_at"]:
            self.registry.record_canary_load(state.id, self.replica, self.failure["error"], poll_s, beat=True)
            return
        try:
            self.adapters.load(wanted, hold, True)
        except Exception as exc:  # noqa: BLE001 - the canary's share goes to the default meanwhile
            self._failed(state.id, wanted, exc, poll_s)
            return
        if self.failure is not None:
            log.info("canary: %s loaded after %d failed tries", wanted, self.failure["attempts"])
        self.loaded, self.failure = wanted, None
        log.info("canary: serving %s next to %s", wanted, self.adapters.default.ref)
        self._report(state.id, None, poll_s)

    def _failed(self, canary_id: int, ref: str, exc: Exception, poll_s: float) -> None:
        attempts = self.failure["attempts"] + 1 if self.failure is not None else 1
        wait = min(max(poll_s, 1.0) * 2 ** (attempts - 1), MAX_RETRY_S)
        error = f"{type(exc).__name__}: {exc}" if not str(exc) else str(exc)
        if self.failure is None or self.failure["error"] != error:
            log.error("cannot serve the canary candidate %s: %s; its share of requests is answered by %s", ref, error, self.adapters.default.version.ref)
        self.failure = {"canary": canary_id, "ref": ref, "error": error, "attempts": attempts, "retry_at": time.monotonic() + wait}
        self._report(canary_id, error, poll_s)

    def _report(self, canary_id: int, error: str | None, poll_s: float) -> None:
        """Write this replica's state to the registry when it changed (a retry that fails again counts an attempt),
        else only its heartbeat, so that ``canary status`` can tell a replica that died from one that polls."""
        beat = error is None and self._reported == (canary_id, None)
        self.registry.record_canary_load(canary_id, self.replica, error, poll_s, beat=beat)
        self._reported = (canary_id, error)

    @property
    def problem(self) -> str | None:
        """Why the canary's candidate is not served, for ``/healthz`` and ``/v1/models`` (None: no failure)."""
        if self.failure is None:
            return None
        retry = max(0.0, self.failure["retry_at"] - time.monotonic())
        return (
            f"cannot serve the canary candidate {self.failure['ref']}: {self.failure['error']}; its share of requests is answered by "
            f"{self.adapters.default.version.ref} (tried {self.failure['attempts']} times, next in {retry:.0f} s)"
        )

    def info(self) -> dict[str, Any] | None:
        """The candidate for ``/v1/models``: its reference and whether this replica serves it."""
        if self.failure is not None:
            return {"candidate": self.failure["ref"], "loaded": False, "attempts": self.failure["attempts"]}
        return {"candidate": self.loaded, "loaded": True} if self.loaded is not None else None
