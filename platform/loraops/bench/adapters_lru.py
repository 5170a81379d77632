"""``bench serve --model-only --adapters N --max-adapters K``: a resident set smaller than the working set.

A replica with ``load_on_demand`` keeps K on-demand adapters in Serve's LRU next to its configured
default. :class:`ResidentSet` does the same on the benchmark's engine: a request for a resident
adapter is a hit; any other one is a miss that loads the adapter (fetched and sha256-verified, then
added between two engine steps), first evicting the least recently used one. As on a replica
(:mod:`loraops.serve.on_demand`): loads and unloads run one at a time on their own thread, an
evicted adapter with rows still running is unloaded when its last row ends (a reference count), and
a request for it meanwhile takes it back without a load. The default adapter (rank 1 of the mix) is
always resident and counts as a hit.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any


class ResidentSet:
    """K adapters resident by least recent use; ``load(ref) -> slot`` and ``unload(slot)`` change the engine (thread-safe)."""

    def __init__(self, capacity: int, load: Callable[[str], str], unload: Callable[[str], None]):
        self.capacity, self._load, self._unload = capacity, load, unload
        self._lock = threading.Lock()
        self._changes = ThreadPoolExecutor(1, thread_name_prefix="bench-adapter-changes")  # one change at a time, as a replica's
        self.resident: OrderedDict[str, str] = OrderedDict()
        self._rows: dict[str, int] = {}
        self._draining: dict[str, str] = {}  # evicted, rows still running: ref -> slot
        self.hits = self.misses = self.reclaimed = self.evictions = 0
        self.load_seconds: list[float] = []

    def acquire(self, ref: str) -> str:
        """The slot of ``ref`` with one row counted: resident (a hit), taken back from the draining, or loaded (a miss)."""
        with self._lock:
            slot = self._take(ref)
            if slot is not None:
                self.hits += 1
                return slot
            self.misses += 1
        return self._changes.submit(self._load_missing, ref).result()

    def _take(self, ref: str) -> str | None:
        slot = self.resident.get(ref)
        if slot is None and ref in self._draining:  # evicted but not unloaded yet: back into the set, no load
            slot = self.resident[ref] = self._draining.pop(ref)
            self.reclaimed += 1
            for victim in self._evict_over(self.capacity):
                self._changes.submit(self._unload, victim)
        if slot is not None:
            self.resident.move_to_end(ref)
            self._rows[ref] = self._rows.get(ref, 0) + 1
        return slot

    def _load_missing(self, ref: str) -> str:
        """On the changes thread: a second miss of the same reference finds the first one's load done."""
        with self._lock:
            slot = self._take(ref)
            if slot is not None:
                return slot
            idle = self._evict_over(self.capacity - 1)
        for victim in idle:
            self._unload(victim)
        started = time.perf_counter()
        slot = self._load(ref)
        with self._lock:
            self.load_seconds.append(time.perf_counter() - started)
            self.resident[ref] = slot
            self._rows[ref] = self._rows.get(ref, 0) + 1
        return slot

    def _evict_over(self, keep: int) -> list[str]:
        """Evict the least recently used down to ``keep``; the slots with no row (to unload now). Under the lock."""
        idle = []
        while len(self.resident) > keep:
            ref, slot = self.resident.popitem(last=False)
            self.evictions += 1
            if self._rows.get(ref, 0) == 0:
                idle.append(slot)
            else:
                self._draining[ref] = slot
        return idle

    def release(self, ref: str) -> None:
        """A row of ``ref`` ended (on the engine's thread): the last one of an evicted adapter unloads it, on the changes thread."""
        with self._lock:
            self._rows[ref] -= 1
            slot = self._draining.pop(ref) if self._rows[ref] == 0 and ref in self._draining else None
        if slot is not None:
            self._changes.submit(self._unload, slot)

    def submit(self, engine, ref: str, prompt: list[int], max_new_tokens: int) -> Future:
        """One request of ``ref`` on ``engine``, its row counted until it ends."""
        slot = self.acquire(ref)
        try:
            future = engine.submit(prompt, max_new_tokens, adapter=slot)
        except BaseException:
            self.release(ref)
            raise
        future.add_done_callback(lambda _: self.release(ref))
        return future

    def close(self) -> list[str]:
        """Wait for the pending unloads; the slots still loaded (resident or draining), for the caller to remove."""
        self._changes.shutdown(wait=True)
        return [*self.resident.values(), *self._draining.values()]

    def counts(self, default_requests: int) -> dict[str, Any]:
        """Hits (the default's requests among them), misses, loads, evictions and the hit ratio over all requests."""
        hits = self.hits + default_requests
        total = hits + self.misses
        return {
            "capacity": self.capacity,
            "requests": total,
            "hits": hits,
            "misses": self.misses,
            "reclaimed": self.reclaimed,
            "loads": len(self.load_seconds),
            "evictions": self.evictions,
            "hit_ratio": round(hits / total, 3) if total else None,
        }
