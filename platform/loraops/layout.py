"""Names on disk that several parts of loraops agree on: the files of a run folder, of an adapter,
of an experiment, and the rule every name that becomes a path component follows.

Training writes these files, tuning and the registry read them, serving loads them: each name is
defined here once, so a reader can grep one definition.

Run folder (``loraops train``, one Tune trial)::

    adapter/              best adapter so far by eval loss (PEFT format)
    checkpoint-<step>/    adapter + trainer_state.pt (optimizer, scheduler, RNG) for resuming
    metrics.jsonl         one JSON object per logging/eval event
    loss.png              train and eval loss per step
    config.yaml           the resolved config of this run
    evaluation.json       ROUGE report of ``loraops evaluate`` (when it ran)

Experiment folder (``loraops tune``): Tune's own files plus ``loraops.yaml``, ``results.csv``,
``search.png``, ``best_trial.json`` and ``best_config.yaml``.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from loraops.errors import LoraopsError

# --- an adapter folder (PEFT format) -----------------------------------------------------------

ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
#: Files every adapter folder must have.
ADAPTER_FILES = (ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE)
#: Optimizer, scheduler and RNG state of a training checkpoint.
TRAINER_STATE_FILE = "trainer_state.pt"
#: Files of a checkpoint folder that are not part of the adapter: not copied when a
#: ``checkpoint-<step>`` folder is registered (optimizer state is large, and a pickle).
NOT_ADAPTER_FILES = (TRAINER_STATE_FILE,)

def check_adapter_dir(adapter: str | os.PathLike) -> Path:
    """The adapter folder as an absolute path, or an error naming what is missing."""
    path = Path(adapter).expanduser().resolve()
    if not path.is_dir():
        raise LoraopsError(f"adapter folder not found: {path}")
    missing = [name for name in ADAPTER_FILES if not (path / name).is_file()]
    if missing:
        raise LoraopsError(f"{path} is not a PEFT adapter folder: missing {', '.join(missing)}")
    return path


# --- a run folder ------------------------------------------------------------------------------

ADAPTER_DIR = "adapter"
CHECKPOINT_PREFIX = "checkpoint-"
RUN_CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
LOSS_PLOT_FILE = "loss.png"
EVALUATION_FILE = "evaluation.json"


def checkpoint_dir_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step}"


def checkpoint_step(folder_name: str) -> int | None:
    """The step of a ``checkpoint-<step>`` folder name, else None."""
    match = re.fullmatch(rf"{CHECKPOINT_PREFIX}(\d+)", folder_name)
    return int(match.group(1)) if match else None


# --- an experiment folder ----------------------------------------------------------------------

#: The resolved config the experiment started with (what ``--resume`` and ``--show`` read).
EXPERIMENT_CONFIG_FILE = "loraops.yaml"
RESULTS_FILE = "results.csv"
SEARCH_PLOT_FILE = "search.png"
#: The best trial: adapter path, metrics, params, config (what ``register --from-experiment`` reads).
BEST_TRIAL_FILE = "best_trial.json"
BEST_CONFIG_FILE = "best_config.yaml"

# --- names -------------------------------------------------------------------------------------

#: Config names, experiment and study names, adapter names and aliases: each becomes one path
#: component (a run folder, an experiment folder, a registry folder), so one rule for all.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
NAME_RULE = "1-128 characters from A-Z a-z 0-9 . _ -, starting with a letter or digit, no '..'"


def is_valid_name(value: object) -> bool:
    return isinstance(value, str) and NAME_PATTERN.fullmatch(value) is not None and ".." not in value


def validate_name(value: str, what: str = "adapter name") -> str:
    """Return ``value`` if it follows the name rule, else raise naming the rule."""
    if not is_valid_name(value):
        raise LoraopsError(f"invalid {what} {value!r}: use {NAME_RULE}")
    return value


# --- an experiment's best trial ----------------------------------------------------------------


@dataclass(frozen=True)
class BestTrial:
    """``best_trial.json``: the trial a finished search selected, written by :mod:`loraops.tune` and read
    by the registry (``register --from-experiment``), one record for both sides.

    ``metrics`` describe the adapter at ``adapter_path`` (the best eval loss, or the last step's eval loss
    and ROUGE-L) and ``selected_by`` names the metric that chose it. ``checkpoint`` is the same adapter's
    folder relative to the experiment, which every machine can read from storage (``adapter_path`` is a
    path on the machine that wrote the record, the fallback for files written before ``checkpoint``)."""

    trial_id: str | None
    experiment: str | None
    experiment_path: str | None
    adapter_path: str | None
    checkpoint: str | None = None
    config: dict[str, Any] | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    selected_by: str | None = None
    params: dict[str, Any] | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str) -> BestTrial:
        """Parse the file at ``where`` (named in errors). Lenient as readers of older files must be: only
        an adapter location is required, and a field of the wrong type reads as missing."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise LoraopsError(f"{where}: invalid JSON ({exc})") from None
        if not isinstance(data, dict) or not (data.get("adapter_path") or data.get("checkpoint")):
            raise LoraopsError(f"{where}: expected an object with at least 'adapter_path'")

        def typed(key: str, kind: type) -> Any:
            value = data.get(key)
            return value if isinstance(value, kind) else None

        return cls(
            trial_id=str(data["trial_id"]) if data.get("trial_id") is not None else None,
            experiment=typed("experiment", str),
            experiment_path=typed("experiment_path", str),
            adapter_path=typed("adapter_path", str),
            checkpoint=typed("checkpoint", str),
            config=typed("config", dict),
            metrics=typed("metrics", dict) or {},
            selected_by=typed("selected_by", str),
            params=typed("params", dict),
        )
