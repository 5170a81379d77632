"""``loraops demo``: the whole loop on the embedded default."""

from __future__ import annotations

import argparse

from loraops.commands.common import SubParsers, add_config_arguments
from loraops.errors import LoraopsError


def add_commands(sub: SubParsers) -> None:
    """Add ``demo``."""
    parser = sub.add_parser(
        "demo",
        help="the whole loop on the embedded default: search, register, promote, serve, call",
        description="Runs on any machine without network, on the built-in data set and tiny Phi model: "
        "an Optuna/ASHA search over QLoRA trials on Ray Tune, the best trial registered and promoted "
        "to production, served by Ray Serve, called over HTTP with held-out dialogues; prints base vs "
        "tuned summaries and the ROUGE gain, then shuts everything down.",
    )
    add_config_arguments(parser, required=False, config_help="tune config (default: tune/tiny.yaml)", set_help="override a tune config key (repeatable)")
    parser.add_argument("--serve-config", metavar="FILE", help="serve config (default: serve/tiny.yaml)")
    parser.add_argument(
        "--serve-set", dest="serve_overrides", action="append", default=[], metavar="KEY=VALUE", help="override a serve config key (repeatable)"
    )
    parser.add_argument("--samples", type=int, default=40, help="held-out dialogues sent to the endpoint (default: 40)")
    parser.add_argument("--keep-serving", action="store_true", help="leave the endpoint up at the end and print a curl line")
    parser.add_argument(
        "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="show Ray's and the libraries' logs here too (else in the log file)"
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from loraops.demo import run_demo

    if args.samples < 1:
        raise LoraopsError("--samples must be at least 1")
    run_demo(
        config_path=args.config,
        overrides=args.overrides,
        serve_config_path=args.serve_config,
        serve_overrides=args.serve_overrides,
        samples=args.samples,
        keep_serving=args.keep_serving,
        verbose=bool(getattr(args, "verbose", False)),
    )
    return 0
