"""Optuna TPE behind Ray Tune, its study kept in the project database.

Ray's ``OptunaSearch`` samples; :class:`StudySearch` adds what a persistent, resumable study needs:

- every Optuna trial records its Tune trial (user attribute ``tune_trial_id``) and the eval loss
  at each optimizer step (intermediate values), so Optuna's own tools show the curves;
- outcomes: a trial that ran to ``training.max_steps`` is COMPLETE with its best eval loss (the
  adapter it keeps), a trial ASHA stopped early is PRUNED (Optuna stores its last eval loss as its
  value, and TPE ranks it below the complete ones), a trial that raised is FAIL;
- resume after a killed driver: Tune restores this object from its last experiment snapshot, so
  the study is reopened from the database (never from the pickled cache), and the trials that
  the killed driver had asked Optuna for but Tune never recorded (left RUNNING) are handed to the
  next new Tune trials instead of being asked again. A trial that finished again after the
  restart (Tune's snapshot predates its end) keeps its first result in the study.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

from ray.tune.search.optuna import OptunaSearch

from loraops.tune.trainable import BEST_METRIC, MAX_STEPS, METRIC, MODE, STEP

log = logging.getLogger(__name__)

#: Optuna user attribute naming the Tune trial of a study trial.
TUNE_TRIAL_ATTR = "tune_trial_id"


def startup_trials(num_samples: int) -> int:
    """Random trials before TPE models the results: Optuna's 10, fewer for small budgets so TPE
    still gets to propose half of them."""
    return min(10, max(2, num_samples // 2))


class StudySearch(OptunaSearch):
    """TPE (seeded, constant liar for concurrent trials) over an Optuna RDB study named ``study_name``."""

    def __init__(self, *, database_url: str, study_name: str, seed: int, num_samples: int):
        import optuna

        sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup_trials(num_samples), constant_liar=True)
        super().__init__(metric=METRIC, mode=MODE, study_name=study_name, storage=optuna.storages.RDBStorage(database_url), sampler=sampler)
        self._database_url = database_url
        #: Storage ids of study trials left RUNNING by a killed driver, to be reused.
        self._orphans: list[int] = []

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        import optuna

        if trial_id not in self._ot_trials and self._orphans:
            self._ot_trials[trial_id] = optuna.trial.Trial(self._ot_study, self._orphans.pop(0))
            log.info("Tune trial %s runs the point Optuna proposed before the driver stopped (trial #%d)", trial_id, self._ot_trials[trial_id].number)
        config = super().suggest(trial_id)
        self._ot_trials[trial_id].set_user_attr(TUNE_TRIAL_ATTR, trial_id)
        return config

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        import optuna

        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is None or trial_id in self._completed_trials or self.metric not in result:
            return
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a step reported again after a resume is ignored, as it should be
                ot_trial.report(result[self.metric], step=int(result.get(STEP, 0)))
        except optuna.exceptions.UpdateFinishedTrialError:
            pass  # the study recorded this trial's end before the driver was killed

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is None or trial_id in self._completed_trials:
            return
        if result and not error:
            # Tune hands a trial's last result (the one that ended it) only to this hook.
            self.on_trial_result(trial_id, result)
        state, value = trial_outcome(result, error)
        self._ot_study.tell(ot_trial, value, state=state, skip_if_finished=True)
        self._completed_trials.add(trial_id)

    def restore(self, checkpoint_path: str) -> None:
        super().restore(checkpoint_path)
        self._reopen_study()

    def _reopen_study(self) -> None:
        import optuna

        study = optuna.load_study(
            study_name=self._study_name,
            storage=optuna.storages.RDBStorage(self._database_url),
            sampler=self._sampler,  # the restored TPE, random state included
            pruner=optuna.pruners.NopPruner(),
        )
        known = {ot_trial._trial_id for ot_trial in self._ot_trials.values()}
        self._ot_trials = {
            trial_id: optuna.trial.Trial(study, ot_trial._trial_id)
            for trial_id, ot_trial in self._ot_trials.items()
            if trial_id not in self._completed_trials
        }
        self._ot_study = study
        running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
        self._orphans = [trial._trial_id for trial in running if trial._trial_id not in known]
        if self._orphans:
            log.info("Optuna study %s: %d proposed trial(s) never reached Tune; they run next", self._study_name, len(self._orphans))


def trial_outcome(result: dict[str, Any] | None, error: bool) -> tuple[Any, float | None]:
    """The Optuna state and value of a finished Tune trial."""
    from optuna.trial import TrialState

    if error:
        return TrialState.FAIL, None
    if not result or METRIC not in result:
        return TrialState.PRUNED, None
    if result.get(STEP, 0) < result.get(MAX_STEPS, 0):
        return TrialState.PRUNED, None  # stopped early by ASHA; Optuna keeps its last eval loss
    return TrialState.COMPLETE, float(result.get(BEST_METRIC, result[METRIC]))
