"""The Optuna searcher behind Ray Tune, without Ray: what Tune calls on it in a run, across a
killed and resumed driver, and what it pickles."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tune" / "tiny.yaml"
SPACE = {"training.learning_rate": {"loguniform": [1e-4, 1e-2]}, "lora.r": {"choice": [8, 16]}}


def tiny_space(space: dict = SPACE):
    from loraops.config import load_config
    from loraops.tune.space import SearchSpace

    return SearchSpace.from_config(load_config(TINY, ["search.space=" + json.dumps(space)]))


def new_searcher(url: str, workspace: Path, name: str = "s", seed: int = 0, num_samples: int = 4, metric: str = "eval_loss", create: bool = True):
    """A searcher as a driver builds it: the study created first, then Tune's param_space handed over."""
    from loraops.tune.searcher import StudySearch, create_study, startup_trials

    space = tiny_space()
    if create:
        create_study(url, name, metric)
    searcher = StudySearch(database_url=url, workspace=str(workspace), study_name=name, space=space.optuna_distributions(),
                           seed=seed, startup_trials=startup_trials(num_samples), objective=metric)
    assert searcher.set_search_properties(None, None, space.ray_param_space())
    return searcher


def result(loss: float, step: int, max_steps: int = 20, best: float | None = None, **extra) -> dict:
    return {"eval_loss": loss, "best_eval_loss": loss if best is None else best, "step": step, "max_steps": max_steps, **extra}


def test_a_searcher_resumed_from_an_old_snapshot_keeps_one_entry_per_trial(tmp_path, monkeypatch):
    """What Tune does to the searcher when a killed driver is resumed: the new driver restores the
    searcher from the last experiment snapshot, which predates the end of trial a (told to the
    study) and the proposal of trial c (which Tune never recorded)."""
    import optuna
    from optuna.trial import TrialState

    from loraops.config import DATABASE_ENV
    from loraops.tune.searcher import StudySearch

    url = f"sqlite:///{tmp_path / 'study.db'}"
    monkeypatch.setenv(DATABASE_ENV, url)  # how a resumed driver finds the study
    first = new_searcher(url, tmp_path)
    first.suggest("a"), first.suggest("b")
    first.on_trial_result("a", result(2.0, 10))
    first.save(str(tmp_path / "snapshot.pkl"))
    first.on_trial_complete("a", result(1.5, 20))
    proposed_c = first.suggest("c")
    # killed here; the new driver unpickles the searcher from tuner.pkl, restores the snapshot,
    # and Tune reruns a from its checkpoint
    second = pickle.loads(pickle.dumps(new_searcher(url, tmp_path, create=False)))
    assert isinstance(second, StudySearch)
    second.restore(str(tmp_path / "snapshot.pkl"))
    second.on_trial_complete("a", result(1.4, 20))
    assert second.suggest("d") == proposed_c  # the point the killed driver asked for, not a new one
    second.on_trial_complete("b", result(3.0, 10))
    second.on_trial_complete("d", error=True)

    trials = optuna.load_study(study_name="s", storage=url).trials
    by_tune = {trial.user_attrs["tune_trial_id"]: trial for trial in trials}
    assert len(trials) == 3 and set(by_tune) == {"a", "b", "d"}
    assert (by_tune["a"].state, by_tune["a"].value, by_tune["a"].intermediate_values) == (TrialState.COMPLETE, 1.5, {10: 2.0, 20: 1.5})
    assert (by_tune["b"].state, by_tune["b"].value) == (TrialState.PRUNED, 3.0)  # stopped early by ASHA: its last eval loss
    assert by_tune["d"].state == TrialState.FAIL


def test_an_orphan_no_trial_took_is_failed_at_the_end(tmp_path):
    import optuna
    from optuna.trial import TrialState

    from loraops.tune.searcher import fail_orphans

    url = f"sqlite:///{tmp_path / 'study.db'}"
    searcher = new_searcher(url, tmp_path)
    searcher.suggest("a")
    searcher.suggest("b")  # asked, then the driver died and the resumed search needed no more trials
    searcher.on_trial_complete("a", result(1.5, 20))
    assert fail_orphans(url, "s") == 1
    states = {trial.user_attrs["tune_trial_id"]: trial.state for trial in optuna.load_study(study_name="s", storage=url).trials}
    assert states == {"a": TrialState.COMPLETE, "b": TrialState.FAIL}


def test_the_same_seed_proposes_the_same_trials(tmp_path):
    """Seeded TPE: the random start-up trials and the model-based ones after them."""

    def run(name: str, seed: int) -> list[dict]:
        searcher = new_searcher(f"sqlite:///{tmp_path / name}.db", tmp_path, name=name, seed=seed, num_samples=6)
        points = []
        for index in range(6):
            trial_id = f"t{index}"
            points.append(searcher.suggest(trial_id))
            loss = abs(points[-1]["training.learning_rate"] - 3e-3) * 100 + points[-1]["lora.r"] / 100  # a smooth, made-up objective
            searcher.on_trial_complete(trial_id, result(loss, 20))
        return points

    first, again, other = run("one", seed=7), run("two", seed=7), run("three", seed=8)
    assert first == again
    assert first != other


def test_selecting_by_rouge_makes_a_maximizing_study(tmp_path):
    """ROUGE-L (scored at the last step) is the value; eval losses are intermediate values in the
    study's direction (negated), so that TPE ranks trials stopped early by how far they got."""
    import optuna
    from optuna.study import StudyDirection
    from optuna.trial import TrialState

    url = f"sqlite:///{tmp_path / 'study.db'}"
    searcher = new_searcher(url, tmp_path, metric="rougeL")
    for trial_id in "abc":
        searcher.suggest(trial_id)
    searcher.on_trial_result("a", result(2.0, 10))
    searcher.on_trial_complete("a", result(1.5, 20, rougeL=27.5))
    searcher.on_trial_complete("b", result(3.0, 10))  # stopped by ASHA: no ROUGE-L
    searcher.on_trial_complete("c", result(1.9, 20))  # ran to the end without a ROUGE-L: not a result to learn from

    study = optuna.load_study(study_name="s", storage=url)
    assert study.direction == StudyDirection.MAXIMIZE
    by_tune = {trial.user_attrs["tune_trial_id"]: trial for trial in study.trials}
    assert (by_tune["a"].state, by_tune["a"].value, by_tune["a"].intermediate_values) == (TrialState.COMPLETE, 27.5, {10: -2.0, 20: -1.5})
    assert (by_tune["b"].state, by_tune["b"].value) == (TrialState.PRUNED, -3.0)
    assert by_tune["c"].state == TrialState.FAIL


def test_the_pickled_searcher_holds_no_database_url(tmp_path, monkeypatch):
    """Tune pickles the searcher into tuner.pkl and its state into searcher-state-*.pkl, in the
    experiment folder, which may be a shared bucket: no URL, so no password. A restored searcher
    finds the database through $LORAOPS_DATABASE_URL (else the workspace's SQLite database)."""
    import optuna

    from loraops.config import DATABASE_ENV
    from loraops.tune.searcher import StudySearch

    url = f"sqlite:///{tmp_path / 'SECRET-MARKER' / 'study.db'}"
    (tmp_path / "SECRET-MARKER").mkdir()
    searcher = new_searcher(url, tmp_path)
    searcher.suggest("a")
    with_password = StudySearch(database_url="postgresql://loraops:s3cr3t-pw@db.internal/loraops", workspace=str(tmp_path), study_name="p",
                                space=tiny_space().optuna_distributions(), seed=0, startup_trials=2)
    for candidate, secret in ((searcher, b"SECRET-MARKER"), (with_password, b"s3cr3t-pw")):
        candidate.save(str(tmp_path / "state.pkl"))
        assert secret not in (tmp_path / "state.pkl").read_bytes()
        assert secret not in pickle.dumps(candidate)
        assert b"db.internal" not in pickle.dumps(candidate)

    monkeypatch.setenv(DATABASE_ENV, url)
    searcher.save(str(tmp_path / "state.pkl"))
    restored = pickle.loads(pickle.dumps(searcher))
    restored.restore(str(tmp_path / "state.pkl"))
    restored.on_trial_complete("a", result(1.5, 20))

    (trial,) = optuna.load_study(study_name="s", storage=url).trials
    assert trial.value == 1.5 and trial.user_attrs["tune_trial_id"] == "a"


def test_the_experiment_config_leaves_the_database_url_out(tmp_path):
    """loraops.yaml, best_config.yaml and every trial's config come from base_config."""
    from loraops.config import load_config
    from loraops.tune.experiment import base_config

    config = load_config(TINY, ["search.database_url=postgresql://loraops:s3cr3t-pw@db.internal/loraops", f"workspace={tmp_path}"])
    assert "s3cr3t-pw" not in json.dumps(base_config(config))
    assert base_config(config)["search"]["database_url"] is None


@pytest.mark.parametrize("keys", [["training.learning_rate"], ["training.learning_rate", "lora.r", "lora.dropout"]])
def test_tune_must_hand_over_the_searched_keys(tmp_path, keys):
    from loraops.tune.searcher import StudySearch

    space = tiny_space()
    searcher = StudySearch(database_url="sqlite://", workspace=str(tmp_path), study_name="s", space=space.optuna_distributions(), seed=0, startup_trials=2)
    assert not searcher.set_search_properties(None, None, dict.fromkeys(keys))
    assert not searcher.set_search_properties("eval_loss", "max", space.ray_param_space())
