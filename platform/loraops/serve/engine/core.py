"""The serving engine: batched generation at fixed shapes, with continuous or static batching.

The engine is three parts: :mod:`~loraops.serve.engine.scheduler` (the queue, the running rows,
admission and the room they need), :mod:`~loraops.serve.engine.cache` (the KV cache of fixed slots and
the forward passes over it, at the shapes of :mod:`~loraops.serve.engine.buckets`) and
:mod:`~loraops.serve.engine.sampler` (the next token of each row under its own sampling parameters).
:class:`Engine` joins them: each pass it runs the scheduler's :class:`~loraops.serve.engine.scheduler.StepPlan`
(prefill the joiners into slots, free the slots of cancelled requests, one decode step) and moves the
cache to match the rows; its thread is :mod:`~loraops.serve.engine.loop`'s.

A serving replica generates through an :class:`Engine` rather than one ``generate`` call per batch:

- **Fixed shapes.** Every forward pass runs at a shape from :class:`~loraops.serve.engine.buckets.Buckets` (rows
  padded up to a batch bucket, the attended cache window rounded up to a length bucket: see
  :mod:`loraops.serve.engine.cache`). :meth:`Engine.warm_up` runs every one of them, so a compiled decode step
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
share batches, every pass naming each row's adapter (:meth:`loraops.serve.model.ServingModel.adapter_rows`).
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
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from loraops.errors import LoraopsError
from loraops.generate import Completion, completion_from_ids, find_stop
from loraops.serve.engine.buckets import Buckets
from loraops.serve.engine.cache import SlotModel
from loraops.serve.engine.loop import LoopThread
from loraops.serve.engine.params import SamplingParams
from loraops.serve.engine.sampler import sample_into
from loraops.serve.engine.scheduler import POLICIES, Policy, Request, Row, RowFailed, Scheduler, StepPlan, fail

log = logging.getLogger(__name__)

__all__ = ["POLICIES", "Engine", "Generated", "Policy", "RowFailed"]


@dataclass(frozen=True)
class Generated:
    """One finished request: its completion, its times, the adapter that generated it."""

    completion: Completion
    #: Seconds from :meth:`Engine.submit` until its prefill began (waiting for a slot).
    queue_s: float
    #: Seconds from :meth:`Engine.submit` until its last token: the model's share of the request's time.
    model_s: float
    #: "stop": end-of-text or a stop text ended it; "length": it reached its ``max_new_tokens``.
    finish_reason: str = "length"
    adapter: str | None = None  # the adapter (PEFT name) that generated it
    #: Per generated token: (log probability, [(token, log probability) of the most likely]), when the request asked.
    logprobs: list[tuple[float, list[tuple[int, float]]]] | None = None


class Engine:
    """Batched generation for one :class:`~loraops.serve.model.ServingModel` at fixed shapes (see the module docstring).

    ``observer``, if given, is called with ``(phase, batch, length)`` before every forward pass (tests
    record the shapes with it). ``resolve_adapter`` maps a request's ``adapter`` to a loaded adapter's
    name when the request starts, so one waiting while its adapter is replaced runs with the replacement.
    """

    def __init__(
        self, served, buckets: Buckets, policy: Policy = "continuous", max_batch_size: int | None = None, batch_wait_s: float = 0.0,
        compile: bool = False, observer: Callable[[str, int, int], None] | None = None, resolve_adapter: Callable | None = None,
    ):  # fmt: skip
        self.served, self.buckets = served, buckets
        self.scheduler = Scheduler(buckets, policy, max_batch_size or buckets.max_batch, batch_wait_s)
        self._resolve_adapter = resolve_adapter or (lambda key: key)
        self.slots = SlotModel(served, buckets, compile=compile, observer=observer)
        self._eos = served.tokenizer.eos_token_id
        self._column = 0  # the cache column the next decode step writes
        self._thread = LoopThread(self.run_once, self.scheduler.fail_all)

    @classmethod
    def from_settings(
        cls, served, settings, max_batch_size: int | None = None, *, policy: Policy | None = None, batch_wait_s: float | None = None,
        resolve_adapter: Callable | None = None,
    ) -> Engine:  # fmt: skip
        """The engine a model replica runs for ``served`` under :class:`~loraops.serve.settings.ServeSettings` ``settings``.

        Buckets from the settings (batch buckets capped by ``max_batch_size``, default the settings' own;
        length buckets by ``context_tokens``, default the model's context); ``policy`` and ``batch_wait_s``
        default to the settings' ``batching`` and ``batch_wait_timeout_s``. Not warmed up, not started: see :meth:`warm_start`."""
        max_batch_size = max_batch_size or settings.max_batch_size
        buckets = settings.buckets(max_batch_size, settings.context_tokens or served.context_tokens)
        return cls(
            served,
            buckets,
            policy=policy or settings.batching,
            max_batch_size=max_batch_size,
            batch_wait_s=settings.batch_wait_timeout_s if batch_wait_s is None else batch_wait_s,
            compile=settings.compiles(served),
            resolve_adapter=resolve_adapter,
        )

    def warm_start(self) -> dict[str, Any]:
        """Run every shape once (:meth:`warm_up`), start the engine's thread; returns the warm-up figures (shapes, seconds, compiled)."""
        shapes, seconds = self.warm_up()
        buckets = self.buckets
        log.info(
            "warm-up: %d shapes (batch %s x cache length %s, prefill batch %s) in %.1f s%s",
            shapes, list(buckets.batch), list(buckets.length), list(buckets.prefill_batch), seconds, ", decode step compiled" if self.compiled else "",
        )  # fmt: skip
        if self.compiled and self.served.mixed:
            log.info("several adapters are loaded: decode steps run uncompiled until one is left")
        self.start()
        return {"shapes": shapes, "seconds": round(seconds, 2), "compiled": self.compiled}

    @property
    def compiled(self) -> bool:
        return self.slots.compiled

    @property
    def policy(self) -> Policy:
        return self.scheduler.policy

    @property
    def max_batch_size(self) -> int:
        return self.scheduler.max_batch_size

    @property
    def batch_wait_s(self) -> float:
        return self.scheduler.batch_wait_s

    @property
    def failure(self) -> BaseException | None:
        return self.scheduler.failure

    @property
    def running(self) -> int:
        """Requests decoding now."""
        return len(self.scheduler.rows)

    @property
    def waiting(self) -> int:
        """Requests queued, not started yet."""
        return len(self.scheduler.pending)

    # --- public API ----------------------------------------------------------------------------

    def set_limits(self, max_batch_size: int, batch_wait_s: float) -> None:
        """Most rows decoding together (the settings validated it; capped by the largest batch bucket) and the idle wait for a batch to fill."""
        self.scheduler.set_limits(max_batch_size, batch_wait_s)

    def submit(
        self, prompt: Sequence[int], max_new_tokens: int, temperature: float = 0.0, adapter: Any = None, on_token=None,
        sampling: SamplingParams | None = None,
    ) -> Future:  # fmt: skip
        """Queue one request; the future resolves to a :class:`Generated` (or raises :class:`RowFailed`). Thread-safe.

        ``adapter``: a loaded adapter's name, or a key ``resolve_adapter`` maps to one (None: the default).
        ``on_token(token_id)`` is called from the engine's thread for each new token, before the future resolves.
        ``sampling``: the request's sampling parameters (its temperature replaces ``temperature``)."""
        if not prompt:
            raise ValueError("empty prompt")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        if len(prompt) + max_new_tokens - 1 > self.buckets.max_length:
            raise ValueError(f"a prompt of {len(prompt)} tokens plus {max_new_tokens} new tokens is over the largest cache bucket ({self.buckets.max_length})")
        future: Future = Future()
        sampling = sampling or SamplingParams(temperature=float(temperature))
        self.scheduler.enqueue(Request(list(prompt), max_new_tokens, sampling, future, time.perf_counter(), adapter, on_token))
        return future

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int | Sequence[int], temperature: float = 0.0) -> list[Completion]:
        """Generate for all ``prompts`` in the calling thread (the engine's own thread must not run); results in order."""
        if self._thread.running:
            raise LoraopsError("generate() runs the loop in the calling thread: the engine's own thread is running")
        limits = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
        futures = [self.submit(p, n, temperature) for p, n in zip(prompts, limits, strict=True)]
        while not all(f.done() for f in futures):
            self.run_once(wait=False)
        return [f.result().completion for f in futures]

    def warm_up(self) -> tuple[int, float]:
        """Run every bucket shape once (and so compile each, when compiling); returns (shapes, seconds). Call before any request."""
        if self.running or self.waiting:
            raise LoraopsError("warm_up() runs before any request")
        return self.slots.warm_up()

    def start(self) -> None:
        """Run the loop in a background thread until :meth:`stop`."""
        self._thread.start()

    def stop(self) -> None:
        self.scheduler.stop()
        self._thread.join()

    @property
    def alive(self) -> bool:
        return self._thread.alive and self.failure is None

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold the model alone: no request starts, and the ones running finish first (for adapter swaps). Thread-safe."""
        with self.scheduler.exclusive(lambda: self._thread.running):
            yield

    def between_steps(self) -> Iterator[None]:
        """Hold the model between two passes, rows kept: for adapter changes that leave the running rows' computation
        as it is (an adapter added or removed while several stay unmerged). Thread-safe."""
        return self.scheduler.between_steps()

    def adopt(self, other: Engine) -> None:
        """Take over the requests waiting in ``other`` (held with :meth:`exclusive`, so none is running there). Thread-safe."""
        self.scheduler.add_waiting(other.scheduler.take_waiting())

    # --- one pass ------------------------------------------------------------------------------

    def run_once(self, wait: bool) -> bool:
        """Admit what may join, prefill it, run one decode step. With ``wait``, block until there is work; False once stopping."""
        plan = self.scheduler.next_step(wait, self._column)
        if plan is None:
            return False
        try:
            self._run(plan)
        finally:
            self.scheduler.idle()
        return True

    def _run(self, plan: StepPlan) -> None:
        if plan.joining:
            self._join(plan.joining)
        for slot in plan.dropping:  # their callers went away: stop spending steps on them
            self._free(slot)
        if plan.decoding and self.scheduler.rows:
            self._step()

    # --- joining -------------------------------------------------------------------------------

    def _join(self, joiners: list[Request]) -> None:
        """Prefill the joining requests (a prefill bucket at a time) and give each a slot."""
        chunk = self.buckets.prefill_batch[-1]
        for first in range(0, len(joiners), chunk):
            self._join_chunk(joiners[first : first + chunk])

    def _loaded(self, requests: list[Request]) -> tuple[list[Request], list[str | None]]:
        """The requests whose adapter is loaded, with its name (the others fail alone)."""
        joiners, adapters = [], []
        for request in requests:
            adapter = self._resolve_adapter(request.adapter) if request.adapter is not None else None
            if adapter is not None and adapter not in self.served.adapters:
                fail(request, RowFailed(f"adapter {adapter} is not loaded (loaded: {', '.join(self.served.adapters)})"))
                continue
            joiners.append(request)
            adapters.append(adapter)
        return joiners, adapters

    def _join_chunk(self, requests: list[Request]) -> None:
        joiners, adapters = self._loaded(requests)
        if not joiners:
            return
        try:
            first_logits, scratch, width = self.slots.prefill([r.prompt for r in joiners], adapters)
        except Exception as exc:  # noqa: BLE001 - retried alone; only a request that fails alone gets the error
            self._retry_alone(joiners, exc)
            return
        now = time.perf_counter()
        self._make_room(joiners)
        for j, request in enumerate(joiners):
            row = Row(request, start=self._column - len(request.prompt), admitted=now, adapter=adapters[j])
            try:
                self._sample(row, first_logits[j])
            except RowFailed as exc:
                fail(request, exc)
                continue
            if self._finished(row):
                self._deliver(row)
                continue
            self.slots.store(self.scheduler.place(row), scratch, j, width, len(request.prompt), self._column)

    def _make_room(self, joiners: list[Request]) -> None:
        """Move the running rows' columns where the scheduler's room rule places the joiners: every joiner's prompt ends at the current column."""
        placement = self.scheduler.placement(joiners, self._column)
        if placement is None:  # admission counted this room: not finding it is a bug, not a request's fault
            raise LoraopsError(f"no room for {len(joiners)} joining requests at column {self._column}")
        if not self.scheduler.rows:
            self._column = placement.column
            return
        self._shift_columns(-placement.drop)
        self._shift_columns(placement.column - self._column)

    # --- decoding ------------------------------------------------------------------------------

    def _step(self) -> None:
        """One decode step for every active row; finished rows leave."""
        rows = self.scheduler.rows
        self._compact_columns()
        try:
            positions, starts = [self._column - row.start for row in rows], [row.start for row in rows]
            logits = self.slots.decode([row.tokens[-1] for row in rows], positions, starts, self._column, [row.adapter for row in rows])
        except Exception as exc:  # noqa: BLE001 - retried alone; only a request that fails alone gets the error
            self._retry_alone([row.request for row in self.scheduler.clear()], exc)
            return
        self._column += 1
        done: list[int] = []
        for i, row in enumerate(rows):
            try:
                self._sample(row, logits[i])
            except RowFailed as exc:
                fail(row.request, exc)
                done.append(i)
                continue
            if self._finished(row):
                self._deliver(row)
                done.append(i)
        for i in reversed(done):
            self._free(i)

    def _sample(self, row: Row, logits) -> None:
        """The row's next token; a row with stop texts notes where the first one starts, once it is allowed to stop."""
        sample_into(row, logits, self._eos)
        sampling = row.request.sampling
        if sampling.stop and len(row.tokens) >= sampling.min_tokens:
            text = self.served.tokenizer.decode(row.tokens, skip_special_tokens=True)
            row.stopped_at = find_stop(text, sampling.stop)

    def _finished(self, row: Row) -> bool:
        ended = row.tokens[-1] == self._eos and not row.request.sampling.ignore_eos
        return ended or row.stopped_at is not None or row.remaining <= 0

    def _deliver(self, row: Row) -> None:
        request = row.request
        until_eos = not request.sampling.ignore_eos
        completion = completion_from_ids(self.served.tokenizer, row.tokens, len(request.prompt), until_eos=until_eos)
        stopped = row.stopped_at is not None or (until_eos and row.tokens[-1] == self._eos)
        if row.stopped_at is not None:  # the text ends before the stop text (the tokens keep the one that completed it, as vLLM's do)
            text = self.served.tokenizer.decode(row.tokens, skip_special_tokens=True)[: row.stopped_at].strip()
            completion = Completion(text=text, token_ids=completion.token_ids, prompt_tokens=completion.prompt_tokens)
        if not request.future.done():
            now = time.perf_counter()
            times = {"queue_s": row.admitted - request.submitted, "model_s": now - request.submitted}
            adapter = row.adapter or self.served.adapter_name
            logprobs = row.logprobs[: len(completion.token_ids)] if request.sampling.logprobs is not None else None
            request.future.set_result(Generated(completion, **times, adapter=adapter, finish_reason="stop" if stopped else "length", logprobs=logprobs))

    def _retry_alone(self, requests: list[Request], exc: Exception) -> None:
        """After a failed forward pass: a request that was alone gets the error, the others are retried one at a time."""
        retry = []
        for request in requests:
            if request.solo or len(requests) == 1:
                fail(request, RowFailed(f"generation failed: {type(exc).__name__}: {exc}"))
            else:
                request.solo = True
                retry.append(request)
        if retry:
            log.warning("a forward pass of %d requests failed (%s: %s): retrying them one at a time", len(requests), type(exc).__name__, exc)
        self.scheduler.add_waiting(retry, first=True)

    # --- moving rows and columns ---------------------------------------------------------------

    def _free(self, slot: int) -> None:
        """Free ``slot``: the scheduler moves the last active row into it, and its cache moves along."""
        moved = self.scheduler.free(slot)
        if moved is not None:
            self.slots.move_slot(moved, slot, self._column)

    def _compact_columns(self) -> None:
        """Drop the columns before every active row's first token when that lets the window use a smaller length bucket."""
        shift = self.scheduler.first_column
        if shift and self.buckets.length_for(self._column + 1 - shift) < self.buckets.length_for(self._column + 1):
            self._shift_columns(-shift)

    def _shift_columns(self, delta: int) -> None:
        """Move the active rows' live columns by ``delta`` (negative: left); positions are per row, so no number changes."""
        rows = self.scheduler.rows
        if delta and rows:
            self.slots.shift_columns(len(rows), self.scheduler.first_column, self._column, delta)
            self._column += delta
            self.scheduler.shift(delta)
