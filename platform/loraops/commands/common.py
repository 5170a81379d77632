"""Arguments and helpers shared by the command modules (a leaf: it imports no command module)."""

from __future__ import annotations

import argparse
import logging

#: The type argparse hands to each ``add_commands``.
SubParsers = argparse._SubParsersAction


def add_config_arguments(
    parser: argparse.ArgumentParser,
    required: bool = True,
    config_help: str = "YAML config, e.g. tune/tiny.yaml",
    set_help: str = "override one config key, e.g. --set training.learning_rate=1e-4 (repeatable)",
) -> None:
    """--config FILE and repeatable --set KEY=VALUE, shared by every command that reads a config."""
    parser.add_argument("--config", "-c", required=required, metavar="FILE", help=config_help)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=set_help)


def positive_float(text: str) -> float:
    """An argparse type: a number above 0 (argparse turns the ValueError into a one-line usage error)."""
    value = float(text)
    if not value > 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be a number above 0, got {text}")
    return value


def add_serve_config_arguments(parser: argparse.ArgumentParser, default: str | None = None) -> None:
    """--config / --set for a serve config (``serve``, ``bench serve``); ``default`` makes --config optional."""
    add_config_arguments(
        parser,
        required=default is None,
        config_help="serve config, e.g. serve/tiny.yaml (a Ray Serve config file)" + (f"; default {default}" if default else ""),
        set_help="override one key of the loraops application, e.g. --set args.adapter=tiny:3, "
        "--set deployments.SummarizerModel.autoscaling_config.max_replicas=2, --set http_options.port=8080 (repeatable)",
    )
    if default is not None:
        parser.set_defaults(config=default)


def load_config(args: argparse.Namespace):
    """The typed config of ``--config`` with the ``--set`` overrides applied."""
    from loraops.config import load_config as load

    return load(args.config, args.overrides)


def quiet_http_log(args: argparse.Namespace) -> None:
    """httpx logs every request at INFO: too much for a CLI unless -v."""
    if not args.verbose:
        logging.getLogger("httpx").setLevel(logging.WARNING)
