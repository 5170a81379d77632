"""CLI of the summarization endpoint: ``serve`` (deploy a serve config), ``summarize`` (call it), ``bench serve``.

Only argparse is imported here; Ray, torch and httpx load inside the handlers, so ``loraops --help``
stays fast.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from loraops.errors import LoraopsError


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add ``serve``, ``summarize`` and ``bench`` to the ``loraops`` parser."""
    _add_serve(sub)
    _add_summarize(sub)
    _add_bench(sub)


def _add_config_arguments(parser: argparse.ArgumentParser, default: str | None = None) -> None:
    from loraops.cli import add_config_arguments

    add_config_arguments(
        parser,
        required=default is None,
        config_help="serve config, e.g. serve/tiny.yaml (a Ray Serve config file)" + (f"; default {default}" if default else ""),
        set_help="override one key of the loraops application, e.g. --set args.adapter=tiny:3, "
        "--set deployments.SummarizerModel.autoscaling_config.max_replicas=2, --set http_options.port=8080 (repeatable)",
    )
    if default is not None:
        parser.set_defaults(config=default)


# --- serve -------------------------------------------------------------------------------------


def _add_serve(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "serve",
        help="deploy the summarization endpoint (Ray Serve) from a serve config",
        description="Deploy the autoscaling summarization API: model replicas (base model + the adapter of a registry "
        "reference, default NAME@production) behind a FastAPI ingress. The same file works with Ray's `serve deploy`. "
        "Replicas follow the alias: `loraops promote` switches every replica to the new version within seconds, "
        "without restarts. Bearer auth is on when the variable named by args.auth_token_env (LORAOPS_API_TOKEN) is set "
        "in the replicas' environment.",
    )
    _add_config_arguments(parser)
    parser.add_argument("--address", metavar="ADDR", help="Ray cluster to deploy to (default: $RAY_ADDRESS, else a new local Ray instance)")
    parser.add_argument(
        "--detach",
        action="store_true",
        help="return once the application is running, leaving it on the cluster (needs a running cluster: --address or $RAY_ADDRESS); "
        "default: stay in the foreground and shut the application down on Ctrl-C",
    )
    parser.set_defaults(handler=_run_serve)


def _run_serve(args: argparse.Namespace) -> int:
    from loraops.serve.settings import load_serve_config

    config = load_serve_config(args.config, args.overrides)
    address = args.address or os.environ.get("RAY_ADDRESS")
    if args.detach and not address:
        raise LoraopsError("--detach needs a Ray cluster that outlives this command: start one (`ray start --head`) and pass --address or set RAY_ADDRESS")
    import ray
    from ray import serve

    from loraops.serve.app import deploy

    ray.init(address=address or None, include_dashboard=False, configure_logging=False)
    url = deploy(config)
    print(f"serving {config.settings.adapter} ({config.settings.mode} mode) at {url}  (API docs: {url}/docs)", flush=True)
    if args.detach:
        return 0
    print("press Ctrl-C to stop", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("shutting down", file=sys.stderr)
        serve.delete(config.app_name)
        if not address:
            serve.shutdown()
    return 0


# --- summarize ---------------------------------------------------------------------------------


def _add_summarize(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "summarize",
        help="summarize a dialogue with a running endpoint",
        description="POST a dialogue to the summarization API and print the summary. Retries while the service answers 503.",
    )
    parser.add_argument("text", nargs="?", metavar="TEXT", help="the dialogue (use --file for a file, - for stdin)")
    parser.add_argument("--file", "-f", metavar="FILE", help="read the dialogue from FILE")
    parser.add_argument("--url", help="API base URL (default: $LORAOPS_SERVE_URL, else http://127.0.0.1:8000)")
    parser.add_argument("--token", help="bearer token (default: $LORAOPS_API_TOKEN)")
    parser.add_argument("--max-new-tokens", type=int, metavar="N", help="summary length limit in tokens")
    parser.add_argument("--temperature", type=float, metavar="T", help="0 (default): greedy; above 0: sampling")
    parser.add_argument("--timeout", type=float, default=120.0, metavar="S", help="seconds per attempt (default 120)")
    parser.add_argument("--json", action="store_true", help="print the whole JSON answer")
    parser.set_defaults(handler=_run_summarize)


def _quiet_http_log(args: argparse.Namespace) -> None:
    """httpx logs every request at INFO: too much for a CLI unless -v."""
    import logging

    if not args.verbose:
        logging.getLogger("httpx").setLevel(logging.WARNING)


def _run_summarize(args: argparse.Namespace) -> int:
    from loraops.serve.client import SummarizerClient

    _quiet_http_log(args)

    dialogue = _read_dialogue(args.text, args.file)
    with SummarizerClient(args.url, token=args.token, timeout=args.timeout) as client:
        answer = client.summarize(dialogue, max_new_tokens=args.max_new_tokens, temperature=args.temperature)
    if args.json:
        print(json.dumps(answer, indent=2))
    else:
        print(answer["summary"])
        usage = answer["usage"]
        print(f"({answer['model']['name']} v{answer['model']['version']}, {usage['prompt_tokens']} prompt + {usage['completion_tokens']} generated tokens)", file=sys.stderr)
    return 0


def _read_dialogue(text: str | None, file: str | None) -> str:
    if (text is None) == (file is None):
        raise LoraopsError("give the dialogue as TEXT or with --file FILE (one of them)")
    if file == "-" or text == "-":
        return sys.stdin.read()
    if file is not None:
        try:
            with open(file, encoding="utf-8") as handle:
                return handle.read()
        except OSError as exc:
            raise LoraopsError(f"--file {file}: {exc.strerror}") from None
    return text  # type: ignore[return-value]


# --- bench -------------------------------------------------------------------------------------


def _add_bench(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("bench", help="benchmarks", description="Benchmarks that print a table and write JSON figures.")
    kinds = parser.add_subparsers(dest="bench_command", metavar="WHAT", required=True)
    bench = kinds.add_parser(
        "serve",
        help="latency and throughput of the endpoint, nf4 vs merged, at several concurrencies",
        description="Deploys the serve config once per mode with one model replica (autoscaling off) on a local Ray "
        "instance, runs closed-loop HTTP clients for --duration seconds per concurrency, and reports p50/p95 latency, "
        "requests/s and generated tokens/s.",
    )
    _add_config_arguments(bench, default="serve/tiny.yaml")
    bench.add_argument("--modes", default="nf4,merged", help="comma-separated modes (default nf4,merged)")
    bench.add_argument("--concurrency", default="1,16", help="comma-separated client counts (default 1,16)")
    bench.add_argument("--duration", type=float, default=20.0, metavar="S", help="seconds per measurement (default 20)")
    bench.add_argument("--max-new-tokens", type=int, default=48, metavar="N", help="tokens per summary (default 48)")
    bench.add_argument("--output", default="benchmarks/results/serve-cpu-tiny.json", metavar="FILE", help="JSON results (default %(default)s)")
    bench.add_argument("--address", metavar="ADDR", help="Ray cluster (default: $RAY_ADDRESS, else a new local instance)")
    bench.set_defaults(handler=_run_bench_serve)
    _add_bench_search(kinds)


def _run_bench_serve(args: argparse.Namespace) -> int:
    from loraops.serve.bench import benchmark

    _quiet_http_log(args)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    try:
        concurrencies = [int(c) for c in args.concurrency.split(",") if c.strip()]
    except ValueError:
        raise LoraopsError(f"--concurrency {args.concurrency!r}: expected comma-separated integers") from None
    benchmark(args.config, args.overrides, modes, concurrencies, args.duration, args.max_new_tokens, args.output, address=args.address)
    print(f"results: {args.output}")
    return 0


def _add_bench_search(kinds: argparse._SubParsersAction) -> None:
    from loraops.cli import add_config_arguments

    parser = kinds.add_parser(
        "search",
        help="does the search pay? the configured search (TPE + ASHA) vs an equal-budget random search, over seeds",
        description="Runs the config's search (Optuna TPE + ASHA) and a random search of the same space without early "
        "stopping (FIFO), each until it has spent the same budget of trial-steps (optimizer steps summed over its "
        "trials, counted from what the trials reported), for --seeds search seeds each, and the config's recipe once "
        "without a search. Prints the best eval loss each method reached and the trial-steps it needed to come within "
        "2% of the best any run found; writes JSON and a PNG of best eval loss against trial-steps.",
    )
    add_config_arguments(parser, required=False, config_help="tune config with a search section (default tune/tiny-bench.yaml)", set_help="override a config key, e.g. --set search.scheduler.grace_period=40 (repeatable)")
    parser.set_defaults(config="tune/tiny-bench.yaml")
    parser.add_argument("--seeds", type=int, default=3, metavar="N", help="search seeds per method: search.seed, search.seed+1, ... (default 3)")
    parser.add_argument("--budget", type=int, metavar="TRIAL_STEPS", help="trial-steps per search (default: search.num_samples x search.max_steps)")
    parser.add_argument("--output", default="benchmarks/results/search-cpu-tiny.json", metavar="FILE", help="JSON results; the plot goes next to it as .png (default %(default)s)")
    parser.set_defaults(handler=_run_bench_search)


def _run_bench_search(args: argparse.Namespace) -> int:
    from loraops.bench.search import benchmark

    if args.seeds < 1:
        raise LoraopsError("--seeds must be at least 1")
    if args.budget is not None and args.budget < 1:
        raise LoraopsError("--budget must be a positive number of trial-steps")
    command = " ".join(["loraops bench search", f"--config {args.config}", *(f"--set {item}" for item in args.overrides), f"--seeds {args.seeds}"]
                       + ([f"--budget {args.budget}"] if args.budget else []))
    benchmark(args.config, args.overrides, seeds=args.seeds, budget=args.budget, output=args.output, command=command)
    print(f"results: {args.output} and {os.path.splitext(args.output)[0]}.png")
    return 0
