"""``loraops tune``: run, resume or show a hyperparameter search (the heavy imports happen on use)."""

from __future__ import annotations

import argparse

from loraops.commands.common import SubParsers, add_config_arguments, add_verbose_argument, human_bytes
from loraops.errors import LoraopsError

#: ``--resume`` without a path: the newest experiment under the storage root.
NEWEST = "<newest>"

DESCRIPTION = """\
Search hyperparameters with Ray Tune: Optuna TPE proposes trials from the config's search.space,
ASHA stops weak ones early on eval loss, each trial is one QLoRA run in its own process with the
resources of search.resources. Runs on $RAY_ADDRESS (or search.ray_address) when set, else on a
local Ray instance. Writes results.csv, search.png, best_trial.json and best_config.yaml into the
experiment folder (search.storage/NAME, default WORKSPACE/experiments/NAME); the Optuna study
NAME is kept in the project database (search.database_url).

  loraops tune --config tune/tiny.yaml                 start an experiment
  loraops tune --resume [PATH]                          continue an interrupted one
  loraops tune --show PATH                              print its results table

The terminal shows one line per trial event (started, evaluated, stopped early by ASHA, finished,
failed) and the results; Ray's and the libraries' logs, Tune's status table and the trials'
output go to WORKSPACE/logs/tune-*.log (printed at the start), or here too with -v.
"""


def add_commands(sub: SubParsers) -> None:
    """Add ``tune``."""
    parser = sub.add_parser(
        "tune",
        help="hyperparameter search on Ray Tune (Optuna TPE + ASHA), one QLoRA run per trial",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_arguments(parser, required=False)
    parser.add_argument(
        "--name",
        metavar="NAME",
        help="experiment (and Optuna study) name; default CONFIG_NAME-YYYYmmdd-HHMMSS. With --resume: the experiment NAME in the storage",
    )
    action = parser.add_mutually_exclusive_group()
    action.add_argument(
        "--resume",
        nargs="?",
        const=NEWEST,
        metavar="PATH",
        help="continue an interrupted experiment (folder or URI); default: the newest one in the storage of --config, else WORKSPACE/experiments",
    )
    action.add_argument("--show", metavar="PATH", help="print the results table of an experiment, finished or running, and exit")
    parser.add_argument(
        "--register",
        nargs="?",
        const="",
        metavar="NAME",
        help="at the end, register the best trial's adapter as the next version of NAME (default: the config's name)",
    )
    add_verbose_argument(parser)
    parser.set_defaults(handler=run_command)


def run_command(args: argparse.Namespace) -> int:
    from loraops import console
    from loraops.tune import experiment

    verbose = bool(getattr(args, "verbose", False))
    if args.show:
        if args.config or args.overrides or args.register is not None or args.name:
            raise LoraopsError("--show PATH takes no other option")
        outcome = experiment.show_experiment(args.show)
    elif args.resume:
        if args.overrides:
            raise LoraopsError("--set cannot change an experiment that is resumed: it goes on with the config it started with")
        path = resume_path(args)
        config = experiment.read_experiment_config(experiment.Location.parse(path))  # read once, here
        console.start_log(config.workspace_path, "tune", verbose)
        outcome = experiment.resume_experiment(path, worker_logs=verbose, config=config)
    else:
        if not args.config:
            raise LoraopsError("tune needs --config FILE (or --resume / --show)")
        from loraops.config import load_config

        config = load_config(args.config, args.overrides)
        experiment.check_search(config)  # a config error is one line, before any file is written
        console.start_log(config.workspace_path, "tune", verbose)
        outcome = experiment.run_experiment(config, name=args.name, worker_logs=verbose)
    print_outcome(outcome)
    if args.show:
        return 0
    if not outcome.finished:
        print(f"the experiment stopped before every trial finished; continue it with: loraops tune --resume {outcome.location.uri}")
        return 1
    if outcome.best is None:
        print("no trial reported an eval loss: nothing to pick")
        return 1
    if args.register is not None:
        register(outcome, args.register or outcome.config.name)
    return 0


def resume_path(args: argparse.Namespace) -> str:
    """The experiment ``--resume`` means: its PATH, else --name or the newest under the storage root."""
    if args.resume != NEWEST:
        return args.resume
    from loraops.config import load_config
    from loraops.tune.experiment import latest_experiment, storage_root

    root = storage_root(load_config(args.config))
    return f"{root}/{args.name}" if args.name else latest_experiment(root)


def print_outcome(outcome) -> None:
    from loraops.layout import RESULTS_FILE
    from loraops.tune.results import best_line, format_table, summary_line

    print()
    print(format_table(outcome.rows))
    print()
    print(f"{summary_line(outcome.rows)}  |  experiment: {outcome.location.uri}")
    if outcome.best:
        print(f"best trial {best_line(outcome.best)}; adapter: {outcome.best.adapter_path}")
    if (outcome.folder / RESULTS_FILE).is_file():
        print(f"results: {outcome.folder}")
    print_storage(outcome)


def print_storage(outcome) -> None:
    """What the experiment holds in its storage: the figure that bounds a search's bucket."""
    from loraops import storage

    filesystem, path = outcome.location.filesystem()
    try:
        count, size, checkpoints = storage.usage(filesystem, path)
    except OSError as exc:  # a figure only: an unreadable listing must not fail a finished search
        print(f"storage: cannot list {outcome.location.uri}: {storage.describe_error(outcome.location.uri, exc)}")
        return
    keep = outcome.config.search.keep_checkpoints
    print(f"storage: {count} objects, {human_bytes(size)} in {outcome.location.uri} "
          f"({checkpoints} checkpoints; search.keep_checkpoints={keep if keep is not None else 'all'} per trial)")


def register(outcome, name: str) -> None:
    """Hand the best trial's adapter to the registry, with its metrics and lineage."""
    from loraops.registry import Registry

    registry = Registry(db_url=outcome.config.search.database_url, workspace=outcome.config.workspace_path)
    version = registry.register_from_experiment(outcome.folder, name)
    print(f"registered {version.ref} from trial {outcome.best.trial_id}")
