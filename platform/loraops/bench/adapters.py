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
"""

from __future__ import annotations

import random
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loraops.bench.load import run_model_load, summarize_records

#: Turns of the one-adapter and the N-adapter runs, each ``duration / ROUNDS`` seconds.
ROUNDS = 3


def benchmark_adapters(
    config_path: str, overrides: list[str], modes: Sequence[str], count: int, skew: float, clients: int, duration_s: float, max_new_tokens: int
) -> dict[str, Any]:
    """For each mode, the one-adapter and the N-adapter runs and the cold loads; the report (see the module docstring)."""
    import os

    from loraops.bench.serve import _machine, _replica_threads, builtin_test_dialogues
    from loraops.serve.settings import load_serve_config

    load_at_start = round(os.getloadavg()[0], 2)
    serve_config = load_serve_config(config_path, [*overrides, f"args.max_batch_size={clients}"], ray_schema=False)
    settings = serve_config.settings.with_absolute_paths()
    threads = _replica_threads(serve_config)
    dialogues = builtin_test_dialogues(64)
    results: list[dict[str, Any]] = []
    cold: dict[str, Any] = {}
    for mode in modes:
        with tempfile.TemporaryDirectory(prefix="loraops-bench-adapters-") as scratch:
            registry, refs = _scratch_registry(settings, Path(scratch), count)
            rows, cold[mode] = _run_mode(registry, refs, settings, mode, skew, clients, duration_s, max_new_tokens, dialogues)
        results.extend(rows)
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
        "machine": _machine(load_at_start),
        "torch_threads": threads,
        "results": results,
        "cold_load_local_s": cold,
        "ratios": {mode: _ratio(results, mode, count) for mode in modes},
    }


def _scratch_registry(settings, folder: Path, count: int):
    """A registry in ``folder`` holding ``count`` versions ``bench-i:1`` of the served version's files and training config."""
    from loraops.registry import Lineage, Registry

    source = settings.open_registry()
    version = source.get(settings.adapter)
    files = source.resolve(version.ref)
    registry = Registry(db_url=f"sqlite:///{folder / 'registry.db'}", artifact_uri=str(folder / "store"), workspace=settings.workspace)
    refs = [registry.register(files, f"bench-{i}", lineage=Lineage(config=version.config)).ref for i in range(count)]
    return registry, refs


def _run_mode(registry, refs, settings, mode, skew, clients, duration_s, max_new_tokens, dialogues):
    """The one-adapter and N-adapter runs, taking turns in :data:`ROUNDS` rounds (a load change on a shared machine
    hits both alike), the other N-1 adapters loaded cold before each N-adapter turn: (result rows, cold-load figures)."""
    from loraops.serve.engine.core import Engine
    from loraops.serve.model import load_registered
    from loraops.training.data import prompt_ids

    served = load_registered(registry, refs[0], mode, settings.dtype, settings.allow_trust_remote_code)
    prompts = [(prompt_ids(served.tokenizer, text, served.config.data, budget=10**9), max_new_tokens) for text in dialogues]
    engine = Engine.from_settings(served, settings, clients)
    engine.warm_start()
    weights = [1.0 / (rank + 1) ** skew for rank in range(len(refs))]
    draw = random.Random(0)
    one, many, loads = [], [], []
    try:
        for _ in range(ROUNDS):
            one += run_model_load(lambda prompt, limit: engine.submit(prompt, limit), prompts, clients, duration_s / ROUNDS)
            loads += [_load_cold(engine, registry, ref, settings) for ref in refs[1:]]
            slots = list(served.adapters)
            mixed = lambda p, n, slots=slots: engine.submit(p, n, adapter=draw.choices(slots, weights)[0])  # noqa: E731
            many += run_model_load(mixed, prompts, clients, duration_s / ROUNDS)
            with engine.exclusive():
                for slot in slots[1:]:
                    served.remove(slot)
    finally:
        engine.stop()
    rows = [
        {"mode": mode, "adapters": 1, "skew": None, "concurrency": clients} | summarize_records(one, duration_s),
        {"mode": mode, "adapters": len(refs), "skew": skew, "concurrency": clients} | summarize_records(many, duration_s),
    ]
    for row in rows:
        row.pop("overhead_p50_ms", None), row.pop("overhead_p99_ms", None)  # no Serve here
    return rows, _quantiles(loads)


def _load_cold(engine, registry, ref: str, settings) -> float:
    """Seconds to load ``ref`` next to the loaded adapters as a replica does: checked and verified, added while the engine holds no request."""
    from loraops.serve.model import prepare_version

    started = time.perf_counter()
    with engine.exclusive():
        prepared = prepare_version(registry, registry.get(ref), settings.allow_trust_remote_code, engine.served)
        engine.served.add(prepared.path, prepared.slot)
    return time.perf_counter() - started


def _quantiles(samples: list[float]) -> dict[str, Any]:
    if not samples:
        return {"loads": 0}
    ordered = sorted(samples)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)

    return {"loads": len(ordered), "p50_s": at(0.5), "p99_s": at(0.99), "max_s": round(ordered[-1], 3)}


def _ratio(results: list[dict[str, Any]], mode: str, count: int) -> float | None:
    """Tokens/s with ``count`` adapters resident over tokens/s with one, in ``mode``."""
    one = next((r for r in results if r["mode"] == mode and r["adapters"] == 1), None)
    many = next((r for r in results if r["mode"] == mode and r["adapters"] == count), None)
    if not one or not many or not one["completion_tokens_per_s"]:
        return None
    return round(many["completion_tokens_per_s"] / one["completion_tokens_per_s"], 3)


def format_adapters_report(report: dict[str, Any]) -> str:
    lines = [f"{'mode':<7}{'adapters':>9}{'requests':>9}{'failed':>7}{'p50 s':>8}{'p99 s':>8}{'tok/s':>8}"]
    for row in report["results"]:
        lines.append(
            f"{row['mode']:<7}{row['adapters']:>9}{row['requests']:>9}{row['failed']:>7}{row['p50_s'] or 0:>8.3f}{row['p99_s'] or 0:>8.3f}"
            f"{row['completion_tokens_per_s']:>8.1f}"
        )
    for mode, ratio in report["ratios"].items():
        cold = report["cold_load_local_s"][mode]
        lines.append(
            f"{mode}: {report['adapters']} adapters at {ratio} x the one-adapter tokens/s; "
            f"cold load (local store) p50 {cold.get('p50_s')} s, p99 {cold.get('p99_s')} s"
        )
    return "\n".join(lines)
