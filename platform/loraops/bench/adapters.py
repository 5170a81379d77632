"""``loraops bench serve --model-only --adapters N``: N registered adapters resident on one replica's model, against one.

In one process and one run per mode: N versions are registered in a scratch registry (copies of the
served version's files with its training config: speed depends on the adapter's shapes, not its
weights), the first is loaded with the base model as a replica loads it, and 16 closed-loop clients
(:func:`~loraops.bench.load.run_model_load`) run on the replica's engine with that one adapter (the
fast path). Then the other N-1 are loaded the way a replica loads an adapter on demand (files fetched
and sha256-verified by :func:`~loraops.serve.model.prepare_version`, then added next to the others),
each load timed (the cold-load latency, local store), and the clients run again, each request naming
one of the N adapters: uniformly, or Zipf-like with ``--skew s`` (adapter i drawn with weight 1/i^s).
The two runs take turns (three rounds, the N-1 unloaded and loaded again each round), so a shared
machine's changing load hits both alike.

``--max-adapters K`` adds a third run to each round: K on-demand adapters resident next to the
default, least recently used evicted (:mod:`loraops.bench.adapters_lru`), which reports the
resident-hit ratio, loads, evictions and the cold loads it took. The versions are stored where the
served registry stores its own (``store``: ``local``, or ``s3`` for an ``s3://`` artifact store,
under a scratch prefix); with a remote store every timed cold load of the N-adapter run downloads
(the replica's local copies of the scratch versions are deleted before each round), while the LRU
run reuses them after the first load, as a replica does.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loraops.bench.adapters_lru import ResidentSet
from loraops.bench.load import run_model_load, summarize_records
from loraops.errors import LoraopsError

#: Turns of the one-adapter and the N-adapter runs, each ``duration / ROUNDS`` seconds.
ROUNDS = 3


def benchmark_adapters(
    config_path: str, overrides: list[str], modes: Sequence[str], count: int, skew: float, clients: int, duration_s: float, max_new_tokens: int,
    max_adapters: int | None = None,
) -> dict[str, Any]:  # fmt: skip
    """For each mode, the one-adapter and the N-adapter runs and the cold loads; the report (see the module docstring)."""
    from loraops.bench.serve import builtin_test_dialogues, machine_figures, replica_threads
    from loraops.serve.settings import load_serve_config

    load_at_start = round(os.getloadavg()[0], 2)
    serve_config = load_serve_config(config_path, [*overrides, f"args.max_batch_size={clients}"], ray_schema=False)
    settings = serve_config.settings.with_absolute_paths()
    threads = replica_threads(serve_config)
    dialogues = builtin_test_dialogues(64)
    results: list[dict[str, Any]] = []
    cold: dict[str, Any] = {}
    lru: dict[str, Any] = {}
    about: dict[str, Any] = {}
    for mode in modes:
        with tempfile.TemporaryDirectory(prefix="loraops-bench-adapters-") as scratch:
            registry, refs = scratch_registry(settings, Path(scratch), count)
            try:
                rows, cold[mode], lru[mode] = _run_mode(
                    registry, refs, settings, mode, skew, clients, duration_s, max_new_tokens, dialogues, max_adapters, about
                )
            finally:
                drop_scratch(registry, refs)
        results.extend(rows)
    store = "local" if registry.store.is_local else registry.artifact_uri.split("://", 1)[0]
    return {
        "what": "N adapters resident on one replica's model (per-row adapters in shared batches) against one adapter, and cold adapter loads",
        "level": "model",
        "config": str(config_path),
        "overrides": list(overrides),
        "adapters": count,
        "skew": skew,
        "clients": clients,
        "max_new_tokens": max_new_tokens,
        "duration_s_per_point": duration_s,
        "machine": {"name": about.get("name")} | machine_figures(load_at_start) | {"load_average_1m_at_end": round(os.getloadavg()[0], 2)},
        "torch_threads": threads,
        "store": store,
        "results": results,
        "cold_load_s": cold,
        "ratios": {mode: ratio_to_one(results, mode, count) for mode in modes},
    } | ({"max_adapters": max_adapters, "lru": lru} if max_adapters else {})


def scratch_registry(settings, folder: Path, count: int):
    """``count`` versions ``bench-i:1`` of the served version's files and training config, in a registry in ``folder``
    whose store is the served registry's kind: a local folder there, or a scratch prefix of the same remote store.

    Each copy gets a file of its own (``bench-copy.json``), so the copies' checksums differ and a replica's local
    copy of one is never another's (a remote store's cold load downloads each)."""
    from loraops.registry import Lineage, Registry

    source = settings.open_registry()
    try:
        version = source.get(settings.adapter)
    except LoraopsError as exc:
        raise LoraopsError(
            f"{exc}: the benchmark copies the served adapter {settings.adapter!r}; in a new workspace register one first "
            "(loraops train --config tune/tiny.yaml; loraops register --adapter .loraops/runs/tiny/adapter --name tiny; loraops promote tiny 1)"
        ) from None
    files = source.resolve(version.ref)
    run = uuid.uuid4().hex[:12]
    store = str(folder / "store") if source.store.is_local else f"{source.artifact_uri.rstrip('/')}/bench-scratch-{run}"
    registry = Registry(db_url=f"sqlite:///{folder / 'registry.db'}", artifact_uri=store, workspace=settings.workspace)
    refs = []
    for i in range(count):
        copy = folder / f"copy-{i}"
        shutil.copytree(files, copy)
        (copy / "bench-copy.json").write_text(json.dumps({"copy": i, "run": run}))
        refs.append(registry.register(copy, f"bench-{i}", lineage=Lineage(config=version.config)).ref)
        shutil.rmtree(copy)
    return registry, refs


def _local_copies(registry, refs) -> list[Path]:
    """Where the replica keeps its verified copies of the versions of a remote store (none for a local store)."""
    from loraops.registry.store import manifest_digest

    if registry.store.is_local:
        return []
    return [registry.workspace / "cache" / "registry" / f"sha256-{manifest_digest(registry.get(ref).files)}" for ref in refs]


def _forget_local_copies(registry, refs) -> None:
    for path in _local_copies(registry, refs):
        shutil.rmtree(path, ignore_errors=True)


def drop_scratch(registry, refs) -> None:
    """The scratch versions' local copies and, for a remote store, their files there (the local store goes with its folder)."""
    _forget_local_copies(registry, refs)
    if not registry.store.is_local:
        for ref in refs:
            registry.store.delete(registry.store.path(ref.split(":")[0]))  # best effort, as the store's own cleanup


def _run_mode(registry, refs, settings, mode, skew, clients, duration_s, max_new_tokens, dialogues, max_adapters, about):
    """The one-adapter, N-adapter (and LRU) runs, taking turns in :data:`ROUNDS` rounds (a load change on a shared machine
    hits all alike), the other N-1 adapters loaded cold before each N-adapter turn: (result rows, cold loads, LRU figures)."""
    from loraops.bench.serve import _device_name
    from loraops.serve.engine.core import Engine
    from loraops.serve.model import load_registered
    from loraops.serve.public import public_model_name
    from loraops.training.data import prompt_ids

    served = load_registered(registry, refs[0], mode, settings.dtype, settings.allow_trust_remote_code)
    device = _device_name(next(served.model.parameters()).device)
    about["name"] = f"{'CPU' if device == 'cpu' else device}, {os.cpu_count()} cores, {public_model_name(served.config.model.name)}"
    prompts = [(prompt_ids(served.tokenizer, text, served.config.data, budget=10**9), max_new_tokens) for text in dialogues]
    engine = Engine.from_settings(served, settings, clients)
    engine.warm_start()
    weights = [1.0 / (rank + 1) ** skew for rank in range(len(refs))]
    draw = random.Random(0)
    one, many, loads, lru, lru_counts = [], [], [], [], []
    try:
        for _ in range(ROUNDS):
            one += run_model_load(lambda prompt, limit: engine.submit(prompt, limit), prompts, clients, duration_s / ROUNDS)
            _forget_local_copies(registry, refs[1:])  # a remote store's cold load downloads, as on a replica that never held it
            loads += [_load_cold(engine, registry, ref, settings) for ref in refs[1:]]
            slots = list(served.adapters)
            mixed = lambda p, n, slots=slots: engine.submit(p, n, adapter=draw.choices(slots, weights)[0])  # noqa: E731
            many += run_model_load(mixed, prompts, clients, duration_s / ROUNDS)
            for slot in slots[1:]:
                _remove(engine, slot)
            if max_adapters:
                _forget_local_copies(registry, refs[1:])
                records, counts = _lru_turn(engine, registry, refs, settings, max_adapters, weights, draw, prompts, clients, duration_s / ROUNDS)
                lru += records
                lru_counts.append(counts)
    finally:
        engine.stop()
    rows = [
        {"mode": mode, "adapters": 1, "skew": None, "concurrency": clients} | summarize_records(one, duration_s),
        {"mode": mode, "adapters": len(refs), "skew": skew, "concurrency": clients} | summarize_records(many, duration_s),
    ]
    if max_adapters:
        row = {"mode": mode, "adapters": len(refs), "skew": skew, "concurrency": clients, "max_adapters": max_adapters}
        rows.append(row | summarize_records(lru, duration_s))
    for row, records in zip(rows, (one, many, lru), strict=False):
        row.pop("overhead_p50_ms", None), row.pop("overhead_p99_ms", None)  # no Serve here
        add_errors(row, records)
    return rows, _quantiles(loads), _lru_summary(lru_counts) if max_adapters else None


def _lru_turn(engine, registry, refs, settings, capacity, weights, draw, prompts, clients, duration_s):
    """One turn of the skewed mix on a resident set of ``capacity`` on-demand adapters (plus the default), starting empty:
    (records, counts with the load seconds)."""
    resident = ResidentSet(capacity, lambda ref: _add(engine, registry, ref, settings), lambda slot: _remove(engine, slot))
    defaults = [0]

    def submit(prompt: list[int], limit: int):
        rank = draw.choices(range(len(refs)), weights)[0]
        if rank == 0:  # the default: configured, always resident
            defaults[0] += 1
            return engine.submit(prompt, limit)
        return resident.submit(engine, refs[rank], prompt, limit)

    try:
        records = run_model_load(submit, prompts, clients, duration_s)
    finally:
        for slot in resident.close():
            _remove(engine, slot)
    return records, resident.counts(defaults[0]) | {"load_seconds": resident.load_seconds}


def _lru_summary(turns: list[dict[str, Any]]) -> dict[str, Any]:
    """The LRU turns added up: requests, hits, misses, loads, evictions, the hit ratio and the cold loads' quantiles."""
    keys = ("requests", "hits", "misses", "reclaimed", "loads", "evictions")
    total = {key: sum(turn[key] for turn in turns) for key in keys}
    ratio = round(total["hits"] / total["requests"], 3) if total["requests"] else None
    seconds = [s for turn in turns for s in turn["load_seconds"]]
    return {"capacity": turns[0]["capacity"]} | total | {"hit_ratio": ratio, "cold_load_s": _quantiles(seconds)}


def _hold(engine, adding: bool):
    """As a replica holds its engine for an adapter change: between two steps when the running rows compute as before
    (nf4, or several adapters stay unmerged), else drained (merging or unmerging changes every row's weights)."""
    served = engine.served
    in_place = served.mode == "nf4" or len(served.adapters) > (1 if adding else 2)
    return engine.between_steps() if in_place else engine.exclusive()


def _add(engine, registry, ref: str, settings) -> str:
    """Load ``ref`` as a replica loads one on demand: fetched and verified first, then added under the hold; its slot."""
    from loraops.serve.model import prepare_version

    prepared = prepare_version(registry, registry.get(ref), settings.allow_trust_remote_code, engine.served)
    with _hold(engine, adding=True):
        engine.served.add(prepared.path, prepared.slot)
    return prepared.slot


def _remove(engine, slot: str) -> None:
    with _hold(engine, adding=False):
        engine.served.remove(slot)


def _load_cold(engine, registry, ref: str, settings) -> float:
    """Seconds to load ``ref`` next to the loaded adapters as a replica does (:func:`_add`), no request running (between turns)."""
    started = time.perf_counter()
    _add(engine, registry, ref, settings)
    return time.perf_counter() - started


def add_errors(row: dict[str, Any], records) -> None:
    """The most frequent errors of a row's failed requests, so a failure in the figures can be explained."""
    if row["failed"]:
        row["errors"] = dict(Counter(f"{record.status}: {record.error}" for record in records if record.error).most_common(3))


def _quantiles(samples: list[float]) -> dict[str, Any]:
    if not samples:
        return {"loads": 0}
    ordered = sorted(samples)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)

    return {"loads": len(ordered), "p50_s": at(0.5), "p99_s": at(0.99), "max_s": round(ordered[-1], 3)}


def ratio_to_one(results: list[dict[str, Any]], mode: str, count: int) -> float | None:
    """Tokens/s with ``count`` adapters resident over tokens/s with one, in ``mode``."""
    one = next((r for r in results if r["mode"] == mode and r["adapters"] == 1), None)
    many = next((r for r in results if r["mode"] == mode and r["adapters"] == count and not r.get("max_adapters")), None)
    if not one or not many or not one["completion_tokens_per_s"]:
        return None
    return round(many["completion_tokens_per_s"] / one["completion_tokens_per_s"], 3)


def format_adapters_report(report: dict[str, Any]) -> str:
    lines = [f"{'mode':<7}{'adapters':>9}{'resident':>9}{'requests':>9}{'failed':>7}{'p50 s':>8}{'p99 s':>8}{'tok/s':>8}"]
    for row in report["results"]:
        resident = row.get("max_adapters") or row["adapters"]
        lines.append(
            f"{row['mode']:<7}{row['adapters']:>9}{resident:>9}{row['requests']:>9}{row['failed']:>7}{row['p50_s'] or 0:>8.3f}{row['p99_s'] or 0:>8.3f}"
            f"{row['completion_tokens_per_s']:>8.1f}"
        )
    store = report["store"]
    for mode, ratio in report["ratios"].items():
        cold = report["cold_load_s"][mode]
        lines.append(
            f"{mode}: {report['adapters']} adapters at {ratio} x the one-adapter tokens/s; "
            f"cold load ({store} store) p50 {cold.get('p50_s')} s, p99 {cold.get('p99_s')} s"
        )
        lru = report.get("lru", {}).get(mode)
        if lru:
            lines.append(
                f"{mode}: LRU of {lru['capacity']} + the default: hit ratio {lru['hit_ratio']} ({lru['hits']}/{lru['requests']}), "
                f"{lru['loads']} loads, {lru['evictions']} evictions; its cold loads p50 {lru['cold_load_s'].get('p50_s')} s, "
                f"p99 {lru['cold_load_s'].get('p99_s')} s"
            )
    return "\n".join(lines)
