"""``loraops registry list|show|verify|audit``, ``register``, ``promote``, ``rollback``: the adapter registry.

Every command takes ``--db URL`` and ``--store URI`` (defaults:
$LORAOPS_DATABASE_URL / $LORAOPS_ARTIFACT_URI, else the workspace's SQLite file and folder).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from loraops.commands.common import SubParsers, human_bytes, open_registry, print_json, registry_options, table, when
from loraops.registry.refs import DEFAULT_ALIAS

_REF_HELP = "NAME (latest version), NAME@ALIAS or NAME:VERSION"
_DIRECTION_HELP = (
    "Direction: metrics whose name contains 'loss' or 'perplexity' are better when lower, "
    "all others (rouge*, accuracy, ...) when higher; override with --lower-is-better / --higher-is-better"
)


def add_commands(sub: SubParsers) -> None:
    """Add ``registry``, ``register``, ``promote`` and ``rollback`` to the ``loraops`` parser."""
    common = registry_options()
    _add_registry(sub, common)
    _add_register(sub, common)
    _add_promote(sub, common)
    _add_rollback(sub, common)


# --- registry list | show | audit ---------------------------------------------------------------


def _add_registry(sub: SubParsers, common: argparse.ArgumentParser) -> None:
    parser = sub.add_parser(
        "registry",
        help="list and inspect registered adapters",
        description="Registered LoRA adapters: versions with metrics, lineage and checksums; aliases; the audit log.",
    )
    actions = parser.add_subparsers(dest="registry_command", metavar="ACTION", required=True)

    listing = actions.add_parser(
        "list",
        parents=[common],
        help="every adapter with its versions and aliases",
        description="Every registered adapter: version count, latest version, aliases.",
    )
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    listing.set_defaults(handler=_run_list)

    show = actions.add_parser(
        "show",
        parents=[common],
        help="one adapter's versions, or one version's details",
        description="NAME: the adapter's versions and aliases. NAME@ALIAS or NAME:VERSION: that version's "
        "metadata (base model, configs, metrics, data fingerprint, lineage, files with sha256).",
    )
    show.add_argument("ref", metavar="REF", help=_REF_HELP)
    show.add_argument("--json", action="store_true", help="print JSON instead of text")
    show.set_defaults(handler=_run_show)

    verify = actions.add_parser(
        "verify",
        parents=[common],
        help="re-hash a version's stored files against their recorded sha256",
        description="Read every stored file of REF from the artifact store and compare its sha256 with the one recorded "
        "at registration. Exit 0 when all match; otherwise one line naming the first missing, unreadable or altered file, exit 2.",
    )
    verify.add_argument("ref", metavar="REF", help=_REF_HELP)
    verify.set_defaults(handler=_run_verify)

    audit = actions.add_parser(
        "audit",
        parents=[common],
        help="the audit log of alias changes",
        description="Every alias change of an adapter, oldest first: when, who, from, to, why.",
    )
    audit.add_argument("name", metavar="NAME")
    audit.add_argument("--alias", help="only this alias")
    audit.add_argument("--json", action="store_true", help="print JSON instead of a table")
    audit.set_defaults(handler=_run_audit)


def _run_list(args: argparse.Namespace) -> int:
    adapters = open_registry(args).list_adapters()
    if args.json:
        return print_json([a.to_dict() for a in adapters])
    if not adapters:
        print("no adapters registered yet (see `loraops register --help`)")
        return 0
    rows = [[a.name, a.versions, a.latest_version or "-", _aliases_text(a.aliases) or "-", when(a.created_at)] for a in adapters]
    print(table(["NAME", "VERSIONS", "LATEST", "ALIASES", "CREATED"], rows))
    return 0


def _run_show(args: argparse.Namespace) -> int:
    from loraops.registry.refs import Bare, Ref

    registry = open_registry(args)
    ref = Ref.parse(args.ref, bare=Bare.LATEST)
    if ref.latest:  # a bare NAME shows the adapter and all its versions
        return _show_adapter(registry, ref.name, args.json)
    found = registry.get(args.ref)
    if args.json:
        return print_json(found.to_dict())
    print(_version_text(found))
    return 0


def _show_adapter(registry, name: str, as_json: bool) -> int:
    info = registry.adapter(name)
    versions = registry.versions(name)
    if as_json:
        return print_json(info.to_dict() | {"versions": [v.to_dict() for v in versions]})
    print(f"{info.name}: {info.versions} version(s); aliases: {_aliases_text(info.aliases) or 'none'}")
    rows = [
        [v.version, when(v.created_at), v.created_by or "-", ",".join(v.aliases) or "-", _metrics_text(v.metrics) or "-", _lineage_text(v)]
        for v in versions
    ]
    print(table(["VERSION", "CREATED", "BY", "ALIASES", "METRICS", "FROM"], rows))
    return 0


def _run_verify(args: argparse.Namespace) -> int:
    version = open_registry(args).verify(args.ref)
    size = sum(entry["size"] for entry in version.files.values())
    print(f"{version.ref}: {len(version.files)} files, {human_bytes(size)}, all sha256 match ({version.artifact_uri})")
    return 0


def _run_audit(args: argparse.Namespace) -> int:
    events = open_registry(args).audit_log(args.name, args.alias)
    if args.json:
        return print_json([e.to_dict() for e in events])
    if not events:
        print(f"no alias changes recorded for {args.name}")
        return 0
    rows = [[when(e.at), e.actor or "-", e.alias, e.action, e.from_version or "-", e.to_version, e.reason or ""] for e in events]
    print(table(["WHEN", "WHO", "ALIAS", "ACTION", "FROM", "TO", "REASON"], rows))
    return 0


# --- register ----------------------------------------------------------------------------------


def _add_register(sub: SubParsers, common: argparse.ArgumentParser) -> None:
    parser = sub.add_parser(
        "register",
        parents=[common],
        help="copy an adapter into the registry as a new version",
        description="Copy a PEFT adapter folder into registry storage as the next version of NAME, "
        "with sha256 checksums of every file. With --adapter, metadata is picked up from the run "
        "folder around it when present: ../config.yaml (base model, quantization, LoRA, training "
        "hyperparameters, data source + fingerprint), the best eval_loss in ../metrics.jsonl and "
        "ROUGE from ../evaluation.json. With --from-experiment, the best trial named in "
        "EXPERIMENT/best_trial.json, with its config, metrics, params and trial id.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--adapter", metavar="DIR", help="adapter folder (adapter_config.json + adapter_model.safetensors)")
    source.add_argument("--from-experiment", metavar="PATH", help="tune experiment folder holding best_trial.json")
    parser.add_argument("--name", required=True, help="adapter name: letters, digits, '.', '_', '-'; starts with a letter or digit; no '..'")
    parser.add_argument("--metrics", metavar="JSON", help='extra metrics, a JSON object or a JSON file, e.g. \'{"rougeL": 41.2}\' (wins over discovered ones)')
    parser.add_argument("--description", help="free text stored with the version")
    parser.add_argument("--actor", help="who registers (default: the OS user)")
    parser.add_argument("--json", action="store_true", help="print the new version as JSON")
    parser.set_defaults(handler=_run_register)


def _run_register(args: argparse.Namespace) -> int:
    registry = open_registry(args)
    options = {"description": args.description, "actor": args.actor}
    if args.from_experiment:
        version = registry.register_from_experiment(args.from_experiment, args.name, args.metrics, **options)
    else:
        version = registry.register(args.adapter, args.name, args.metrics, **options)
    if args.json:
        return print_json(version.to_dict() | {"same_files_as": version.same_files_as})  # null: no earlier version has these files
    size = sum(entry["size"] for entry in version.files.values())
    print(f"registered {version.ref} ({len(version.files)} files, {human_bytes(size)}) at {version.artifact_uri}")
    if version.same_files_as is not None:
        print(f"note: its files equal version {version.same_files_as} ({version.name}:{version.same_files_as}): the same adapter registered again")
    if version.metrics:
        print(f"metrics: {_metrics_text(version.metrics, limit=None)}")
    return 0


# --- promote / rollback ------------------------------------------------------------------------


def _add_promote(sub: SubParsers, common: argparse.ArgumentParser) -> None:
    parser = sub.add_parser(
        "promote",
        parents=[common],
        help=f"point an alias (default: {DEFAULT_ALIAS}) at a version",
        description="Point NAME@ALIAS at VERSION and record the change in the audit log. With "
        "--if-better METRIC, only when VERSION is strictly better on METRIC than the alias's "
        f"current version; otherwise nothing changes, both figures are printed and the exit code is 2. {_DIRECTION_HELP}.",
    )
    parser.add_argument("name", metavar="NAME")
    parser.add_argument("version", metavar="VERSION", help="version number, e.g. 3 or v3")
    parser.add_argument("--alias", default=DEFAULT_ALIAS, help=f"alias to move (default: {DEFAULT_ALIAS})")
    parser.add_argument("--if-better", metavar="METRIC", help="promote only if VERSION beats the current target on METRIC, e.g. eval_loss or rougeL")
    direction = parser.add_mutually_exclusive_group()
    direction.add_argument("--higher-is-better", dest="higher_is_better", action="store_true", default=None, help="METRIC is better when higher")
    direction.add_argument("--lower-is-better", dest="higher_is_better", action="store_false", help="METRIC is better when lower")
    _add_change_options(parser)
    parser.set_defaults(handler=_run_promote)


def _add_rollback(sub: SubParsers, common: argparse.ArgumentParser) -> None:
    parser = sub.add_parser(
        "rollback",
        parents=[common],
        help="point an alias back at its previous version",
        description="Point NAME@ALIAS back at the version it had before its latest promotion, per the "
        "audit log. Repeated rollbacks walk further back (3 -> 2 -> 1), they do not toggle.",
    )
    parser.add_argument("name", metavar="NAME")
    parser.add_argument("--alias", default=DEFAULT_ALIAS, help=f"alias to move back (default: {DEFAULT_ALIAS})")
    _add_change_options(parser)
    parser.set_defaults(handler=_run_rollback)


def _add_change_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--reason", help="why, for the audit log")
    parser.add_argument("--actor", help="who, for the audit log (default: the OS user)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def _run_promote(args: argparse.Namespace) -> int:
    change = open_registry(args).promote(
        args.name, args.version, alias=args.alias, if_better=args.if_better, higher_is_better=args.higher_is_better, actor=args.actor, reason=args.reason
    )
    return _print_change(change, args.json)


def _run_rollback(args: argparse.Namespace) -> int:
    change = open_registry(args).rollback(args.name, alias=args.alias, actor=args.actor, reason=args.reason)
    return _print_change(change, args.json)


def _print_change(change, as_json: bool) -> int:
    if as_json:
        from dataclasses import asdict

        return print_json(asdict(change))
    print(change.message)
    return 0


# --- formatting --------------------------------------------------------------------------------


def _aliases_text(aliases: dict[str, int]) -> str:
    return ", ".join(f"{alias}->v{version}" for alias, version in aliases.items())


def _metrics_text(metrics: dict[str, float], limit: int | None = 4) -> str:
    # eval loss and ROUGE-L first: the figures people promote on
    order = sorted(metrics, key=lambda key: (key not in ("eval_loss", "rougeL"), key))
    shown = order if limit is None else order[:limit]
    text = " ".join(f"{key}={metrics[key]:.4g}" for key in shown)
    return text + (" ..." if len(order) > len(shown) else "")


def _lineage_text(version) -> str:
    if version.experiment:
        return f"{version.experiment}" + (f" trial {version.trial_id}" if version.trial_id else "")
    return version.source_path or "-"


def _version_text(version) -> str:
    def compact(value: Any) -> str:
        return json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else str(value if value is not None else "-")

    lines = [
        f"{version.ref}" + (f"  [{', '.join(version.aliases)}]" if version.aliases else ""),
        f"  created:          {when(version.created_at)} by {version.created_by or 'unknown'}",
        f"  description:      {compact(version.description)}",
        f"  base model:       {compact(version.base_model)}",
        f"  quantization:     {compact(version.quantization)}",
        f"  lora:             {compact(version.lora)}",
        f"  hyperparameters:  {compact(version.hyperparameters)}",
        f"  metrics:          {_metrics_text(version.metrics, limit=None) or '-'}",
        f"  data:             {compact(version.data_source)} (fingerprint {compact(version.data_fingerprint)})",
        f"  experiment:       {compact(version.experiment)}" + (f" trial {version.trial_id}" if version.trial_id else ""),
        f"  registered from:  {compact(version.source_path)}",
        f"  artifacts:        {version.artifact_uri}",
        "  files:",
    ]
    lines += [f"    {rel}  {human_bytes(entry['size'])}  sha256 {entry['sha256']}" for rel, entry in sorted(version.files.items())]
    return "\n".join(lines)
