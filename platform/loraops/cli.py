"""The `loraops` command line: the list of command groups (one module each in :mod:`loraops.commands`) and ``main``.

Problems the user can fix (bad config, missing file, unknown adapter) print one line
``loraops: error: ...`` and exit with code 2; there is no traceback.
"""

from __future__ import annotations

import argparse
import os
import sys

from loraops import __version__, console
from loraops.commands import bench, canary, demo, evaluate, registry, serve, train, tune
from loraops.commands.common import add_verbose_argument
from loraops.errors import LoraopsError

#: In the order ``loraops --help`` lists them.
GROUPS = [train, evaluate, demo, registry, canary, tune, serve, bench]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loraops",
        description="Tune, register and serve QLoRA adapters on Ray.",
    )
    parser.add_argument("--version", action="version", version=f"loraops {__version__}")
    add_verbose_argument(parser, top_level=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for group in GROUPS:
        group.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    console.setup(args.verbose)
    try:
        code = int(args.handler(args) or 0)
        sys.stdout.flush()  # here, so a reader that went away (`| head`) is caught below, not at exit
        return code
    except BrokenPipeError:
        return _reader_gone()
    except LoraopsError as exc:
        print(f"loraops: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("loraops: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - last resort: one line unless debugging
        if args.verbose:
            raise
        # One line even when the message spans several (SQL errors, remote tracebacks).
        print(f"loraops: error: {type(exc).__name__}: {' '.join(str(exc).split())} (rerun with -v for the traceback)", file=sys.stderr)
        return 1



def _reader_gone() -> int:
    """The reader of stdout closed it (``loraops ... | head``): stop quietly, as Unix tools do.

    stdout is pointed at /dev/null so the interpreter's own flush at exit cannot fail again;
    128 + SIGPIPE is the status a shell shows for a tool its reader stopped."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return 141
