"""``loraops bench ...``: benchmarks that print a table and write JSON figures (code in :mod:`loraops.bench`).

Each benchmark adds its own sub-parser to the ``bench`` group here.
"""

from __future__ import annotations

import argparse
import os

from loraops.commands.common import SubParsers, add_config_arguments, add_serve_config_arguments, add_verbose_argument, load_config, quiet_http_log
from loraops.errors import LoraopsError


def add_commands(sub: SubParsers) -> None:
    """Add the ``bench`` group and its benchmarks."""
    parser = sub.add_parser("bench", help="benchmarks", description="Benchmarks that print a table and write JSON figures.")
    kinds = parser.add_subparsers(dest="bench_command", metavar="WHAT", required=True)
    _add_serve(kinds)
    _add_train(kinds)
    _add_search(kinds)


def _add_serve(kinds: SubParsers) -> None:
    bench = kinds.add_parser(
        "serve",
        help="latency, throughput and Serve's overhead on a mixed-length workload",
        description="Over HTTP (default): deploys the serve config once per mode and batching with one model replica (autoscaling "
        "off) on a local Ray instance, runs closed-loop clients for --duration seconds per concurrency, and reports p50/p95/p99 "
        "latency, generated tokens/s and Serve's overhead (end-to-end minus the model's own time). --model-only: the replica's "
        "model and batching called directly, no Ray, no HTTP (with --random-init phi-2: on a GPU machine without a download).",
    )
    add_serve_config_arguments(bench, default="serve/tiny.yaml")
    bench.add_argument("--modes", default="nf4,merged", help="comma-separated serving modes (default nf4,merged)")
    bench.add_argument(
        "--batching",
        default="continuous,static",
        help="comma-separated batching: continuous, static (the engine's policies); --model-only also takes generate, "
        "the pre-engine baseline (one generate call per batch) (default continuous,static)",
    )
    bench.add_argument("--concurrency", default="1,4,16", help="comma-separated client counts (default 1,4,16)")
    bench.add_argument("--duration", type=float, default=20.0, metavar="S", help="seconds per measurement (default 20)")
    bench.add_argument("--max-new-tokens", type=int, default=48, metavar="N", help="tokens per summary (default 48)")
    bench.add_argument("--data", metavar="FILE", help="DialogSum-format file (dialogue, summary columns) for the workload; default the built-in test split")
    bench.add_argument(
        "--lengths",
        choices=("fixed", "reference"),
        help="fixed: every request asks --max-new-tokens; reference: its reference summary's length, at most that "
        "(default fixed, reference with --random-init: random weights never stop on their own)",
    )
    bench.add_argument("--model-only", action="store_true", help="no Ray, no HTTP: the replica's ServingModel and engine directly")
    bench.add_argument(
        "--random-init", metavar="ARCH", help="with --model-only: serve this architecture with random weights (phi-2) instead of the registry's adapter"
    )
    bench.add_argument("--random-init-layers", type=int, metavar="N", help=argparse.SUPPRESS)  # tests: a short random-init model
    bench.add_argument(
        "--adapters",
        type=int,
        metavar="N",
        help="N registered adapters against one, the largest --concurrency clients: with --model-only resident at once on the "
        "replica's engine (per-row adapters), and each adapter's cold load (default output WORKSPACE/benchmarks/serve-adapters-<device>.json); "
        "without, named per request over HTTP through Serve's multiplexed routing to a load_on_demand replica "
        "(serve-adapters-http-cpu-tiny.json)",
    )
    bench.add_argument(
        "--skew", type=float, default=0.0, metavar="S", help="with --adapters: Zipf-like mix, adapter i drawn with weight 1/i^S (default 0: uniform)"
    )
    bench.add_argument(
        "--max-adapters",
        type=int,
        metavar="K",
        help="with --adapters: a third run with K on-demand adapters resident next to the default (least recently used evicted, "
        "as a replica's load_on_demand LRU): resident-hit ratio, loads, evictions, cold loads (K at most N-2)",
    )
    bench.add_argument(
        "--output", metavar="FILE", help="JSON results (default WORKSPACE/benchmarks/serve-cpu-tiny.json; with --model-only serve-model-<device>.json)"
    )
    bench.add_argument("--address", metavar="ADDR", help="Ray cluster (default: $RAY_ADDRESS, else a new local instance)")
    bench.set_defaults(handler=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    from loraops.bench.serve import benchmark, benchmark_model

    quiet_http_log(args)
    modes = _names(args.modes)
    batchings = _names(args.batching)
    try:
        concurrencies = [int(c) for c in args.concurrency.split(",") if c.strip()]
    except ValueError:
        raise LoraopsError(f"--concurrency {args.concurrency!r}: expected comma-separated integers") from None
    if not concurrencies or min(concurrencies) < 1:
        raise LoraopsError(f"--concurrency {args.concurrency!r}: expected positive integers")
    if args.max_new_tokens < 1:
        raise LoraopsError(f"--max-new-tokens {args.max_new_tokens}: expected a positive integer")
    if args.random_init and not args.model_only:
        raise LoraopsError("--random-init needs --model-only (a random-init model is not in the registry a deployment serves from)")
    if args.max_adapters is not None and args.adapters is None:
        raise LoraopsError("--max-adapters needs --adapters N (the working set it is smaller than)")
    if args.adapters is not None:
        return _run_adapters(args, modes, max(concurrencies))
    if args.model_only:
        output = args.output or _default_output(None, f"serve-model-{_device_tag()}.json")
        benchmark_model(
            args.config, args.overrides, modes, batchings, concurrencies, args.duration, args.max_new_tokens, output,
            data=args.data, lengths=args.lengths, random_init=args.random_init, random_init_layers=args.random_init_layers,
        )
    else:
        bad = sorted(set(batchings) - {"continuous", "static"})
        if bad:
            raise LoraopsError(f"--batching {bad[0]!r}: over HTTP the replica batches continuous or static (generate is --model-only)")
        output = args.output or _default_output(None, "serve-cpu-tiny.json")
        benchmark(
            args.config, args.overrides, modes, concurrencies, args.duration, args.max_new_tokens, output,
            address=args.address, batchings=batchings, data=args.data, lengths=args.lengths or "fixed",
        )
    print(f"results: {output}")
    return 0


def _run_adapters(args: argparse.Namespace, modes: list[str], clients: int) -> int:
    """``bench serve [--model-only] --adapters N``: :mod:`loraops.bench.adapters` (model-level), :mod:`loraops.bench.adapters_http` (HTTP)."""
    import json
    from pathlib import Path

    from loraops.bench.adapters import benchmark_adapters, format_adapters_report
    from loraops.bench.adapters_http import benchmark_adapters_http, format_http_report

    if not 2 <= args.adapters <= 64:
        raise LoraopsError(f"--adapters {args.adapters}: expected 2 to 64 (a replica's max_adapters is at most 64)")
    if args.skew < 0:
        raise LoraopsError(f"--skew {args.skew}: expected 0 (uniform) or more")
    if args.max_adapters is not None and not 1 <= args.max_adapters <= args.adapters - 2:
        raise LoraopsError(
            f"--max-adapters {args.max_adapters}: expected 1 to {args.adapters - 2} (the default is resident besides; "
            f"{args.adapters - 1} or more keep all {args.adapters} adapters resident, nothing evicted)"
        )
    common = (args.config, args.overrides, modes, args.adapters, args.skew, clients, args.duration, args.max_new_tokens, args.max_adapters)
    if args.model_only:
        report, name, table = benchmark_adapters(*common), f"serve-adapters-{_device_tag()}.json", format_adapters_report
    else:
        report, name, table = benchmark_adapters_http(*common, address=args.address), "serve-adapters-http-cpu-tiny.json", format_http_report
    output = Path(args.output or _default_output(None, name))
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    print(table(report))
    print(f"results: {output}")
    return 0


def _default_output(workspace: str | os.PathLike | None, name: str) -> str:
    """WORKSPACE/benchmarks/NAME: a benchmark run by default never overwrites the figures committed in
    the repository's benchmarks/results/; writing there takes an explicit --output."""
    from loraops.config import resolve_workspace

    return str(resolve_workspace(workspace) / "benchmarks" / name)


def _names(value: str) -> list[str]:
    return [name.strip() for name in value.split(",") if name.strip()]


def _device_tag() -> str:
    """cpu, or the GPU's name in lower case (h200, a100-sxm4-80gb, ...)."""
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    return torch.cuda.get_device_name().lower().removeprefix("nvidia ").replace(" ", "-")


def _add_train(kinds: SubParsers) -> None:
    bench = kinds.add_parser(
        "train",
        help="training throughput of a recipe against the seed recipe (samples/s, tokens/s, TFLOP/s, peak memory, eval loss)",
        description="Runs loraops' train() for --steps steps with the configured recipe, and with the seed recipe (micro-batch 1 x "
        "accumulation 4, gradient checkpointing, paged AdamW 32-bit, no packing, no token budget; fp16 on a GPU) for the same number "
        "of samples, one after the other in this process on the same data. Prints a table and writes JSON.",
    )
    add_config_arguments(bench, config_help="training config, e.g. tune/tiny.yaml or tune/phi2-dialogsum-fast.yaml")
    bench.add_argument("--steps", type=int, default=20, metavar="N", help="optimizer steps of the configured recipe (default 20)")
    bench.add_argument(
        "--random-init",
        choices=["phi-2"],
        help="replace the model with this architecture with RANDOM weights and the embedded tokenizer (no model hub needed; "
        "throughput and memory only, the eval loss says nothing about the real model)",
    )
    bench.add_argument("--eval-samples", type=int, default=100, metavar="N", help="eval rows for the eval loss (default 100)")
    bench.add_argument("--output", metavar="FILE", help="JSON results (default WORKSPACE/benchmarks/train.json)")
    bench.set_defaults(handler=run_train)


def run_train(args: argparse.Namespace) -> int:
    from loraops.bench.train import benchmark

    config = load_config(args)
    output = args.output or _default_output(config.workspace_path, "train.json")
    benchmark(args.config, args.overrides, args.steps, output=output, random_init=args.random_init, eval_samples=args.eval_samples, configured=config)
    print(f"results: {output}")
    return 0


def _add_search(kinds: SubParsers) -> None:
    parser = kinds.add_parser(
        "search",
        help="does the search pay? the configured search (TPE + ASHA) vs an equal-budget random search, over seeds",
        description="Runs the config's search (Optuna TPE + ASHA) and a random search of the same space without early "
        "stopping (FIFO), each until it has spent the same budget of trial-steps (optimizer steps summed over its "
        "trials, counted from what the trials reported), for --seeds search seeds each, and the config's recipe once "
        "without a search. Prints the best eval loss each method reached and the trial-steps it needed to come within "
        "2% of the best any run found; writes JSON and a PNG of best eval loss against trial-steps.",
    )
    add_config_arguments(
        parser,
        required=False,
        config_help="tune config with a search section (default tune/tiny-bench.yaml)",
        set_help="override a config key, e.g. --set search.scheduler.grace_period=40 (repeatable)",
    )
    parser.set_defaults(config="tune/tiny-bench.yaml")
    parser.add_argument("--seeds", type=int, default=3, metavar="N", help="search seeds per method: search.seed, search.seed+1, ... (default 3)")
    parser.add_argument("--budget", type=int, metavar="TRIAL_STEPS", help="trial-steps per search (default: search.num_samples x search.max_steps)")
    parser.add_argument(
        "--output",
        metavar="FILE",
        help="JSON results; the plot goes next to it as .png (default WORKSPACE/benchmarks/search-cpu-tiny.json)",
    )
    add_verbose_argument(parser)
    parser.set_defaults(handler=run_search)


def run_search(args: argparse.Namespace) -> int:
    from loraops import console
    from loraops.bench.search import benchmark

    verbose = bool(getattr(args, "verbose", False))
    if args.seeds < 1:
        raise LoraopsError("--seeds must be at least 1")
    if args.budget is not None and args.budget < 1:
        raise LoraopsError("--budget must be a positive number of trial-steps")
    words = ["loraops bench search", f"--config {args.config}", *(f"--set {item}" for item in args.overrides), f"--seeds {args.seeds}"]
    words += [f"--budget {args.budget}"] if args.budget else []
    # A config error is one line before anything starts; then Ray's and the libraries' logs go to the log file.
    config = load_config(args)
    console.start_log(config.workspace_path, "bench-search", verbose)
    output = args.output or _default_output(config.workspace_path, "search-cpu-tiny.json")
    benchmark(args.config, args.overrides, seeds=args.seeds, budget=args.budget, output=output, command=" ".join(words), worker_logs=verbose, config=config)
    print(f"results: {output} and {os.path.splitext(output)[0]}.png")
    return 0
