"""Registered versions served the moment a request names them (``args.load_on_demand``).

A request whose ``model`` names a registry reference that the replica does not serve yet is checked
here (a reference, never a path; allowed by ``args.on_demand_names``; known to the registry), then
loaded through Ray Serve's model multiplexing: the API sends it with ``multiplexed_model_id`` set to
the reference, so Serve routes repeated requests to a replica that holds it, and the replica's
``@serve.multiplexed`` loader (:meth:`OnDemand.load`) runs once per reference, whatever the number
of requests waiting for it (Serve serialises loads per replica).

Serve keeps what the loader returns, a :class:`Lease`, in its own LRU of ``max_adapters`` minus the
configured references per replica, and drops the least recently used one when a new one comes
(calling its ``__del__``). The lease owns the adapter's slot in the engine: it unloads the adapter
then, or, while rows of that adapter are still waiting or decoding (a reference count, not a timer),
when the last one ends. A reference asked for again while its evicted lease still has rows gets a
second lease of the same loaded adapter; the adapter is unloaded only with the last lease of it.
Adding or removing an adapter next to others that stay unmerged (``nf4``, or ``merged`` with several
loaded) pauses the engine between two steps, rows kept; only the change from one merged adapter to
several (or back) waits for the running rows to finish. The configured references (the default among
them) and a canary's candidate are loaded outside the LRU, so they are never evicted. A load that
fails is retried on a later request, after a back-off that doubles per failure (:data:`RETRY_S` to
:data:`MAX_RETRY_S`).
"""

from __future__ import annotations

import asyncio
import fnmatch
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from loraops.errors import LoraopsError
from loraops.registry.refs import Bare, Ref, normalize_ref
from loraops.serve.contract import Rejection
from loraops.serve.public import without_paths

log = logging.getLogger("ray.serve")

#: The first wait before a failed load is tried again, and the longest.
RETRY_S = 1.0
MAX_RETRY_S = 30.0
#: How long an eviction waits for the unload (rows of other adapters finishing first) before Serve goes on.
UNLOAD_TIMEOUT_S = 300.0


def allowed(name: str, patterns: list[str] | None) -> bool:
    """Whether adapter ``name`` may be loaded on demand: any name without a list, else a listed name or ``prefix-*`` pattern."""
    return patterns is None or any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


class Lease:
    """An on-demand adapter's slot, as long as Serve's LRU keeps it or rows of it run (:meth:`acquire`/:meth:`release`).

    ``unload(ref)`` is a coroutine function run on the replica's event loop ``loop`` once the lease is
    evicted and no row holds it. Thread-safe: rows end on the engine's thread, Serve evicts from an executor.
    """

    def __init__(self, ref: str, unload: Callable[[str], Awaitable[None]], loop: asyncio.AbstractEventLoop):
        self.ref, self._unload, self._loop = ref, unload, loop
        self._lock = threading.Lock()
        self.rows = 0
        self.evicted = False
        self.unloaded = False

    def acquire(self) -> None:
        """One more row uses the adapter. Raises LoraopsError when it is unloaded already (the caller loads it again)."""
        with self._lock:
            if self.unloaded:
                raise LoraopsError(f"{self.ref} was unloaded")
            self.rows += 1

    def release(self) -> None:
        """A row of the adapter ended (answered, failed or dropped); the last one after eviction unloads it."""
        with self._lock:
            self.rows -= 1
            due = self._due()
        if due:
            self._loop.call_soon_threadsafe(lambda: self._loop.create_task(self._unload(self.ref)))

    def _due(self) -> bool:
        if self.evicted and self.rows == 0 and not self.unloaded:
            self.unloaded = True
            return True
        return False

    def __del__(self) -> None:
        """Serve's LRU evicts the lease (from an executor thread: wait for the unload, so the replica stays within its
        ``max_adapters``); a second call, or the garbage collector's, does nothing."""
        try:
            with self._lock:
                if self.evicted:
                    return
                self.evicted = True
                due = self._due()
            if not due:
                return
            if _in_loop(self._loop):
                self._loop.create_task(self._unload(self.ref))
            else:
                asyncio.run_coroutine_threadsafe(self._unload(self.ref), self._loop).result(UNLOAD_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 - a finalizer must not raise; the adapter then stays loaded
            log.warning("could not unload %s: %s", getattr(self, "ref", "?"), exc)


def _in_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


@dataclass
class Failure:
    """A reference whose last load failed: why, how often in a row, when it may be tried again."""

    error: str
    status: int
    attempts: int
    retry_at: float


class OnDemand:
    """A replica's on-demand references: checks, loads (Serve's multiplexed loader), unloads, failures, counts.

    ``load_adapter(ref)`` is the ``@serve.multiplexed`` wrapper of :meth:`load` (set by the replica);
    ``change(fn)`` runs ``fn`` (a blocking change of the adapter set) serialised with the replica's other changes;
    ``hold_for(adding)`` holds the engine while an adapter is added (or removed).
    """

    def __init__(
        self, settings, registry, adapters, change: Callable[[Callable[[], Any]], Awaitable[Any]], hold_for, clock: Callable[[], float] = time.monotonic
    ):
        self.settings, self.registry, self.adapters, self._change, self._hold_for, self._clock = settings, registry, adapters, change, hold_for, clock
        self.load_adapter: Callable[[str], Awaitable[Lease]] | None = None
        self.loads = self.evictions = 0
        #: Loads per reference: more than one means it was evicted and asked for again.
        self.loaded: dict[str, int] = {}
        self.load_seconds: list[float] = []
        self.failures: dict[str, Failure] = {}
        self._metrics = _metrics()
        #: Where :meth:`publish` sends :meth:`info` (the replica sets it): every replica's state in ``/v1/models``.
        self.board, self.replica, self.poll_s = None, "", 1.0
        #: Leases per reference not ended yet (Serve's and evicted ones whose rows still run): the adapter stays while any does.
        self._live: dict[str, int] = {}
        self._publishing: set[asyncio.Task] = set()

    @property
    def capacity(self) -> int:
        """References Serve's LRU keeps per replica: ``max_adapters`` minus the configured ones (at least 1)."""
        return max(1, self.settings.max_adapters - len(self.settings.adapters))

    def check(self, model: str) -> str | Rejection:
        """The normalized reference ``model`` names, or why it is refused (422: not a reference; 404: not allowed)."""
        try:
            ref = normalize_ref(model.strip())
        except LoraopsError as exc:
            return Rejection(422, "invalid_model", f"model {model!r}: {exc} (expected NAME, NAME@ALIAS or NAME:VERSION of the registry)", "model")
        name = Ref.parse(ref, bare=Bare.DEFAULT_ALIAS).name
        if not allowed(name, self.settings.on_demand_names):
            return Rejection(404, "model_not_found", f"model {ref!r} is not served: {name!r} is not in args.on_demand_names", "model")
        return ref

    async def lease(self, model: str) -> Lease | Rejection:
        """The lease of ``model`` with one row acquired: loaded (once) if it exists, or the reason it cannot be served."""
        ref = self.check(model)
        if isinstance(ref, Rejection):
            return ref
        failure = self.failures.get(ref)
        if failure is not None and self._clock() < failure.retry_at:
            wait = failure.retry_at - self._clock()
            return Rejection(failure.status, "model_unavailable", f"model {ref!r} cannot be loaded: {failure.error} (next try in {wait:.0f} s)", "model")
        resident = any(r.ref == ref for r in self.adapters.references)
        try:
            if not resident:  # a reference the registry does not know is a 404, and never reaches the loader
                await asyncio.to_thread(self.registry.get, ref)
        except LoraopsError as exc:
            return Rejection(404, "model_not_found", f"model {ref!r} is not served: {exc}", "model")
        for _ in range(2):  # a lease unloaded between Serve handing it out and this row taking it: load again
            try:
                lease = await self.load_adapter(ref)
            except Exception as exc:  # noqa: BLE001 - a load that fails fails this reference's requests, nothing else
                return self._failed(ref, exc)
            try:
                lease.acquire()
            except LoraopsError:
                continue
            self.failures.pop(ref, None)
            return lease
        return Rejection(503, "model_unavailable", f"model {ref!r} was unloaded while this request waited; retry", "model")

    def _failed(self, ref: str, exc: Exception) -> Rejection:
        previous = self.failures.get(ref)
        attempts = previous.attempts + 1 if previous else 1
        log.error("cannot load %s on demand (attempt %d): %s", ref, attempts, exc)
        error = without_paths(str(exc) or type(exc).__name__)  # clients see the reason, not the replica's file system
        # A version that exists but cannot be served (checksums, another base, trust_remote_code) is the
        # request's reference at fault: 422. Anything else (the store unreachable) may pass: 503.
        status = 422 if isinstance(exc, LoraopsError) else 503
        wait = min(RETRY_S * 2 ** (attempts - 1), MAX_RETRY_S)
        self.failures[ref] = Failure(error, status, attempts, self._clock() + wait)
        self._metrics["failures"].inc()
        return Rejection(status, "model_unavailable", f"model {ref!r} cannot be loaded: {error}", "model")

    async def load(self, ref: str) -> Lease:
        """Serve's multiplexed loader: load ``ref``'s adapter next to the others (verified, as every load); its lease."""
        started = time.perf_counter()
        await self._change(lambda: self.adapters.load(ref, lambda: self._hold_for(True), True, on_demand=True))
        seconds = time.perf_counter() - started
        self.loads += 1
        self.loaded[ref] = self.loaded.get(ref, 0) + 1
        self._live[ref] = self._live.get(ref, 0) + 1
        self.load_seconds.append(seconds)
        self._metrics["loads"].inc()
        self._metrics["load_seconds"].observe(seconds)
        self._metrics["resident"].set(len(self.adapters.references))
        log.info("loaded %s on demand in %.2f s", ref, seconds)
        self.publish_soon()
        return Lease(ref, self._unload, asyncio.get_running_loop())

    async def _unload(self, ref: str) -> None:
        """A lease's end. Serve may load a reference again while an evicted lease of it still has rows (the load then
        finds it loaded and hands out a second lease): the adapter goes only with the last of its leases."""
        self._live[ref] -= 1
        if self._live[ref] > 0:
            log.info("evicted a lease of %s; a newer one keeps it loaded", ref)
        else:
            del self._live[ref]
            await self._change(lambda: self.adapters.unload(ref, lambda: self._hold_for(False)))
            log.info("evicted %s (least recently used on-demand adapter)", ref)
        self.evictions += 1  # counted once the change is done, so a reader of the count sees its effect
        self._metrics["evictions"].inc()
        self._metrics["resident"].set(len(self.adapters.references))
        self.publish_soon()

    def publish_soon(self) -> None:
        """Publish this replica's state (a heartbeat, or a change) without making the caller wait for the board (tasks kept until done)."""
        task = asyncio.get_running_loop().create_task(self.publish())
        self._publishing.add(task)
        task.add_done_callback(self._publishing.discard)

    async def publish(self) -> None:
        """Tell the application's board (:mod:`loraops.serve.replica_board`) this replica's state: its heartbeat, and each change."""
        if self.board is not None:
            await self.board.publish(self.replica, self.info(), self.poll_s)

    def info(self) -> dict[str, Any]:
        """``/v1/models``' view: what is resident on demand, the counts, and that other versions load on request."""
        return {
            "resident": [r.ref for r in self.adapters.references if r.on_demand],
            "capacity": self.capacity,
            "loads": self.loads,
            "loads_by_ref": dict(self.loaded),
            "evictions": self.evictions,
            "failing": {ref: failure.error for ref, failure in self.failures.items()},
            "note": "other registered versions load when a request names them (model: NAME@ALIAS or NAME:VERSION)",
        }


def _metrics() -> dict[str, Any]:
    """The replica's on-demand Ray metrics (beside :mod:`loraops.serve.metrics`' per-version ones); Serve's metric
    classes tag each with the deployment and the replica, so the gauge is the resident count per replica."""
    from ray.serve.metrics import Counter, Gauge, Histogram

    return {
        "loads": Counter("loraops_adapter_loads_total", "Adapters loaded on demand"),
        "evictions": Counter("loraops_adapter_evictions_total", "On-demand adapters evicted (least recently used)"),
        "failures": Counter("loraops_adapter_load_failures_total", "On-demand loads that failed"),
        "load_seconds": Histogram("loraops_adapter_load_seconds", "Seconds an on-demand load took", boundaries=[0.1, 0.25, 0.5, 1, 2, 5, 10, 30]),
        "resident": Gauge("loraops_resident_adapters", "Adapters resident on a replica (configured, canary and on demand)"),
    }
