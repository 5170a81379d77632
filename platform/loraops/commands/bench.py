"""``loraops bench ...``: benchmarks that print a table and write JSON figures (code in :mod:`loraops.bench`).

Each benchmark adds its own sub-parser to the ``bench`` group here.
"""

from __future__ import annotations

import argparse
import os

from loraops.commands.common import SubParsers, add_config_arguments, add_serve_config_arguments, quiet_http_log
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
        help="latency and throughput of the endpoint, nf4 vs merged, at several concurrencies",
        description="Deploys the serve config once per mode with one model replica (autoscaling off) on a local Ray "
        "instance, runs closed-loop HTTP clients for --duration seconds per concurrency, and reports p50/p95 latency, "
        "requests/s and generated tokens/s.",
    )
    add_serve_config_arguments(bench, default="serve/tiny.yaml")
    bench.add_argument("--modes", default="nf4,merged", help="comma-separated modes (default nf4,merged)")
    bench.add_argument("--concurrency", default="1,16", help="comma-separated client counts (default 1,16)")
    bench.add_argument("--duration", type=float, default=20.0, metavar="S", help="seconds per measurement (default 20)")
    bench.add_argument("--max-new-tokens", type=int, default=48, metavar="N", help="tokens per summary (default 48)")
    bench.add_argument("--output", default="benchmarks/results/serve-cpu-tiny.json", metavar="FILE", help="JSON results (default %(default)s)")
    bench.add_argument("--address", metavar="ADDR", help="Ray cluster (default: $RAY_ADDRESS, else a new local instance)")
    bench.set_defaults(handler=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    from loraops.bench.serve import benchmark

    quiet_http_log(args)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    try:
        concurrencies = [int(c) for c in args.concurrency.split(",") if c.strip()]
    except ValueError:
        raise LoraopsError(f"--concurrency {args.concurrency!r}: expected comma-separated integers") from None
    benchmark(args.config, args.overrides, modes, concurrencies, args.duration, args.max_new_tokens, args.output, address=args.address)
    print(f"results: {args.output}")
    return 0


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
    bench.add_argument("--output", default="benchmarks/results/train.json", metavar="FILE", help="JSON results (default %(default)s)")
    bench.set_defaults(handler=run_train)


def run_train(args: argparse.Namespace) -> int:
    from loraops.bench.train import benchmark

    benchmark(args.config, args.overrides, args.steps, output=args.output, random_init=args.random_init, eval_samples=args.eval_samples)
    print(f"results: {args.output}")
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
        default="benchmarks/results/search-cpu-tiny.json",
        metavar="FILE",
        help="JSON results; the plot goes next to it as .png (default %(default)s)",
    )
    parser.set_defaults(handler=run_search)


def run_search(args: argparse.Namespace) -> int:
    from loraops.bench.search import benchmark

    if args.seeds < 1:
        raise LoraopsError("--seeds must be at least 1")
    if args.budget is not None and args.budget < 1:
        raise LoraopsError("--budget must be a positive number of trial-steps")
    words = ["loraops bench search", f"--config {args.config}", *(f"--set {item}" for item in args.overrides), f"--seeds {args.seeds}"]
    words += [f"--budget {args.budget}"] if args.budget else []
    benchmark(args.config, args.overrides, seeds=args.seeds, budget=args.budget, output=args.output, command=" ".join(words))
    print(f"results: {args.output} and {os.path.splitext(args.output)[0]}.png")
    return 0
