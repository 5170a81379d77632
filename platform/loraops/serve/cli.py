"""CLI of the summarization endpoint: ``serve`` (deploy a serve config), ``summarize`` (call it), ``bench serve`` (and ``bench train``).

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
    _add_bench_train(kinds)


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


def _add_bench_train(kinds: argparse._SubParsersAction) -> None:
    from loraops.cli import add_config_arguments

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
    bench.set_defaults(handler=_run_bench_train)


def _run_bench_train(args: argparse.Namespace) -> int:
    from loraops.bench.train import benchmark

    benchmark(args.config, args.overrides, args.steps, output=args.output, random_init=args.random_init, eval_samples=args.eval_samples)
    print(f"results: {args.output}")
    return 0
