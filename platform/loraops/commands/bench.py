"""``loraops bench ...``: benchmarks that print a table and write JSON figures (code in :mod:`loraops.bench`).

Each benchmark adds its own sub-parser to the ``bench`` group here.
"""

from __future__ import annotations

import argparse

from loraops.commands.common import SubParsers, add_serve_config_arguments, quiet_http_log
from loraops.errors import LoraopsError


def add_commands(sub: SubParsers) -> None:
    """Add the ``bench`` group and its benchmarks."""
    parser = sub.add_parser("bench", help="benchmarks", description="Benchmarks that print a table and write JSON figures.")
    kinds = parser.add_subparsers(dest="bench_command", metavar="WHAT", required=True)
    _add_serve(kinds)


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
