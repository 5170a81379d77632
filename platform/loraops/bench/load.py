"""Closed-loop load and its statistics, for ``loraops bench serve`` and the serving tests.

:func:`run_load` drives the HTTP API, :func:`run_model_load` the model engine directly: N clients, each
sending its next request as soon as the previous one answered, for a fixed time; every request becomes
a :class:`Record`. :class:`GenerateBatcher` is the replica's batching before the engine (a baseline).
:func:`summarize_records` turns records into latency percentiles, throughput and Serve's overhead.
"""

from __future__ import annotations

import itertools
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import httpx


@dataclass
class Record:
    """One request of a load run."""

    client: int
    started: float
    ended: float
    status: int | None  # None: no HTTP answer (connection error or timeout)
    version: int | None = None
    completion_tokens: int = 0
    error: str | None = None
    #: The model's own time for this request (``usage.model_ms``), when the answer says.
    model_ms: float | None = None

    @property
    def latency(self) -> float:
        return self.ended - self.started


# --- load over HTTP ----------------------------------------------------------------------------


def run_load(
    url: str,
    dialogues: Sequence[Any],
    clients: int,
    duration_s: float,
    body: Callable[[Any], dict[str, Any]] | None = None,
    headers: dict[str, str] | None = None,
    timeout_s: float = 120.0,
    stop: threading.Event | None = None,
) -> list[Record]:
    """``clients`` threads POST /v1/summarize back to back for ``duration_s`` (or until ``stop``); every request recorded.

    ``body`` turns an element of ``dialogues`` into the request body (default: ``{"dialogue": it}``).
    No retries: a failed request stays a failure in the records.
    """
    import httpx  # here, not at the top: the model-level benchmark runs where only torch's stack is installed

    make_body = body or (lambda text: {"dialogue": text})

    def client(index: int, items: Callable[[], Any], deadline: float, records: list[Record], lock: threading.Lock) -> None:
        with httpx.Client(base_url=url, headers=headers or {}, timeout=timeout_s) as http:
            while time.monotonic() < deadline and not (stop and stop.is_set()):
                record = _one_request(http, index, make_body(items()))
                with lock:
                    records.append(record)

    return _closed_loop(dialogues, clients, duration_s, client)


def _closed_loop(items: Sequence[Any], clients: int, duration_s: float, client: Callable) -> list[Record]:
    """Run ``client(index, next_item, deadline, records, lock)`` in ``clients`` threads; each starts at its own offset in ``items``."""
    records: list[Record] = []
    lock = threading.Lock()
    deadline = time.monotonic() + duration_s
    threads = []
    for index in range(clients):
        cycle = itertools.cycle(list(items[index % len(items):]) + list(items[: index % len(items)]))
        threads.append(threading.Thread(target=client, args=(index, cycle.__next__, deadline, records, lock), daemon=True))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sorted(records, key=lambda r: r.started)


def _one_request(http: httpx.Client, index: int, body: dict[str, Any]) -> Record:
    import httpx

    started = time.monotonic()
    try:
        response = http.post("/v1/summarize", json=body)
    except httpx.HTTPError as exc:
        return Record(index, started, time.monotonic(), None, error=f"{type(exc).__name__}: {exc}")
    ended = time.monotonic()
    if response.status_code != 200:
        return Record(index, started, ended, response.status_code, error=response.text[:300])
    answer = response.json()
    usage = answer["usage"]
    return Record(index, started, ended, 200, version=answer["model"]["version"], completion_tokens=usage["completion_tokens"], model_ms=usage.get("model_ms"))


# --- load on the model directly ----------------------------------------------------------------


def run_model_load(submit: Callable[[list[int], int], Future], prompts: Sequence[tuple[list[int], int]], clients: int, duration_s: float) -> list[Record]:
    """``clients`` threads call ``submit(prompt_ids, max_new_tokens)`` back to back, each waiting for its :class:`~loraops.serve.engine.core.Generated`."""

    def client(index: int, items: Callable[[], Any], deadline: float, records: list[Record], lock: threading.Lock) -> None:
        while time.monotonic() < deadline:
            prompt, limit = items()
            started = time.monotonic()
            try:
                generated = submit(prompt, limit).result()
            except Exception as exc:  # noqa: BLE001 - a failure is a record, like an HTTP error
                record = Record(index, started, time.monotonic(), 500, error=f"{type(exc).__name__}: {exc}")
            else:
                record = Record(index, started, time.monotonic(), 200, completion_tokens=len(generated.completion.token_ids), model_ms=generated.model_s * 1000)
            with lock:
                records.append(record)

    return _closed_loop(prompts, clients, duration_s, client)


class GenerateBatcher:
    """The replica's batching before the engine, as a baseline: the engine's static policy (a batch of up to
    ``max_batch_size`` waiting requests, after at most ``batch_wait_s``, starts when the previous one has
    ended), each batch one left-padded ``generate`` call instead of the engine's fixed-shape steps, like
    ``@serve.batch`` did. Admission is the engine's own :class:`~loraops.serve.engine.scheduler.Scheduler`."""

    def __init__(self, served, max_batch_size: int, batch_wait_s: float, context_tokens: int):
        from loraops.serve.engine.buckets import Buckets
        from loraops.serve.engine.loop import LoopThread
        from loraops.serve.engine.scheduler import Scheduler

        self.served = served
        self.scheduler = Scheduler(Buckets.build(max_batch_size, context_tokens), "static", max_batch_size, batch_wait_s)
        self._thread = LoopThread(self._run_once, self.scheduler.fail_all)
        self._thread.start()

    def submit(self, prompt: list[int], max_new_tokens: int, temperature: float = 0.0) -> Future:
        from loraops.serve.engine.params import SamplingParams
        from loraops.serve.engine.scheduler import Request

        if len(prompt) + max_new_tokens - 1 > self.scheduler.buckets.max_length:
            raise ValueError(f"a prompt of {len(prompt)} tokens plus {max_new_tokens} new tokens is over the context ({self.scheduler.buckets.max_length})")
        future: Future = Future()
        self.scheduler.enqueue(Request(list(prompt), max_new_tokens, SamplingParams(float(temperature)), future, time.perf_counter()))
        return future

    def stop(self) -> None:
        self.scheduler.stop()
        self._thread.join()

    def _run_once(self, wait: bool) -> bool:
        plan = self.scheduler.next_step(wait, column=0)  # nothing stays running between calls: each batch starts at column 0
        if plan is None:
            return False
        try:
            if plan.joining:
                self._generate(plan.joining)
        finally:
            self.scheduler.idle()
        return True

    def _generate(self, batch) -> None:
        from loraops.generate import generate_completions
        from loraops.serve.engine.core import Generated

        started = time.perf_counter()
        try:
            completions = generate_completions(
                self.served.model, self.served.tokenizer, [r.prompt for r in batch], [r.max_new_tokens for r in batch], **self.served.generate_options()
            )
        except Exception as exc:  # noqa: BLE001 - the whole batch fails, as it did; the loop goes on (a dead one would hang its clients)
            for request in batch:
                request.future.set_exception(exc)
            return
        now, adapter = time.perf_counter(), self.served.adapter_name
        for request, completion in zip(batch, completions, strict=True):
            if not request.future.done():
                ended = "stop" if completion.token_ids[-1:] == [self.served.tokenizer.eos_token_id] else "length"
                times = {"queue_s": started - request.submitted, "model_s": now - request.submitted}
                request.future.set_result(Generated(completion, **times, adapter=adapter, finish_reason=ended))


# --- statistics --------------------------------------------------------------------------------


def summarize_records(records: Sequence[Record], duration_s: float) -> dict[str, Any]:
    """Latency percentiles (successful requests), throughput, the failure count, and Serve's overhead when answers carry the model time."""
    ok = [r for r in records if r.status == 200]
    latencies = sorted(r.latency for r in ok)
    p50, p99 = _percentile(latencies, 50), _percentile(latencies, 99)
    summary: dict[str, Any] = {
        "requests": len(records),
        "failed": len(records) - len(ok),
        "p50_s": _round(p50, 3),
        "p95_s": _round(_percentile(latencies, 95), 3),
        "p99_s": _round(p99, 3),
        "p99_over_p50": _round(p99 / p50, 2) if latencies and p50 > 0 else None,
        "mean_s": round(statistics.fmean(latencies), 3) if latencies else None,
        "requests_per_s": round(len(ok) / duration_s, 2),
        "completion_tokens_per_s": round(sum(r.completion_tokens for r in ok) / duration_s, 1),
    }
    # Latency per generated token: answers vary in length, so a stall shows here when p99/p50 of latency cannot tell.
    per_token = sorted(r.latency * 1000 / r.completion_tokens for r in ok if r.completion_tokens)
    summary |= {"ms_per_token_p50": _round(_percentile(per_token, 50), 1), "ms_per_token_p99": _round(_percentile(per_token, 99), 1)}
    timed = [r for r in ok if r.model_ms is not None]
    if timed:
        model = sorted(r.model_ms for r in timed)
        overhead = sorted(r.latency * 1000 - r.model_ms for r in timed)
        summary |= {
            "model_p50_ms": _round(_percentile(model, 50), 1),
            "overhead_p50_ms": _round(_percentile(overhead, 50), 1),
            "overhead_p99_ms": _round(_percentile(overhead, 99), 1),
        }
    return summary


def _percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    rank = (len(values) - 1) * q / 100
    low, high = int(rank), min(int(rank) + 1, len(values) - 1)
    return values[low] + (values[high] - values[low]) * (rank - low)


def _round(value: float, digits: int) -> float | None:
    return None if value != value else round(value, digits)  # NaN (no data) becomes null in the JSON
