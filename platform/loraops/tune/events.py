"""What a running search says: one console line per trial event, Tune's status table in the log.

- :class:`TrialEvents` (a Ray Tune ``Callback``, run in the driver) prints a line when a trial
  starts, reports an evaluation (and whether that was an ASHA rung it passed), is stopped early
  by ASHA, finishes, fails or is retried, each with the time since the search started;
- :class:`LoggedReporter` is Tune's classic status table (searched values and losses per trial),
  written to the ``loraops.tune.progress`` logger instead of the terminal: the log file by
  default, the terminal too with ``-v``.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import time
from pathlib import Path
from typing import Any

from ray.tune import Callback, CLIReporter

from loraops.tune.trainable import BEST_METRIC, MAX_STEPS, METRIC, ROUGE_METRIC, STEP

log = logging.getLogger(__name__)
progress_log = logging.getLogger("loraops.tune.progress")


class TrialEvents(Callback):
    """One line per trial event. ``rungs``: the steps where ASHA decides (empty for FIFO);
    ``labels``: searched key -> short column name for the start line."""

    def __init__(self, rungs: list[int], labels: dict[str, str]):
        self.rungs = set(rungs)
        self.labels = labels
        self.started = time.monotonic()

    def setup(self, **info: Any) -> None:
        self.started = time.monotonic()  # a resumed search counts from its own start

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        params = "  ".join(f"{self.labels.get(key, key)}={_short(value)}" for key, value in trial.config.items() if key in self.labels)
        resumed = trial.last_result.get(STEP)
        self._say(trial, f"resumed at step {resumed}" if resumed else "started", params)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict[str, Any], **info: Any) -> None:
        step = result.get(STEP)
        if step is None or result.get("done") or step >= result.get(MAX_STEPS, math.inf):
            return  # the trial's last result: on_trial_complete says how it ended
        rung = "  (passed ASHA's rung)" if step in self.rungs else ""
        self._say(trial, f"step {step}", f"eval loss {result[METRIC]:.4f} (best {result[BEST_METRIC]:.4f}){rung}")

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        last = trial.last_result
        step, max_steps = last.get(STEP), last.get(MAX_STEPS)
        if step is None:
            self._say(trial, "ended", "without an evaluation")
        elif max_steps is not None and step < max_steps:
            self._say(trial, f"stopped early by ASHA at step {step}", f"eval loss {last[METRIC]:.4f} (best {last[BEST_METRIC]:.4f})")
        else:
            rouge = f", {ROUGE_METRIC} {last[ROUGE_METRIC]:.2f}" if ROUGE_METRIC in last else ""
            self._say(trial, f"finished at step {step}", f"best eval loss {last[BEST_METRIC]:.4f}{rouge}")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        step = trial.last_result.get(STEP)
        self._say(trial, f"failed at step {step}" if step else "failed", error_line(trial))

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._say(trial, "failed; retrying from its latest checkpoint", error_line(trial))

    def _say(self, trial: Any, event: str, detail: str = "") -> None:
        elapsed = time.monotonic() - self.started
        print(f"[{elapsed:5.0f}s] trial {trial.trial_id} {event}" + (f": {detail}" if detail else ""), flush=True)


def error_line(trial: Any) -> str:
    """The cause of a trial's latest error, from its error file."""
    from loraops.tune.results import error_message

    path = Path(trial.error_file) if getattr(trial, "error_file", None) else None
    text = path.read_text() if path is not None and path.is_file() else None
    return error_message(text) or "see the trial's error.txt"


class LoggedReporter(CLIReporter):
    """Tune's status table, to the ``loraops.tune.progress`` logger (every ``max_report_frequency`` s)."""

    def report(self, trials: list, done: bool, *sys_info: str) -> None:
        table = io.StringIO()
        with contextlib.redirect_stdout(table):
            super().report(trials, done, *sys_info)
        progress_log.info("Tune status\n%s", table.getvalue().rstrip())


def status_reporter(labels: dict[str, str], num_samples: int) -> LoggedReporter:
    """The searched values and the eval losses of every trial, nothing of Ray's internals."""
    return LoggedReporter(
        parameter_columns=labels,
        metric_columns={STEP: "step", METRIC: "eval loss", BEST_METRIC: "best"},
        total_samples=num_samples,
        max_report_frequency=20,
        max_column_length=36,  # room for a target-module set
        metric=BEST_METRIC,
        mode="min",
        sort_by_metric=False,  # Ray's sort fails on a trial stopped before its first result (a budget stop in `bench search` does that)
    )


def column_labels(keys: list[str]) -> dict[str, str]:
    """Searched key -> the short name the console and the status table show."""
    return {key: key.split(".")[-1] for key in keys}


def asha_rungs(scheduler: Any, max_steps: int) -> list[int]:
    """The steps where ASHA decides whether a trial goes on (none for FIFO); ``scheduler`` is
    ``search.scheduler``."""
    if scheduler.type != "asha":
        return []
    steps, milestone = [], float(scheduler.grace_period)
    while milestone < max_steps:
        steps.append(round(milestone))
        milestone *= scheduler.reduction_factor
    return steps


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
