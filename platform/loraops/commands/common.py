"""Arguments and helpers shared by the command modules (a leaf: it imports no command module)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from datetime import datetime
from typing import Any

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


def non_negative_int(text: str) -> int:
    """An argparse type: a whole number of 0 or more."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
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


def add_verbose_argument(parser: argparse.ArgumentParser, top_level: bool = False) -> None:
    """``-v/--verbose``: on the ``loraops`` parser (``top_level``), and again on the long-running commands
    whose logs go to a file (tune, bench search), so that it may also follow the command's name."""
    if top_level:
        parser.add_argument("-v", "--verbose", action="store_true", help="debug logging; tune and demo also show Ray's and the libraries' logs on the terminal")
    else:  # SUPPRESS: the top-level flag's value stays when the command's own is not given
        parser.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="show Ray's and the libraries' logs here too")


# --- the registry's location, and output ----------------------------------------------------------


def registry_options() -> argparse.ArgumentParser:
    """A parent parser with --db and --store, for the commands that open the registry."""
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("registry location")
    group.add_argument("--db", metavar="URL", help="SQLAlchemy database URL (default: $LORAOPS_DATABASE_URL, else sqlite:///WORKSPACE/loraops.db)")
    group.add_argument("--store", metavar="URI", help="artifact root: folder, s3://..., gs://... (default: $LORAOPS_ARTIFACT_URI, else WORKSPACE/registry)")
    return parent


def open_registry(args: argparse.Namespace):
    """The registry that --db and --store name (imported here: SQLAlchemy loads only when a command runs)."""
    from loraops.registry.api import Registry

    return Registry(db_url=args.db, artifact_uri=args.store)


def print_json(data: Any) -> int:
    json.dump(data, sys.stdout, indent=2, default=str)
    print()
    return 0


def table(headers: list[str], rows: list[list[Any]]) -> str:
    """Left-aligned columns two spaces apart, the headers first."""
    cells = [headers] + [[str(cell) for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in cells)


def when(moment: datetime) -> str:
    """A moment in the local time zone, to the second."""
    return moment.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def human_bytes(size: float) -> str:
    """A byte count in binary units, the one format of every command: 512 B, 202.2 KiB, 2.0 MiB, 1.3 GiB."""
    for unit in ("B", "KiB", "MiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"
