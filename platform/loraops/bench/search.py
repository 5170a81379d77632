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
import statistics
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray.tune import Stopper

from loraops.config import Config, dump_config, load_config, validate
from loraops.errors import LoraopsError
from loraops.tune.trainable import METRIC, STEP

#: "Found it": an eval loss within this fraction of the best that any run found.
WITHIN = 0.02
#: The target: the search gets there with at most this fraction of random search's trial-steps.
TARGET_RATIO = 0.40
#: Points of the mean curves, spread evenly over the budget.
GRID_POINTS = 100


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
) -> dict[str, Any]:
    """Run both methods for ``seeds`` search seeds and the recipe once; print a table, write JSON and a PNG."""
    from loraops import cluster
    from loraops.tune.experiment import prepare_model, trial_steps

    config = load_config(config_path, list(overrides))
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
    machine = {
        "cpus": os.cpu_count(),
        "load_average_1m_at_start": round(os.getloadavg()[0], 2),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    started = time.monotonic()
    runs: list[dict[str, Any]] = []
    cpu = CpuMeter()
    with cpu, cluster.session(config.search.ray_address, num_cpus=os.cpu_count()):
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
        "experiments": str(root),
    }
    print(format_report(report), flush=True)
    if output:
        path = Path(output)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n")
        plot_report(report, path.with_suffix(".png"))
    return report


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
    return settings | ({"tpe_startup_trials": startup_trials(config.search.num_samples)} if method.algorithm == "tpe" else {})


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
        "experiment": outcome.location.uri,
        "trials": len(reported),
        "trials_completed": sum(row.steps >= trial_steps(config) for row in reported),
        "trial_steps": min(ledger.spent, budget),
        "trial_steps_counted": ledger.spent,
        "best_eval_loss": curve[-1][1] if curve else None,
        "curve": curve,
        "wall_s": round(wall, 1),
    }


def best_so_far(events: Sequence[tuple[int, str, int, float]], budget: int) -> list[tuple[int, float]]:
    """(trial-steps spent, best eval loss so far) at each improvement within the budget, ending at the budget."""
    curve: list[tuple[int, float]] = []
    best = math.inf
    for spent, _, _, loss in sorted(events, key=lambda event: event[0]):
        if spent > budget:
            break
        if loss < best:
            best = loss
            curve.append((spent, loss))
    if curve and curve[-1][0] < budget:
        curve.append((budget, best))
    return curve


def value_at(curve: Sequence[tuple[int, float]], spent: float) -> float | None:
    """The best eval loss a run had by ``spent`` trial-steps (None before its first result)."""
    value = None
    for x, loss in curve:
        if x > spent:
            break
        value = loss
    return value


def steps_to(curve: Sequence[tuple[int, float]], threshold: float) -> int | None:
    """The trial-steps a run spent until its best eval loss was at or under ``threshold``."""
    return next((x for x, loss in curve if loss <= threshold), None)


def summarize(runs: list[dict[str, Any]], reference: dict[str, Any], methods: list[str], budget: int) -> dict[str, Any]:
    """Per method: curve statistics over seeds and trial-steps to within 2% of the best any run found."""
    finals = [run["best_eval_loss"] for run in runs if run["best_eval_loss"] is not None]
    if not finals:
        raise LoraopsError("no search run reported an eval loss: see the trial errors in the experiments")
    best_any = min(finals)
    threshold = best_any * (1 + WITHIN)
    grid = sorted({round(budget * i / GRID_POINTS) for i in range(1, GRID_POINTS + 1)})
    summary: dict[str, Any] = {}
    for method in methods:
        mine = [run for run in runs if run["method"] == method]
        for run in mine:
            run["steps_to_target"] = steps_to(run["curve"], threshold)
        needed = [run["steps_to_target"] if run["steps_to_target"] is not None else budget for run in mine]
        points = [[value_at(run["curve"], x) for run in mine] for x in grid]
        mean = [_round(statistics.fmean(v)) if all(p is not None for p in v) else None for v in points]
        best = [run["best_eval_loss"] for run in mine if run["best_eval_loss"] is not None]
        summary[method] = {
            "best_eval_loss_mean": _round(statistics.fmean(best)) if best else None,
            "best_eval_loss_sd": _round(statistics.stdev(best)) if len(best) > 1 else 0.0,
            "best_eval_loss_min": _round(min(best)) if best else None,
            "best_eval_loss_max": _round(max(best)) if best else None,
            "steps_to_target": [run["steps_to_target"] for run in mine],
            "steps_to_target_mean": round(statistics.fmean(needed), 1),
            "reached_target": sum(run["steps_to_target"] is not None for run in mine),
            "censored": any(run["steps_to_target"] is None for run in mine),  # the mean is then a lower bound
            "trials_mean": round(statistics.fmean(run["trials"] for run in mine), 1),
            "trials_completed_mean": round(statistics.fmean(run["trials_completed"] for run in mine), 1),
            "curve": {
                "trial_steps": grid,
                "mean": mean,
                "min": [_round(min(v)) if all(p is not None for p in v) else None for v in points],
                "max": [_round(max(v)) if all(p is not None for p in v) else None for v in points],
            },
        }
    search, baseline = (summary[method]["steps_to_target_mean"] for method in methods)
    ratio = search / baseline if baseline else None
    return {
        "target": {"within": WITHIN, "best_eval_loss_any_run": _round(best_any), "threshold": _round(threshold), "max_ratio": TARGET_RATIO},
        "summary": summary,
        # The search's mean trial-steps to the target over random search's (lower is better).
        "ratio_steps_to_target": round(ratio, 3) if ratio is not None else None,
        "target_met": bool(
            ratio is not None and ratio <= TARGET_RATIO and summary[methods[0]]["reached_target"] == len([r for r in runs if r["method"] == methods[0]])
        ),
        "reference": reference | {"steps_to_target": steps_to(reference["curve"], threshold)},
        "runs": runs,
    }


def _round(value: float) -> float:
    return round(value, 4)


# --- the recipe, once ----------------------------------------------------------------------------


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

    from loraops.train import read_metrics, train
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
        "best_eval_loss": _round(result.best_eval_loss),
        "best_step": result.best_step,
        "steps": result.steps,
        "curve": best_so_far([(step, "reference", step, loss) for step, loss in evals], result.steps),
        "recipe": recipe,
        "run": str(result.output_dir),
    }


# --- output ----------------------------------------------------------------------------------------


def format_report(report: dict[str, Any]) -> str:
    header = f"{'method':<14}{'seeds':>6}{'trials':>8}{'completed':>11}{'best eval loss':>20}{'steps to 2%':>13}{'reached':>9}"
    lines = [header]
    for method, row in report["summary"].items():
        seeds = len(row["steps_to_target"])
        loss = f"{row['best_eval_loss_mean']:.4f} ± {row['best_eval_loss_sd']:.4f}"
        needed = f"{'>=' if row['censored'] else ''}{row['steps_to_target_mean']:.0f}"
        lines.append(
            f"{method:<14}{seeds:>6}{row['trials_mean']:>8.1f}{row['trials_completed_mean']:>11.1f}{loss:>20}{needed:>13}{row['reached_target']:>6}/{seeds}"
        )
    reference = report["reference"]
    target = report["target"]
    reached = reference["steps_to_target"] is not None
    lines.append(
        f"{'recipe, 1 run':<14}{'':>6}{1:>8}{1:>11}{reference['best_eval_loss']:>20.4f}"
        f"{reference['steps_to_target'] if reached else '-':>13}{int(reached):>6}/1"
    )
    methods = list(report["summary"])
    verdict = "met" if report["target_met"] else "not met"
    lines.append(
        f"budget {report['budget_trial_steps']} trial-steps per search; target: within {target['within']:.0%} of the best eval loss any run found "
        f"({target['best_eval_loss_any_run']:.4f} -> {target['threshold']:.4f})"
    )
    if report["ratio_steps_to_target"] is not None:
        lines.append(
            f"{methods[0]} needs {report['ratio_steps_to_target']:.2f}x the trial-steps of {methods[1]} to get there (target <= {TARGET_RATIO:.2f}): {verdict}"
        )
    return "\n".join(lines)


def plot_report(report: dict[str, Any], path: Path) -> Path:
    """Best eval loss so far against trial-steps: per method the mean over seeds, the min-max band
    and each seed thin; the recipe's run as a point; the 2% line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    colors = dict(zip(report["summary"], ("tab:blue", "tab:orange"), strict=True))
    for method, row in report["summary"].items():
        curve = row["curve"]
        xs = [x for x, y in zip(curve["trial_steps"], curve["mean"], strict=True) if y is not None]
        ax.plot(
            xs,
            [y for y in curve["mean"] if y is not None],
            color=colors[method],
            linewidth=2.2,
            drawstyle="steps-post",
            label=f"{method} (mean of {len(row['steps_to_target'])} seeds)",
        )
        band = [(x, low, high) for x, low, high in zip(curve["trial_steps"], curve["min"], curve["max"], strict=True) if low is not None]
        if band:
            ax.fill_between([b[0] for b in band], [b[1] for b in band], [b[2] for b in band], color=colors[method], alpha=0.15, step="post")
        for run in report["runs"]:
            if run["method"] == method and run["curve"]:
                ax.plot(*zip(*run["curve"], strict=True), color=colors[method], linewidth=0.7, alpha=0.5, drawstyle="steps-post")
    reference = report["reference"]
    ax.scatter([reference["steps"]], [reference["best_eval_loss"]], marker="*", s=160, color="black", zorder=5, label="the config's recipe, one run")
    ax.axhline(
        report["target"]["threshold"], color="grey", linestyle="--", linewidth=1, label=f"within {report['target']['within']:.0%} of the best any run found"
    )
    ax.set(
        xlabel="trial-steps spent (optimizer steps summed over trials)",
        ylabel="best eval loss so far",
        title=f"Does the search pay? budget {report['budget_trial_steps']} trial-steps per search",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
