"""``loraops bench serve``: load against the summarization API, a bounded closed-loop generator and the benchmark.

:func:`run_load` runs N clients, each sending its next request as soon as the previous one
answered, for a fixed time; every request becomes a :class:`Record` (timing, status, the
version that answered). The benchmark deploys the serve config once per mode (one model
replica, no autoscaling, so the figures compare modes and not replica counts), measures
latency percentiles and throughput at each concurrency, prints a table and writes JSON.
"""

from __future__ import annotations

import itertools
import json
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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

    @property
    def latency(self) -> float:
        return self.ended - self.started


def run_load(
    url: str,
    dialogues: Sequence[str],
    clients: int,
    duration_s: float,
    body: Callable[[str], dict[str, Any]] | None = None,
    headers: dict[str, str] | None = None,
    timeout_s: float = 120.0,
    stop: threading.Event | None = None,
) -> list[Record]:
    """``clients`` threads POST /v1/summarize back to back for ``duration_s`` (or until ``stop``); every request recorded.

    No retries: a failed request stays a failure in the records.
    """
    records: list[Record] = []
    lock = threading.Lock()
    deadline = time.monotonic() + duration_s
    stop = stop or threading.Event()
    make_body = body or (lambda text: {"dialogue": text})

    def client(index: int) -> None:
        texts = itertools.cycle(dialogues[index % len(dialogues):] + dialogues[: index % len(dialogues)])
        with httpx.Client(base_url=url, headers=headers or {}, timeout=timeout_s) as http:
            while time.monotonic() < deadline and not stop.is_set():
                record = _one_request(http, index, make_body(next(texts)))
                with lock:
                    records.append(record)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
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
    return Record(index, started, ended, 200, version=answer["model"]["version"], completion_tokens=answer["usage"]["completion_tokens"])


def summarize_records(records: Sequence[Record], duration_s: float) -> dict[str, Any]:
    """Latency percentiles (successful requests), throughput and the failure count."""
    ok = [r for r in records if r.status == 200]
    latencies = sorted(r.latency for r in ok)
    return {
        "requests": len(records),
        "failed": len(records) - len(ok),
        "p50_s": round(_percentile(latencies, 50), 3),
        "p95_s": round(_percentile(latencies, 95), 3),
        "mean_s": round(statistics.fmean(latencies), 3) if latencies else None,
        "requests_per_s": round(len(ok) / duration_s, 2),
        "completion_tokens_per_s": round(sum(r.completion_tokens for r in ok) / duration_s, 1),
    }


def _percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    rank = (len(values) - 1) * q / 100
    low, high = int(rank), min(int(rank) + 1, len(values) - 1)
    return values[low] + (values[high] - values[low]) * (rank - low)


# --- the benchmark -----------------------------------------------------------------------------


def benchmark(
    config_path: str,
    overrides: list[str],
    modes: Sequence[str],
    concurrencies: Sequence[int],
    duration_s: float,
    max_new_tokens: int,
    output: str | os.PathLike | None,
    address: str | None = None,
) -> dict[str, Any]:
    """Deploy the config once per mode with one model replica and measure each concurrency."""
    from ray import serve

    from loraops import cluster
    from loraops.serve.app import app_url, deploy
    from loraops.serve.settings import MODEL_DEPLOYMENT, load_serve_config

    dialogues = builtin_test_dialogues()
    load_at_start = round(os.getloadavg()[0], 2)
    owned = cluster.connect(address, log_to_driver=False, configure_logging=False)
    results: list[dict[str, Any]] = []
    print(HEADER, flush=True)
    try:
        for mode in modes:
            config = load_serve_config(config_path, [*overrides, f"args.mode={mode}", f"args.max_batch_size={max(concurrencies)}"])
            model_options = config.deployment_options.setdefault(MODEL_DEPLOYMENT, {})
            model_options.pop("autoscaling_config", None)
            model_options["num_replicas"] = 1
            model_options["max_ongoing_requests"] = max(model_options.get("max_ongoing_requests", 1), max(concurrencies))
            deploy(config)
            url = app_url(config)
            body = lambda text: {"dialogue": text, "max_new_tokens": max_new_tokens}  # noqa: E731
            run_load(url, dialogues, clients=2, duration_s=min(5.0, duration_s), body=body)  # warm-up
            for clients in concurrencies:
                records = run_load(url, dialogues, clients=clients, duration_s=duration_s, body=body)
                row = {"mode": mode, "concurrency": clients} | summarize_records(records, duration_s)
                results.append(row)
                print(format_row(row), flush=True)
            serve.delete(config.app_name)
        report = {
            "what": "end-to-end latency of POST /v1/summarize (HTTP, Serve proxy, batching, generation), one model replica",
            "config": str(config_path),
            "overrides": list(overrides),
            "max_new_tokens": max_new_tokens,
            "duration_s_per_point": duration_s,
            # Other work on the machine skews the figures: the load average says how busy it was.
            "machine": {"cpus": os.cpu_count(), "load_average_1m_at_start": load_at_start, "platform": platform.platform(), "python": platform.python_version()},
            "model_replica": {key: value for key, value in config.deployment_options.get(MODEL_DEPLOYMENT, {}).items() if key in ("ray_actor_options",)},
            "results": results,
        }
        if output:
            path = Path(output)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(report, indent=2) + "\n")
        return report
    finally:
        if owned:
            serve.shutdown()
        cluster.shutdown(owned)


HEADER = f"{'mode':<8}{'clients':>8}{'requests':>10}{'failed':>8}{'p50 s':>9}{'p95 s':>9}{'req/s':>8}{'tok/s':>8}"


def format_row(row: dict[str, Any]) -> str:
    return (
        f"{row['mode']:<8}{row['concurrency']:>8}{row['requests']:>10}{row['failed']:>8}"
        f"{row['p50_s']:>9.3f}{row['p95_s']:>9.3f}{row['requests_per_s']:>8.2f}{row['completion_tokens_per_s']:>8.1f}"
    )


def format_report(report: dict[str, Any]) -> str:
    return "\n".join([HEADER, *(format_row(row) for row in report["results"])])


def builtin_test_dialogues(count: int = 64) -> list[str]:
    """Dialogues of the built-in test split (no network)."""
    from loraops.builtin_data import generate_splits

    return [row["dialogue"] for row in generate_splits()["test"][:count]]
