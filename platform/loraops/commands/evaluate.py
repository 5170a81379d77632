"""``loraops evaluate``: ROUGE of the base model vs. base + adapter."""

from __future__ import annotations

import argparse

from loraops.commands.common import SubParsers, add_config_arguments, load_config


def add_commands(sub: SubParsers) -> None:
    """Add ``evaluate``."""
    parser = sub.add_parser(
        "evaluate",
        help="ROUGE of the base model vs. base + adapter on held-out dialogues",
        description="Greedy, batched generation on held-out dialogues with and without the adapter; "
        "ROUGE-1/2/L/Lsum (best over references). Writes a JSON report and prints a table.",
    )
    add_config_arguments(parser)
    parser.add_argument("--adapter", required=True, metavar="PATH", help="adapter folder (adapter_config.json + weights)")
    parser.add_argument("--output", metavar="FILE", help="JSON report (default: ADAPTER/../evaluation.json)")
    parser.add_argument("--no-base", action="store_true", help="skip the base model, score only the adapter")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from loraops import console

    config = load_config(args)
    console.start_log(config.workspace_path, "evaluate", args.verbose)  # libraries' logs and warnings: see `train`
    from loraops.training.evaluate import evaluate, format_report

    report = evaluate(config, adapter=args.adapter, output=args.output, include_base=not args.no_base)
    print(format_report(report))
    return 0
