"""``loraops bench serve``: latency, throughput and Serve's overhead on a mixed-length workload.

Two levels, the same workload and statistics:

- **HTTP** (default): the serve config deployed on Ray Serve once per (mode, batching) with one model
  replica and autoscaling off, and N closed-loop HTTP clients (:func:`run_load`: each sends its next
  request as soon as the previous one answered) for a fixed time per concurrency. Every answer
  carries the model's own time (``usage.model_ms``), so the end-to-end time minus it is what Serve
  adds: HTTP, proxy, ingress, routing, tokenization (``overhead`` in the results).
- **Model** (``--model-only``): no Ray, no HTTP. The replica's :class:`~loraops.generate.ServingModel`
  and :class:`~loraops.engine.Engine`, called by N client threads directly. ``--random-init phi-2``
  serves Phi-2's architecture with random weights (no download, no registry), so it runs on a GPU
  machine without Ray. ``generate`` is the batching the replica had before the engine: one
  ``generate`` call per batch of waiting requests (:class:`GenerateBatcher`), as a baseline.

The workload: dialogues of varied length (the built-in test split, or a DialogSum-format file from
``--data``), shuffled with a fixed seed so long and short ones mix. Each request asks for
``--max-new-tokens``; with ``--lengths reference`` it asks for its reference summary's length instead
(random weights never stop on their own: that gives the varied answer lengths real summaries have).
"""

from __future__ import annotations

import itertools
import json
import os
import platform
import random
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

#: Batching schemes the model-level benchmark compares: the engine's two policies and the pre-engine baseline.
MODEL_BATCHINGS = ("continuous", "static", "generate")
LENGTHS = ("fixed", "reference")


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


@dataclass(frozen=True)
class WorkItem:
    """One request of the workload: a dialogue and how many tokens it asks for."""

    dialogue: str
    max_new_tokens: int


# --- the workload ------------------------------------------------------------------------------


def builtin_test_dialogues(count: int = 64) -> list[str]:
    """Dialogues of the built-in test split (no network)."""
    from loraops.builtin_data import generate_splits

    return [row["dialogue"] for row in generate_splits()["test"][:count]]


def load_workload(data: str | None, max_new_tokens: int, lengths: str, tokenizer=None, count: int = 64, seed: int = 0) -> tuple[list[WorkItem], str]:
    """The benchmark's requests and a description of their source.

    ``data``: a DialogSum-format file (``dialogue`` and ``summary`` columns; JSONL, JSON, CSV or
    Parquet), else the built-in test split. ``lengths`` ``reference`` asks each request for its
    reference summary's token count (``tokenizer``), at most ``max_new_tokens``.
    """
    from loraops.errors import LoraopsError

    if lengths not in LENGTHS:
        raise LoraopsError(f"--lengths {lengths!r}: expected one of {', '.join(LENGTHS)}")
    if data:
        from loraops.data import read_table_file

        path = Path(data).expanduser()
        if not path.is_file():
            raise LoraopsError(f"--data {data}: no such file")
        rows = [row for row in read_table_file(path) if isinstance(row, dict) and str(row.get("dialogue") or "").strip() and str(row.get("summary") or "").strip()]
        if not rows:
            raise LoraopsError(f"--data {data}: no rows with 'dialogue' and 'summary' columns")
        source = f"{path.name} ({len(rows)} usable rows)"
    else:
        from loraops.builtin_data import generate_splits

        rows = generate_splits()["test"]
        source = "built-in test split"
    rows = random.Random(seed).sample(rows, min(count, len(rows)))
    items = []
    for row in rows:
        limit = max_new_tokens
        if lengths == "reference":
            limit = max(1, min(max_new_tokens, len(tokenizer.encode(row["summary"], add_special_tokens=False)) + 1))  # + end-of-text
        items.append(WorkItem(row["dialogue"], limit))
    return items, source


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
    """``clients`` threads call ``submit(prompt_ids, max_new_tokens)`` back to back, each waiting for its answer (a :class:`~loraops.engine.Generated`)."""

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
    """The replica's batching before the engine, as a baseline: waiting requests (up to ``max_batch_size``,
    after at most ``batch_wait_s``) share one left-padded ``generate`` call, like ``@serve.batch`` did."""

    def __init__(self, served, max_batch_size: int, batch_wait_s: float):
        self.served, self.max_batch_size, self.batch_wait_s = served, max_batch_size, batch_wait_s
        self._pending: deque = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="generate-batcher", daemon=True)
        self._thread.start()

    def submit(self, prompt: list[int], max_new_tokens: int, temperature: float = 0.0) -> Future:
        future: Future = Future()
        with self._cond:
            self._pending.append((prompt, max_new_tokens, future, time.perf_counter()))
            self._cond.notify_all()
        return future

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join()

    def _loop(self) -> None:
        from loraops.engine import Generated
        from loraops.generate import generate_completions

        while True:
            with self._cond:
                while not self._pending and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                deadline = self._pending[0][3] + self.batch_wait_s
                while len(self._pending) < self.max_batch_size and time.perf_counter() < deadline and not self._stopping:
                    self._cond.wait(max(deadline - time.perf_counter(), 0.0))
                batch = [self._pending.popleft() for _ in range(min(len(self._pending), self.max_batch_size))]
            started = time.perf_counter()
            try:
                completions = generate_completions(
                    self.served.model, self.served.tokenizer, [b[0] for b in batch], [b[1] for b in batch], **self.served.generate_options()
                )
            except Exception as exc:  # noqa: BLE001 - the baseline fails its whole batch, as it did
                for _, _, future, _ in batch:
                    future.set_exception(exc)
                continue
            now = time.perf_counter()
            for (_, _, future, submitted), completion in zip(batch, completions, strict=True):
                future.set_result(Generated(completion, None, queue_s=started - submitted, model_s=now - submitted))


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


# --- the HTTP benchmark ------------------------------------------------------------------------


def benchmark(
    config_path: str,
    overrides: list[str],
    modes: Sequence[str],
    concurrencies: Sequence[int],
    duration_s: float,
    max_new_tokens: int,
    output: str | os.PathLike | None,
    address: str | None = None,
    batchings: Sequence[str] = ("continuous",),
    data: str | None = None,
    lengths: str = "fixed",
) -> dict[str, Any]:
    """Deploy the config once per (mode, batching) with one model replica and measure each concurrency over HTTP."""
    from ray import serve

    from loraops import cluster
    from loraops.serve.app import app_url, deploy
    from loraops.serve.settings import MODEL_DEPLOYMENT, load_serve_config

    load_at_start = round(os.getloadavg()[0], 2)
    owned = cluster.connect(address, log_to_driver=False, configure_logging=False)
    results: list[dict[str, Any]] = []
    warm_ups: dict[str, Any] = {}
    source = ""
    print(HEADER, flush=True)
    try:
        for mode, batching in itertools.product(modes, batchings):
            config = load_serve_config(config_path, [*overrides, f"args.mode={mode}", f"args.batching={batching}", f"args.max_batch_size={max(concurrencies)}"])
            model_options = config.deployment_options.setdefault(MODEL_DEPLOYMENT, {})
            model_options.pop("autoscaling_config", None)
            model_options["num_replicas"] = 1
            model_options["max_ongoing_requests"] = max(model_options.get("max_ongoing_requests", 1), max(concurrencies))
            deploy(config)
            url = app_url(config)
            if not source:
                items, source = load_workload(data, max_new_tokens, lengths, tokenizer=_tokenizer_for(config.settings) if lengths == "reference" else None)
            info = httpx.get(url + "/v1/models", timeout=60).json()["models"][0]
            warm_ups[f"{mode}/{batching}"] = info.get("warm_up")
            body = lambda item: {"dialogue": item.dialogue, "max_new_tokens": item.max_new_tokens}  # noqa: E731
            run_load(url, items, clients=2, duration_s=min(5.0, duration_s), body=body)  # connections and first calls, not measured
            for clients in concurrencies:
                records = run_load(url, items, clients=clients, duration_s=duration_s, body=body)
                row = {"mode": mode, "batching": batching, "concurrency": clients} | summarize_records(records, duration_s)
                results.append(row)
                print(format_row(row), flush=True)
            serve.delete(config.app_name)
        report = {
            "what": "end-to-end latency of POST /v1/summarize (HTTP, Serve proxy, ingress, engine), one model replica; "
            "overhead = end-to-end minus the model's own time (usage.model_ms)",
            "level": "http",
            "config": str(config_path),
            "overrides": list(overrides),
            "workload": {"source": source, "requests": len(items), "max_new_tokens": max_new_tokens, "lengths": lengths},
            "duration_s_per_point": duration_s,
            "machine": _machine(load_at_start),
            "model_replica": {key: value for key, value in config.deployment_options.get(MODEL_DEPLOYMENT, {}).items() if key in ("ray_actor_options",)},
            "warm_up": warm_ups,
            "results": results,
        }
        _write(report, output)
        return report
    finally:
        if owned:
            serve.shutdown()
        cluster.shutdown(owned)


def _tokenizer_for(settings):
    """The tokenizer of the adapter the settings serve (for --lengths reference over HTTP)."""
    from loraops.model import load_tokenizer
    from loraops.registry import Registry
    from loraops.serve.replica import training_config

    absolute = settings.with_absolute_paths()
    registry = Registry(db_url=absolute.db_url, artifact_uri=absolute.artifact_uri, workspace=absolute.workspace)
    return load_tokenizer(training_config(registry.get(settings.adapter), absolute.workspace))


# --- the model-level benchmark -----------------------------------------------------------------


def benchmark_model(
    config_path: str,
    overrides: list[str],
    modes: Sequence[str],
    batchings: Sequence[str],
    concurrencies: Sequence[int],
    duration_s: float,
    max_new_tokens: int,
    output: str | os.PathLike | None,
    data: str | None = None,
    lengths: str | None = None,
    random_init: str | None = None,
    random_init_layers: int | None = None,
) -> dict[str, Any]:
    """The replica's model and engine without Ray or HTTP: for each mode and batching, N client threads for each concurrency."""
    from loraops.errors import LoraopsError
    from loraops.model import device
    from loraops.serve.settings import load_serve_config

    unknown = sorted(set(batchings) - set(MODEL_BATCHINGS))
    if unknown:
        raise LoraopsError(f"--batching {unknown[0]!r}: expected one of {', '.join(MODEL_BATCHINGS)}")
    lengths = lengths or ("reference" if random_init else "fixed")
    load_at_start = round(os.getloadavg()[0], 2)
    settings = load_serve_config(config_path, [*overrides, f"args.max_batch_size={max(concurrencies)}"]).settings.with_absolute_paths()
    results: list[dict[str, Any]] = []
    warm_ups: dict[str, Any] = {}
    items: list[WorkItem] = []
    source, model_label = "", ""
    print(HEADER, flush=True)
    for mode in modes:
        started = time.perf_counter()
        served, model_label = _load_served(settings, mode, random_init, random_init_layers)
        load_s = time.perf_counter() - started
        if not items:
            items, source = load_workload(data, max_new_tokens, lengths, tokenizer=served.tokenizer)
        prompts = [(_prompt(served, item.dialogue), item.max_new_tokens) for item in items]
        context = settings.context_tokens or served.context_tokens
        prompts = [(p, n) for p, n in prompts if len(p) + n <= context]  # the API would answer 422 to the others
        for batching in batchings:
            runner, warm_up = _runner(served, settings, batching, max(concurrencies), context)
            warm_ups[f"{mode}/{batching}"] = warm_up | {"model_load_s": round(load_s, 1)}
            try:
                for clients in concurrencies:
                    records = run_model_load(runner.submit, prompts, clients, duration_s)
                    row = {"mode": mode, "batching": batching, "concurrency": clients} | summarize_records(records, duration_s)
                    row.pop("overhead_p50_ms", None), row.pop("overhead_p99_ms", None)  # no Serve here: latency is the model time
                    results.append(row)
                    print(format_row(row), flush=True)
            finally:
                runner.stop()
        del served
        _free_accelerator()
    report = {
        "what": "model-level latency and throughput: the replica's ServingModel and batching called by client threads directly (no Ray, no HTTP)",
        "level": "model",
        "config": str(config_path),
        "overrides": list(overrides),
        "model": model_label,
        "device": _device_name(device()),
        "workload": {"source": source, "requests": len(items), "max_new_tokens": max_new_tokens, "lengths": lengths},
        "duration_s_per_point": duration_s,
        "machine": _machine(load_at_start),
        "settings": {key: getattr(settings, key) for key in ("dtype", "batch_buckets", "length_buckets", "prefill_batch_size", "compile", "batch_wait_timeout_s")},
        "warm_up": warm_ups,
        "results": results,
    }
    _write(report, output)
    return report


def _load_served(settings, mode: str, random_init: str | None, random_init_layers: int | None):
    """The served model: the settings' registered adapter (as a replica loads it), or a random-init architecture with a fresh adapter."""
    from loraops.generate import load_for_serving

    if random_init:
        from loraops.bench.random_init import ensure_random_init_adapter, ensure_random_init_model, random_init_config

        workspace = Path(settings.workspace)
        folder = ensure_random_init_model(random_init, workspace, random_init_layers)
        config = random_init_config(folder, workspace)
        adapter = ensure_random_init_adapter(folder, config)
        layers = f", {random_init_layers} layers" if random_init_layers else ""
        return load_for_serving(config, adapter, mode, dtype=settings.dtype), f"random-init {random_init} (its architecture, RANDOM weights, embedded tokenizer{layers}) + a fresh LoRA adapter"
    from loraops.registry import Registry
    from loraops.serve.replica import adapter_slot, training_config

    registry = Registry(db_url=settings.db_url, artifact_uri=settings.artifact_uri, workspace=settings.workspace)
    version = registry.get(settings.adapter)
    config = training_config(version, settings.workspace)
    served = load_for_serving(config, registry.resolve(version.ref), mode, adapter_name=adapter_slot(version.name, version.version), dtype=settings.dtype)
    return served, f"{config.model.name} + {version.ref}"


def _runner(served, settings, batching: str, max_batch_size: int, context: int):
    """A started engine (after its warm-up) or the generate baseline, and its warm-up figures."""
    if batching == "generate":
        return GenerateBatcher(served, max_batch_size, settings.batch_wait_timeout_s), {"shapes": 0, "seconds": 0.0}
    from loraops.engine import Engine

    engine = Engine(
        served,
        settings.buckets(max_batch_size, context),
        policy=batching,
        batch_wait_s=settings.batch_wait_timeout_s,
        compile=settings.compiles(served),
    )
    shapes, seconds = engine.warm_up()
    engine.start()
    return engine, {"shapes": shapes, "seconds": round(seconds, 2), "compiled": engine.compiled}


def _prompt(served, dialogue: str) -> list[int]:
    import sys

    from loraops.data import prompt_ids

    return prompt_ids(served.tokenizer, dialogue, served.config.data, budget=sys.maxsize)


def _free_accelerator() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _device_name(target) -> str:
    import torch

    return f"cuda: {torch.cuda.get_device_name(target)}" if target.type == "cuda" else "cpu"


def _machine(load_at_start: float) -> dict[str, Any]:
    # Other work on the machine skews the figures: the load average says how busy it was.
    return {"cpus": os.cpu_count(), "load_average_1m_at_start": load_at_start, "platform": platform.platform(), "python": platform.python_version()}


def _write(report: dict[str, Any], output: str | os.PathLike | None) -> None:
    if output:
        path = Path(output)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n")


# --- the table ---------------------------------------------------------------------------------

HEADER = (
    f"{'mode':<7}{'batching':<11}{'clients':>7}{'requests':>9}{'failed':>7}{'p50 s':>8}{'p95 s':>8}{'p99 s':>8}{'p99/p50':>8}"
    f"{'tok/s':>8}{'overhead p50/p99 ms':>21}"
)


def format_row(row: dict[str, Any]) -> str:
    overhead = f"{row['overhead_p50_ms']} / {row['overhead_p99_ms']}" if row.get("overhead_p50_ms") is not None else "-"

    def number(key: str, spec: str) -> str:
        return format(row[key], spec) if row.get(key) is not None else "-"

    return (
        f"{row['mode']:<7}{row.get('batching', '-'):<11}{row['concurrency']:>7}{row['requests']:>9}{row['failed']:>7}"
        f"{number('p50_s', '.3f'):>8}{number('p95_s', '.3f'):>8}{number('p99_s', '.3f'):>8}{number('p99_over_p50', '.2f'):>8}"
        f"{row['completion_tokens_per_s']:>8.1f}{overhead:>21}"
    )


def format_report(report: dict[str, Any]) -> str:
    return "\n".join([HEADER, *(format_row(row) for row in report["results"])])
