"""One Tune trial = one :func:`loraops.train.train` run, in its own Ray worker process.

Tune starts a fresh actor (process) per trial (``reuse_actors=False``), so the GPU memory of a
trial is returned when it ends, however it ends. The trial reports after every evaluation:
``eval_loss``, ``best_eval_loss``, ``step`` and ``max_steps``, with the checkpoint saved at that
step (adapter + optimizer state), which Tune copies into the experiment and prunes to the best
few. A restored or retried trial continues from its latest checkpoint.
"""

from __future__ import annotations

import logging
import shutil
import warnings
from pathlib import Path
from typing import Any

from loraops.tune.space import SearchSpace, trial_config, trial_name

#: The metric every trial reports and the search minimizes.
METRIC = "eval_loss"
MODE = "min"
#: Reported with every result: the best eval loss so far, the optimizer step, the step budget.
BEST_METRIC = "best_eval_loss"
STEP, MAX_STEPS = "step", "max_steps"


def run_trial(sampled: dict[str, Any], *, base: dict[str, Any], space: SearchSpace, threads: int) -> None:
    """The function trainable: ``sampled`` is Tune's config (the searched keys, choice labels)."""
    import ray.tune
    import torch

    from loraops.train import train

    torch.set_num_threads(threads)  # the CPUs reserved for this trial, not every core of the node
    quiet_trial_output()
    context = ray.tune.get_context()
    config = trial_config(base, space.decode(sampled), name=trial_name(context.get_experiment_name(), context.get_trial_id()))
    # Tune's per-trial working directory on this node (the process's cwd), kept out of the synced
    # experiment folder: Tune stores the checkpoints itself.
    output = Path.cwd() / "run"

    def report(metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        checkpoint = ray.tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.tune.report({**metrics, MAX_STEPS: config.training.max_steps}, checkpoint=checkpoint)
        if checkpoint_dir is not None:
            shutil.rmtree(checkpoint_dir, ignore_errors=True)  # Tune has copied it into the experiment

    restored = ray.tune.get_checkpoint()
    if restored is None:
        train(config, output_dir=output, report=report, progress=False)
        return
    with restored.as_directory() as folder:
        train(config, output_dir=output, report=report, resume_from=folder, progress=False)


def quiet_trial_output() -> None:
    """Trial output streams into the driver's terminal next to the progress table: keep warnings
    and errors, drop per-trial progress bars and info lines."""
    import transformers

    for name in ("loraops", "transformers", "peft", "ray.train", "ray.tune"):
        logging.getLogger(name).setLevel(logging.WARNING)
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU")  # once per trial, expected


def build_trainable(base: dict[str, Any], space: SearchSpace, resources: dict[str, float]) -> Any:
    """The trainable for ``Tuner``/``Tuner.restore``: :func:`run_trial` bound to the experiment's
    base config and space, reserving ``resources`` ({"cpu": .., "gpu": ..}) per trial."""
    from ray import tune

    trainable = tune.with_parameters(run_trial, base=base, space=space, threads=max(1, int(resources["cpu"])))
    return tune.with_resources(trainable, resources)
