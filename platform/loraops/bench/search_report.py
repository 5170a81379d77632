"""What the search benchmark's runs show: best-so-far curves over trial-steps, the trial-steps each
method needed to come within reach of the best loss any run found, the table and the plot."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loraops.errors import LoraopsError

#: "Found it": an eval loss within this fraction of the best that any run found.
WITHIN = 0.02
#: The target: the search gets there with at most this fraction of random search's trial-steps.
TARGET_RATIO = 0.40
#: Points of the mean curves, spread evenly over the budget.
GRID_POINTS = 100


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
        mean = [round_figure(statistics.fmean(v)) if all(p is not None for p in v) else None for v in points]
        best = [run["best_eval_loss"] for run in mine if run["best_eval_loss"] is not None]
        summary[method] = {
            "best_eval_loss_mean": round_figure(statistics.fmean(best)) if best else None,
            "best_eval_loss_sd": round_figure(statistics.stdev(best)) if len(best) > 1 else 0.0,
            "best_eval_loss_min": round_figure(min(best)) if best else None,
            "best_eval_loss_max": round_figure(max(best)) if best else None,
            "steps_to_target": [run["steps_to_target"] for run in mine],
            "steps_to_target_mean": round(statistics.fmean(needed), 1),
            "reached_target": sum(run["steps_to_target"] is not None for run in mine),
            "censored": any(run["steps_to_target"] is None for run in mine),  # the mean is then a lower bound
            "trials_mean": round(statistics.fmean(run["trials"] for run in mine), 1),
            "trials_completed_mean": round(statistics.fmean(run["trials_completed"] for run in mine), 1),
            "curve": {
                "trial_steps": grid,
                "mean": mean,
                "min": [round_figure(min(v)) if all(p is not None for p in v) else None for v in points],
                "max": [round_figure(max(v)) if all(p is not None for p in v) else None for v in points],
            },
        }
    search, baseline = (summary[method]["steps_to_target_mean"] for method in methods)
    ratio = search / baseline if baseline else None
    return {
        "target": {"within": WITHIN, "best_eval_loss_any_run": round_figure(best_any), "threshold": round_figure(threshold), "max_ratio": TARGET_RATIO},
        "summary": summary,
        # The search's mean trial-steps to the target over random search's (lower is better).
        "ratio_steps_to_target": round(ratio, 3) if ratio is not None else None,
        "target_met": bool(
            ratio is not None and ratio <= TARGET_RATIO and summary[methods[0]]["reached_target"] == len([r for r in runs if r["method"] == methods[0]])
        ),
        "reference": reference | {"steps_to_target": steps_to(reference["curve"], threshold)},
        "runs": runs,
    }


def round_figure(value: float) -> float:
    return round(value, 4)


# --- the recipe, once ----------------------------------------------------------------------------


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
