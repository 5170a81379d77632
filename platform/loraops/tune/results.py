"""What an experiment produced: the trials table, the best trial, and a picture of the search.

Read from the experiment folder alone (Tune's experiment state and each trial's result.json), so
``loraops tune --show`` works on a running, an interrupted or a finished experiment, without Ray.

Files written into the experiment folder (names in :mod:`loraops.layout`):

    results.csv        trial, status, searched values, best eval loss (step), ROUGE-L (when the search
                       selects by it), steps done, stop reason
    search.png         eval loss over steps per trial | best eval loss against the main parameter
    best_trial.json    trial_id, experiment, experiment_path, adapter_path, config, metrics, params
    best_config.yaml   the best trial's full loraops config
"""

from __future__ import annotations

import csv
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from loraops.errors import LoraopsError
from loraops.layout import BEST_CONFIG_FILE, BEST_TRIAL_FILE, BestTrial
from loraops.tune.trainable import MAX_STEPS, METRIC, ROUGE_METRIC, STEP

FINISHED = ("TERMINATED", "ERROR")


@dataclass
class TrialRow:
    """One trial of an experiment, as the results table shows it."""

    trial_id: str
    status: str  # Tune's: PENDING, RUNNING, PAUSED, TERMINATED, ERROR
    params: dict[str, Any]  # searched key -> sampled value (choice labels as Tune shows them)
    best_eval_loss: float | None
    best_step: int | None
    steps: int
    max_steps: int | None
    error: str | None = None
    history: list[tuple[int, float]] = field(default_factory=list)  # (step, eval loss)
    rougeL: float | None = None  # scored at the last step when the search selects by ROUGE-L
    last_eval_loss: float | None = None  # of the last evaluation (the checkpoint ROUGE-L scores)

    @property
    def finished(self) -> bool:
        return self.status in FINISHED

    @property
    def stop_reason(self) -> str:
        if self.status == "ERROR":
            return f"error: {self.error or 'unknown (see the trial folder)'}"
        if self.status != "TERMINATED":
            return ""
        if self.max_steps is not None and self.steps >= self.max_steps:
            return "completed"
        return "stopped early (ASHA)"


def load_trials(experiment_uri: str, metric: str = METRIC) -> tuple[Any, list[TrialRow]]:
    """Tune's analysis of an experiment folder (local path or URI, opened by :mod:`loraops.storage`)
    and its trials, best first by ``metric`` (``eval_loss``: the lowest best eval loss; ``rougeL``:
    the highest ROUGE-L, then the trials without one by eval loss)."""
    import pyarrow.fs
    from ray.tune import ExperimentAnalysis

    from loraops import storage

    # Tune warns about every trial that has not reported yet; here that is just "pending".
    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
    filesystem, path = storage.open_uri(experiment_uri)
    local = isinstance(filesystem, pyarrow.fs.LocalFileSystem)
    try:
        analysis = ExperimentAnalysis(path, storage_filesystem=None if local else filesystem)
    except (ValueError, FileNotFoundError) as exc:
        raise LoraopsError(f"{experiment_uri} is not a Tune experiment folder: {str(exc).splitlines()[0]}") from None
    rows = [_row(trial, analysis.trial_dataframes.get(trial.trial_id)) for trial in analysis.trials]
    rows.sort(key=lambda row: (row.best_eval_loss is None, row.best_eval_loss or 0.0, row.trial_id))
    if metric == ROUGE_METRIC:
        rows.sort(key=lambda row: -row.rougeL if row.rougeL is not None else math.inf)  # stable: ties stay by eval loss
    return analysis, rows


def _row(trial: Any, frame: Any) -> TrialRow:
    history: list[tuple[int, float]] = []
    if frame is not None and not frame.empty and METRIC in frame and STEP in frame:
        points = frame[[STEP, METRIC]].dropna()
        history = [(int(step), float(loss)) for step, loss in points.itertuples(index=False)]
    best = min(history, key=lambda point: point[1]) if history else None
    last = trial.last_result or {}
    # Tune's snapshot records a running trial as PENDING (so that a resume starts it again).
    status = "RUNNING" if trial.status == "PENDING" and last.get(STEP) else trial.status
    return TrialRow(
        trial_id=trial.trial_id,
        status=status,
        params=dict(trial.config),
        best_eval_loss=best[1] if best else None,
        best_step=best[0] if best else None,
        steps=int(last.get(STEP, 0) or 0),
        max_steps=int(last[MAX_STEPS]) if last.get(MAX_STEPS) else None,
        error=error_message(trial.get_error()) if trial.status == "ERROR" else None,
        history=history,
        rougeL=_number(last.get(ROUGE_METRIC)),
        last_eval_loss=history[-1][1] if history else None,
    )


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def error_message(text: str | None) -> str | None:
    """The last ``SomeError: message`` line of a trial's error.txt (the cause, not Ray's wrapper)."""
    if not text:
        return None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    raised = [line for line in lines if re.match(r"^[\w.]*(Error|Exception|Interrupt)\b.*:", line)]
    message = (raised or lines)[-1]
    return re.sub(r"^(?:\w+\.)+(?=\w+(Error|Exception)\b)", "", message)  # loraops.errors.LoraopsError -> LoraopsError


# --- table -------------------------------------------------------------------------------------


def table_columns(rows: list[TrialRow]) -> list[str]:
    keys = list(dict.fromkeys(key for row in rows for key in row.params))
    rouge = [ROUGE_METRIC] if any(row.rougeL is not None for row in rows) else []
    return ["trial", "status", *keys, "best_eval_loss", "best_step", *rouge, "steps", "stop_reason"]


def table_records(rows: list[TrialRow]) -> list[dict[str, Any]]:
    """One dict per trial, in :func:`table_columns` order, values unformatted."""
    records = []
    for row in rows:
        record: dict[str, Any] = {"trial": row.trial_id, "status": row.status, **row.params}
        record.update(best_eval_loss=row.best_eval_loss, best_step=row.best_step, rougeL=row.rougeL, steps=row.steps, stop_reason=row.stop_reason)
        records.append(record)
    return records


def write_table(rows: list[TrialRow], path: Path) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=table_columns(rows), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(table_records(rows))
    return path


def format_table(rows: list[TrialRow], max_width: int = 48) -> str:
    """The results table as aligned text, best trial first."""
    if not rows:
        return "(no trials yet)"
    columns = table_columns(rows)
    records = [{key: _clip(_format_value(record.get(key)), max_width) for key in columns} for record in table_records(rows)]
    widths = {key: max(len(key), *(len(record[key]) for record in records)) for key in columns}
    lines = ["  ".join(key.ljust(widths[key]) for key in columns).rstrip()]
    lines += ["  ".join(record[key].ljust(widths[key]) for key in columns).rstrip() for record in records]
    return "\n".join(lines)


def summary_line(rows: list[TrialRow]) -> str:
    counts: dict[str, int] = {}
    for row in rows:
        reason = row.stop_reason.split(":")[0] or row.status.lower()
        counts[reason] = counts.get(reason, 0) + 1
    return f"{len(rows)} trials: " + ", ".join(f"{count} {reason}" for reason, count in sorted(counts.items()))


def best_line(best: BestTrial) -> str:
    """``ID: rougeL 28.10, eval loss 1.8123 at step 150`` (the selection metric first)."""
    metrics = best.metrics
    rouge = f"rougeL {metrics['rougeL']:.2f}, " if best.selected_by == "rougeL" else ""
    return f"{best.trial_id}: {rouge}eval loss {metrics['eval_loss']:.4f} at step {metrics['step']}"


def _format_value(value: Any) -> str:
    if value is None:
        return ""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _natural(text: str) -> tuple[int, float, str]:
    """Numbers in numeric order, before other labels."""
    try:
        return (0, float(text), text)
    except ValueError:
        return (1, 0.0, text)


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


# --- best trial --------------------------------------------------------------------------------


def best_row(rows: list[TrialRow], metric: str = METRIC) -> TrialRow | None:
    """The best trial by ``metric``: the lowest best eval loss, or the highest ROUGE-L (which only
    trials that ran all their steps have)."""
    if metric == ROUGE_METRIC:
        scored = [row for row in rows if row.rougeL is not None and row.stop_reason == "completed"]
        return max(scored, key=lambda row: row.rougeL) if scored else None
    scored = [row for row in rows if row.best_eval_loss is not None and math.isfinite(row.best_eval_loss)]
    return min(scored, key=lambda row: row.best_eval_loss) if scored else None


def best_trial_record(
    row: TrialRow,
    experiment: str,
    experiment_path: str,
    adapter_path: Path,
    config: dict[str, Any],
    params: dict[str, Any],
    metric: str = METRIC,
    checkpoint: str | None = None,
) -> BestTrial:
    """The ``best_trial.json`` of ``row`` (:class:`~loraops.layout.BestTrial`): its metrics are the ones
    of the adapter at ``adapter_path``, as ``metric`` measured it."""
    if metric == ROUGE_METRIC:
        metrics = {"eval_loss": row.last_eval_loss, ROUGE_METRIC: row.rougeL, "step": row.steps, "steps": row.steps}
    else:
        metrics = {"eval_loss": row.best_eval_loss, "step": row.best_step, "steps": row.steps}
    return BestTrial(row.trial_id, experiment, experiment_path, str(adapter_path), checkpoint, config, metrics, metric, params)


def write_best(folder: Path, record: BestTrial) -> None:
    (folder / BEST_TRIAL_FILE).write_text(record.to_json())
    (folder / BEST_CONFIG_FILE).write_text(yaml.safe_dump(record.config, sort_keys=False))


def read_best(folder: Path) -> BestTrial | None:
    path = folder / BEST_TRIAL_FILE
    return BestTrial.from_json(path.read_text(), str(path)) if path.is_file() else None


# --- plot --------------------------------------------------------------------------------------


def plot_search(rows: list[TrialRow], x_key: str | None, x_log: bool, color_key: str | None, path: Path, title: str, metric: str = METRIC) -> Path | None:
    """Left: eval loss over steps per trial (the best one bold). Right: best eval loss against
    ``x_key`` (log axis when ``x_log``), colored by ``color_key``; x = early-stopped trials."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scored = [row for row in rows if row.history]
    if not scored:
        return None
    best = best_row(rows, metric)
    fig, (curves, params) = plt.subplots(1, 2, figsize=(12, 4.5))
    for row in scored:
        steps, losses = zip(*row.history, strict=False)
        is_best = row is best
        curves.plot(steps, losses, marker=".", linewidth=2.5 if is_best else 1.0, alpha=1.0 if is_best else 0.6,
                    label=f"{row.trial_id} (best)" if is_best else None, linestyle="-" if row.stop_reason == "completed" else "--")
    curves.set(xlabel="step", ylabel="eval loss", title="eval loss per trial (dashed: stopped early)")
    curves.grid(alpha=0.3)
    curves.legend(fontsize=8)

    if x_key is not None:
        groups = sorted({str(row.params.get(color_key)) for row in scored}, key=_natural) if color_key else ["all"]
        colors = plt.get_cmap("tab10")
        for index, group in enumerate(groups):
            members = [row for row in scored if not color_key or str(row.params.get(color_key)) == group]
            label = f"{color_key}={group}" if color_key else None
            for early in (False, True):
                points = [(row.params[x_key], row.best_eval_loss) for row in members if (row.stop_reason != "completed") == early and x_key in row.params]
                if points:
                    params.scatter(*zip(*points, strict=False), color=colors(index % 10), marker="x" if early else "o", s=45, label=label)
                    label = None  # one legend entry per group
        if x_log:
            params.set_xscale("log")
        params.set(xlabel=x_key, ylabel="best eval loss", title=f"best eval loss vs {x_key} (x: stopped early)")
        params.grid(alpha=0.3)
        if color_key:
            params.legend(fontsize=8)
    else:
        params.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
