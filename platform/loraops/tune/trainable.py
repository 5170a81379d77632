"""One Tune trial = one :func:`loraops.training.train.train` run, in its own Ray worker process.

Tune starts a fresh actor (process) per trial (``reuse_actors=False``), so the GPU memory of a
trial is returned when it ends, however it ends. The trial reports after every evaluation:
``eval_loss``, ``best_eval_loss``, ``step`` and ``max_steps`` (plus ``rougeL`` at the last step
when the search selects by ROUGE-L), the ``device`` it trains on and the ``gpu_ids`` Ray gave it,
with the checkpoint saved at that step (adapter + optimizer state), which Tune copies into the
experiment and prunes to the best few. A restored or retried trial continues from its latest
checkpoint.
"""

from __future__ import annotations

import logging
import shutil
import warnings
from pathlib import Path
from typing import Any

from loraops.metrics import mode_of
from loraops.tune.space import SearchSpace, trial_config, trial_name

log = logging.getLogger(__name__)

#: The metric every trial reports at every evaluation; ASHA stops trials on it.
METRIC = "eval_loss"
MODE = mode_of(METRIC)
#: Reported with every result: the best eval loss so far, the optimizer step, the step budget.
BEST_METRIC = "best_eval_loss"
STEP, MAX_STEPS = "step", "max_steps"
#: Reported at a trial's last step when ``search.metric`` is rougeL.
ROUGE_METRIC = "rougeL"


def run_trial(sampled: dict[str, Any], *, base: dict[str, Any], space: SearchSpace, threads: int) -> None:
    """The function trainable: ``sampled`` is Tune's config (the searched keys, choice labels)."""
    import ray.tune

    from loraops.training.model import use_reserved_cpus
    from loraops.training.train import train

    use_reserved_cpus(threads)  # the CPUs reserved for this trial, not every core of the node (nor more than it has)
    quiet_trial_output()
    context = ray.tune.get_context()
    config = trial_config(base, space.decode(sampled), name=trial_name(context.get_experiment_name(), context.get_trial_id()))
    placement = placement_info()
    # Tune's per-trial working directory on this node (the process's cwd), kept out of the synced
    # experiment folder: Tune stores the checkpoints itself.
    output = Path.cwd() / "run"

    def report(metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        checkpoint = ray.tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.tune.report({**metrics, MAX_STEPS: config.training.max_steps, **placement}, checkpoint=checkpoint)
        if checkpoint_dir is not None:
            shutil.rmtree(checkpoint_dir, ignore_errors=True)  # Tune has copied it into the experiment

    final = rouge_evaluation(config) if config.search.metric == ROUGE_METRIC else None
    restored = ray.tune.get_checkpoint()
    if restored is None:
        train(config, output_dir=output, report=report, progress=False, final_evaluation=final)
        return
    with restored.as_directory() as folder:
        train(config, output_dir=output, report=report, resume_from=folder, progress=False, final_evaluation=final)


def placement_info() -> dict[str, str]:
    """Where this trial trains: ``device`` (cpu or cuda) and the ``gpu_ids`` Ray assigned.

    Ray may assign GPU ids (it sets CUDA_VISIBLE_DEVICES) on a node whose GPUs torch cannot use,
    e.g. a node that declares GPUs without CUDA; the trial then trains on the CPU, and says so."""
    import ray
    import torch

    from loraops.training.model import device

    gpu_ids = ",".join(str(gpu) for gpu in ray.get_gpu_ids())
    if gpu_ids and not torch.cuda.is_available():
        log.warning("Ray assigned GPU %s to this trial but torch sees no CUDA device: training on the CPU", gpu_ids)
    return {"device": device().type, "gpu_ids": gpu_ids}


def rouge_evaluation(config: Any) -> Any:
    """ROUGE-L (F1 x 100) of greedy summaries of the first ``search.rouge_samples`` validation
    dialogues: a fixed subset, so trials are compared on the same dialogues."""
    from loraops.training.data import load_split
    from loraops.training.evaluate import generate_summaries, rouge

    examples = load_split(config.data, config.data.eval_split)[0][: config.search.rouge_samples]

    def score(model: Any, tokenizer: Any) -> dict[str, float]:
        model.eval()
        use_cache, model.config.use_cache = model.config.use_cache, True  # training may turn the KV cache off
        try:
            summaries = generate_summaries(model, tokenizer, [example.dialogue for example in examples], config, progress=False)
        finally:
            model.config.use_cache = use_cache
        return {ROUGE_METRIC: rouge(summaries, [example.references for example in examples])[ROUGE_METRIC]}

    return score


def quiet_trial_output() -> None:
    """Keep a trial's log (Ray writes it to the session's worker log files) to what matters:
    warnings and errors, no per-trial progress bars or info lines."""
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
