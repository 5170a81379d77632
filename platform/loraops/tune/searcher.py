"""Optuna TPE behind Ray Tune's public ``Searcher`` interface, its study kept in the project database.

:class:`StudySearch` drives an Optuna study with Optuna's ask-and-tell API:

- ``suggest``: ``study.ask`` samples a point (seeded TPE; constant liar, so concurrent trials do
  not get the same point); the Optuna trial records its Tune trial (user attribute ``tune_trial_id``);
- ``on_trial_result``: each evaluation's eval loss becomes an intermediate value at its optimizer
  step, so Optuna's own tools show the curves;
- ``on_trial_complete``: ``study.tell``: a trial that ran all its steps is COMPLETE with its value
  (the best eval loss, or the last rung's ROUGE-L when ``search.metric`` is ``rougeL``), a trial
  ASHA stopped early is PRUNED (TPE ranks it by how far it got, then by its last eval loss), a
  trial that raised is FAIL;
- ``save``/``restore``: Tune snapshots this object with the experiment and restores it when a
  killed driver is resumed. The snapshot (and ``tuner.pkl``, which pickles the searcher too) holds
  the study name, the sampler with its random state, the space and which Optuna trial each Tune
  trial is, never the database URL: it may carry a password and experiment storage may be a shared
  bucket. After a restore the study is reopened in the database the driver resolves now (see
  :func:`loraops.config.database_url`).

A resumed driver restores a snapshot that can be up to a second old: trials the killed driver
had asked Optuna for but Tune never recorded (left RUNNING) are handed to the next new Tune
trials instead of asking again, and a trial whose end the study already has keeps that first end.
Everything goes through public APIs: ``Study.ask``/``tell`` (``tell`` takes a trial number) and
the storage methods of :class:`optuna.storages.BaseStorage` for the rest.
"""

from __future__ import annotations

import contextlib
import logging
import math
import pickle
from typing import Any

from ray.tune.search import Searcher

from loraops.metrics import mode_of
from loraops.tune.trainable import BEST_METRIC, MAX_STEPS, METRIC, STEP

log = logging.getLogger(__name__)

#: Optuna user attribute naming the Tune trial of a study trial.
TUNE_TRIAL_ATTR = "tune_trial_id"


def startup_trials(num_samples: int, configured: int | None = None) -> int:
    """Random trials before TPE models the results: ``configured`` (``search.startup_trials``), else
    Optuna's 10, fewer for small budgets so TPE still gets to propose half of them."""
    return configured if configured is not None else min(10, max(2, num_samples // 2))


class StudySearch(Searcher):
    """Seeded TPE over the Optuna study ``study_name`` in the database at ``database_url``.

    ``space``: searched key -> Optuna distribution (:meth:`SearchSpace.optuna_distributions`),
    the same keys as the Tuner's ``param_space``. ``objective``: the metric the study optimizes
    (``eval_loss`` or ``rougeL``, direction from :func:`loraops.metrics.mode_of`); to Tune this searcher's ``metric`` is always
    ``eval_loss``, the one every result carries (Tune checks that), while ``rougeL`` only comes with
    a trial's last result. ``workspace`` locates the default SQLite database when the driver that
    restores this searcher has no ``$LORAOPS_DATABASE_URL``.
    """

    def __init__(self, *, database_url: str, workspace: str, study_name: str, space: dict[str, Any], seed: int, startup_trials: int, objective: str = METRIC):
        import optuna

        super().__init__(metric=METRIC, mode=mode_of(METRIC))
        self._objective = objective
        self._study_name = study_name
        self._workspace = workspace
        self._space = dict(space)
        self._sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup_trials, constant_liar=True)
        #: Tune trial id -> Optuna trial number.
        self._numbers: dict[str, int] = {}
        #: Tune trials told to the study.
        self._told: set[str] = set()
        #: Numbers of study trials a killed driver left RUNNING without a Tune trial, reused first.
        self._orphans: list[int] = []
        self._database_url: str | None = database_url  # never pickled
        self._connection: tuple[Any, Any, int] | None = None  # (study, storage, study id), never pickled

    # --- Tune's Searcher interface -------------------------------------------------------------

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict[str, Any], **spec: Any) -> bool:
        """Tune hands over its ``param_space``: it must name the keys this searcher samples."""
        same_metric = (not metric or metric == self._metric) and (not mode or mode == self._mode)  # the study's direction is fixed
        return set(config) == set(self._space) and same_metric

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        study, storage, study_id = self._connect()
        if self._orphans:
            number = self._orphans.pop(0)
            params = next(trial.params for trial in study.get_trials(deepcopy=False) if trial.number == number)
            log.info("Tune trial %s runs the point Optuna proposed before the driver stopped (trial #%d)", trial_id, number)
        else:
            trial = study.ask(fixed_distributions=self._space)
            number, params = trial.number, trial.params
        storage.set_trial_user_attr(storage.get_trial_id_from_study_id_trial_number(study_id, number), TUNE_TRIAL_ATTR, trial_id)
        self._numbers[trial_id] = number
        return dict(params)

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        import optuna

        number = self._numbers.get(trial_id)
        value = result.get(METRIC)
        if number is None or trial_id in self._told or not _finite(value):
            return
        _, storage, study_id = self._connect()
        # The study records eval losses in its own direction: a rougeL study (maximize) stores
        # them negated, so that TPE ranks trials stopped early by how far they got, then by loss.
        value = float(value) if mode_of(self._objective) == "min" else -float(value)
        # UpdateFinishedTrialError: the study recorded this trial's end before the driver was killed.
        with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
            storage.set_trial_intermediate_value(storage.get_trial_id_from_study_id_trial_number(study_id, number), int(result.get(STEP, 0)), value)

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        number = self._numbers.get(trial_id)
        if number is None or trial_id in self._told:
            return
        if result and not error:
            # Tune hands a trial's last result (the one that ended it) only to this hook.
            self.on_trial_result(trial_id, result)
        study, _, _ = self._connect()
        state, value = trial_outcome(result, error, self._objective)
        study.tell(number, value, state=state, skip_if_finished=True)
        self._told.add(trial_id)

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as handle:
            pickle.dump(self.__getstate__(), handle)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as handle:
            self.__setstate__(pickle.load(handle))
        self._find_orphans()

    # --- pickling without the database ---------------------------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_database_url"] = None
        state["_connection"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    # --- the study -----------------------------------------------------------------------------

    def _connect(self) -> tuple[Any, Any, int]:
        """The study, its storage and the study's storage id, opened on first use."""
        if self._connection is None:
            import optuna

            from loraops.config import database_url

            url = self._database_url or database_url(None, self._workspace)
            storage = optuna.storages.RDBStorage(url)
            study = optuna.load_study(study_name=self._study_name, storage=storage, sampler=self._sampler, pruner=optuna.pruners.NopPruner())
            self._database_url = url
            self._connection = (study, storage, storage.get_study_id_from_name(self._study_name))
        return self._connection

    def _find_orphans(self) -> None:
        """Study trials still RUNNING that no Tune trial of the snapshot knows: the killed driver
        asked for them after its last snapshot."""
        from optuna.trial import TrialState

        study, _, _ = self._connect()
        known = set(self._numbers.values())
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        self._orphans = sorted(trial.number for trial in running if trial.number not in known)
        if self._orphans:
            log.info("Optuna study %s: %d proposed trial(s) never reached Tune; they run next", self._study_name, len(self._orphans))


def create_study(database_url: str, name: str, metric: str) -> None:
    """A new, empty study for an experiment (the searcher opens it by name)."""
    import optuna

    optuna.create_study(study_name=name, storage=database_url, direction="minimize" if mode_of(metric) == "min" else "maximize")


def fail_orphans(database_url: str, name: str) -> int:
    """Tell FAIL to every study trial still RUNNING once the experiment has finished (a trial the
    killed driver asked for and no resumed trial took); returns how many."""
    import optuna
    from optuna.trial import TrialState

    study = optuna.load_study(study_name=name, storage=database_url)
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for trial in running:
        study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
    return len(running)


def trial_outcome(result: dict[str, Any] | None, error: bool, metric: str = METRIC) -> tuple[Any, float | None]:
    """The Optuna state and value of a finished Tune trial."""
    from optuna.trial import TrialState

    if error:
        return TrialState.FAIL, None
    if not result or METRIC not in result or result.get(STEP, 0) < result.get(MAX_STEPS, 0):
        return TrialState.PRUNED, None  # stopped early by ASHA; Optuna keeps its last intermediate value
    if metric == METRIC:
        return TrialState.COMPLETE, float(result.get(BEST_METRIC, result[METRIC]))
    if not _finite(result.get(metric)):
        return TrialState.FAIL, None  # ran to the end but the selection metric is missing
    return TrialState.COMPLETE, float(result[metric])


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)
