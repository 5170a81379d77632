"""``loraops bench serve --adapters N`` (without ``--model-only``): the same comparison over HTTP, through Serve's routing.

N versions are registered as for the model-level run (:func:`loraops.bench.adapters.scratch_registry`,
in the served registry's kind of store), and one application per mode is deployed on a local Ray
instance (one model replica, autoscaling off) serving the first as its default with
``load_on_demand``: each request of the N-adapter run names its adapter in ``model`` (the default's
requests name none), so it goes through the ingress and Serve's multiplexed routing, and the replica
loads it on first use into its LRU (``max_adapters``: N, all resident, or ``--max-adapters K`` + the
default). The one-adapter and N-adapter runs take turns in :data:`~loraops.bench.adapters.ROUNDS`
rounds; before the first, every adapter is asked for once (its cold load, not measured). The
replica's own counts (``/v1/models``' ``replicas``) give the loads and evictions during the runs.
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

from loraops.bench.adapters import ROUNDS, add_errors, drop_scratch, ratio_to_one, scratch_registry
from loraops.bench.load import run_load, summarize_records


def benchmark_adapters_http(
    config_path: str, overrides: list[str], modes: list[str], count: int, skew: float, clients: int, duration_s: float, max_new_tokens: int,
    max_adapters: int | None = None, address: str | None = None,
) -> dict[str, Any]:  # fmt: skip
    """For each mode: the one-adapter and N-adapter runs over HTTP and the replica's loads and evictions (module docstring)."""
    from ray import serve

    from loraops import cluster
    from loraops.bench.serve import bench_config, load_workload, machine_figures
    from loraops.serve.deploy import deploy
    from loraops.serve.settings import load_serve_config

    load_at_start = round(os.getloadavg()[0], 2)
    settings = load_serve_config(config_path, list(overrides), ray_schema=False).settings.with_absolute_paths()
    items, _ = load_workload(None, max_new_tokens, "fixed")
    results: list[dict[str, Any]] = []
    counts: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="loraops-bench-adapters-http-") as scratch:
        registry, refs = scratch_registry(settings, Path(scratch), count)
        owned = cluster.connect(address, log_to_driver=False, configure_logging=False)
        deployed: list[str] = []
        try:
            for mode in modes:
                on_demand = [
                    f"args.db_url={registry.db_url}", f"args.artifact_uri={registry.artifact_uri}", f"args.adapter={refs[0]}",
                    "args.load_on_demand=true", f"args.max_adapters={(max_adapters or count - 1) + 1}",
                ]  # fmt: skip
                config = bench_config(config_path, [*overrides, *on_demand], mode, "continuous", clients)
                url = deploy(config)
                deployed.append(config.app_name)
                rows, counts[mode] = _run_mode(url, refs, mode, skew, clients, duration_s, items)
                results.extend(rows)
                serve.delete(deployed.pop())
        finally:
            for name in deployed:
                serve.delete(name)
            cluster.shutdown(owned)
            drop_scratch(registry, refs)
    return {
        "what": "N adapters named per request over HTTP (ingress, Serve's multiplexed routing, one model replica with load_on_demand) "
        "against one adapter",
        "level": "http",
        "config": str(config_path),
        "overrides": list(overrides),
        "adapters": count,
        "skew": skew,
        "max_adapters": max_adapters,
        "clients": clients,
        "max_new_tokens": max_new_tokens,
        "duration_s_per_point": duration_s,
        "store": "local" if registry.store.is_local else registry.artifact_uri.split("://", 1)[0],
        "machine": machine_figures(load_at_start) | {"load_average_1m_at_end": round(os.getloadavg()[0], 2)},
        "results": results,
        "on_demand": counts,
        "ratios": {mode: ratio_to_one(results, mode, count) for mode in modes},
    }


def _run_mode(url: str, refs: list[str], mode: str, skew: float, clients: int, duration_s: float, items):
    """The two runs on one deployed application, in turns: (result rows, the replica's loads and evictions during them)."""
    import httpx

    weights = [1.0 / (rank + 1) ** skew for rank in range(len(refs))]
    draw = random.Random(0)

    def one(item) -> dict[str, Any]:
        return {"dialogue": item.dialogue, "max_new_tokens": item.max_new_tokens}

    def named(item) -> dict[str, Any]:
        ref = draw.choices(refs, weights)[0]
        return one(item) | ({"model": ref} if ref != refs[0] else {})

    run_load(url, items, clients=2, duration_s=min(5.0, duration_s), body=one)  # connections and first calls, not measured
    for ref in refs[1:]:  # every adapter loaded once (cold) before the measured runs
        httpx.post(url + "/v1/summarize", json=one(items[0]) | {"model": ref}, timeout=300).raise_for_status()
    before = _replica_counts(url)
    alone, mixed = [], []
    for _ in range(ROUNDS):
        alone += run_load(url, items, clients=clients, duration_s=duration_s / ROUNDS, body=one)
        mixed += run_load(url, items, clients=clients, duration_s=duration_s / ROUNDS, body=named)
    after = _replica_counts(url)
    rows = [
        {"mode": mode, "adapters": 1, "skew": None, "concurrency": clients} | summarize_records(alone, duration_s),
        {"mode": mode, "adapters": len(refs), "skew": skew, "concurrency": clients} | summarize_records(mixed, duration_s),
    ]
    for row, records in zip(rows, (alone, mixed), strict=True):
        add_errors(row, records)
    loads, evictions = after[0] - before[0], after[1] - before[1]
    requests = len(mixed)
    # A request that waited for another one's load of the same adapter counts as a hit here.
    return rows, {"requests": requests, "loads": loads, "evictions": evictions, "hit_ratio": round(1 - loads / requests, 3) if requests else None}


def _replica_counts(url: str) -> tuple[int, int]:
    """Loads and evictions summed over the model replicas (``/v1/models``' ``replicas``)."""
    import httpx

    replicas = httpx.get(url + "/v1/models", timeout=60).json()["replicas"]
    return sum(r["loads"] for r in replicas), sum(r["evictions"] for r in replicas)


def format_http_report(report: dict[str, Any]) -> str:
    lines = [f"{'mode':<7}{'adapters':>9}{'requests':>9}{'failed':>7}{'p50 s':>8}{'p99 s':>8}{'tok/s':>8}"]
    for row in report["results"]:
        lines.append(
            f"{row['mode']:<7}{row['adapters']:>9}{row['requests']:>9}{row['failed']:>7}{row['p50_s'] or 0:>8.3f}{row['p99_s'] or 0:>8.3f}"
            f"{row['completion_tokens_per_s']:>8.1f}"
        )
    for mode, ratio in report["ratios"].items():
        counts = report["on_demand"][mode]
        lines.append(
            f"{mode} over HTTP: {report['adapters']} adapters at {ratio} x the one-adapter tokens/s; "
            f"{counts['loads']} loads, {counts['evictions']} evictions in {counts['requests']} requests (hit ratio {counts['hit_ratio']})"
        )
    return "\n".join(lines)
