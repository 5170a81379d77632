"""Admission and scheduling: the queue of waiting requests, the rows decoding, and who may join when.

The :class:`Scheduler` holds both under one lock (a :class:`threading.Condition`): callers on any
thread queue requests and pause it (adapter swaps), the engine's thread asks it for the next pass, a
:class:`StepPlan` (in the spirit of vLLM v1's ``SchedulerOutput``: what to prefill, which slots to
free, whether to decode). Requests start FIFO, as many as free slots and cache room allow; with
``policy="static"`` a new batch starts only when the previous one has ended completely. A request
retried alone after a failed forward pass (``solo``) runs by itself.

The scheduler owns the rows (slot ``i`` holds ``rows[i]``) and the room rule (:meth:`Scheduler.placement`):
the engine changes them only through :meth:`Scheduler.place`, :meth:`Scheduler.free`,
:meth:`Scheduler.shift` and :meth:`Scheduler.clear`, and moves the cache to match.
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
from loraops.serve.engine.params import SamplingParams

POLICIES = ("continuous", "static")
Policy = Literal["continuous", "static"]


class RowFailed(LoraopsError):
    """Generation failed for this request alone (its batch-mates were not affected)."""


@dataclass
class Request:
    prompt: list[int]
    max_new_tokens: int
    sampling: SamplingParams
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
    stopped_at: int | None = None  # where a stop string starts in the row's text, once one appeared
    generator: Any = None  # the row's own torch.Generator when its request has a seed
    logprobs: list = field(default_factory=list)  # per token (log probability, [(token, log probability), ...]) when asked

    @property
    def remaining(self) -> int:
        return self.request.max_new_tokens - len(self.tokens)


@dataclass(frozen=True)
class StepPlan:
    """One pass of the engine, as the scheduler decided it.

    ``joining``: requests to prefill, in this order; each takes the next free slot (``len(rows)``) unless
    it ends at its first token (see :meth:`Scheduler.place`). ``dropping``: slots whose caller went away,
    highest first, freed after the joins. Then every row left decodes one token (``decoding``)."""

    joining: list[Request]
    dropping: list[int]
    decoding: bool


@dataclass(frozen=True)
class Placement:
    """Where joining prompts go beside the running rows: drop the ``drop`` columns before every running row
    (a shift left), then shift right as needed so that every prompt ends at ``column``."""

    drop: int
    column: int


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

    def next_step(self, wait: bool, column: int) -> StepPlan | None:
        """The next pass (maybe with nothing to do), marking the engine busy; None once stopping.

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
                    return StepPlan([], [], decoding=False)
                self.cond.wait()
            joiners = self._admit(column)
            self.busy = True
            dropping = [slot for slot in reversed(range(len(self.rows))) if self.rows[slot].request.future.cancelled()]
            return StepPlan(joiners, dropping, decoding=len(self.rows) + len(joiners) > len(dropping))

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
        joiners: list[Request] = []
        while self.pending and len(joiners) < free and not self.pending[0].solo:
            if self.placement([*joiners, self.pending[0]], column) is None:
                break  # no room beside the running rows yet: it waits, and so does everything behind it
            joiners.append(self.pending.popleft())
        return joiners

    def placement(self, joiners: list[Request], column: int) -> Placement | None:
        """The room rule: where ``joiners`` go beside the running rows when the next decode step writes ``column``;
        None when they do not fit in the largest length bucket even once the columns before every running row are dropped.

        An idle engine starts over at column 0, wherever the last request ended. Called by admission (under the
        lock) and by the engine for each prefill chunk it places, so both count the same room."""
        longest = max(len(r.prompt) for r in joiners)
        need = max(max((row.remaining for row in self.rows), default=0), max(r.max_new_tokens for r in joiners) - 1)
        drop = 0
        if not self.rows:
            column = 0
        elif max(column, longest) + need > self.buckets.max_length:
            drop = min(row.start for row in self.rows)
            column -= drop
        if max(column, longest) + need > self.buckets.max_length:
            return None
        return Placement(drop, max(column, longest))

    # --- the rows, changed by the engine's thread only -----------------------------------------

    def place(self, row: Row) -> int:
        """Give ``row`` the next free slot; returns it."""
        self.rows.append(row)
        return len(self.rows) - 1

    def free(self, slot: int) -> int | None:
        """Free ``slot``: the last row moves into it, so rows stay in the lowest slots. Returns the slot that row
        left (the engine moves its cache there), or None when ``slot`` was the last."""
        last = len(self.rows) - 1
        moved = None
        if slot != last:
            self.rows[slot], moved = self.rows[last], last
        self.rows.pop()
        return moved

    def shift(self, delta: int) -> None:
        """The rows' columns moved by ``delta`` (negative: left)."""
        for row in self.rows:
            row.start += delta

    @property
    def first_column(self) -> int:
        """The first column any running row uses."""
        return min(row.start for row in self.rows)

    def clear(self) -> list[Row]:
        """Take every running row out (a failed forward pass retries their requests)."""
        rows, self.rows = self.rows, []
        return rows

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
