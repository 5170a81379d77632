"""Admission and scheduling: the queue of waiting requests, the rows decoding, and who may join when.

The :class:`Scheduler` holds both under one lock (a :class:`threading.Condition`): callers on any
thread queue requests and pause it (adapter swaps), the engine's thread asks it for the next work.
Requests start FIFO, as many as free slots and cache room allow; with ``policy="static"`` a new batch
starts only when the previous one has ended completely. A request retried alone after a failed forward
pass (``solo``) runs by itself.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Literal

from loraops.errors import LoraopsError
from loraops.serve.engine.buckets import Buckets

POLICIES = ("continuous", "static")
Policy = Literal["continuous", "static"]


class RowFailed(LoraopsError):
    """Generation failed for this request alone (its batch-mates were not affected)."""


@dataclass
class Request:
    prompt: list[int]
    max_new_tokens: int
    temperature: float
    future: Future
    submitted: float
    adapter: Any = None  # resolved to a loaded adapter name when it starts
    on_token: Callable[[int], None] | None = None
    solo: bool = False  # retried alone after a forward pass that included it failed


@dataclass
class Row:
    request: Request
    start: int  # cache column of its first prompt token
    admitted: float
    adapter: str | None = None
    tokens: list[int] = field(default_factory=list)

    @property
    def remaining(self) -> int:
        return self.request.max_new_tokens - len(self.tokens)


def fail(request: Request, exc: Exception) -> None:
    if not request.future.done():
        request.future.set_exception(exc)


class Scheduler:
    """Waiting requests and decoding rows of one engine (slot ``i`` holds ``rows[i]``), and the admission rule.

    ``max_batch_size`` is not checked here: the serve settings validate it where they are read, and
    :meth:`set_limits` takes it as given (capped by the largest batch bucket the cache has)."""

    def __init__(self, buckets: Buckets, policy: Policy, max_batch_size: int, batch_wait_s: float):
        if policy not in POLICIES:
            raise LoraopsError(f"policy {policy!r}: expected one of {', '.join(POLICIES)}")
        self.buckets, self.policy = buckets, policy
        self.rows: list[Row] = []
        self.pending: deque[Request] = deque()
        self.cond = threading.Condition()
        self.paused, self.busy, self.stopping = 0, False, False
        self.held = 0  # between_steps() holders: no pass runs, the rows stay
        self.failure: BaseException | None = None
        self.set_limits(max_batch_size, batch_wait_s)

    def set_limits(self, max_batch_size: int, batch_wait_s: float) -> None:
        """Most rows decoding together (at most the largest batch bucket) and how long an idle engine waits for a batch to fill."""
        with self.cond:
            self.max_batch_size, self.batch_wait_s = min(max_batch_size, self.buckets.max_batch), batch_wait_s
            self.cond.notify_all()

    def enqueue(self, request: Request) -> None:
        with self.cond:
            if self.failure is not None:
                raise LoraopsError(f"the engine stopped after an error: {self.failure}")
            self.pending.append(request)
            self.cond.notify_all()

    def next_work(self, wait: bool, column: int) -> list[Request] | None:
        """The requests that start now (maybe none), marking the engine busy; None once stopping.

        With ``wait``, block until there is work: a running row, or waiting requests whose batch is full
        or waited long enough. ``column``: the cache column the next decode step writes."""
        with self.cond:
            while True:
                if self.stopping:
                    return None
                if self.held and wait:  # the engine's thread; a caller running passes itself holds nothing
                    self.cond.wait()
                    continue
                if self.rows:
                    break
                if self.pending and not self.paused:
                    delay = self._fill_delay()
                    if delay <= 0 or not wait:
                        break
                    self.cond.wait(delay)
                    continue
                if not wait:
                    return []
                self.cond.wait()
            joiners = self._admit(column)
            self.busy = True
            return joiners

    def idle(self) -> None:
        """The engine's pass is over: an :meth:`exclusive` waiting for it may go on."""
        with self.cond:
            self.busy = False
            self.cond.notify_all()

    def _fill_delay(self) -> float:
        """Seconds an idle engine still waits for its first batch to fill."""
        if len(self.pending) >= self.max_batch_size or self.pending[0].solo:
            return 0.0
        return self.pending[0].submitted + self.batch_wait_s - time.perf_counter()

    def _admit(self, column: int) -> list[Request]:
        """Requests that start now (called under the lock): FIFO, as many as free slots and cache room allow."""
        while self.pending and self.pending[0].future.cancelled():
            self.pending.popleft()
        if self.paused or not self.pending:
            return []
        if self.rows and (self.policy == "static" or self.rows[0].request.solo or self.pending[0].solo):
            return []
        if self.pending[0].solo:
            return [self.pending.popleft()]
        free = self.max_batch_size - len(self.rows)
        # The column the joiners align to once the columns before every running row are dropped; an
        # idle engine starts over at column 0, wherever the last request ended.
        column = column - min(row.start for row in self.rows) if self.rows else 0
        need = max((row.remaining for row in self.rows), default=0)
        joiners: list[Request] = []
        longest = 0
        while self.pending and len(joiners) < free and not self.pending[0].solo:
            candidate = self.pending[0]
            longest_after = max(longest, len(candidate.prompt))
            need_after = max(need, candidate.max_new_tokens - 1)
            if max(column, longest_after) + need_after > self.buckets.max_length:
                break  # no room beside the running rows yet: it waits, and so does everything behind it
            joiners.append(self.pending.popleft())
            longest, need = longest_after, need_after
        return joiners

    @contextlib.contextmanager
    def exclusive(self, has_thread: Callable[[], bool]) -> Iterator[None]:
        """No request starts, and the running ones finish first. ``has_thread``: whether a loop runs to finish them."""
        with self.cond:
            self.paused += 1
            while self.rows or self.busy:
                if not has_thread():
                    self.paused -= 1
                    raise LoraopsError("exclusive() with requests in flight and no engine thread to finish them")
                self.cond.wait()
        try:
            yield
        finally:
            with self.cond:
                self.paused -= 1
                self.cond.notify_all()

    @contextlib.contextmanager
    def between_steps(self) -> Iterator[None]:
        """No pass runs while held: the running pass ends first, the rows stay (they wait, they are not drained)."""
        with self.cond:
            self.held += 1
            while self.busy:
                self.cond.wait()
        try:
            yield
        finally:
            with self.cond:
                self.held -= 1
                self.cond.notify_all()

    def take_waiting(self) -> list[Request]:
        with self.cond:
            waiting = list(self.pending)
            self.pending.clear()
        return waiting

    def add_waiting(self, requests: list[Request], first: bool = False) -> None:
        """Queue ``requests`` at the end (or, with ``first``, ahead of everything waiting: retries)."""
        with self.cond:
            if first:
                self.pending.extendleft(reversed(requests))
            else:
                self.pending.extend(requests)
            self.cond.notify_all()

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify_all()

    def fail_all(self, exc: BaseException) -> None:
        """The loop died: every running and waiting request fails with it, and no new one is taken."""
        with self.cond:
            self.failure = exc
            waiting = [row.request for row in self.rows] + list(self.pending)
            self.rows, self.pending = [], deque()
            self.cond.notify_all()
        for request in waiting:
            fail(request, RowFailed(f"the engine stopped: {exc}"))
