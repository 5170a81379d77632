"""The `loraops` command line: one subcommand per job, each a thin layer over a module's function.

Problems the user can fix (bad config, missing file, unknown adapter) print one line
``loraops: error: ...`` and exit with code 2; there is no traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from loraops import __version__, console
from loraops.errors import LoraopsError
from loraops.registry.cli import add_commands as add_registry_commands
from loraops.serve.cli import add_commands as add_serve_commands
from loraops.tune.cli import add_commands as add_tune_commands

def add_config_arguments(
    parser: argparse.ArgumentParser,
    required: bool = True,
    config_help: str = "YAML config, e.g. tune/tiny.yaml",
    set_help: str = "override one config key, e.g. --set training.learning_rate=1e-4 (repeatable)",
) -> None:
    """--config FILE and repeatable --set KEY=VALUE, shared by every command that reads a config."""
    parser.add_argument("--config", "-c", required=required, metavar="FILE", help=config_help)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=set_help)


def _load(args: argparse.Namespace):
    from loraops.config import load_config

    return load_config(args.config, args.overrides)


# --- train -------------------------------------------------------------------------------------


def _add_train(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "train",
        help="run one QLoRA fine-tuning run",
        description="Fine-tune one LoRA adapter on a 4-bit base model. Writes adapter checkpoints "
        "(PEFT format), metrics.jsonl and loss.png into the run folder.",
    )
    add_config_arguments(parser)
    parser.add_argument("--output-dir", metavar="DIR", help="run folder (default: WORKSPACE/runs/NAME)")
    parser.set_defaults(handler=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    from loraops.train import train

    config = _load(args)
    result = train(config, output_dir=args.output_dir)
    print(f"adapter: {result.adapter_dir}")
    print(f"best eval loss: {result.best_eval_loss:.4f} (step {result.best_step}); metrics: {result.metrics_file}")
    return 0


# --- evaluate ----------------------------------------------------------------------------------


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
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
    parser.set_defaults(handler=_run_evaluate)


def _run_evaluate(args: argparse.Namespace) -> int:
    from loraops.evaluate import evaluate, format_report

    config = _load(args)
    report = evaluate(config, adapter=args.adapter, output=args.output, include_base=not args.no_base)
    print(format_report(report))
    return 0


# --- demo --------------------------------------------------------------------------------------


def _add_demo(sub: argparse._SubParsersAction) -> None:
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
    parser.add_argument("--serve-set", dest="serve_overrides", action="append", default=[], metavar="KEY=VALUE", help="override a serve config key (repeatable)")
    parser.add_argument("--samples", type=int, default=40, help="held-out dialogues sent to the endpoint (default: 40)")
    parser.add_argument("--keep-serving", action="store_true", help="leave the endpoint up at the end and print a curl line")
    parser.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="show Ray's and the libraries' logs here too (else in the log file)")
    parser.set_defaults(handler=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
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


COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_train, _add_evaluate, _add_demo, add_registry_commands, add_tune_commands, add_serve_commands]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loraops",
        description="Tune, register and serve QLoRA adapters on Ray.",
    )
    parser.add_argument("--version", action="version", version=f"loraops {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging; tune and demo also show Ray's and the libraries' logs on the terminal")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    console.setup(args.verbose)
    try:
        return int(args.handler(args) or 0)
    except LoraopsError as exc:
        print(f"loraops: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("loraops: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - last resort: one line unless debugging
        if args.verbose:
            raise
        print(f"loraops: error: {type(exc).__name__}: {exc} (rerun with -v for the traceback)", file=sys.stderr)
        return 1
