"""``loraops canary start|status|promote|abort``: a candidate version takes a share of an alias's traffic.

The canary lives in the registry database, so every serving replica and every CLI sees the same
one; the commands take the registry's ``--db`` / ``--store`` options.
"""

from __future__ import annotations

import argparse
import math

from loraops.commands.common import SubParsers, open_registry, print_json, registry_options, table, when
from loraops.errors import LoraopsError
from loraops.registry.refs import DEFAULT_ALIAS, DEFAULT_MAX_ERROR_MARGIN, DEFAULT_MIN_REQUESTS

_ABORT_RULE = (
    "The serving endpoint aborts a canary by itself (actor 'auto') once both versions have at least --min-requests requests "
    "and the candidate's error rate exceeds the baseline's by more than --max-error-margin, or once no model replica could load "
    "the candidate (they retry on every registry poll, with back-off) while the split routed --min-requests requests to it."
)


def add_commands(sub: SubParsers) -> None:
    """Add the ``canary`` group to the ``loraops`` parser."""
    common = registry_options()
    parser = sub.add_parser(
        "canary",
        help="send a share of traffic to a candidate version, then promote or abort it",
        description="Canary releases: a candidate version answers a share of the requests that name no model, "
        "is compared with the alias's version on the same traffic, and is promoted or aborted. " + _ABORT_RULE,
    )
    actions = parser.add_subparsers(dest="canary_command", metavar="ACTION", required=True)

    start = actions.add_parser(
        "start",
        parents=[common],
        help="start a canary of NAME:VERSION",
        description="Send PERCENT% of the requests to NAME@ALIAS that name no model to NAME:VERSION (deterministic per request id). "
        "Refused while another canary of NAME runs, when the alias already points to VERSION, or when VERSION's files fail verification. " + _ABORT_RULE,
    )
    start.add_argument("ref", metavar="NAME:VERSION", help="the candidate, e.g. tiny:7")
    start.add_argument("--percent", type=float, required=True, help="share of the traffic for the candidate, above 0 and at most 100")
    start.add_argument("--alias", default=DEFAULT_ALIAS, help=f"the alias whose traffic is shared; its version is the baseline (default: {DEFAULT_ALIAS})")
    start.add_argument(
        "--max-error-margin",
        type=float,
        default=DEFAULT_MAX_ERROR_MARGIN,
        help="abort when the candidate's error rate exceeds the baseline's by more "
        f"(default: {DEFAULT_MAX_ERROR_MARGIN:g} = {DEFAULT_MAX_ERROR_MARGIN * 100:g} points)",
    )
    start.add_argument(
        "--min-requests",
        type=int,
        default=DEFAULT_MIN_REQUESTS,
        help=f"requests each version needs before the error rates are compared (default: {DEFAULT_MIN_REQUESTS})",
    )
    _add_audit_options(start)
    start.set_defaults(handler=_run_start)

    status = actions.add_parser(
        "status",
        parents=[common],
        help="per-version figures of the running (or last) canary",
        description="The running canary of NAME, else its last one: per version, requests, errors, error rate, latency p50/p99 "
        "and mean generated tokens, merged over every serving process, of the requests the split routed (requests that named "
        "a version are counted apart); then which model replicas loaded the candidate, or why they could not. "
        "Latency quantiles are the upper bound of a log-spaced bucket (at most 19% above the true figure).",
    )
    status.add_argument("name", metavar="NAME", nargs="?", help="the adapter; may be left out while exactly one canary runs")
    status.add_argument("--json", action="store_true", help="print JSON instead of a table")
    status.set_defaults(handler=_run_status)

    promote = actions.add_parser(
        "promote",
        parents=[common],
        help="move the alias to the candidate and end the canary",
        description="Point the canary's alias at its candidate (recorded in the audit log as 'canary-promote', undone by `loraops rollback`) "
        "and end the canary as promoted. Refused while the candidate has answered none of the canary's requests.",
    )
    promote.add_argument("name", metavar="NAME", nargs="?", help="the adapter; may be left out while exactly one canary runs")
    promote.add_argument("--force", action="store_true", help="promote even a candidate that has answered no requests")
    _add_audit_options(promote)
    promote.set_defaults(handler=_run_promote)

    abort = actions.add_parser(
        "abort", parents=[common], help="end the canary; the alias stays where it is", description="End the running canary of NAME as aborted."
    )
    abort.add_argument("name", metavar="NAME", nargs="?", help="the adapter; may be left out while exactly one canary runs")
    _add_audit_options(abort)
    abort.set_defaults(handler=_run_abort)


def _add_audit_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--reason", help="why, for the record")
    parser.add_argument("--actor", help="who, for the record (default: the OS user)")


def _run_start(args: argparse.Namespace) -> int:
    canary = open_registry(args).start_canary(
        args.ref, args.percent, alias=args.alias, max_error_margin=args.max_error_margin, min_requests=args.min_requests, actor=args.actor, reason=args.reason
    )
    print(
        f"canary {canary.id}: {canary.name}:{canary.candidate} takes {canary.percent:g}% of {canary.name}@{canary.alias} "
        f"(baseline v{canary.baseline}); auto-abort above +{canary.max_error_margin * 100:g} points of errors after {canary.min_requests} requests each"
    )
    return 0


def _run_status(args: argparse.Namespace) -> int:
    registry = open_registry(args)
    status = registry.canary_status(_name(args, registry))
    if args.json:
        return print_json(status.to_dict())
    canary = status.canary
    ended = f", {canary.state} {when(canary.ended_at)} by {canary.ended_by or '-'}" if canary.ended_at else ""
    head = f"canary {canary.id} of {canary.name}@{canary.alias}: {canary.state}, {canary.percent:g}% to v{canary.candidate}"
    print(f"{head}, started {when(canary.started_at)}{ended}")
    if canary.end_reason:
        print(f"reason: {canary.end_reason}")
    rows = [
        [v.version, v.role, v.requests, v.errors, _percent(v.error_rate), _seconds(v.p50_s), _seconds(v.p99_s), _number(v.mean_completion_tokens)]
        for v in (status.baseline, status.candidate)
    ]
    print(table(["VERSION", "ROLE", "REQUESTS", "ERRORS", "ERROR RATE", "P50", "P99", "MEAN TOKENS"], rows))
    _print_apart(status)
    return 0


def _print_apart(status) -> None:
    """What the comparison leaves out: requests that named a version, and the candidate's load on each replica."""
    named = [f"v{v.version} {v.requests} ({v.errors} errors)" for v in status.named if v.requests]
    if named:
        print(f"requests that named a version (not compared): {', '.join(named)}")
    if status.missed:
        print(f"split requests for v{status.candidate.version} answered by v{status.baseline.version} (candidate not loaded): {status.missed}")
    if status.replicas:
        rows = [[r.replica, _load_state(r), r.attempts or "-", when(r.updated_at), _seen(r), r.error or "-"] for r in status.replicas]
        print(f"model replicas and v{status.candidate.version}:")
        print(table(["REPLICA", "CANDIDATE", "FAILED TRIES", "SINCE", "LAST SEEN", "REASON"], rows))


def _load_state(replica) -> str:
    """``gone`` for a replica without a heartbeat for a few polls (counted neither as loaded nor as failed)."""
    return "gone" if replica.gone else "loaded" if replica.error is None else "FAILED"


def _seen(replica) -> str:
    return when(replica.seen_at) if replica.seen_at else "-"


def _run_promote(args: argparse.Namespace) -> int:
    registry = open_registry(args)
    print(registry.promote_canary(_name(args, registry), actor=args.actor, reason=args.reason, force=args.force).message)
    return 0


def _run_abort(args: argparse.Namespace) -> int:
    registry = open_registry(args)
    canary = registry.abort_canary(_name(args, registry), actor=args.actor, reason=args.reason)
    print(f"canary {canary.id} of {canary.name}:{canary.candidate} aborted; {canary.name}@{canary.alias} was not moved")
    return 0


def _name(args: argparse.Namespace, registry) -> str:
    """NAME as given, else the adapter of the one running canary; with none or several, an error that lists them."""
    if args.name is not None:
        return args.name
    running = registry.running_canaries()
    if len(running) == 1:
        return running[0].name
    if not running:
        raise LoraopsError(f"no canary is running; name the adapter (`loraops canary {args.canary_command} NAME`) for its last one")
    listed = ", ".join(f"{c.name} ({c.name}:{c.candidate}, {c.percent:g}% of @{c.alias})" for c in running)
    raise LoraopsError(f"{len(running)} canaries are running: {listed}; name one: `loraops canary {args.canary_command} NAME`")


def _percent(rate: float | None) -> str:
    return "-" if rate is None else f"{rate:.1%}"


def _seconds(value: float | None) -> str:
    from loraops.registry.canary import LATENCY_BOUNDS_S  # not at import time: it loads SQLAlchemy

    if value is None:
        return "-"
    return f"> {LATENCY_BOUNDS_S[-1]:.0f} s" if math.isinf(value) else f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"
