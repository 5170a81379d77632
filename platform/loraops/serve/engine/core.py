"""The serving engine: batched generation at fixed shapes, with continuous or static batching.

A serving replica generates through an :class:`Engine` rather than one ``generate`` call per batch:

- **Fixed shapes.** Every forward pass runs at a shape from :class:`~loraops.buckets.Buckets` (rows
  padded up to a batch bucket, the attended cache window rounded up to a length bucket: see
  :mod:`loraops.slots`). :meth:`Engine.warm_up` runs every one of them, so a compiled decode step
  compiles during warm-up and never on a request.
- **Continuous batching** (``policy="continuous"``): requests join between decode steps as soon as a
  slot is free, and leave as soon as they end (end-of-text or their own ``max_new_tokens``).
  ``"static"`` admits a new batch only when the previous one has ended completely: the same kernels
  and shapes, so the two policies compare like for like.

How rows share the cache: all active rows write their next token at the same cache column ``t``; a
joining row's prompt is prefilled and stored so that it ends at ``t``. When a joining prompt is longer
than ``t`` the live columns shift right; when the columns before every active row's first token could
go and that lets the window use a smaller length bucket, they shift left. Active rows stay in the
lowest slots (a finished row's slot takes the last row), so a step over ``n`` rows runs at
``Buckets.batch_for(n)``.

Several adapters: each request names its adapter (None: the default); requests for different adapters
share batches, every pass naming each row's adapter (:meth:`loraops.generate.ServingModel.adapter_rows`).
Streaming: a request's ``on_token`` callback receives each new token id from the engine's thread.

Greedy rows produce the tokens :func:`loraops.generate.generate_completions` produces for the same
prompt and limit (tested on the built-in test dialogues, both serving modes). A row whose sampling
fails fails alone; if a forward pass raises, its rows are retried one at a time, so only a request
that fails on its own gets the error.

:meth:`Engine.submit` and :meth:`Engine.exclusive` may be called from any thread while the engine's
own thread (:meth:`Engine.start`) runs the loop; nothing else is thread-safe.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from loraops.errors import LoraopsError
from loraops.generate import Completion, completion_from_ids
from loraops.serve.engine.buckets import Buckets
from loraops.serve.engine.cache import SlotModel

log = logging.getLogger(__name__)

POLICIES = ("continuous", "static")
Policy = Literal["continuous", "static"]


@dataclass(frozen=True)
class Generated:
    """One finished request: its completion, its times, the adapter that generated it."""

    completion: Completion
    #: Seconds from :meth:`Engine.submit` until its prefill began (waiting for a slot).
    queue_s: float
    #: Seconds from :meth:`Engine.submit` until its last token: the model's share of the request's time.
    model_s: float
    adapter: str | None = None  # the adapter (PEFT name) that generated it


class RowFailed(LoraopsError):
    """Generation failed for this request alone (its batch-mates were not affected)."""


@dataclass
class _Request:
    prompt: list[int]
    max_new_tokens: int
    temperature: float
    future: Future
    submitted: float
    adapter: Any = None  # resolved to a loaded adapter name when it starts
    on_token: Callable[[int], None] | None = None
    solo: bool = False  # retried alone after a forward pass that included it failed


@dataclass
class _Row:
    request: _Request
    start: int  # cache column of its first prompt token
    admitted: float
    adapter: str | None = None
    tokens: list[int] = field(default_factory=list)

    @property
    def remaining(self) -> int:
        return self.request.max_new_tokens - len(self.tokens)


class Engine:
    """Batched generation for one :class:`~loraops.generate.ServingModel` at fixed shapes (see the module docstring).

    ``observer``, if given, is called with ``(phase, batch, length)`` before every forward pass (tests
    record the shapes with it). ``resolve_adapter`` maps a request's ``adapter`` to a loaded adapter's
    name when the request starts, so one waiting while its adapter is replaced runs with the replacement.
    """

    def __init__(
        self, served, buckets: Buckets, policy: Policy = "continuous", max_batch_size: int | None = None, batch_wait_s: float = 0.0,
        compile: bool = False, observer: Callable[[str, int, int], None] | None = None, resolve_adapter: Callable | None = None,
    ):  # fmt: skip
        if policy not in POLICIES:
            raise LoraopsError(f"policy {policy!r}: expected one of {', '.join(POLICIES)}")
        self.served, self.buckets, self.policy = served, buckets, policy
        self._resolve_adapter = resolve_adapter or (lambda key: key)
        self.slots = SlotModel(served, buckets, compile=compile, observer=observer)
        self._eos = served.tokenizer.eos_token_id
        self._column = 0  # the cache column the next decode step writes
        self._rows: list[_Row] = []  # slot i holds _rows[i]
        self._pending: deque[_Request] = deque()
        self._cond = threading.Condition()
        self._paused, self._busy, self._stopping = 0, False, False
        self._thread: threading.Thread | None = None
        self.failure: BaseException | None = None
        self.set_limits(max_batch_size or buckets.max_batch, batch_wait_s)

    @property
    def compiled(self) -> bool:
        return self.slots.compiled

    # --- public API ----------------------------------------------------------------------------

    def set_limits(self, max_batch_size: int, batch_wait_s: float) -> None:
        """Most rows decoding together (at most the largest batch bucket) and how long an idle engine waits for a batch to fill."""
        if not 1 <= max_batch_size <= self.buckets.max_batch:
            raise LoraopsError(f"max_batch_size {max_batch_size}: the engine's batch buckets go up to {self.buckets.max_batch}")
        with self._cond:
            self.max_batch_size, self.batch_wait_s = max_batch_size, batch_wait_s
            self._cond.notify_all()

    def submit(self, prompt: Sequence[int], max_new_tokens: int, temperature: float = 0.0, adapter: Any = None, on_token=None) -> Future:
        """Queue one request; the future resolves to a :class:`Generated` (or raises :class:`RowFailed`). Thread-safe.

        ``adapter``: a loaded adapter's name, or a key ``resolve_adapter`` maps to one (None: the default).
        ``on_token(token_id)`` is called from the engine's thread for each new token, before the future resolves."""
        if not prompt:
            raise ValueError("empty prompt")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        if len(prompt) + max_new_tokens - 1 > self.buckets.max_length:
            raise ValueError(f"a prompt of {len(prompt)} tokens plus {max_new_tokens} new tokens is over the largest cache bucket ({self.buckets.max_length})")
        future: Future = Future()
        with self._cond:
            if self.failure is not None:
                raise LoraopsError(f"the engine stopped after an error: {self.failure}")
            self._pending.append(_Request(list(prompt), max_new_tokens, float(temperature), future, time.perf_counter(), adapter, on_token))
            self._cond.notify_all()
        return future

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int | Sequence[int], temperature: float = 0.0) -> list[Completion]:
        """Generate for all ``prompts`` in the calling thread (the engine's own thread must not run); results in order."""
        if self._thread is not None:
            raise LoraopsError("generate() runs the loop in the calling thread: the engine's own thread is running")
        limits = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
        futures = [self.submit(p, n, temperature) for p, n in zip(prompts, limits, strict=True)]
        while not all(f.done() for f in futures):
            self.run_once(wait=False)
        return [f.result().completion for f in futures]

    def warm_up(self) -> tuple[int, float]:
        """Run every bucket shape once (and so compile each, when compiling); returns (shapes, seconds). Call before any request."""
        if self._rows or self._pending:
            raise LoraopsError("warm_up() runs before any request")
        return self.slots.warm_up()

    def start(self) -> None:
        """Run the loop in a background thread until :meth:`stop`."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="loraops-engine", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.failure is None

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold the model alone: no request starts, and the ones running finish first (for adapter swaps). Thread-safe."""
        with self._cond:
            self._paused += 1
            while self._rows or self._busy:
                if self._thread is None:
                    self._paused -= 1
                    raise LoraopsError("exclusive() with requests in flight and no engine thread to finish them")
                self._cond.wait()
        try:
            yield
        finally:
            with self._cond:
                self._paused -= 1
                self._cond.notify_all()

    def adopt(self, other: Engine) -> None:
        """Take over the requests waiting in ``other`` (held with :meth:`exclusive`, so none is running there). Thread-safe."""
        with other._cond:
            waiting = list(other._pending)
            other._pending.clear()
        with self._cond:
            self._pending.extend(waiting)
            self._cond.notify_all()

    # --- the loop ------------------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            while self.run_once(wait=True):
                pass
        except BaseException as exc:  # noqa: BLE001 - a dead loop must fail every waiting request, not hang them
            log.exception("the engine loop stopped")
            with self._cond:
                self.failure = exc
                waiting = [row.request for row in self._rows] + list(self._pending)
                self._rows, self._pending = [], deque()
                self._cond.notify_all()
            for request in waiting:
                _fail(request, RowFailed(f"the engine stopped: {exc}"))

    def run_once(self, wait: bool) -> bool:
        """Admit what may join, prefill it, run one decode step. With ``wait``, block until there is work; False once stopping."""
        with self._cond:
            while True:
                if self._stopping:
                    return False
                if self._rows:
                    break
                if self._pending and not self._paused:
                    delay = self._fill_delay()
                    if delay <= 0 or not wait:
                        break
                    self._cond.wait(delay)
                    continue
                if not wait:
                    return True
                self._cond.wait()
            joiners = self._admit()
            self._busy = True
        try:
            if joiners:
                self._join(joiners)
            if self._rows:
                self._step()
        finally:
            with self._cond:
                self._busy = False
                self._cond.notify_all()
        return True

    def _fill_delay(self) -> float:
        """Seconds an idle engine still waits for its first batch to fill."""
        if len(self._pending) >= self.max_batch_size or self._pending[0].solo:
            return 0.0
        return self._pending[0].submitted + self.batch_wait_s - time.perf_counter()

    def _admit(self) -> list[_Request]:
        """Requests that start now (called under the lock): FIFO, as many as free slots and cache room allow."""
        while self._pending and self._pending[0].future.cancelled():
            self._pending.popleft()
        if self._paused or not self._pending:
            return []
        if self._rows and (self.policy == "static" or self._rows[0].request.solo or self._pending[0].solo):
            return []
        if self._pending[0].solo:
            return [self._pending.popleft()]
        free = self.max_batch_size - len(self._rows)
        # The column the joiners align to once the columns before every running row are dropped; an
        # idle engine starts over at column 0, wherever the last request ended.
        column = self._column - min(row.start for row in self._rows) if self._rows else 0
        need = max((row.remaining for row in self._rows), default=0)
        joiners: list[_Request] = []
        longest = 0
        while self._pending and len(joiners) < free and not self._pending[0].solo:
            candidate = self._pending[0]
            longest_after = max(longest, len(candidate.prompt))
            need_after = max(need, candidate.max_new_tokens - 1)
            if max(column, longest_after) + need_after > self.buckets.max_length:
                break  # no room beside the running rows yet: it waits, and so does everything behind it
            joiners.append(self._pending.popleft())
            longest, need = longest_after, need_after
        return joiners

    # --- joining -------------------------------------------------------------------------------

    def _join(self, joiners: list[_Request]) -> None:
        """Prefill the joining requests (a prefill bucket at a time) and give each a slot."""
        chunk = self.buckets.prefill_batch[-1]
        for first in range(0, len(joiners), chunk):
            self._join_chunk(joiners[first : first + chunk])

    def _join_chunk(self, requests: list[_Request]) -> None:
        joiners, adapters = [], []
        for request in requests:
            adapter = self._resolve_adapter(request.adapter) if request.adapter is not None else None
            if adapter is not None and adapter not in self.served.adapters:
                _fail(request, RowFailed(f"adapter {adapter} is not loaded (loaded: {', '.join(self.served.adapters)})"))
                continue
            joiners.append(request)
            adapters.append(adapter)
        if not joiners:
            return
        try:
            first_logits, scratch, width = self.slots.prefill([r.prompt for r in joiners], adapters)
        except Exception as exc:  # noqa: BLE001 - retried alone; only a request that fails alone gets the error
            self._retry_alone(joiners, exc)
            return
        now = time.perf_counter()
        longest = max(len(r.prompt) for r in joiners)
        if not self._rows:
            self._column = longest
        else:
            need = max(max(row.remaining for row in self._rows), max(r.max_new_tokens for r in joiners) - 1)
            if max(self._column, longest) + need > self.buckets.max_length:
                self._shift_columns(-min(row.start for row in self._rows))  # the room _admit counted on
            if longest > self._column:
                self._shift_columns(longest - self._column)
        for j, request in enumerate(joiners):
            row = _Row(request, start=self._column - len(request.prompt), admitted=now, adapter=adapters[j])
            try:
                self._append(row, self._pick(first_logits[j], request.temperature))
            except RowFailed as exc:
                _fail(request, exc)
                continue
            if self._finished(row):
                self._deliver(row)
                continue
            self.slots.store(len(self._rows), scratch, j, width, len(request.prompt), self._column)
            self._rows.append(row)

    # --- decoding ------------------------------------------------------------------------------

    def _step(self) -> None:
        """One decode step for every active row; finished rows leave."""
        for i in reversed(range(len(self._rows))):
            if self._rows[i].request.future.cancelled():  # its caller went away: stop spending steps on it
                self._drop_slot(i)
        if not self._rows:
            return
        self._compact_columns()
        rows = self._rows
        try:
            positions, starts = [self._column - row.start for row in rows], [row.start for row in rows]
            logits = self.slots.decode([row.tokens[-1] for row in rows], positions, starts, self._column, [row.adapter for row in rows])
        except Exception as exc:  # noqa: BLE001 - retried alone; only a request that fails alone gets the error
            self._rows = []
            self._retry_alone([row.request for row in rows], exc)
            return
        self._column += 1
        done: list[int] = []
        for i, row in enumerate(rows):
            try:
                self._append(row, self._pick(logits[i], row.request.temperature))
            except RowFailed as exc:
                _fail(row.request, exc)
                done.append(i)
                continue
            if self._finished(row):
                self._deliver(row)
                done.append(i)
        for i in reversed(done):
            self._drop_slot(i)

    @staticmethod
    def _pick(logits: torch.Tensor, temperature: float) -> int:
        """The next token: argmax at temperature 0 (as ``generate`` does), else a sample at that temperature."""
        if temperature <= 0:
            return int(logits.argmax())
        probs = torch.softmax(logits / temperature, dim=-1)
        if not bool(torch.isfinite(probs).all()) or float(probs.sum()) <= 0:
            raise RowFailed("sampling failed: the next-token probabilities are not finite")
        return int(torch.multinomial(probs, 1))

    @staticmethod
    def _append(row: _Row, token: int) -> None:
        row.tokens.append(token)
        if row.request.on_token is not None:
            try:
                row.request.on_token(token)
            except Exception as exc:  # noqa: BLE001 - a listener that went away must not stop generation
                log.warning("a token listener failed (%s: %s); generation goes on", type(exc).__name__, exc)

    def _finished(self, row: _Row) -> bool:
        return row.tokens[-1] == self._eos or row.remaining <= 0

    def _deliver(self, row: _Row) -> None:
        request = row.request
        completion = completion_from_ids(self.served.tokenizer, row.tokens, len(request.prompt))
        if not request.future.done():
            now = time.perf_counter()
            times = {"queue_s": row.admitted - request.submitted, "model_s": now - request.submitted}
            request.future.set_result(Generated(completion, **times, adapter=row.adapter or self.served.adapter_name))

    def _retry_alone(self, requests: list[_Request], exc: Exception) -> None:
        """After a failed forward pass: a request that was alone gets the error, the others are retried one at a time."""
        retry = []
        for request in requests:
            if request.solo or len(requests) == 1:
                _fail(request, RowFailed(f"generation failed: {type(exc).__name__}: {exc}"))
            else:
                request.solo = True
                retry.append(request)
        if retry:
            log.warning("a forward pass of %d requests failed (%s: %s): retrying them one at a time", len(requests), type(exc).__name__, exc)
        with self._cond:
            self._pending.extendleft(reversed(retry))

    # --- moving rows and columns ---------------------------------------------------------------

    def _drop_slot(self, slot: int) -> None:
        """Free ``slot``: the last active row moves into it, so active rows stay in the lowest slots."""
        last = len(self._rows) - 1
        if slot != last:
            self.slots.move_slot(last, slot, self._column)
            self._rows[slot] = self._rows[last]
        self._rows.pop()

    def _compact_columns(self) -> None:
        """Drop the columns before every active row's first token when that lets the window use a smaller length bucket."""
        shift = min(row.start for row in self._rows)
        if shift and self.buckets.length_for(self._column + 1 - shift) < self.buckets.length_for(self._column + 1):
            self._shift_columns(-shift)

    def _shift_columns(self, delta: int) -> None:
        """Move the active rows' live columns by ``delta`` (negative: left); positions are per row, so no number changes."""
        if delta and self._rows:
            self.slots.shift_columns(len(self._rows), min(row.start for row in self._rows), self._column, delta)
            self._column += delta
            for row in self._rows:
                row.start += delta


def _fail(request: _Request, exc: Exception) -> None:
    if not request.future.done():
        request.future.set_exception(exc)
