"""Build, run and resume a Ray Tune experiment: ``Tuner`` with Optuna TPE, ASHA or FIFO, one
process per trial; ``Tuner.restore`` to continue one whose driver stopped.

An experiment is the folder ``STORAGE/NAME`` (STORAGE: ``search.storage``, a folder or a pyarrow
URI, default ``WORKSPACE/experiments``). Besides Tune's own files it holds ``loraops.yaml``, the
resolved config the experiment was started with (what ``--resume`` and ``--show`` read), and the
results (see :mod:`loraops.tune.results`). The Optuna study of the same NAME lives in the project
database (``search.database_url``). Nothing in the experiment folder holds the database URL (it
may carry a password, and the folder may be a shared bucket): a resumed experiment finds its study
through ``$LORAOPS_DATABASE_URL``, else the workspace's SQLite database.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from loraops import cluster
from loraops.config import Config, database_url, display_url, dump_config, validate
from loraops.errors import LoraopsError
from loraops.layout import BEST_CONFIG_FILE, BEST_TRIAL_FILE, EXPERIMENT_CONFIG_FILE, NAME_RULE, RESULTS_FILE, SEARCH_PLOT_FILE, BestTrial, is_valid_name
from loraops.tune import results
from loraops.tune.space import SearchSpace
from loraops.tune.strategy import build_scheduler, build_searcher, check_search, trial_steps
from loraops.tune.trainable import METRIC, MODE, STEP, build_trainable

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class Location:
    """Where an experiment lives: ``root`` (a local folder or a URI) and ``name``."""

    root: str
    name: str

    @classmethod
    def parse(cls, path: str) -> Location:
        """A location from an experiment's own path (folder or URI)."""
        path = path.rstrip("/")
        if "://" not in path:
            path = str(Path(path).expanduser().resolve())
        root, _, name = path.rpartition("/")
        return cls(root, name)

    @property
    def uri(self) -> str:
        return f"{self.root}/{self.name}"

    @property
    def is_local(self) -> bool:
        return "://" not in self.root

    def local_dir(self, workspace: Path) -> Path:
        """Where results are written on this machine: the experiment itself when it is local,
        else a mirror under WORKSPACE/experiments (and the files are uploaded to the URI too)."""
        return Path(self.uri) if self.is_local else workspace / "experiments" / self.name

    def filesystem(self) -> tuple[Any, str]:
        """The experiment's filesystem and its path there (see :mod:`loraops.storage`)."""
        from loraops import storage

        return storage.open_uri(self.uri)

    def storage(self) -> tuple[Any, str]:
        """For Tune's ``storage_filesystem``/``storage_path``: (None, the folder) when local, else
        the filesystem set up from the environment and the root's path in it."""
        if self.is_local:
            return None, self.root
        from loraops import storage

        return storage.open_uri(self.root)

    def check(self) -> None:
        """One line naming the URI and the variable to check when the storage cannot be used."""
        from loraops import storage

        filesystem, path = storage.open_uri(self.root)
        storage.check_access(filesystem, path, self.root)

    def exists(self) -> bool:
        from loraops import storage

        return storage.exists(*self.filesystem())

    def read_text(self, name: str) -> str:
        from loraops import storage

        filesystem, path = self.filesystem()
        if not storage.exists(filesystem, f"{path}/{name}"):
            raise LoraopsError(f"{self.uri} is not a loraops experiment: {name} not found")
        return storage.read_text(filesystem, f"{path}/{name}")

    def write_text(self, name: str, text: str) -> None:
        from loraops import storage

        filesystem, path = self.filesystem()
        storage.write_text(filesystem, f"{path}/{name}", text)


@dataclass
class Outcome:
    """What ``loraops tune`` reports at the end."""

    location: Location
    config: Config
    folder: Path  # local folder with the results
    rows: list[results.TrialRow]
    finished: bool
    best: BestTrial | None


# --- entry points ------------------------------------------------------------------------------


def run_experiment(
    config: Config, name: str | None = None, callbacks: list[Any] | None = None, worker_logs: bool = False, stop: Any = None, trials: int | None = None
) -> Outcome:
    """Start a new experiment from ``config`` (its ``search`` section) and run it to the end.
    ``callbacks``: extra Ray Tune callbacks (the console's trial events are always there);
    ``worker_logs``: stream the trials' output to this terminal when this call starts Ray.
    ``loraops bench search`` ends it with a Tune stopper ``stop`` at a trial-step budget, and may
    run another number of ``trials`` than ``search.num_samples`` (which still sizes TPE's random
    start-up); -1: until ``stop`` ends the search."""
    space = check_search(config)  # a bad space fails before Ray starts
    base = base_config(config)
    location = Location(storage_root(config), check_name(name) if name else default_name(config))
    location.check()  # a wrong key, a missing bucket: one line before anything is written
    if location.exists():
        raise LoraopsError(f"experiment {location.uri} already exists: continue it with `loraops tune --resume {location.uri}`, or pick another --name")
    config.workspace_path.mkdir(parents=True, exist_ok=True)  # also holds the default SQLite database
    db_url = database_url(config.search.database_url, config.workspace_path)
    ensure_new_study(db_url, location.name)
    prepare_model(config)

    from ray import tune

    from loraops.tune.events import TrialEvents, asha_rungs, column_labels, status_reporter

    with cluster.session(config.search.ray_address, num_cpus=os.cpu_count(), **ray_logging(worker_logs)):
        resources = trial_resources(config)
        concurrency = config.search.max_concurrent_trials or default_concurrency(resources)
        log.info(
            "experiment %s: %d trials, %d at a time, %s per trial; Optuna study %r in %s",
            *(location.uri, config.search.num_samples, concurrency, resources, location.name, display_url(db_url)),
        )
        location.write_text(EXPERIMENT_CONFIG_FILE, yaml.safe_dump(base, sort_keys=False))
        filesystem, root = location.storage()
        tuner = tune.Tuner(
            build_trainable(base, space, resources),
            param_space=space.ray_param_space(),
            tune_config=tune.TuneConfig(
                search_alg=build_searcher(config, db_url, location.name, concurrency),
                scheduler=build_scheduler(config),
                num_samples=config.search.num_samples if trials is None else trials,
                max_concurrent_trials=None if config.search.algorithm == "random" else concurrency,  # random: the generator's own limit
                reuse_actors=False,  # one process per trial: its GPU memory is freed when it ends
                trial_dirname_creator=trial_dirname,
            ),
            run_config=tune.RunConfig(
                name=location.name,
                storage_path=root,
                storage_filesystem=filesystem,
                checkpoint_config=tune.CheckpointConfig(
                    num_to_keep=config.search.keep_checkpoints, checkpoint_score_attribute=METRIC, checkpoint_score_order=MODE
                ),
                failure_config=tune.FailureConfig(max_failures=config.search.max_failures),
                callbacks=[TrialEvents(asha_rungs(config.search.scheduler, trial_steps(config)), column_labels(space.keys)), *(callbacks or [])],
                progress_reporter=status_reporter(column_labels(space.keys), config.search.num_samples),
                verbose=1,  # the status table (to the log); Tune's per-result lines would repeat every parameter
                stop=stop,
            ),
        )
        configure_driver(location)
        tuner.fit()
    return finish(location, config, space, db_url)


def resume_experiment(path: str, worker_logs: bool = False, config: Config | None = None) -> Outcome:
    """Continue an interrupted experiment: finished trials stay as they are, unfinished ones go
    on from their latest checkpoint, and the search proposes the trials still missing.
    ``config``: the experiment's own (:func:`read_experiment_config`), when the caller has read it."""
    location = Location.parse(path)
    location.check()
    config = config or read_experiment_config(location)
    space = SearchSpace.from_config(config)
    base = base_config(config)
    db_url = database_url(config.search.database_url, config.workspace_path)
    check_study_exists(db_url, location.name)
    prepare_model(config)

    from ray import tune

    with cluster.session(config.search.ray_address, num_cpus=os.cpu_count(), **ray_logging(worker_logs)):
        filesystem, root = location.storage()
        experiment_path = f"{root}/{location.name}"
        if not tune.Tuner.can_restore(experiment_path, storage_filesystem=filesystem):
            raise LoraopsError(f"{location.uri} has no Tune experiment state to resume")
        tuner = tune.Tuner.restore(
            experiment_path,
            storage_filesystem=filesystem,
            trainable=build_trainable(base, space, trial_resources(config)),
            resume_unfinished=True,
            resume_errored=False,  # a failed trial is a result, not something to run again
            restart_errored=False,
        )
        configure_driver(location)
        tuner.fit()
    return finish(location, config, space, db_url)


def show_experiment(path: str) -> Outcome:
    """The results of an experiment as they are now (finished, running or interrupted)."""
    location = Location.parse(path)
    location.check()
    config = read_experiment_config(location)
    _, rows = results.load_trials(location.uri, config.search.metric)
    folder = location.local_dir(config.workspace_path)
    best = results.read_best(folder) if location.is_local else _remote_best(location)
    return Outcome(location, config, folder, rows, _all_finished(rows, config), best)


def latest_experiment(root: str) -> str:
    """The most recently started loraops experiment under a local storage root."""
    if "://" in root:
        raise LoraopsError(f"cannot find the latest experiment in {root}: pass its path to --resume")
    candidates = [folder for folder in Path(root).glob("*") if (folder / EXPERIMENT_CONFIG_FILE).is_file()]
    if not candidates:
        raise LoraopsError(f"no loraops experiment in {root}")
    return str(max(candidates, key=lambda folder: (folder / EXPERIMENT_CONFIG_FILE).stat().st_mtime))


# --- pieces ------------------------------------------------------------------------------------


def storage_root(config: Config) -> str:
    raw = config.search.storage
    if raw is None:
        return str(config.workspace_path / "experiments")
    return raw.rstrip("/") if "://" in raw else str(Path(raw).expanduser().resolve())


def check_name(name: str) -> str:
    """An experiment name is a folder and an Optuna study name: the rule of config names."""
    if not is_valid_name(name):
        raise LoraopsError(f"--name {name!r}: use {NAME_RULE}")
    return name


def default_name(config: Config) -> str:
    return f"{config.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def base_config(config: Config) -> dict[str, Any]:
    """The config every trial starts from: the trial budget in ``training.max_steps``, and paths
    made absolute, because Ray workers run elsewhere (another cwd, maybe another machine sharing
    the workspace) and without $LORAOPS_HOME. Without the database URL: trials never use it, and
    this config is written into the experiment folder (see the module's docstring)."""
    data = dump_config(config)
    data["search"]["database_url"] = None
    data["training"]["max_steps"] = trial_steps(config)
    data["workspace"] = str(config.workspace_path)
    for section, key in (("data", "source"), ("model", "name")):
        local = Path(data[section][key]).expanduser()
        if local.exists():
            data[section][key] = str(local.resolve())
    return data


def read_experiment_config(location: Location) -> Config:
    data = yaml.safe_load(location.read_text(EXPERIMENT_CONFIG_FILE))
    return validate(Config, data, origin=f"{location.uri}/{EXPERIMENT_CONFIG_FILE}")


def trial_dirname(trial: Any) -> str:
    """Short trial folders (Tune's default repeats every parameter in the name)."""
    return f"trial_{trial.trial_id}"


def trial_resources(config: Config) -> dict[str, float]:
    """CPUs and GPUs per trial; GPUs default to 1 when the cluster has any, else 0."""
    import ray

    cluster_gpus = ray.cluster_resources().get("GPU", 0.0)
    gpu = config.search.resources.gpu
    if gpu is None:
        gpu = 1.0 if cluster_gpus else 0.0
    if gpu > cluster_gpus:
        log.warning("search.resources.gpu is %g per trial but the cluster has %g GPUs now; trials wait for the autoscaler", gpu, cluster_gpus)
    return {"cpu": config.search.resources.cpu, "gpu": gpu}


def default_concurrency(resources: dict[str, float]) -> int:
    """As many trials as the cluster's GPUs hold (CPUs on a CPU-only cluster), at least one."""
    import ray

    cluster = ray.cluster_resources()
    if resources["gpu"] > 0:
        return max(1, int(cluster.get("GPU", 0.0) // resources["gpu"]))
    return max(1, int(cluster.get("CPU", 1.0) // resources["cpu"]))


def prepare_model(config: Config) -> None:
    """Build the embedded tiny model once here, so concurrent trials do not race to build it."""
    from loraops.training.model import resolve_model_path

    resolve_model_path(config)


def ensure_new_study(db_url: str, name: str) -> None:
    import optuna

    from loraops.registry.db import database_errors

    with database_errors(db_url):  # an unreachable database: one line, before Ray starts
        names = optuna.study.get_all_study_names(storage=db_url)
    if name in names:
        raise LoraopsError(f"the database {display_url(db_url)} already has an Optuna study named {name!r}: pick another --name")


def check_study_exists(db_url: str, name: str) -> None:
    import optuna

    if name not in optuna.study.get_all_study_names(storage=db_url):
        raise LoraopsError(
            f"the database {display_url(db_url)} has no Optuna study named {name!r}: resume with the database the experiment "
            "started with (set LORAOPS_DATABASE_URL; the experiment folder does not store its URL)"
        )


def ray_logging(worker_logs: bool) -> dict[str, bool]:
    """How a search joins Ray: the workers' (trials') output streams to this terminal only with
    ``worker_logs`` (it is in Ray's session logs either way), and the CLI's handlers, not Ray's,
    decide where the driver's logs go."""
    return {"log_to_driver": worker_logs, "configure_logging": False}


def configure_driver(location: Location) -> None:
    """Process-wide settings Tune reads when the run starts."""
    import optuna

    # Tune's classic reporter prints the CLIReporter table; the newer output ignores it.
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    if location.is_local and "TUNE_GLOBAL_CHECKPOINT_S" not in os.environ:
        # Snapshot the experiment state every second (cheap on a local disk, default ~10 s): a
        # killed driver then loses at most a second of bookkeeping. See searcher.StudySearch.
        os.environ["TUNE_GLOBAL_CHECKPOINT_S"] = "1"
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the progress table already says it


def finish(location: Location, config: Config, space: SearchSpace, db_url: str) -> Outcome:
    """Write the results table, the plot and (when every trial is done) the best trial; close
    the study's trials that a killed driver left behind."""
    analysis, rows = results.load_trials(location.uri, config.search.metric)
    folder = location.local_dir(config.workspace_path)
    folder.mkdir(parents=True, exist_ok=True)
    written = [results.write_table(rows, folder / RESULTS_FILE)]
    x_key, x_log, color_key = plot_axes(space)
    plot = results.plot_search(rows, x_key, x_log, color_key, folder / SEARCH_PLOT_FILE, title=location.name, metric=config.search.metric)
    written += [plot] if plot else []
    finished = _all_finished(rows, config)
    if finished and config.search.algorithm != "random":  # Ray's random sampling keeps no Optuna study
        from loraops.tune.searcher import fail_orphans

        if orphans := fail_orphans(db_url, location.name):
            reason = "the search ended first, or a killed driver left them"
            log.info("Optuna study %s: %d proposed trial(s) never ran (%s), marked failed", location.name, orphans, reason)
    best = None
    row = results.best_row(rows, config.search.metric)
    if finished and row is not None:
        best = best_record(analysis, row, location, folder, config, space)
        results.write_best(folder, best)
        written += [folder / BEST_TRIAL_FILE, folder / BEST_CONFIG_FILE]
    if not location.is_local:
        for path in written:
            _upload(path, location)
    return Outcome(location, config, folder, rows, finished, best)


def best_record(analysis: Any, row: results.TrialRow, location: Location, folder: Path, config: Config, space: SearchSpace) -> BestTrial:
    """``best_trial.json`` for ``row``: its adapter is the checkpoint the selection metric was
    measured on: the trial's best by eval loss, or its last (where ROUGE-L was scored)."""
    from loraops.tune.space import trial_config, trial_name

    trial = next(trial for trial in analysis.trials if trial.trial_id == row.trial_id)
    if config.search.metric == METRIC:
        checkpoint = analysis.get_best_checkpoint(trial, metric=METRIC, mode=MODE)
    else:
        checkpoint = analysis.get_best_checkpoint(trial, metric=STEP, mode="max")
    if checkpoint is None:
        raise LoraopsError(f"trial {row.trial_id} has no checkpoint in {location.uri}")
    adapter = Path(checkpoint.path) if location.is_local else Path(checkpoint.to_directory(str(folder / "best_adapter")))
    params = space.decode(row.params)
    full = trial_config(base_config(config), params, name=trial_name(location.name, row.trial_id))
    inside = Path(checkpoint.path).relative_to(location.uri if location.is_local else f"{location.storage()[1]}/{location.name}").as_posix()
    return results.best_trial_record(row, location.name, location.uri, adapter.resolve(), dump_config(full), params, config.search.metric, inside)


def plot_axes(space: SearchSpace) -> tuple[str | None, bool, str | None]:
    """The plot's x axis (the learning rate if searched, else the first float) and color (the
    first choice or integer key)."""
    floats = [d for d in space.dimensions if d.kind in ("uniform", "loguniform", "quniform")]
    x = next((d for d in floats if d.key == "training.learning_rate"), floats[0] if floats else None)
    x = x or space.dimensions[0]
    color = next((d.key for d in space.dimensions if d.kind in ("choice", "randint") and d.key != x.key), None)
    return x.key, x.log, color


def _upload(path: Path, location: Location) -> None:
    from loraops import storage

    filesystem, target = location.filesystem()
    storage.upload_file(path, filesystem, f"{target}/{path.name}")


def _remote_best(location: Location) -> BestTrial | None:
    """best_trial.json of a remote experiment, None before the search has finished."""
    try:
        text = location.read_text(BEST_TRIAL_FILE)
    except LoraopsError:
        return None
    return BestTrial.from_json(text, f"{location.uri}/{BEST_TRIAL_FILE}")


def _all_finished(rows: list[results.TrialRow], config: Config) -> bool:
    return len(rows) >= config.search.num_samples and all(row.finished for row in rows)
