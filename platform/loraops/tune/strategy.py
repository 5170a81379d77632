"""Who proposes trials and who stops them: the searcher (Optuna TPE with its study in the database,
or Ray Tune's seeded random sampling) and the scheduler (ASHA or FIFO) a tune config asks for."""

from __future__ import annotations

from typing import Any

from loraops.config import Config, ConfigError
from loraops.tune.space import SearchSpace
from loraops.tune.trainable import METRIC, MODE, STEP


def trial_steps(config: Config) -> int:
    """Optimizer steps per trial: ``search.max_steps``, else ``training.max_steps``."""
    return config.search.max_steps or config.training.max_steps


def check_search(config: Config) -> SearchSpace:
    """The validated search space, after checking the scheduler against the trial budget."""
    check_scheduler(config)
    return SearchSpace.from_config(config)


def check_scheduler(config: Config) -> None:
    scheduler = config.search.scheduler
    if scheduler.type == "asha" and scheduler.grace_period > trial_steps(config):
        raise ConfigError(f"search.scheduler.grace_period: {scheduler.grace_period} is more than the {trial_steps(config)} steps of a trial")


def build_searcher(config: Config, db_url: str, study_name: str, concurrency: int) -> Any:
    """Who proposes the trials: Optuna TPE with its study in the database, or Ray Tune's plain
    random sampling of the same domains (seeded, and restored with the experiment on --resume)."""
    if config.search.algorithm == "random":
        from ray.tune.search.basic_variant import BasicVariantGenerator

        return BasicVariantGenerator(random_state=config.search.seed, max_concurrent=concurrency)
    from loraops.tune.searcher import StudySearch, create_study, startup_trials

    create_study(db_url, study_name, config.search.metric)
    return StudySearch(
        database_url=db_url,
        workspace=str(config.workspace_path),
        study_name=study_name,
        space=SearchSpace.from_config(config).optuna_distributions(),
        seed=config.search.seed,
        startup_trials=startup_trials(config.search.num_samples, config.search.startup_trials),
        objective=config.search.metric,
    )


def build_scheduler(config: Config) -> Any:
    from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler

    scheduler = config.search.scheduler
    if scheduler.type == "fifo":
        return FIFOScheduler()
    return AsyncHyperBandScheduler(
        time_attr=STEP,  # rungs in optimizer steps, whatever eval_steps is
        metric=METRIC,
        mode=MODE,
        max_t=trial_steps(config),
        grace_period=scheduler.grace_period,
        reduction_factor=scheduler.reduction_factor,
    )
