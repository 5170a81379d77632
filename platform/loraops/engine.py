"""The serving engine: a decode loop over a static, slot-based KV cache whose shapes come from a fixed set of buckets.

A serving replica generates through an :class:`Engine` rather than one ``generate`` call per batch:

- **Fixed shapes.** Every forward pass the model sees has a batch size from ``Buckets.batch`` (rows are
  padded up with dummy rows) and a cache length from ``Buckets.length`` (the attended window of the cache
  is rounded up to a bucket). Prefill passes are shaped ``(batch bucket, length bucket)``, decode steps
  ``(batch bucket, 1)`` against a cache window of a length bucket. :meth:`Engine.warm_up` runs every one
  of these shapes once, so a compiled decode step (``compile=True``, GPU) compiles during warm-up and
  never on a request.
- **Continuous batching** (``policy="continuous"``): requests join between decode steps as soon as a slot
  is free, and leave as soon as they end (end-of-text or their own ``max_new_tokens``). ``"static"``
  admits a new batch only when the previous one has ended completely: the same kernels and shapes, so
  the two policies compare like for like.

How rows share one cache: all active rows write their next token's keys and values at the same cache
column ``t``; a row's prompt ends at the column where it joined and its positions (RoPE) count from its
own first token, so each row computes exactly what it would compute alone. A joining row's prompt is
prefilled separately and copied into a free slot, the live columns are shifted when a joining prompt is
longer than ``t`` or when dropping finished rows' columns lets the window fall into a smaller bucket,
and the active rows are kept in the lowest slots (a finished row's slot takes the last row), so a step
over ``n`` rows runs at ``Buckets.batch_for(n)``.

Greedy rows produce the tokens :func:`loraops.generate.generate_completions` produces for the same
prompt and limit (the tests check it on the built-in test dialogues, both serving modes). A row whose
sampling fails (non-finite probabilities) fails alone; if a forward pass raises, its rows are retried one
at a time, so only a row that fails on its own gets the error.

Not thread-safe except where stated: :meth:`Engine.submit` and :meth:`Engine.exclusive` may be called
from any thread while the engine's own thread (:meth:`Engine.start`) runs the loop.
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

log = logging.getLogger(__name__)

POLICIES = ("continuous", "static")
Policy = Literal["continuous", "static"]
#: Smallest default cache-length bucket: shorter windows save little and would add shapes.
MIN_LENGTH_BUCKET = 256


# --- buckets -----------------------------------------------------------------------------------


def batch_buckets(max_batch_size: int, buckets: Sequence[int] | None = None) -> tuple[int, ...]:
    """The batch sizes a step may run at: ``buckets`` (default 1, 2, 4, 8, ...) below ``max_batch_size``, then ``max_batch_size``."""
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
    if buckets is None:
        buckets = [2**i for i in range(max_batch_size.bit_length())]
    return tuple(sorted({b for b in buckets if b < max_batch_size} | {max_batch_size}))


def length_buckets(context_tokens: int, buckets: Sequence[int] | None = None) -> tuple[int, ...]:
    """The cache lengths a step may attend over: ``buckets`` (default 256, 512, ...) below the context, then the context."""
    if context_tokens < 1:
        raise ValueError(f"context_tokens must be at least 1, got {context_tokens}")
    if buckets is None:
        buckets = [MIN_LENGTH_BUCKET * 2**i for i in range(max(context_tokens // MIN_LENGTH_BUCKET, 1).bit_length())]
    return tuple(sorted({b for b in buckets if b < context_tokens} | {context_tokens}))


@dataclass(frozen=True)
class Buckets:
    """The fixed shapes of an engine: batch sizes and cache lengths, each ascending.

    ``prefill_batch`` (default: the batch buckets) are the batch sizes of prefill passes: joining prompts
    are prefilled that many at a time. Prefill is compute-bound, so a few rows per pass already use the
    hardware, and fewer prefill shapes make warm-up shorter.
    """

    batch: tuple[int, ...]
    length: tuple[int, ...]
    prefill_batch: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not self.prefill_batch:
            object.__setattr__(self, "prefill_batch", self.batch)
        for name, values in (("batch", self.batch), ("length", self.length), ("prefill_batch", self.prefill_batch)):
            if not values or list(values) != sorted(set(values)) or values[0] < 1:
                raise ValueError(f"{name} buckets must be ascending positive integers without repeats, got {list(values)}")
        if not set(self.prefill_batch) <= set(self.batch):
            raise ValueError(f"prefill batch buckets {list(self.prefill_batch)} must be batch buckets ({list(self.batch)})")

    @classmethod
    def build(
        cls,
        max_batch_size: int,
        context_tokens: int,
        batch: Sequence[int] | None = None,
        length: Sequence[int] | None = None,
        prefill_batch_size: int | None = None,
    ) -> Buckets:
        """Buckets from settings: ``batch`` capped by ``max_batch_size``, ``length`` by the context, prefill passes of at most ``prefill_batch_size`` rows."""
        batches = batch_buckets(max_batch_size, batch)
        prefill = tuple(b for b in batches if b <= (prefill_batch_size or max_batch_size)) or batches[:1]
        return cls(batches, length_buckets(context_tokens, length), prefill)

    @property
    def max_batch(self) -> int:
        return self.batch[-1]

    @property
    def max_length(self) -> int:
        return self.length[-1]

    def batch_for(self, rows: int) -> int:
        return _bucket(rows, self.batch, "batch")

    def length_for(self, tokens: int) -> int:
        return _bucket(tokens, self.length, "length")

    def prefill_batch_for(self, rows: int) -> int:
        return _bucket(rows, self.prefill_batch, "prefill batch")

    def shapes(self) -> list[tuple[str, int, int]]:
        """Every (phase, batch, length) a forward pass of the engine can have."""
        prefill = [("prefill", b, n) for n in self.length for b in self.prefill_batch]
        return prefill + [("decode", b, n) for n in self.length for b in self.batch]


def _bucket(value: int, buckets: tuple[int, ...], name: str) -> int:
    for bucket in buckets:
        if bucket >= value:
            return bucket
    raise ValueError(f"{value} is over the largest {name} bucket ({buckets[-1]})")


# --- results -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Generated:
    """One finished request: its completion, the label the engine had when it started, and its times."""

    completion: Completion
    label: Any
    #: Seconds from :meth:`Engine.submit` until its prefill began (waiting for a slot).
    queue_s: float
    #: Seconds from :meth:`Engine.submit` until its last token: the model's share of the request's time.
    model_s: float


class RowFailed(LoraopsError):
    """Generation failed for this request alone (its batch-mates were not affected)."""


@dataclass
class _Request:
    prompt: list[int]
    max_new_tokens: int
    temperature: float
    future: Future
    submitted: float
    solo: bool = False  # retried alone after a forward pass that included it failed


@dataclass
class _Row:
    request: _Request
    start: int  # cache column of its first prompt token
    label: Any
    admitted: float
    tokens: list[int] = field(default_factory=list)

    @property
    def remaining(self) -> int:
        return self.request.max_new_tokens - len(self.tokens)


# --- the slot cache ----------------------------------------------------------------------------


class _Window:
    """The part of the slot cache a decode step uses: the first ``rows`` slots, the first ``length`` columns, writing at ``column``."""

    def __init__(self, device: torch.device):
        self.rows = 1
        self.length = 1
        self.column = torch.zeros(1, dtype=torch.long, device=device)


def _slot_cache(keys: list[torch.Tensor], values: list[torch.Tensor], window: _Window):
    """A transformers ``Cache`` over the engine's buffers: each layer writes one column and returns the window."""
    from transformers.cache_utils import Cache, CacheLayerMixin

    class SlotLayer(CacheLayerMixin):
        is_compileable = True
        is_sliding = False

        def __init__(self, layer_keys: torch.Tensor, layer_values: torch.Tensor):
            super().__init__()
            self.keys, self.values, self.is_initialized = layer_keys, layer_values, True
            self.device = layer_keys.device

        def lazy_initialization(self, key_states, value_states) -> None:  # the buffers exist from the start
            pass

        def update(self, key_states, value_states, *args, **kwargs):
            keys = self.keys[: window.rows, :, : window.length]
            values = self.values[: window.rows, :, : window.length]
            keys.index_copy_(2, window.column, key_states)
            values.index_copy_(2, window.column, value_states)
            return keys, values

        def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
            return window.length, 0

        def get_seq_length(self) -> int:
            return window.column

        def get_max_length(self) -> int:
            return self.keys.shape[2]

    return Cache(layers=[SlotLayer(k, v) for k, v in zip(keys, values, strict=True)])


# --- the engine --------------------------------------------------------------------------------


class Engine:
    """Batched generation for one :class:`~loraops.generate.ServingModel` with fixed shapes (see the module docstring).

    ``label`` is attached to every request admitted while it is set (the replica sets the adapter
    version it serves, inside :meth:`exclusive`). ``observer``, if given, is called with
    ``(phase, batch, length)`` before every forward pass (tests record the shapes with it).
    """

    def __init__(
        self,
        served,
        buckets: Buckets,
        policy: Policy = "continuous",
        max_batch_size: int | None = None,
        batch_wait_s: float = 0.0,
        compile: bool = False,
        label: Any = None,
        observer: Callable[[str, int, int], None] | None = None,
    ):
        if policy not in POLICIES:
            raise LoraopsError(f"policy {policy!r}: expected one of {', '.join(POLICIES)}")
        attention = getattr(served.model.config, "_attn_implementation", "sdpa")
        if attention not in ("sdpa", "eager"):
            raise LoraopsError(f"the engine passes explicit attention masks: attention implementation {attention!r} is not supported (use sdpa or eager)")
        self.served = served
        self.buckets = buckets
        self.policy = policy
        self.label = label
        self.observer = observer
        self.compiled = compile
        self._model = served.model.get_base_model() if hasattr(served.model, "get_base_model") else served.model
        self._eager_mask = attention == "eager"
        self._device = next(self._model.parameters()).device
        self._eos = served.tokenizer.eos_token_id
        self._pad = served.tokenizer.pad_token_id if served.tokenizer.pad_token_id is not None else self._eos
        self._decode_forward = self._compiled_forward() if compile else self._model
        self._window = _Window(self._device)
        self._keys: list[torch.Tensor] = []
        self._values: list[torch.Tensor] = []
        self._cache = None
        self._column = 0  # the cache column the next decode step writes
        self._rows: list[_Row] = []  # slot i holds _rows[i]
        self._pending: deque[_Request] = deque()
        self._cond = threading.Condition()
        self._paused = 0
        self._busy = False
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.failure: BaseException | None = None
        self.set_limits(max_batch_size or buckets.max_batch, batch_wait_s)

    # --- public API ----------------------------------------------------------------------------

    def set_limits(self, max_batch_size: int, batch_wait_s: float) -> None:
        """Most rows decoding together (at most the largest batch bucket) and how long an idle engine waits for a batch to fill."""
        if not 1 <= max_batch_size <= self.buckets.max_batch:
            raise LoraopsError(f"max_batch_size {max_batch_size}: the engine's batch buckets go up to {self.buckets.max_batch}")
        with self._cond:
            self.max_batch_size, self.batch_wait_s = max_batch_size, batch_wait_s
            self._cond.notify_all()

    def submit(self, prompt: Sequence[int], max_new_tokens: int, temperature: float = 0.0) -> Future:
        """Queue one request; the future resolves to a :class:`Generated` (or raises :class:`RowFailed`). Thread-safe."""
        if not prompt:
            raise ValueError("empty prompt")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        if len(prompt) + max_new_tokens - 1 > self.buckets.max_length:
            raise ValueError(f"prompt of {len(prompt)} tokens plus {max_new_tokens} new tokens is over the largest cache bucket ({self.buckets.max_length})")
        future: Future = Future()
        with self._cond:
            if self.failure is not None:
                raise LoraopsError(f"the engine stopped after an error: {self.failure}")
            self._pending.append(_Request(list(prompt), max_new_tokens, float(temperature), future, time.perf_counter()))
            self._cond.notify_all()
        return future

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int | Sequence[int], temperature: float = 0.0) -> list[Completion]:
        """Generate for all ``prompts`` in the calling thread (the engine's thread must not be running); results in order."""
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
        started = time.perf_counter()
        shapes = self.buckets.shapes()
        for phase, batch, length in shapes:
            if phase == "prefill":
                self._prefill([[self._pad] * length] * batch)  # dummy prompts of the bucket's full width
            else:
                self._decode_dummy(batch, length)
        return len(shapes), time.perf_counter() - started

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
                    raise LoraopsError("exclusive() with rows in flight and no engine thread to finish them")
                self._cond.wait()
        try:
            yield
        finally:
            with self._cond:
                self._paused -= 1
                self._cond.notify_all()

    def stats(self) -> dict[str, int]:
        with self._cond:
            return {"active": len(self._rows), "pending": len(self._pending)}

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
                self._rows.clear()
                self._pending.clear()
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
        """Requests that start now (under the lock): FIFO, as many as free slots and cache room allow."""
        while self._pending and self._pending[0].future.cancelled():
            self._pending.popleft()
        if self._paused or not self._pending:
            return []
        if self._rows and (self.policy == "static" or self._rows[0].request.solo or self._pending[0].solo):
            return []
        if self._pending[0].solo:
            return [self._pending.popleft()]
        free = self.max_batch_size - len(self._rows)
        shift = min((row.start for row in self._rows), default=0)
        column = self._column - shift  # after dropping finished rows' columns
        need = max((row.remaining for row in self._rows), default=0)
        joiners: list[_Request] = []
        longest = 0
        while self._pending and len(joiners) < free and not self._pending[0].solo:
            candidate = self._pending[0]
            longest_after = max(longest, len(candidate.prompt))
            need_after = max(need, candidate.max_new_tokens - 1)
            if max(column, longest_after) + need_after > self.buckets.max_length:
                break  # does not fit beside the running rows yet: it waits, and so does everything behind it
            joiners.append(self._pending.popleft())
            longest, need = longest_after, need_after
        return joiners

    # --- joining: prefill and copy into slots --------------------------------------------------

    def _join(self, joiners: list[_Request]) -> None:
        """Prefill the joining requests (a prefill bucket at a time) and give each a slot."""
        chunk = self.buckets.prefill_batch[-1]
        for first in range(0, len(joiners), chunk):
            self._join_chunk(joiners[first : first + chunk])

    def _join_chunk(self, joiners: list[_Request]) -> None:
        try:
            first_tokens, scratch, width = self._prefill([r.prompt for r in joiners])
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
                self._shift_columns(-min(row.start for row in self._rows))  # room for them, as _admit assumed
            if longest > self._column:
                self._shift_columns(longest - self._column)
        for j, request in enumerate(joiners):
            row = _Row(request, start=self._column - len(request.prompt), label=self.label, admitted=now)
            try:
                token = self._pick(first_tokens[j : j + 1], [request.temperature])[0]
            except RowFailed as exc:
                _fail(request, exc)
                continue
            row.tokens.append(token)
            if self._finished(row):
                self._deliver(row)
                continue
            slot = len(self._rows)
            self._rows.append(row)
            for layer, scratch_layer in enumerate(scratch.layers):
                n = len(request.prompt)
                self._keys[layer][slot, :, row.start : self._column] = scratch_layer.keys[j, :, width - n :]
                self._values[layer][slot, :, row.start : self._column] = scratch_layer.values[j, :, width - n :]

    @torch.no_grad()
    def _prefill(self, prompts: list[list[int]]):
        """One prefill pass over left-padded ``prompts`` at their bucket shape; returns (last logits, its cache, width)."""
        from transformers import DynamicCache

        rows, width = self.buckets.prefill_batch_for(len(prompts)), self.buckets.length_for(max(len(p) for p in prompts))
        input_ids = torch.full((rows, width), self._pad, dtype=torch.long)
        valid = torch.zeros((rows, width), dtype=torch.bool)
        for i in range(rows):
            prompt = prompts[i] if i < len(prompts) else [self._pad]  # padding rows: one token each
            input_ids[i, width - len(prompt) :] = torch.tensor(prompt)
            valid[i, width - len(prompt) :] = True
        positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
        causal = torch.tril(torch.ones((width, width), dtype=torch.bool))
        # A padding position attends to itself only: no fully masked rows (they give NaN), and no real
        # position ever attends to it, so real rows compute exactly what they would alone.
        mask = (causal[None] & valid[:, None, :]) | torch.eye(width, dtype=torch.bool)[None]
        self._observe("prefill", rows, width)
        cache = DynamicCache()
        out = self._model(
            input_ids=input_ids.to(self._device),
            attention_mask=self._mask(mask[:, None]),
            position_ids=positions.to(self._device),
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        if not self._keys:
            self._allocate(cache)
        return out.logits[: len(prompts), -1].float(), cache, width

    def _allocate(self, cache) -> None:
        """The slot buffers, shaped like the model's own cache (heads, head size, dtype), for the largest buckets."""
        for layer in cache.layers:
            rows, heads, _, head_size = layer.keys.shape
            shape = (self.buckets.max_batch, heads, self.buckets.max_length, head_size)
            self._keys.append(torch.zeros(shape, dtype=layer.keys.dtype, device=self._device))
            self._values.append(torch.zeros((*shape[:3], layer.values.shape[-1]), dtype=layer.values.dtype, device=self._device))
        if self.compiled:
            for tensor in [*self._keys, *self._values, self._window.column]:
                torch._dynamo.mark_static_address(tensor)  # fixed addresses: CUDA graphs replay without copying the cache
        self._cache = _slot_cache(self._keys, self._values, self._window)

    # --- decoding ------------------------------------------------------------------------------

    def _step(self) -> None:
        """One decode step for every active row, then finished rows leave."""
        for i in reversed(range(len(self._rows))):
            if self._rows[i].request.future.cancelled():  # its caller went away: stop spending steps on it
                self._drop_slot(i)
        if not self._rows:
            return
        self._compact_columns()
        rows = self._rows
        batch, length = self.buckets.batch_for(len(rows)), self.buckets.length_for(self._column + 1)
        tokens = torch.full((batch, 1), self._pad, dtype=torch.long)
        positions = torch.zeros((batch, 1), dtype=torch.long)
        columns = torch.arange(length)
        mask = columns[None, :] == self._column  # padding slots attend to their own column only
        mask = mask.expand(batch, length).clone()
        for i, row in enumerate(rows):
            tokens[i, 0] = row.tokens[-1]
            positions[i, 0] = self._column - row.start
            mask[i] = (columns >= row.start) & (columns <= self._column)
        try:
            logits = self._decode(tokens, positions, mask, batch, length)
        except Exception as exc:  # noqa: BLE001 - retried alone; only a request that fails alone gets the error
            failed = list(rows)
            self._rows = []
            self._retry_alone([row.request for row in failed], exc)
            return
        self._column += 1
        done: list[int] = []
        for i, row in enumerate(rows):
            try:
                row.tokens.append(self._pick(logits[i : i + 1], [row.request.temperature])[0])
            except RowFailed as exc:
                _fail(row.request, exc)
                done.append(i)
                continue
            if self._finished(row):
                self._deliver(row)
                done.append(i)
        for i in reversed(done):
            self._drop_slot(i)

    @torch.no_grad()
    def _decode(self, tokens, positions, mask, batch: int, length: int) -> torch.Tensor:
        self._window.rows, self._window.length = batch, length
        self._window.column.fill_(self._column)
        self._observe("decode", batch, length)
        out = self._decode_forward(
            input_ids=tokens.to(self._device),
            attention_mask=self._mask(mask[:, None, None, :]),
            position_ids=positions.to(self._device),
            cache=self._cache,
            use_cache=True,
        )
        return out.logits[:, -1].float()

    def _decode_dummy(self, batch: int, length: int) -> None:
        """A decode step at (batch, length) on padding rows only (warm-up); writes into unused slots' last column."""
        saved = self._column
        self._column = length - 1
        try:
            mask = (torch.arange(length) == self._column).expand(batch, length)
            self._decode(torch.full((batch, 1), self._pad, dtype=torch.long), torch.zeros((batch, 1), dtype=torch.long), mask, batch, length)
        finally:
            self._column = saved

    def _compiled_forward(self):
        """The decode step compiled once per (batch, length) bucket: every one compiles during warm-up."""
        import torch._dynamo

        shapes = len(self.buckets.batch) * len(self.buckets.length)
        # One graph per decode shape: dynamo's default limit (8 per function) would fall back to eager beyond it.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, shapes + 2)
        torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit, shapes + 2)
        mode = "reduce-overhead" if self._device.type == "cuda" else None
        return torch.compile(self._model.__call__, mode=mode, dynamic=False, fullgraph=False)

    def _mask(self, allowed: torch.Tensor) -> torch.Tensor:
        """The boolean mask in the form the model's attention takes (sdpa: boolean; eager: additive)."""
        allowed = allowed.to(self._device)
        if not self._eager_mask:
            return allowed
        dtype = self.served.dtype
        return torch.zeros(allowed.shape, dtype=dtype, device=self._device).masked_fill(~allowed, torch.finfo(dtype).min)

    def _pick(self, logits: torch.Tensor, temperatures: list[float]) -> list[int]:
        """Next token per row: argmax at temperature 0 (as ``generate`` does), else a sample at that temperature."""
        picked = []
        for row, temperature in zip(logits, temperatures, strict=True):
            if temperature <= 0:
                picked.append(int(row.argmax()))
                continue
            probs = torch.softmax(row / temperature, dim=-1)
            if not bool(torch.isfinite(probs).all()) or float(probs.sum()) <= 0:
                raise RowFailed("sampling failed: the next-token probabilities are not finite")
            picked.append(int(torch.multinomial(probs, 1)))
        return picked

    def _finished(self, row: _Row) -> bool:
        return row.tokens[-1] == self._eos or row.remaining <= 0

    def _deliver(self, row: _Row) -> None:
        now = time.perf_counter()
        request = row.request
        completion = completion_from_ids(self.served.tokenizer, row.tokens, len(request.prompt))
        if not request.future.done():
            request.future.set_result(Generated(completion, row.label, queue_s=row.admitted - request.submitted, model_s=now - request.submitted))

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
            for buffers in (self._keys, self._values):
                for tensor in buffers:
                    tensor[slot, :, : self._column] = tensor[last, :, : self._column]
            self._rows[slot] = self._rows[last]
        self._rows.pop()

    def _compact_columns(self) -> None:
        """Drop the columns before every active row's first token when that lets the window use a smaller length bucket."""
        if not self._rows:
            return
        shift = min(row.start for row in self._rows)
        if shift and self.buckets.length_for(self._column + 1 - shift) < self.buckets.length_for(self._column + 1):
            self._shift_columns(-shift)

    def _shift_columns(self, delta: int) -> None:
        """Move the active rows' live columns by ``delta`` (negative: left); positions are per row, so nothing changes numerically."""
        rows, end = len(self._rows), self._column
        if delta == 0 or rows == 0:
            return
        first = min(row.start for row in self._rows)
        for buffers in (self._keys, self._values):
            for tensor in buffers:
                tensor[:rows, :, first + delta : end + delta] = tensor[:rows, :, first:end].clone()
        self._column += delta
        for row in self._rows:
            row.start += delta

    def _observe(self, phase: str, batch: int, length: int) -> None:
        if self.observer is not None:
            self.observer(phase, batch, length)


def _fail(request: _Request, exc: Exception) -> None:
    if not request.future.done():
        request.future.set_exception(exc)
