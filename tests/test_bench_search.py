"""``loraops bench search`` at a tiny size on the session's Ray: both methods spend exactly the
budget, the curves only go down, and the JSON and the PNG are written. The ledger's accounting
and the statistics are checked on hand-made results, without Ray."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import pytest

from helpers import run_cli
from loraops.bench.search import BudgetLedger
from loraops.bench.search_report import best_so_far, steps_to, summarize, value_at

REPO = Path(__file__).resolve().parents[1]

#: With the session's small search: the budget is num_samples x max_steps, as in the default, so the
#: random search finishes every trial (two of 20 steps); the recipe's one run is 10 steps.
EXTRA = ["search.num_samples=2", "training.max_steps=10"]
BUDGET = 40


def test_ledger_counts_reported_steps_in_arrival_order_and_stops_at_the_budget():
    ledger = BudgetLedger(budget=50)
    ledger("a", {"step": 10, "eval_loss": 3.0})
    ledger("b", {"step": 10, "eval_loss": 2.5})
    ledger("a", {"step": 20, "eval_loss": 2.8})
    ledger("a", {"step": 20, "eval_loss": 2.8})  # Tune's repeated last result costs nothing
    assert (ledger.spent, ledger.stop_all()) == (30, False)
    ledger("c", {"step": 10, "eval_loss": 2.0})
    ledger("b", {"step": 20, "eval_loss": 2.4})
    assert (ledger.spent, ledger.stop_all()) == (50, True)
    assert [event[0] for event in ledger.events] == [10, 20, 30, 40, 50]
    curve = best_so_far(ledger.events, budget=50)
    assert curve == [(10, 3.0), (20, 2.5), (40, 2.0), (50, 2.0)]
    assert value_at(curve, 5) is None and value_at(curve, 39) == 2.5
    assert steps_to(curve, 2.5) == 20 and steps_to(curve, 1.0) is None


def test_summary_counts_a_run_that_never_got_there_as_the_whole_budget():
    runs = [
        {"method": "tpe+asha", "seed": 0, "curve": [(10, 3.0), (30, 2.0), (100, 2.0)], "best_eval_loss": 2.0, "trials": 5, "trials_completed": 1},
        {"method": "random+fifo", "seed": 0, "curve": [(50, 2.5), (100, 2.1)], "best_eval_loss": 2.1, "trials": 2, "trials_completed": 2},
    ]
    reference = {"best_eval_loss": 2.6, "steps": 50, "curve": [(50, 2.6)]}
    report = summarize(runs, reference, ["tpe+asha", "random+fifo"], budget=100)
    assert report["target"]["threshold"] == pytest.approx(2.04)
    search, random = report["summary"]["tpe+asha"], report["summary"]["random+fifo"]
    assert (search["steps_to_target"], search["censored"]) == ([30], False)
    assert (random["steps_to_target"], random["steps_to_target_mean"], random["censored"]) == ([None], 100, True)
    assert report["ratio_steps_to_target"] == 0.3 and report["target_met"]
    assert report["reference"]["steps_to_target"] is None


@pytest.mark.slow
@pytest.mark.ray
def test_bench_search_spends_equal_budgets_and_writes_json_and_png(ray_address, workspace, tmp_path, cli_env, small_search):
    output = workspace / "benchmarks" / "search-cpu-tiny.json"  # the default: the workspace, not the repository's benchmarks/results/
    overrides = [arg for item in [*small_search, *EXTRA] for arg in ("--set", item)]
    config = str(REPO / "tune" / "tiny-bench.yaml")
    command = ["bench", "search", "--config", config, *overrides, "--seeds", "1", "--budget", str(BUDGET)]
    env = cli_env(workspace) | {"RAY_ADDRESS": ray_address}
    done = run_cli(*command, env=env, timeout=900, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]

    # The terminal shows loraops' own lines; Ray's, Tune's and the trials' output go to the log file.
    terminal = done.stdout + done.stderr
    log_file = Path(re.search(r"^log: (\S+)", done.stdout, re.MULTILINE).group(1))
    assert "tpe+asha seed 0:" in terminal and "random+fifo seed 0:" in terminal and f"results: {output}" in terminal
    assert "pid=" not in terminal and "Tune status" not in terminal and "tune.py:" not in terminal, terminal[-3000:]
    assert "Tune status" in log_file.read_text()
    assert not (tmp_path / "benchmarks").exists()

    report = json.loads(output.read_text())
    assert output.with_suffix(".png").stat().st_size > 10_000
    assert report["budget_trial_steps"] == BUDGET and report["steps_per_trial"] == 20 and report["seeds"] == [0]
    assert set(report["summary"]) == {"tpe+asha", "random+fifo"}
    assert report["machine"]["cpus"] and "load_average_1m_at_start" in report["machine"]
    runs = report["runs"]
    assert sorted(run["method"] for run in runs) == ["random+fifo", "tpe+asha"]
    for run in runs:
        # The budget is what both spent, counted from the trials' reports.
        assert run["trial_steps"] == BUDGET <= run["trial_steps_counted"]
        xs, losses = zip(*run["curve"], strict=True)
        assert list(xs) == sorted(xs) and xs[-1] == BUDGET
        assert all(later <= earlier for earlier, later in itertools.pairwise(losses))
        assert run["best_eval_loss"] == min(losses)
    random = next(run for run in runs if run["method"] == "random+fifo")
    assert random["trials"] == random["trials_completed"] == BUDGET // 20  # no early stopping
    for method, row in report["summary"].items():
        mean = [value for value in row["curve"]["mean"] if value is not None]
        assert mean and all(later <= earlier for earlier, later in itertools.pairwise(mean)), method
        assert row["curve"]["trial_steps"][-1] == BUDGET
        assert row["best_eval_loss_min"] <= row["best_eval_loss_mean"] <= row["best_eval_loss_max"]
    best = min(run["best_eval_loss"] for run in runs)
    assert report["target"]["best_eval_loss_any_run"] == pytest.approx(best, abs=1e-4)
    assert any(run["steps_to_target"] is not None for run in runs)  # the best run got there, at least
    # Committed results name no path of the machine that made them.
    assert report["experiments"].startswith("WORKSPACE/bench/search-") and report["reference"]["run"].startswith("WORKSPACE/")
    assert all(run["experiment"].startswith("WORKSPACE/") for run in runs)
    reference = report["reference"]
    assert reference["steps"] == 10 and reference["best_eval_loss"] > 0
