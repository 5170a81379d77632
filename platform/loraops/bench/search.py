"""``loraops bench search``: does the search pay?

The configured search (Optuna TPE proposing, ASHA stopping weak trials early) against the obvious
alternative, a random search of the same space in which every trial runs to its last step (FIFO),
both with the same budget of trial-steps (optimizer steps summed over every trial), for N search
seeds each, on the same data and the same trial recipe; plus the config's own recipe trained once,
without a search, as the point a search has to beat.

Trial-steps are counted from what the trials reported, in the order the driver received the
results: a result at step s of a trial adds s minus that trial's previous step. A trial that ASHA
stopped at step 50 costs 50; steps that trials still running at the end made after their last
report are not counted, for either method. A search ends as soon as it has spent the budget
(:class:`BudgetLedger`, a Tune stopper), and its curve is the best eval loss any of its trials had
reported by each number of trial-steps spent.

For each method the report gives the curve (mean, min and max over seeds) and the trial-steps each
run needed to come within 2% of the best eval loss any run found. A run that never got there
within the budget counts as the whole budget, a lower bound, and is flagged as censored.
"""

from __future__ import annotations

import json
import math
import os
import platform
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray.tune import Stopper

from loraops.bench.search_report import best_so_far, format_report, plot_report, round_figure, summarize
from loraops.config import Config, dump_config, load_config, validate
from loraops.errors import LoraopsError
from loraops.tune.trainable import METRIC, STEP


@dataclass(frozen=True)
class Method:
    """A search method: who proposes trials and who stops them."""

    algorithm: str  # search.algorithm
    scheduler: dict[str, Any]  # search.scheduler

    @property
    def name(self) -> str:
        return f"{self.algorithm}+{self.scheduler['type']}"


BASELINE = Method("random", {"type": "fifo"})


class BudgetLedger(Stopper):
    """Counts trial-steps from the results in the order Tune receives them and ends the search
    once ``budget`` is spent. ``events`` holds (trial-steps spent, trial, step, eval loss)."""

    def __init__(self, budget: int):
        self.budget = budget
        self.spent = 0
        self.steps: dict[str, int] = {}
        self.events: list[tuple[int, str, int, float]] = []

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        step = result.get(STEP)
        previous = self.steps.get(trial_id, 0)
        if step is not None and int(step) > previous:  # a repeated result (Tune's end-of-trial copy) costs nothing
            self.spent += int(step) - previous
            self.steps[trial_id] = int(step)
            if result.get(METRIC) is not None:
                self.events.append((self.spent, trial_id, int(step), float(result[METRIC])))
        return False  # never stops one trial: that is the scheduler's job

    def stop_all(self) -> bool:
        return self.spent >= self.budget


class CpuMeter:
    """CPU-seconds of this process and of every process it started (a local Ray instance: its
    raylet and the trials' workers), sampled every second; on a shared machine the wall time says
    little, the CPU-seconds say what the run needs. Each process's last second may be missed."""

    def __init__(self, interval_s: float = 1.0):
        self.interval_s = interval_s
        self._seen: dict[tuple[int, float], float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cpu-meter", daemon=True)

    def __enter__(self) -> None:
        self._thread.start()

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def sample(self) -> None:
        import psutil

        root = psutil.Process()
        for process in [root, *root.children(recursive=True)]:
            try:
                with process.oneshot():
                    times = process.cpu_times()
                    self._seen[(process.pid, process.create_time())] = times.user + times.system
            except psutil.Error:
                continue  # it ended between listing and reading

    @property
    def seconds(self) -> float:
        return sum(self._seen.values())


# --- the benchmark -----------------------------------------------------------------------------


def benchmark(
    config_path: str,
    overrides: Sequence[str] = (),
    seeds: int = 3,
    budget: int | None = None,
    output: str | os.PathLike | None = None,
    command: str | None = None,
    worker_logs: bool = False,
    config: Config | None = None,
) -> dict[str, Any]:
    """Run both methods for ``seeds`` search seeds and the recipe once; print a table, write JSON and a PNG.

    ``worker_logs``: the trials' output streams to this terminal too (it is in Ray's session logs either way).
    ``config``: ``config_path`` with ``overrides`` already loaded (the command has: not read twice)."""
    from loraops import cluster
    from loraops.tune.experiment import prepare_model, ray_logging, trial_steps

    config = config or load_config(config_path, list(overrides))
    steps_per_trial = trial_steps(config)
    configured = Method(config.search.algorithm, config.search.scheduler.model_dump())
    if configured.name == BASELINE.name:
        raise LoraopsError(
            f"{config_path}: the configured search is already {BASELINE.name}, the baseline: nothing to compare "
            "(set search.algorithm: tpe or search.scheduler.type: asha)"
        )
    if seeds < 1:
        raise LoraopsError("--seeds must be at least 1")
    budget = budget or config.search.num_samples * steps_per_trial
    if budget < steps_per_trial:
        raise LoraopsError(f"--budget {budget}: less than one trial of {steps_per_trial} steps")
    root = config.workspace_path / "bench" / f"search-{time.strftime('%Y%m%d-%H%M%S')}"
    machine = machine_facts()
    started = time.monotonic()
    runs: list[dict[str, Any]] = []
    cpu = CpuMeter()
    with cpu, cluster.session(config.search.ray_address, num_cpus=os.cpu_count(), **ray_logging(worker_logs)):
        prepare_model(config)
        reference = reference_run(config, root / "reference")
        print(f"reference: the config's recipe, one run of {reference['steps']} steps: best eval loss {reference['best_eval_loss']:.4f}", flush=True)
        for seed in range(config.search.seed, config.search.seed + seeds):
            for method in (configured, BASELINE):  # interleaved, so that a busier machine hurts both alike
                runs.append(search_run(config, method, seed, budget, root))
                run = runs[-1]
                print(
                    f"{method.name} seed {seed}: {run['trials']} trials, {run['trial_steps']} trial-steps, "
                    f"best eval loss {run['best_eval_loss']:.4f}, {run['wall_s']:.0f} s",
                    flush=True,
                )
    machine["load_average_1m_at_end"] = round(os.getloadavg()[0], 2)
    # Only complete when this run started Ray itself (a cluster's processes are not its children).
    machine["cpu_s"] = round(cpu.seconds, 1)
    report = summarize(runs, reference, [configured.name, BASELINE.name], budget)
    report = {
        "what": "best eval loss reached against trial-steps spent: the configured search vs an equal-budget random search "
        "without early stopping, and the config's recipe trained once",
        "command": command,
        "config": str(config_path),
        "overrides": list(overrides),
        "space": {key: spec.model_dump(exclude_none=True) for key, spec in config.search.space.items()},
        "steps_per_trial": steps_per_trial,
        "eval_steps": config.training.eval_steps,
        "budget_trial_steps": budget,
        "seeds": list(range(config.search.seed, config.search.seed + seeds)),
        "max_concurrent_trials": config.search.max_concurrent_trials,
        "methods": {method.name: method_settings(config, method, budget) for method in (configured, BASELINE)},
        **report,
        # Other work on the machine slows every run alike (runs are interleaved); it does not change losses.
        "machine": machine,
        "wall_s": round(time.monotonic() - started, 1),
        "experiments": in_workspace(root, config.workspace_path),
    }
    print(format_report(report), flush=True)
    if output:
        path = Path(output)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n")
        plot_report(report, path.with_suffix(".png"))
    return report


def machine_facts() -> dict[str, Any]:
    """What the figures ran on, at the start of the run."""
    return {
        "cpus": os.cpu_count(),
        "load_average_1m_at_start": round(os.getloadavg()[0], 2),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def in_workspace(path: str | Path, workspace: Path) -> str:
    """``path`` as ``WORKSPACE/...`` when it lies in the workspace: results get committed, and this machine's paths mean nothing elsewhere."""
    try:
        return str(Path("WORKSPACE") / Path(path).resolve().relative_to(workspace.resolve()))
    except ValueError:  # elsewhere (a storage URI): as it is
        return str(path)


def method_config(config: Config, method: Method, seed: int, root: Path) -> Config:
    """The config of one search: the method and the seed, its experiments and Optuna studies kept
    under the benchmark's folder. ``num_samples`` stays as configured (it sizes TPE's random
    start-up); the budget, not the trial count, ends the search."""
    data = dump_config(config)
    data["search"].update(
        algorithm=method.algorithm,
        scheduler=method.scheduler,
        seed=seed,
        storage=str(root / "experiments"),
        database_url=f"sqlite:///{root / 'optuna.db'}",
    )
    return validate(Config, data, origin=f"{method.name} seed {seed}")


def trial_count(config: Config, method: Method, budget: int) -> int:
    """Trials a search may start: without early stopping, the whole trials the budget pays for (the
    last one cut short only if the budget is not a multiple of a trial); with ASHA, no limit (-1):
    the budget ends the search."""
    from loraops.tune.experiment import trial_steps

    return math.ceil(budget / trial_steps(config)) if method.scheduler["type"] == "fifo" else -1


def method_settings(config: Config, method: Method, budget: int) -> dict[str, Any]:
    """What a method ran with: algorithm, scheduler, trial limit (-1: none), and for TPE its random start-up trials."""
    from loraops.tune.searcher import startup_trials

    settings = {"algorithm": method.algorithm, "scheduler": method.scheduler, "trials": trial_count(config, method, budget)}
    return settings | ({"tpe_startup_trials": startup_trials(config.search.num_samples, config.search.startup_trials)} if method.algorithm == "tpe" else {})


def search_run(config: Config, method: Method, seed: int, budget: int, root: Path) -> dict[str, Any]:
    """One search until the budget is spent; its curve from the ledger, its trials from Tune."""
    from loraops.tune.experiment import run_experiment, trial_steps

    ledger = BudgetLedger(budget)
    started = time.monotonic()
    outcome = run_experiment(
        method_config(config, method, seed, root), name=f"{method.name.replace('+', '-')}-seed{seed}", stop=ledger, trials=trial_count(config, method, budget)
    )
    wall = time.monotonic() - started
    curve = best_so_far(ledger.events, budget)
    reported = [row for row in outcome.rows if row.history]
    return {
        "method": method.name,
        "seed": seed,
        "experiment": in_workspace(outcome.location.uri, config.workspace_path),
        "trials": len(reported),
        "trials_completed": sum(row.steps >= trial_steps(config) for row in reported),
        "trial_steps": min(ledger.spent, budget),
        "trial_steps_counted": ledger.spent,
        "best_eval_loss": curve[-1][1] if curve else None,
        "curve": curve,
        "wall_s": round(wall, 1),
    }


def reference_run(config: Config, folder: Path) -> dict[str, Any]:
    """The config's recipe (its ``training`` section) trained once, in a Ray worker with the CPUs
    (and GPU) of one trial, like a trial."""
    import ray

    from loraops.tune.experiment import base_config, trial_resources

    data = base_config(config)
    data["training"]["max_steps"] = config.training.max_steps  # the recipe's own length, not a trial's
    data["name"] = "reference"
    resources = trial_resources(config)
    task = ray.remote(num_cpus=resources["cpu"], num_gpus=resources["gpu"])(_train_once)
    return ray.get(task.remote(data, str(folder), max(1, int(resources["cpu"]))))


def _train_once(data: dict[str, Any], folder: str, threads: int) -> dict[str, Any]:
    import torch

    from loraops.training.train import read_metrics, train
    from loraops.tune.trainable import quiet_trial_output

    torch.set_num_threads(threads)
    quiet_trial_output()
    config = validate(Config, data, origin="reference run")
    result = train(config, output_dir=folder, progress=False)
    evals = [(event["step"], event["eval_loss"]) for event in read_metrics(result.metrics_file) if "eval_loss" in event]
    recipe = {
        "training.learning_rate": config.training.learning_rate,
        "lora.r": config.lora.r,
        "lora.dropout": config.lora.dropout,
        "lora.target_modules": config.lora.target_modules,
    }
    return {
        "best_eval_loss": round_figure(result.best_eval_loss),
        "best_step": result.best_step,
        "steps": result.steps,
        "curve": best_so_far([(step, "reference", step, loss) for step, loss in evals], result.steps),
        "recipe": recipe,
        "run": in_workspace(result.output_dir, config.workspace_path),
    }


# --- output ----------------------------------------------------------------------------------------
