"""The ingress's view of traffic: which adapter version answers a request, and what each version did.

A request that names no model (or the bare adapter name) goes to the deployment's default reference,
except the running canary's share, which goes to the candidate (:class:`~loraops.serve.canary.CanaryRouter`:
deterministic per request id, so a retry with the same ``X-Request-Id`` lands on the same version).
Every answer and failure is recorded per version: Ray metrics, and while a canary runs the
figures ``loraops canary status`` reads from the registry. Inside a request, both wait until its answer
reached the client (:mod:`loraops.serve.delivery`): an answer lost with its proxy counts for no version.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from loraops.errors import LoraopsError
from loraops.registry.refs import Bare, Ref
from loraops.serve.contract import SummaryResult
from loraops.serve.delivery import once_delivered

log = logging.getLogger("ray.serve")


class Traffic:
    """Routing and records of one ingress replica for its deployment's default reference (``settings.adapter``)."""

    def __init__(self, settings):
        from loraops.serve.canary import CanaryRouter
        from loraops.serve.metrics import VersionMetrics

        ref = Ref.parse(settings.adapter, bare=Bare.DEFAULT_ALIAS)
        self.name, alias = ref.name, ref.alias
        self.metrics = VersionMetrics()
        registry = settings.open_registry()
        # Only an alias can have a canary: a pinned NAME:VERSION means exactly that version.
        self.router = CanaryRouter(registry, self.name, alias, metrics=self.metrics) if alias else None
        self._default_version: int | None = None

    @property
    def canary(self) -> dict[str, Any] | None:
        """The running canary as this replica last read it (for /v1/models), or None."""
        state = self.router.canary if self.router is not None else None
        if state is None or state.state != "running":
            return None
        return {"name": state.name, "candidate": state.candidate, "baseline": state.baseline, "percent": state.percent, "id": state.id}

    def names_default(self, model: str | None) -> bool:
        """Whether a request's ``model`` leaves the choice to the deployment: absent, or the bare adapter name."""
        return model is None or model == self.name

    def choose(self, model: str | None, request_id: str) -> str | None:
        """The reference the model replica serves the request with (None: its default)."""
        if not self.names_default(model):
            return model
        return self.router.route(request_id) if self.router is not None else None

    def record(self, model: str | None, result: SummaryResult, seconds: float, split: bool = True) -> None:
        """An answer to a request sent with ``model``: the version that gave it, its latency and length.
        ``split``: the request named no version (:meth:`choose` picked ``model``)."""
        name, version, tokens = result.model.name, result.model.version, result.usage.completion_tokens
        if model is None:
            self._default_version = version
        once_delivered(lambda: self._count(name, version, seconds, False, tokens, split, model))

    def record_failure(self, model: str | None, seconds: float, server_side: bool, split: bool = True) -> None:
        """A request sent with ``model`` that got no answer; the version's error when the server side failed (not the client's input)."""
        target = self._version_of(model) if server_side else None
        if target is not None:
            once_delivered(lambda: self._count(*target, seconds, True, 0, split, model))

    def _count(self, name: str, version: int, seconds: float, error: bool, tokens: int, split: bool, model: str | None) -> None:
        if self.router is not None and name == self.name:  # the router also keeps the canary's figures
            target = self._version_of(model) if split and model is not None else None  # the split sent it to the candidate
            intended = target[1] if target else None
            self.router.record(version, seconds, error=error, completion_tokens=tokens, split=split, intended=intended)
        else:
            self.metrics.record(name, version, seconds, error, tokens)

    def _version_of(self, model: str | None) -> tuple[str, int] | None:
        """(name, version) a failed request was meant for: a pinned version, or the default's latest answer."""
        if model is None:
            return (self.name, self._default_version) if self._default_version is not None else None
        try:
            ref = Ref.parse(model, bare=Bare.DEFAULT_ALIAS)
        except LoraopsError:
            return None
        return (ref.name, ref.version) if ref.pinned else None

    async def run(self, poll_s: float) -> None:
        """Re-read the canary every ``poll_s`` seconds and write this replica's figures (never stops serving on a registry hiccup)."""
        from loraops.registry.db import DatabaseError
        from loraops.serve.registry_health import RegistryHealth

        if self.router is None:
            return
        outage = RegistryHealth()  # a database outage is logged when it starts and when it ends, not at every poll
        while True:
            try:
                await asyncio.to_thread(self.router.refresh)
                await asyncio.to_thread(self.router.flush)
            except DatabaseError as exc:
                outage.checked(exc)
            except Exception as exc:  # noqa: BLE001 - a registry hiccup must not stop the API
                log.warning("canary check for %s failed: %s", self.name, exc)
            else:
                outage.checked(None)
            await asyncio.sleep(poll_s or 1.0)
