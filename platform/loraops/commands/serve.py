"""``loraops serve`` (deploy a serve config) and ``loraops summarize`` (call the endpoint)."""

from __future__ import annotations

import argparse
import json
import sys

from loraops.commands.common import SubParsers, add_serve_config_arguments, non_negative_int, positive_float, quiet_http_log
from loraops.errors import LoraopsError


def add_commands(sub: SubParsers) -> None:
    """Add ``serve`` and ``summarize``."""
    _add_serve(sub)
    _add_summarize(sub)


# --- serve -------------------------------------------------------------------------------------


def _add_serve(sub: SubParsers) -> None:
    parser = sub.add_parser(
        "serve",
        help="deploy the summarization endpoint (Ray Serve) from a serve config",
        description="Deploy the autoscaling summarization API: model replicas (one base model + the adapters of the "
        "registry references in args.adapters, default [args.adapter] = NAME@production; a request picks one with "
        "`model`) behind a FastAPI ingress with loraops' routes and OpenAI-compatible ones (/v1/completions, "
        "/v1/chat/completions). The same file works with Ray's `serve deploy`. Replicas follow their aliases: "
        "`loraops promote` switches every replica to the new version within seconds, without restarts, and "
        "`loraops canary start` sends a share of the traffic to a candidate. Bearer auth is on when the variable "
        "named by args.auth_token_env (LORAOPS_API_TOKEN) is set in the replicas' environment.",
    )
    add_serve_config_arguments(parser)
    parser.add_argument("--address", metavar="ADDR", help="Ray cluster to deploy to (default: $RAY_ADDRESS, else a new local Ray instance)")
    parser.add_argument(
        "--detach",
        action="store_true",
        help="return once the application is running, leaving it on the cluster (needs a running cluster: --address or $RAY_ADDRESS); "
        "default: stay in the foreground and shut the application down on Ctrl-C or SIGTERM (kill, docker stop)",
    )
    parser.set_defaults(handler=_run_serve)


def _run_serve(args: argparse.Namespace) -> int:
    from loraops import cluster
    from loraops.serve.deploy import check_port_free, deploy, target_version
    from loraops.serve.settings import load_serve_config

    config = load_serve_config(args.config, args.overrides)
    target_version(config)  # an unknown or refused adapter, an unreachable registry: one line, before any Ray starts
    address = cluster.cluster_address(args.address)
    if args.detach and not address:
        raise LoraopsError("--detach needs a Ray cluster that outlives this command: start one (`ray start --head`) and pass --address or set RAY_ADDRESS")
    from ray import serve

    if not address:
        check_port_free(config)  # the local instance's proxy would bind here
    cluster.connect(address, configure_logging=False, log_to_driver=not args.detach)
    url = deploy(config)
    print(f"serving {config.settings.adapter} ({config.settings.mode} mode) at {url}  (API docs: {url}/docs)", flush=True)
    if args.detach:
        return 0
    cluster.wait_until_interrupted()
    serve.delete(config.app_name)
    if not address:  # the local instance ends with this process: stop its Serve cleanly first
        serve.shutdown()
    return 0


# --- summarize ---------------------------------------------------------------------------------


def _add_summarize(sub: SubParsers) -> None:
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
    parser.add_argument("--timeout", type=positive_float, default=120.0, metavar="S", help="seconds per attempt (default 120)")
    parser.add_argument(
        "--retries", type=non_negative_int, default=5, metavar="N",
        help="tries after the first while the service answers 503 or refuses connections, waiting 0.5 s, 1 s, 2 s, ... "
        "(or its Retry-After) between them (default 5)",
    )  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print the whole JSON answer")
    parser.set_defaults(handler=_run_summarize)


def _run_summarize(args: argparse.Namespace) -> int:
    from loraops.serve.client import SummarizerClient

    quiet_http_log(args)

    dialogue = _read_dialogue(args.text, args.file)
    with SummarizerClient(args.url, token=args.token, timeout=args.timeout, retries=args.retries) as client:
        answer = client.summarize(dialogue, max_new_tokens=args.max_new_tokens, temperature=args.temperature)
    if args.json:
        print(json.dumps(answer, indent=2))
    else:
        print(answer["summary"])
        usage = answer["usage"]
        model = f"{answer['model']['name']} v{answer['model']['version']}"
        print(f"({model}, {usage['prompt_tokens']} prompt + {usage['completion_tokens']} generated tokens)", file=sys.stderr)
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
