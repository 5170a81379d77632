"""What a run folder or an experiment says about an adapter: config, metrics, hyperparameters, lineage.

A training run folder (see :mod:`loraops.layout`) holds the resolved config, ``metrics.jsonl``
and maybe an ``evaluation.json``; a tune experiment names its best trial in ``best_trial.json``.
The registry records what it finds there with each version.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from loraops.config import BUILTIN_DATA
from loraops.errors import LoraopsError
from loraops.layout import ADAPTER_CONFIG_FILE, BEST_TRIAL_FILE, EVALUATION_FILE, METRICS_FILE, RUN_CONFIG_FILE, BestTrial, check_adapter_dir, checkpoint_step
from loraops.registry.refs import flatten_metrics
from loraops.training.data import data_fingerprint

log = logging.getLogger(__name__)


@dataclass
class Lineage:
    """Everything recorded with a version besides its files."""

    config: dict[str, Any] | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    hyperparameters: dict[str, Any] | None = None
    experiment: str | None = None
    trial_id: str | None = None
    description: str | None = None

    def version_fields(self, source: Path, actor: str | None) -> dict[str, Any]:
        """The registry's version columns for an adapter registered from ``source`` with this lineage
        (all but its number and storage place)."""
        config = self.config or {}
        data = config.get("data") if isinstance(config.get("data"), dict) else None
        model = config.get("model") if isinstance(config.get("model"), dict) else {}
        return {
            "created_by": actor,
            "description": self.description,
            "base_model": model.get("name"),
            "quantization": config.get("quantization"),
            "lora": config.get("lora") or read_json_object(source / ADAPTER_CONFIG_FILE),
            "hyperparameters": self.hyperparameters,
            "metrics": self.metrics,
            "data_source": str(data.get("source", BUILTIN_DATA)) if data is not None else None,
            "data_fingerprint": data_fingerprint(data) if data is not None else None,
            "experiment": self.experiment,
            "trial_id": self.trial_id,
            "source_path": str(source),
            "config": config or None,
        }


def read_run_folder(adapter_dir: Path) -> Lineage:
    """Best effort: what the training run folder around ``adapter_dir`` recorded.

    - ``../config.yaml``: the resolved loraops config (model, quantization, lora, training, data);
    - ``../metrics.jsonl``: ``eval_loss``, the best one (or, for a ``checkpoint-<step>`` folder,
      the one at that step);
    - ``../evaluation.json``: ROUGE of the tuned model (``rouge1``, ``rouge2``, ``rougeL``,
      ``rougeLsum``), used only if the report is about this adapter folder.

    Missing or unreadable files are skipped with a log line; they never stop a registration.
    """
    run = adapter_dir.parent
    lineage = Lineage()
    config = _read_structured(run / RUN_CONFIG_FILE, yaml.safe_load)
    if isinstance(config, dict):
        lineage.config = config
        training = config.get("training")
        lineage.hyperparameters = dict(training) if isinstance(training, dict) else None
    eval_loss = _eval_loss(run / METRICS_FILE, adapter_dir.name)
    if eval_loss is not None:
        lineage.metrics["eval_loss"] = eval_loss
    lineage.metrics.update(_rouge(run / EVALUATION_FILE, adapter_dir))
    return lineage


def _read_structured(path: Path, parse: Any) -> Any:
    if not path.is_file():
        return None
    try:
        return parse(path.read_text())
    except (ValueError, yaml.YAMLError) as exc:
        log.warning("ignoring unreadable %s: %s", path, exc)
        return None


def _eval_loss(metrics_file: Path, adapter_folder_name: str) -> float | None:
    if not metrics_file.is_file():
        return None
    events = []
    for line in metrics_file.read_text().splitlines():
        try:
            event = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
        if isinstance(event, dict) and isinstance(event.get("eval_loss"), (int, float)):
            events.append(event)
    step = checkpoint_step(adapter_folder_name)
    if step is not None:  # a step checkpoint: its own eval loss, not the run's best
        at_step = [e["eval_loss"] for e in events if e.get("step") == step]
        return at_step[-1] if at_step else None
    return min((e["eval_loss"] for e in events), default=None)


def _rouge(evaluation_file: Path, adapter_dir: Path) -> dict[str, float]:
    report = _read_structured(evaluation_file, json.loads)
    if not isinstance(report, dict) or not isinstance(report.get("tuned"), dict):
        return {}
    about = report.get("adapter")
    if about and Path(about).expanduser().resolve() != adapter_dir:
        log.info("ignoring %s: it evaluated %s, not %s", evaluation_file, about, adapter_dir)
        return {}
    return {key: value for key, value in flatten_metrics(report["tuned"], strict=False).items() if key.startswith("rouge")}


def read_best_trial(experiment: str | os.PathLike, download: Path | None = None) -> tuple[Path, Lineage]:
    """The adapter folder and lineage of an experiment's best trial (``best_trial.json``).

    ``experiment``: a local folder or a storage URI (``s3://B/experiments/NAME``). The adapter is
    the best trial's checkpoint inside the experiment (``checkpoint`` in best_trial.json), read
    from storage into ``download`` when the experiment is remote, so this works on a machine that
    holds none of the trials' files; ``adapter_path`` (where the driver put its copy) is the
    fallback for experiments written before ``checkpoint`` was recorded.
    """
    from loraops import storage

    where = str(experiment)
    if storage.is_remote(where):
        filesystem, root = storage.open_uri(where.rstrip("/"))
        storage.check_access(filesystem, root, where)
        best = BestTrial.from_json(_read_remote(filesystem, f"{root}/{BEST_TRIAL_FILE}", where), f"{where.rstrip('/')}/{BEST_TRIAL_FILE}")
        if not best.checkpoint:
            raise LoraopsError(f"{where}/{BEST_TRIAL_FILE} names no checkpoint: register this experiment from the machine that ran it")
        if download is None:
            raise LoraopsError(f"{where} is remote: a download folder is needed")
        adapter = check_adapter_dir(_download_dir(filesystem, f"{root}/{best.checkpoint}", download / "adapter", where))
        return adapter, _lineage(best, adapter, where)
    folder = Path(experiment).expanduser().resolve()
    if not folder.is_dir():
        raise LoraopsError(f"experiment folder not found: {folder}")
    best_file = folder / BEST_TRIAL_FILE
    if not best_file.is_file():
        raise LoraopsError(f"{best_file} not found: is {folder} a finished loraops tune experiment?")
    best = BestTrial.from_json(best_file.read_text(), str(best_file))
    if best.checkpoint and (folder / best.checkpoint).is_dir():
        adapter = check_adapter_dir(folder / best.checkpoint)
    elif best.adapter_path is None:
        raise LoraopsError(f"{best_file}: its checkpoint {best.checkpoint} is not in {folder}, and it names no 'adapter_path'")
    else:
        adapter = Path(best.adapter_path).expanduser()
        adapter = check_adapter_dir(adapter if adapter.is_absolute() else folder / adapter)
    return adapter, _lineage(best, adapter, str(folder))


def _lineage(best: BestTrial, adapter: Path, experiment: str) -> Lineage:
    lineage = read_run_folder(adapter)  # the trial's own run folder, when it has one
    if best.config is not None:
        lineage.config = best.config
        training = best.config.get("training")
        lineage.hyperparameters = dict(training) if isinstance(training, dict) else lineage.hyperparameters
    if best.params is not None:  # the searched values: what this trial was about
        lineage.hyperparameters = best.params
    lineage.metrics.update(flatten_metrics(best.metrics, strict=False))
    lineage.experiment = best.experiment or experiment
    lineage.trial_id = best.trial_id
    return lineage


def _read_remote(filesystem: Any, path: str, uri: str) -> str:
    from loraops import storage

    try:
        return storage.read_text(filesystem, path)
    except FileNotFoundError:
        raise LoraopsError(f"{uri}/{BEST_TRIAL_FILE} not found: is {uri} a finished loraops tune experiment?") from None
    except OSError as exc:
        raise LoraopsError(storage.describe_error(uri, exc)) from None


def _download_dir(filesystem: Any, path: str, target: Path, uri: str) -> Path:
    """Copy the folder ``path`` of a remote filesystem to the local ``target``."""
    from loraops import storage

    try:
        copied = storage.download_tree(filesystem, path, target)
    except OSError as exc:
        raise LoraopsError(storage.describe_error(uri, exc)) from None
    if not copied:
        raise LoraopsError(f"{uri}: the best trial's checkpoint {path} holds no files")
    return target


def read_json_object(path: Path) -> dict[str, Any] | None:
    """A JSON file holding an object, else None (missing or unreadable files are skipped)."""
    data = _read_structured(path, json.loads)
    return data if isinstance(data, dict) else None
