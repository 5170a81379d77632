"""Trials across GPUs, on a Ray instance that declares two GPUs this machine does not have.

The search runs in a separate driver process with its own Ray (``num_gpus=2``), apart from the
test session's Ray: ``search.resources.gpu: 1`` runs two trials at a time, each on its own GPU id;
``gpu: 0.5`` runs four, two per GPU; a trial that finishes or that ASHA stops ends its process,
which hands its GPU to the next trial. The trials see GPU ids but no CUDA and train on the CPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
#: Two learning rates: one that learns in 2 steps, one that leaves the eval loss where it starts.
GOOD, BAD = "0.005", "1.0e-12"
SETTINGS = [
    "data.builtin_size=60",
    "training.per_device_train_batch_size=4",
    "training.warmup_steps=0",
    "training.logging_steps=2",
    "training.eval_steps=2",
    "training.eval_max_samples=8",
    "search.num_samples=4",
    "search.max_concurrent_trials=null",  # the default: the cluster's GPUs / resources.gpu
    f'search.space={{"training.learning_rate": {{"choice": [{GOOD}, {BAD}]}}}}',
]
RUNS = {
    # ASHA decides at step 2; a bad third trial is stopped there (see seed_for_a_stop).
    "gpu1": ["search.resources={cpu: 1, gpu: 1}", "search.max_steps=4", "search.scheduler={type: asha, grace_period: 2, reduction_factor: 2}"],
    "gpu05": ["search.resources={cpu: 1, gpu: 0.5}", "search.max_steps=2", "search.scheduler={type: fifo}"],
}

DRIVER = r"""
import json, os, sys, time
import ray

ray.init(address="local", num_cpus=4, num_gpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False, object_store_memory=150 * 1024 * 1024)
from loraops.config import load_config
from loraops.tune.experiment import run_experiment

spec = json.loads(sys.argv[1])
report = {}
for name, overrides in spec["runs"].items():
    print(f"== {name}", flush=True)
    outcome = run_experiment(load_config(spec["config"], spec["settings"] + overrides), name=name)
    trials = []
    for row in outcome.rows:
        results = [json.loads(line) for line in (outcome.folder / f"trial_{row.trial_id}" / "result.json").read_text().splitlines()]
        trials.append({"id": row.trial_id, "stop_reason": row.stop_reason, "lr": row.params["training.learning_rate"],
                       "gpu_ids": {r["gpu_ids"] for r in results}.pop(), "device": {r["device"] for r in results}.pop(), "pid": results[-1]["pid"]})
    deadline = time.monotonic() + 60  # actors end asynchronously after the search returns
    while time.monotonic() < deadline and (ray.available_resources().get("GPU", 0) < 2 or any(os.path.exists(f"/proc/{t['pid']}") for t in trials)):
        time.sleep(0.5)
    report[name] = {"trials": trials, "free_gpus": ray.available_resources().get("GPU", 0),
                    "alive": [t["pid"] for t in trials if os.path.exists(f"/proc/{t['pid']}")]}
print("REPORT " + json.dumps(report), flush=True)
ray.shutdown()
"""


def seed_for_a_stop() -> int:
    """A TPE seed whose first two trials take the good learning rate and whose third takes the
    bad one, whether the third is proposed with one trial finished (still random start-up) or
    two (TPE's first pick). The first two run together on the two GPUs; the third starts on the
    GPU the first hands back, and ASHA stops it at its first rung: it is worse than both."""
    import optuna

    from loraops.tune.searcher import startup_trials

    space = {"training.learning_rate": optuna.distributions.CategoricalDistribution([float(GOOD), float(BAD)])}
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    def third(seed: int, finished: int) -> list[float]:
        sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup_trials(4), constant_liar=True)
        study = optuna.create_study(sampler=sampler)
        first = [study.ask(fixed_distributions=space) for _ in range(2)]
        for trial in first[:finished]:
            study.tell(trial, 3.0)
        return [trial.params["training.learning_rate"] for trial in first] + [study.ask(fixed_distributions=space).params["training.learning_rate"]]

    for seed in range(500):
        if third(seed, 1) == third(seed, 2) == [float(GOOD), float(GOOD), float(BAD)]:
            return seed
    raise AssertionError("no seed found")


def peak_concurrency(lines: list[str]) -> int:
    """The most trials running at once, from the console's trial events."""
    running, peak = set(), 0
    for line in lines:
        words = line.split()
        if len(words) < 4 or words[2] != "trial":
            continue
        trial, event = words[3], " ".join(words[4:])
        if event.startswith("started"):
            running.add(trial)
        elif event.startswith(("finished", "stopped early", "failed", "ended")):
            running.discard(trial)
        peak = max(peak, len(running))
    return peak


@pytest.mark.slow
@pytest.mark.ray
def test_trials_share_declared_gpus_and_hand_them_back(workspace, tmp_path):
    spec = {"config": str(REPO / "tune" / "tiny.yaml"), "settings": [*SETTINGS, f"search.seed={seed_for_a_stop()}"], "runs": RUNS}
    env = dict(os.environ, LORAOPS_HOME=str(workspace), PYTHONUNBUFFERED="1")
    env.pop("RAY_ADDRESS", None)  # its own Ray, not the test session's
    run = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(spec)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    lines = run.stdout.splitlines()
    report = json.loads(next(line for line in lines if line.startswith("REPORT "))[len("REPORT "):])
    sections = {name: lines[lines.index(f"== {name}") + 1:] for name in RUNS}

    one_each, halves = report["gpu1"], report["gpu05"]
    for result in (one_each, halves):
        assert len(result["trials"]) == 4 and all(trial["device"] == "cpu" for trial in result["trials"])  # GPU ids, no CUDA: the CPU
        assert result["alive"] == [] and result["free_gpus"] == 2  # every trial's process ended and gave its GPU back

    assert peak_concurrency(sections["gpu1"][: sections["gpu1"].index("== gpu05")]) == 2
    assert {trial["gpu_ids"] for trial in one_each["trials"]} == {"0", "1"}  # one GPU each
    stopped = [trial for trial in one_each["trials"] if trial["stop_reason"] == "stopped early (ASHA)"]
    assert stopped and all(trial["lr"] == float(BAD) for trial in stopped)  # and its GPU went to the fourth trial

    assert peak_concurrency(sections["gpu05"]) == 4
    assert Counter(trial["gpu_ids"] for trial in halves["trials"]) == {"0": 2, "1": 2}  # two trials per GPU
