"""``loraops bench serve``: latency, throughput and Serve's overhead on a mixed-length workload.

Two levels, the same workload and statistics:

- **HTTP** (default): the serve config deployed on Ray Serve once per (mode, batching) with one model
  replica and autoscaling off, and N closed-loop HTTP clients (:func:`run_load`: each sends its next
  request as soon as the previous one answered) for a fixed time per concurrency. Every answer
  carries the model's own time (``usage.model_ms``), so the end-to-end time minus it is what Serve
  adds: HTTP, proxy, ingress, routing, tokenization (``overhead`` in the results).
- **Model** (``--model-only``): no Ray, no HTTP. The replica's :class:`~loraops.serve.model.ServingModel`
  and :class:`~loraops.serve.engine.core.Engine`, called by N client threads directly. ``--random-init phi-2``
  serves Phi-2's architecture with random weights (no download, no registry), so it runs on a GPU
  machine without Ray. ``generate`` is the batching the replica had before the engine: one
  ``generate`` call per batch of waiting requests (:class:`GenerateBatcher`), as a baseline.

The workload: dialogues of varied length (the built-in test split, or a DialogSum-format file from
``--data``), shuffled with a fixed seed so long and short ones mix. Each request asks for
``--max-new-tokens``; with ``--lengths reference`` it asks for its reference summary's length instead
(random weights never stop on their own: that gives the varied answer lengths real summaries have).
"""

from __future__ import annotations

import json
import os
import platform
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraops.bench.load import GenerateBatcher, run_load, run_model_load, summarize_records
from loraops.bench.served import load_served
from loraops.serve.prompts import prompt_of

#: Batching schemes the model-level benchmark compares: the engine's two policies and the pre-engine baseline.
MODEL_BATCHINGS = ("continuous", "static", "generate")
LENGTHS = ("fixed", "reference")
#: Serve settings a model-level report records (they shape the engine).
SETTINGS_REPORTED = ("dtype", "batch_buckets", "length_buckets", "prefill_batch_size", "compile", "batch_wait_timeout_s")


@dataclass(frozen=True)
class WorkItem:
    """One request of the workload: a dialogue and how many tokens it asks for."""

    dialogue: str
    max_new_tokens: int


# --- the workload ------------------------------------------------------------------------------


def builtin_test_dialogues(count: int = 64) -> list[str]:
    """Dialogues of the built-in test split (no network)."""
    from loraops.training.builtin_data import generate_splits

    return [row["dialogue"] for row in generate_splits()["test"][:count]]


def load_workload(data: str | None, max_new_tokens: int, lengths: str, tokenizer=None, count: int = 64, seed: int = 0) -> tuple[list[WorkItem], str]:
    """The benchmark's requests and a description of their source (:func:`read_workload`, then :func:`workload_items`)."""
    rows, source = read_workload(data, lengths, count, seed)
    return workload_items(rows, max_new_tokens, lengths, tokenizer), source


def read_workload(data: str | None, lengths: str, count: int = 64, seed: int = 0) -> tuple[list[dict], str]:
    """``count`` rows with a dialogue and a summary, and where they come from; bad arguments fail here, before a model loads.

    ``data``: a DialogSum-format file (``dialogue`` and ``summary`` columns; JSONL, JSON, CSV or
    Parquet), else the built-in test split.
    """
    from loraops.errors import LoraopsError

    if lengths not in LENGTHS:
        raise LoraopsError(f"--lengths {lengths!r}: expected one of {', '.join(LENGTHS)}")
    if data:
        from loraops.training.data import read_table_file

        path = Path(data).expanduser()
        if not path.is_file():
            raise LoraopsError(f"--data {data}: no such file")
        rows = [row for row in read_table_file(path) if isinstance(row, dict) and _text(row, "dialogue") and _text(row, "summary")]
        if not rows:
            raise LoraopsError(f"--data {data}: no rows with 'dialogue' and 'summary' columns")
        source = f"{path.name} ({len(rows)} usable rows)"
    else:
        from loraops.training.builtin_data import generate_splits

        rows = generate_splits()["test"]
        source = "built-in test split"
    return random.Random(seed).sample(rows, min(count, len(rows))), source


def workload_items(rows: list[dict], max_new_tokens: int, lengths: str, tokenizer=None) -> list[WorkItem]:
    """One request per row: ``max_new_tokens`` each, or with ``lengths`` ``reference`` the reference summary's token count (``tokenizer``), at most that."""
    items = []
    for row in rows:
        limit = max_new_tokens
        if lengths == "reference":
            limit = max(1, min(max_new_tokens, len(tokenizer.encode(row["summary"], add_special_tokens=False)) + 1))  # + end-of-text
        items.append(WorkItem(row["dialogue"], limit))
    return items


def _text(row: dict, column: str) -> str:
    return str(row.get(column) or "").strip()


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
    """Deploy the config once per (mode, batching) with one model replica each and measure each concurrency over HTTP.

    A mode's batchings are deployed side by side and take turns at each concurrency, so a change of
    load on the machine hits them alike.
    """
    import httpx
    from ray import serve

    from loraops import cluster
    from loraops.serve.deploy import deploy
    from loraops.serve.settings import MODEL_DEPLOYMENT, load_serve_config

    load_at_start = round(os.getloadavg()[0], 2)
    # The workload first: a bad --data file is one line before any model loads.
    settings = load_serve_config(config_path, list(overrides)).settings
    items, source = load_workload(data, max_new_tokens, lengths, tokenizer=_tokenizer_for(settings) if lengths == "reference" else None)
    deployed: list[str] = []  # the benchmark's applications on the cluster now
    owned = cluster.connect(address, log_to_driver=False, configure_logging=False)
    results: list[dict[str, Any]] = []
    warm_ups: dict[str, Any] = {}
    body = lambda item: {"dialogue": item.dialogue, "max_new_tokens": item.max_new_tokens}  # noqa: E731
    print(HEADER, flush=True)
    try:
        for mode in modes:
            urls: dict[str, str] = {}
            for batching in batchings:
                config = bench_config(config_path, overrides, mode, batching, max(concurrencies))
                urls[batching] = deploy(config)
                deployed.append(config.app_name)
                warm_ups[f"{mode}/{batching}"] = httpx.get(urls[batching] + "/v1/models", timeout=60).json()["models"][0].get("warm_up")
                run_load(urls[batching], items, clients=2, duration_s=min(5.0, duration_s), body=body)  # connections and first calls, not measured
            for clients in concurrencies:
                for batching, url in urls.items():
                    records = run_load(url, items, clients=clients, duration_s=duration_s, body=body)
                    row = {"mode": mode, "batching": batching, "concurrency": clients} | summarize_records(records, duration_s)
                    results.append(row)
                    print(format_row(row), flush=True)
            while deployed:
                serve.delete(deployed.pop())
        floor = _serve_floor(config, items, body, min(10.0, duration_s))
        print(f"Serve's floor (the same ingress and hop to a model replica that answers at once, 1 client): {floor['p50_ms']} ms p50, {floor['p99_ms']} ms p99")
        report = {
            "what": "end-to-end latency of POST /v1/summarize (HTTP, Serve proxy, ingress, engine), one model replica; "
            "overhead = end-to-end minus the model's own time (usage.model_ms)",
            "level": "http",
            "config": str(config_path),
            "overrides": list(overrides),
            "workload": {"source": source, "requests": len(items), "max_new_tokens": max_new_tokens, "lengths": lengths},
            "duration_s_per_point": duration_s,
            "machine": machine_figures(load_at_start),
            "model_replica": {key: value for key, value in config.deployment_options.get(MODEL_DEPLOYMENT, {}).items() if key in ("ray_actor_options",)},
            "warm_up": warm_ups,
            "serve_floor": floor,
            "results": results,
        }
        _write(report, output)
        return report
    finally:
        if owned:
            serve.shutdown()
        else:  # someone else's cluster: leave it as found, even when the benchmark stopped half-way
            for name in deployed:
                serve.delete(name)
        cluster.shutdown(owned)


def bench_config(config_path: str, overrides: list[str], mode: str, batching: str, clients: int):
    """The serve config of one (mode, batching) application: its own name and route, one model replica taking ``clients`` at once."""
    from loraops.serve.settings import MODEL_DEPLOYMENT, load_serve_config

    config = load_serve_config(
        config_path,
        [*overrides, f"name=bench-{mode}-{batching}", f"route_prefix=/{mode}-{batching}", f"args.mode={mode}", f"args.batching={batching}",
         f"args.max_batch_size={clients}"],
    )  # fmt: skip
    model_options = config.deployment_options.setdefault(MODEL_DEPLOYMENT, {})
    model_options.pop("autoscaling_config", None)
    model_options["num_replicas"] = 1
    model_options["max_ongoing_requests"] = max(model_options.get("max_ongoing_requests", 1), clients)
    return config


def _serve_floor(config, items: Sequence[WorkItem], body, duration_s: float) -> dict[str, Any]:
    """End-to-end latency of the same application with a model replica that answers at once: what HTTP,
    the proxy, the ingress and one handle call cost on this machine, the floor under Serve's overhead."""
    from ray import serve

    from loraops.serve.app import SummarizerAPI
    from loraops.serve.contract import AnsweredBy, SummaryRequest, SummaryResult, Usage
    from loraops.serve.deploy import app_url
    from loraops.serve.settings import API_DEPLOYMENT, MODEL_DEPLOYMENT

    answer = SummaryResult("", AnsweredBy("echo", 0), Usage(prompt_tokens=0, completion_tokens=1, model_ms=0.0, queue_ms=0.0), "stop")

    @serve.deployment(name=MODEL_DEPLOYMENT)
    class EchoModel:
        async def summarize(self, request: SummaryRequest) -> SummaryResult:
            return answer

    model_options = {k: v for k, v in config.deployment_options.get(MODEL_DEPLOYMENT, {}).items() if k == "ray_actor_options"}
    api = SummarizerAPI.options(**config.deployment_options.get(API_DEPLOYMENT, {}))
    serve.run(api.bind(EchoModel.options(**model_options).bind(), config.settings.model_dump()), name="bench-floor", route_prefix="/floor")
    url = app_url(config).removesuffix(config.route_prefix.rstrip("/")) + "/floor"
    try:
        run_load(url, items, clients=1, duration_s=1.0, body=body)  # connections, not measured
        summary = summarize_records(run_load(url, items, clients=1, duration_s=duration_s, body=body), duration_s)
    finally:
        serve.delete("bench-floor")
    return {"requests": summary["requests"], "failed": summary["failed"], "p50_ms": _ms(summary["p50_s"]), "p99_ms": _ms(summary["p99_s"])}


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def _tokenizer_for(settings):
    """The tokenizer of the adapter the settings serve (for --lengths reference over HTTP)."""
    from loraops.serve.model import training_config
    from loraops.training.model import load_tokenizer

    absolute = settings.with_absolute_paths()
    registry = absolute.open_registry()
    return load_tokenizer(training_config(registry.get(settings.adapter), absolute.workspace, settings.allow_trust_remote_code))


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
    from loraops.serve.settings import load_serve_config
    from loraops.training.model import device

    unknown = sorted(set(batchings) - set(MODEL_BATCHINGS))
    if unknown:
        raise LoraopsError(f"--batching {unknown[0]!r}: expected one of {', '.join(MODEL_BATCHINGS)}")
    lengths = lengths or ("reference" if random_init else "fixed")
    load_at_start = round(os.getloadavg()[0], 2)
    serve_config = load_serve_config(config_path, [*overrides, f"args.max_batch_size={max(concurrencies)}"], ray_schema=False)
    rows, source = read_workload(data, lengths)  # a bad --data file is one line before any model loads
    settings = serve_config.settings.with_absolute_paths()
    threads = replica_threads(serve_config)
    results: list[dict[str, Any]] = []
    warm_ups: dict[str, Any] = {}
    items: list[WorkItem] = []
    model_label = ""
    print(HEADER, flush=True)
    for mode in modes:
        started = time.perf_counter()
        served, model_label = load_served(settings, mode, random_init, random_init_layers)
        load_s = time.perf_counter() - started
        if not items:
            items = workload_items(rows, max_new_tokens, lengths, tokenizer=served.tokenizer)
        prompts = [(prompt_of(served, item.dialogue), item.max_new_tokens) for item in items]
        context = settings.context_tokens or served.context_tokens
        prompts = [(p, n) for p, n in prompts if len(p) + n <= context]  # the API would answer 422 to the others
        runners = {}
        try:
            for batching in batchings:
                runners[batching], warm_up = _runner(served, settings, batching, max(concurrencies))
                warm_ups[f"{mode}/{batching}"] = warm_up | {"model_load_s": round(load_s, 1)}
            # Batchings take turns at each concurrency: a load change on the machine hits them alike.
            for clients in concurrencies:
                for batching, runner in runners.items():
                    records = run_model_load(runner.submit, prompts, clients, duration_s)
                    row = {"mode": mode, "batching": batching, "concurrency": clients} | summarize_records(records, duration_s)
                    row.pop("overhead_p50_ms", None), row.pop("overhead_p99_ms", None)  # no Serve here: latency is the model time
                    results.append(row)
                    print(format_row(row), flush=True)
        finally:
            for runner in runners.values():
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
        "machine": machine_figures(load_at_start),
        "settings": {key: getattr(settings, key) for key in SETTINGS_REPORTED},
        "torch_threads": threads,
        "warm_up": warm_ups,
        "results": results,
    }
    _write(report, output)
    return report


def replica_threads(serve_config) -> int:
    """torch threads of a model replica (``torch_threads``, else what Ray gives it: its num_cpus), set here too so both levels compare."""
    import torch

    from loraops.serve.settings import MODEL_DEPLOYMENT

    cpus = serve_config.deployment_options.get(MODEL_DEPLOYMENT, {}).get("ray_actor_options", {}).get("num_cpus", 1)
    threads = serve_config.settings.torch_threads or max(1, int(cpus))
    torch.set_num_threads(threads)
    return threads


def _runner(served, settings, batching: str, max_batch_size: int):
    """A started engine (after its warm-up) or the generate baseline, and its warm-up figures."""
    if batching == "generate":
        context = settings.context_tokens or served.context_tokens
        return GenerateBatcher(served, max_batch_size, settings.batch_wait_timeout_s, context), {"shapes": 0, "seconds": 0.0}
    from loraops.serve.engine.core import Engine

    engine = Engine.from_settings(served, settings, max_batch_size, policy=batching)
    return engine, engine.warm_start()


def _free_accelerator() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _device_name(target) -> str:
    import torch

    return f"cuda: {torch.cuda.get_device_name(target)}" if target.type == "cuda" else "cpu"


def machine_figures(load_at_start: float) -> dict[str, Any]:
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
