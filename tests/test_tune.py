"""loraops tune: the search space mapping, and real experiments on the session's local Ray instance
(2 CPUs, one trial per CPU) with tiny budgets."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from helpers import forbid_ray, run_cli, run_main
from loraops.config import ConfigError, database_url, load_config

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tune" / "tiny.yaml"
SPACE = {
    "training.learning_rate": {"loguniform": [1.0e-4, 5.0e-3]},
    "lora.r": {"choice": [8, 16, 32]},
    "lora.dropout": {"uniform": [0.0, 0.1]},
    "training.warmup_steps": {"randint": [0, 20]},
    "lora.alpha": {"quniform": [16, 64, 16]},
    "lora.target_modules": {"choice": [["q_proj", "v_proj"], ["q_proj", "k_proj", "v_proj", "dense"]]},
    "training": {"choice": [
        {"per_device_train_batch_size": 16, "gradient_accumulation_steps": 1},
        {"per_device_train_batch_size": 8, "gradient_accumulation_steps": 2},
    ]},
}


def space_override(space: dict) -> str:
    return "search.space=" + json.dumps(space)


# --- the search space --------------------------------------------------------------------------


def test_yaml_space_maps_to_ray_domains_and_optuna_distributions():
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
    from ray.tune.search.sample import Categorical, Float, Integer, LogUniform, Quantized, Uniform

    from loraops.tune.space import SearchSpace

    space = SearchSpace.from_config(load_config(TINY, [space_override(SPACE)]))
    ray = space.ray_param_space()
    optuna = space.optuna_distributions()

    lr = ray["training.learning_rate"]
    assert isinstance(lr, Float) and isinstance(lr.get_sampler(), LogUniform) and (lr.lower, lr.upper) == (1e-4, 5e-3)
    assert optuna["training.learning_rate"] == FloatDistribution(1e-4, 5e-3, log=True)

    dropout = ray["lora.dropout"]
    assert isinstance(dropout, Float) and isinstance(dropout.get_sampler(), Uniform) and (dropout.lower, dropout.upper) == (0.0, 0.1)
    assert optuna["lora.dropout"] == FloatDistribution(0.0, 0.1)

    warmup = ray["training.warmup_steps"]  # YAML bounds are inclusive, Ray's upper bound is exclusive
    assert isinstance(warmup, Integer) and (warmup.lower, warmup.upper) == (0, 21)
    assert optuna["training.warmup_steps"] == IntDistribution(0, 20)

    alpha = ray["lora.alpha"]
    assert isinstance(alpha.get_sampler(), Quantized) and alpha.get_sampler().q == 16
    assert optuna["lora.alpha"] == FloatDistribution(16, 64, step=16)

    assert isinstance(ray["lora.r"], Categorical) and ray["lora.r"].categories == [8, 16, 32]
    assert optuna["lora.r"] == CategoricalDistribution([8, 16, 32])

    # Optuna only takes scalars: lists and mappings travel as labels and decode back to values.
    modules = optuna["lora.target_modules"]
    assert modules == CategoricalDistribution(["[q_proj, v_proj]", "[q_proj, k_proj, v_proj, dense]"])
    batches = optuna["training"].choices
    assert batches == ("{per_device_train_batch_size: 16, gradient_accumulation_steps: 1}", "{per_device_train_batch_size: 8, gradient_accumulation_steps: 2}")
    sampled = {"training.learning_rate": 1e-3, "lora.r": 16, "lora.dropout": 0.05, "training.warmup_steps": 7, "lora.alpha": 32.0,
               "lora.target_modules": modules.choices[0], "training": batches[1]}
    assert space.decode(sampled)["lora.target_modules"] == ["q_proj", "v_proj"]
    assert space.decode(sampled)["training"] == {"per_device_train_batch_size": 8, "gradient_accumulation_steps": 2}


def test_trial_config_applies_sampled_values_and_checkpoints_every_evaluation(tmp_path):
    from loraops.tune.experiment import base_config
    from loraops.tune.space import SearchSpace, trial_config

    config = load_config(TINY, [space_override(SPACE), f"workspace={tmp_path}"])
    space = SearchSpace.from_config(config)
    values = space.decode({"training.learning_rate": 2e-3, "lora.r": 8, "lora.dropout": 0.0, "training.warmup_steps": 3, "lora.alpha": 48.0,
                           "lora.target_modules": "[q_proj, v_proj]", "training": "{per_device_train_batch_size: 8, gradient_accumulation_steps: 2}"})
    trial = trial_config(base_config(config), values, name="abc_00001")
    assert (trial.lora.r, trial.lora.alpha, trial.lora.target_modules) == (8, 48, ["q_proj", "v_proj"])
    assert (trial.training.learning_rate, trial.training.warmup_steps) == (2e-3, 3)
    assert (trial.training.per_device_train_batch_size, trial.training.gradient_accumulation_steps) == (8, 2)
    assert trial.training.eval_steps == config.training.eval_steps  # the section's other keys stay
    assert trial.training.max_steps == config.search.max_steps != config.training.max_steps  # the trial budget
    assert trial.training.save_steps == trial.training.eval_steps and trial.training.save_total_limit == 1
    assert trial.workspace == str(tmp_path) and trial.name == "abc_00001"
    with pytest.raises(ConfigError, match="trial bad: .*lora.dropout"):
        trial_config(base_config(config), {"lora.dropout": 1.5}, name="bad")


@pytest.mark.parametrize(
    ("space", "message"),
    [
        ({"lora.r": {"uniform": [8, 64]}}, r"search\.space\.lora\.r: .*valid integer"),
        ({"lora.rank": {"choice": [8, 16]}}, r"search\.space\.lora\.rank: .*unknown key"),
        ({"training.learning_rate": {"loguniform": [0, 1e-3]}}, r"search\.space\.training\.learning_rate: .*low must be positive"),
        ({"training.learning_rate": {"uniform": [1e-3, 1e-4]}}, r"search\.space\.training\.learning_rate: .*low must be smaller than high"),
        ({"training.learning_rate": {"uniform": [1e-4, 2.0]}}, r"search\.space\.training\.learning_rate: 2\.0 is not a valid value"),
        ({"lora.dropout": {"gaussian": [0, 1]}}, r"search\.space\.lora\.dropout\.gaussian: unknown key"),
        ({"lora.dropout": {"uniform": [0, 0.1], "choice": [0.0]}}, r"search\.space\.lora\.dropout: .*exactly one"),
        ({"lora.r": {"choice": []}}, r"search\.space\.lora\.r\.choice"),
        ({"lora.r": {"choice": [8, 8]}}, r"search\.space\.lora\.r: choice lists 8 more than once"),
        ({"lora.target_modules": {"choice": [["q_proj"], []]}}, r"search\.space\.lora\.target_modules: '\[\]' is not a valid value"),
        ({"training": {"choice": [{"per_device_batch": 8}]}}, r"search\.space\.training: .*training\.per_device_batch: unknown key"),
        ({"workspace": {"choice": ["/a", "/b"]}}, r"search\.space\.workspace: only keys of"),
        ({"training.max_steps": {"choice": [10, 20]}}, r"search\.space\.training\.max_steps: .*ASHA"),
        ({}, r"search\.space: nothing to search"),
    ],
)
def test_a_bad_search_space_is_a_config_error_naming_the_key(space, message):
    from loraops.tune.space import SearchSpace

    with pytest.raises(ConfigError, match=message):
        SearchSpace.from_config(load_config(TINY, [space_override(space)]))


def test_cli_reports_a_bad_space_before_starting_ray(cli_env, tmp_path, monkeypatch):
    forbid_ray(monkeypatch)  # in this process (run_main): connecting to Ray fails the test
    run = run_main("tune", "-c", str(TINY), "--set", space_override({"lora.r": {"uniform": [8, 64]}}), env=cli_env(tmp_path / "ws"), cwd=tmp_path)
    assert run.returncode == 2 and run.stderr.startswith("loraops: error: search.space.lora.r: "), run.stderr
    assert not (tmp_path / "ws").exists()  # nothing built, no Ray started
    show = run_main("tune", "--show", str(tmp_path), env=cli_env(tmp_path), cwd=tmp_path)
    assert show.returncode == 2 and "is not a loraops experiment" in show.stderr


def test_experiment_location_is_a_folder_or_a_uri(tmp_path):
    from loraops.tune.experiment import Location, storage_root

    local = Location.parse(str(tmp_path / "exps" / "tiny-1") + "/")
    assert local.is_local and (local.root, local.name) == (str(tmp_path / "exps"), "tiny-1")
    assert local.local_dir(tmp_path / "ws") == tmp_path / "exps" / "tiny-1"
    remote = Location.parse("s3://bucket/loraops/experiments/tiny-1/")
    assert not remote.is_local and remote.uri == "s3://bucket/loraops/experiments/tiny-1"
    assert remote.local_dir(tmp_path / "ws") == tmp_path / "ws" / "experiments" / "tiny-1"  # results mirrored here
    assert storage_root(load_config(TINY, ["search.storage=gs://b/x/"])) == "gs://b/x"
    assert storage_root(load_config(TINY, [f"workspace={tmp_path}"])) == str(tmp_path / "experiments")


def test_tiny_yaml_search_fits_its_budget():
    """tune/tiny.yaml is the demo's search: about 8 trials, 2 at a time, ASHA, a space that validates."""
    from loraops.tune.experiment import trial_steps
    from loraops.tune.space import SearchSpace

    config = load_config(TINY)
    assert 6 <= config.search.num_samples <= 10 and config.search.max_concurrent_trials == 2
    assert config.search.scheduler.type == "asha" and config.search.scheduler.grace_period < trial_steps(config)
    assert "training.learning_rate" in SearchSpace.from_config(config).keys
    phi2 = load_config(REPO / "tune" / "phi2-dialogsum.yaml")
    assert phi2.search.resources.gpu == 1 and SearchSpace.from_config(phi2).keys


# --- experiments on Ray ------------------------------------------------------------------------


def study_entries(workspace: Path, name: str, url: str | None = None) -> dict[str, list]:
    """Optuna study trials by the Tune trial they record."""
    import optuna

    study = optuna.load_study(study_name=name, storage=url or database_url(None, workspace))
    entries: dict[str, list] = {}
    for trial in study.trials:
        entries.setdefault(trial.user_attrs.get("tune_trial_id"), []).append(trial)
    return entries


def assert_study_has_one_entry_per_trial(workspace: Path, name: str, rows, url: str | None = None) -> None:
    from optuna.trial import TrialState

    entries = study_entries(workspace, name, url)
    assert set(entries) == {row.trial_id for row in rows}, "study trials without a Tune trial, or the reverse"
    for row in rows:
        assert len(entries[row.trial_id]) == 1, f"{row.trial_id} is in the study {len(entries[row.trial_id])} times"
        (entry,) = entries[row.trial_id]
        expected = {"completed": TrialState.COMPLETE, "stopped early (ASHA)": TrialState.PRUNED}.get(row.stop_reason, TrialState.FAIL)
        assert entry.state == expected, (row.trial_id, row.stop_reason, entry.state)
        if expected == TrialState.COMPLETE:
            assert entry.value == pytest.approx(row.best_eval_loss)
        if expected != TrialState.FAIL:  # the eval loss of every evaluation, at its optimizer step
            assert set(entry.intermediate_values) == {step for step, _ in row.history}
        if expected == TrialState.PRUNED:  # Optuna's value for a pruned trial: its last eval loss
            assert entry.value == pytest.approx(row.history[-1][1])


def assert_results_written(folder: Path, rows) -> dict:
    import csv

    with (folder / "results.csv").open() as handle:
        table = list(csv.DictReader(handle))
    assert sorted(record["trial"] for record in table) == sorted(row.trial_id for row in rows)
    assert {"best_eval_loss", "steps", "status", "stop_reason", "training.learning_rate"} <= set(table[0])
    assert (folder / "search.png").stat().st_size > 10_000
    best = json.loads((folder / "best_trial.json").read_text())
    assert {"trial_id", "experiment", "experiment_path", "adapter_path", "config", "metrics", "params"} <= set(best)
    adapter = Path(best["adapter_path"])
    assert adapter.is_absolute() and (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    scored = [row.best_eval_loss for row in rows if row.best_eval_loss is not None]
    assert best["metrics"]["eval_loss"] == pytest.approx(min(scored))
    assert yaml.safe_load((folder / "best_config.yaml").read_text()) == best["config"]
    return best


def seed_covering(choices: list[str], key: str, distributions: dict) -> int:
    """A TPE seed whose first two (random, start-up) trials take two different ``choices`` of ``key``.

    They are drawn before any result exists, so which trials fail below does not depend on timing.
    """
    import optuna

    for seed in range(100):
        study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=seed, n_startup_trials=2))
        picked = {study.ask(fixed_distributions=distributions).params[key] for _ in range(2)}
        if picked == set(choices):
            return seed
    raise AssertionError("no seed found")


@pytest.mark.reliability
@pytest.mark.ray
@pytest.mark.slow
def test_a_failing_trial_is_recorded_and_the_others_finish(ray_address, workspace, monkeypatch, small_search):
    import optuna

    from loraops.tune.experiment import run_experiment
    from loraops.tune.space import SearchSpace

    for name in ("RAY_AIR_NEW_OUTPUT", "TUNE_GLOBAL_CHECKPOINT_S"):  # set by the driver; undone after the test
        monkeypatch.delenv(name, raising=False)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = {"training.learning_rate": {"loguniform": [5e-4, 5e-3]}, "lora.target_modules": {"choice": [["q_proj", "v_proj"], ["no_such_module"]]}}
    config = load_config(TINY, [*small_search, space_override(space), "search.num_samples=3", "search.scheduler={type: fifo}"])
    seed = seed_covering(["[q_proj, v_proj]", "[no_such_module]"], "lora.target_modules", SearchSpace.from_config(config).optuna_distributions())
    config.search.seed = seed

    outcome = run_experiment(config, name="fails")

    rows = outcome.rows
    assert len(rows) == 3 and outcome.finished
    failed = [row for row in rows if row.status == "ERROR"]
    finished = [row for row in rows if row.status == "TERMINATED"]
    assert failed and finished and len(failed) + len(finished) == 3
    for row in failed:
        assert row.params["lora.target_modules"] == "[no_such_module]"
        assert row.stop_reason.startswith("error: LoraopsError: lora.target_modules: ['no_such_module'] not found in the model")
    for row in finished:
        assert row.params["lora.target_modules"] == "[q_proj, v_proj]"
        assert row.stop_reason == "completed" and row.steps == 20 and [step for step, _ in row.history] == [10, 20]
    assert_study_has_one_entry_per_trial(workspace, "fails", rows)
    best = assert_results_written(outcome.folder, rows)
    assert best["trial_id"] in {row.trial_id for row in finished}
    assert best["params"]["lora.target_modules"] == ["q_proj", "v_proj"] and best["config"]["lora"]["target_modules"] == ["q_proj", "v_proj"]


@pytest.mark.reliability
@pytest.mark.ray
@pytest.mark.slow
def test_a_diverging_trial_is_recorded_as_failed_and_the_best_comes_from_the_others(ray_address, workspace, monkeypatch, small_search):
    """One trial's loss becomes NaN at step 2: it ends as ERROR with the divergence in the results table,
    the other trial completes and is the best. The tiny model's loss stays finite at any learning rate the
    config accepts (at most 1), so the diverging choice adds an absurd weight decay that overflows step 1's update."""
    import csv

    import optuna

    from loraops.tune.experiment import run_experiment
    from loraops.tune.space import SearchSpace

    for name in ("RAY_AIR_NEW_OUTPUT", "TUNE_GLOBAL_CHECKPOINT_S"):  # set by the driver; undone after the test
        monkeypatch.delenv(name, raising=False)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = {"training": {"choice": [{"weight_decay": 0.0}, {"learning_rate": 1.0, "weight_decay": 1e40}]}}
    settings = [*small_search, space_override(space), "search.num_samples=2", "search.scheduler={type: fifo}", "search.max_steps=2", "training.eval_steps=2"]
    config = load_config(TINY, settings)
    distributions = SearchSpace.from_config(config).optuna_distributions()
    healthy, diverging = distributions["training"].choices
    config.search.seed = seed_covering([healthy, diverging], "training", distributions)

    outcome = run_experiment(config, name="diverges")

    rows = outcome.rows
    assert len(rows) == 2 and outcome.finished
    [failed] = [row for row in rows if row.status == "ERROR"]
    [finished] = [row for row in rows if row.status == "TERMINATED"]
    assert failed.params["training"] == diverging and finished.params["training"] == healthy
    divergence = "error: DivergenceError: training diverged: the loss became nan at step 2; lower training.learning_rate"
    assert failed.stop_reason.startswith(divergence) and failed.best_eval_loss is None
    assert finished.stop_reason == "completed" and finished.steps == 2
    with (outcome.folder / "results.csv").open() as handle:
        table = {record["trial"]: record for record in csv.DictReader(handle)}
    assert table[failed.trial_id]["status"] == "ERROR" and table[failed.trial_id]["stop_reason"].startswith(divergence)
    assert_study_has_one_entry_per_trial(workspace, "diverges", rows)
    best = json.loads((outcome.folder / "best_trial.json").read_text())
    assert best["trial_id"] == finished.trial_id and best["config"]["training"]["weight_decay"] == 0.0
    assert best["metrics"]["eval_loss"] == pytest.approx(finished.best_eval_loss)


@pytest.mark.reliability
@pytest.mark.ray
@pytest.mark.slow
def test_a_killed_driver_resumes_with_every_trial_once(cli_env, ray_address, workspace, tmp_path, small_search):
    """Also: the database URL (here a SQLite path with a marker, as a password would be in a
    PostgreSQL URL) reaches the resumed driver from the environment, never from the experiment."""
    from loraops.cli import main
    from loraops.tune.results import load_trials

    secret = "SECRET-MARKER-7f3a"
    (tmp_path / secret).mkdir()
    db_url = f"sqlite:///{tmp_path / secret / 'loraops.db'}"
    env = cli_env(workspace) | {"RAY_ADDRESS": ray_address, "LORAOPS_DATABASE_URL": db_url}
    name = "killed"
    experiment = workspace / "experiments" / name
    space = {"training.learning_rate": {"loguniform": [5e-4, 5e-3]}, "lora.r": {"choice": [8, 16]}}
    # The first two trials run side by side; the third runs alone, and ASHA leaves it alone until step 20.
    settings = [*small_search, "search.max_steps=30", "search.scheduler={type: asha, grace_period: 20, reduction_factor: 2}",
                space_override(space), "search.num_samples=3"]
    command = [sys.executable, "-m", "loraops", "tune", "-c", str(TINY), *[arg for item in settings for arg in ("--set", item)], "--name", name]
    with (tmp_path / "first.log").open("w") as log:
        driver = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        # Kill when the experiment state (what a resume starts from) has a finished trial and one
        # half-way, with a checkpoint.
        snapshot = wait_for(experiment, driver, lambda rows: any(row.status == "TERMINATED" for row in rows)
                            and any(row.status == "RUNNING" and row.steps >= 10 for row in rows), timeout=240)
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    finished_before = {row.trial_id: row.history for row in snapshot if row.status == "TERMINATED"}
    halfway = [row.trial_id for row in snapshot if row.status == "RUNNING" and row.steps >= 10]

    resumed = run_cli("tune", "--resume", str(experiment), "--register", "tiny-best", env=env, cwd=tmp_path, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]

    _, rows = load_trials(str(experiment))
    assert len(rows) == 3 and len({row.trial_id for row in rows}) == 3
    assert all(row.status == "TERMINATED" for row in rows), [(row.trial_id, row.status, row.stop_reason) for row in rows]
    by_id = {row.trial_id: row for row in rows}
    for trial_id, history in finished_before.items():  # not run again
        assert by_id[trial_id].history == history
    for trial_id in halfway:  # went on from its checkpoint, not from step 0
        steps = [step for step, _ in by_id[trial_id].history]
        assert steps.count(10) == 1 and max(steps) > 10, steps
    assert_study_has_one_entry_per_trial(workspace, name, rows, db_url)
    best = assert_results_written(experiment, rows)
    assert f"registered tiny-best:1 from trial {best['trial_id']}" in resumed.stdout

    assert main(["tune", "--show", str(experiment)]) == 0
    stored = [path for path in experiment.rglob("*") if path.is_file()]
    assert {"tuner.pkl", "loraops.yaml", "best_config.yaml"} <= {path.name for path in stored}
    assert any(path.name.startswith("searcher-state-") for path in stored)
    leaks = [str(path) for path in stored if secret.encode() in path.read_bytes()]
    assert not leaks, f"the database URL is stored in {leaks}"


def wait_for(experiment: Path, driver: subprocess.Popen, condition, timeout: float):
    """Poll the experiment folder (as ``--show`` reads it) until ``condition(rows)`` holds."""
    from loraops.tune.results import load_trials

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert driver.poll() is None, "the driver ended before it could be killed"
        try:
            _, rows = load_trials(str(experiment))
        except Exception:  # noqa: BLE001 - not started yet, or a snapshot being written
            rows = []
        if rows and condition(rows):
            return rows
        time.sleep(0.5)
    raise AssertionError(f"the experiment did not get there within {timeout} s")


@pytest.mark.ray
@pytest.mark.slow
def test_selecting_by_rouge_l_scores_the_last_step_and_drives_best_trial_registry_and_promotion(ray_address, workspace, monkeypatch, small_search):
    """search.metric rougeL: ROUGE-L of greedy summaries of a few validation dialogues, only at a
    trial's last step; TPE maximizes it, the best trial, its registered metrics and --if-better
    use it, and the table shows it beside the eval loss."""
    import optuna
    from optuna.study import StudyDirection

    from loraops.registry import PromotionRefused, Registry
    from loraops.tune.experiment import run_experiment
    from loraops.tune.results import format_table

    for name in ("RAY_AIR_NEW_OUTPUT", "TUNE_GLOBAL_CHECKPOINT_S"):  # set by the driver; undone after the test
        monkeypatch.delenv(name, raising=False)
    space = {"training.learning_rate": {"loguniform": [5e-4, 8e-3]}}
    config = load_config(TINY, [*small_search, space_override(space), "search.num_samples=3", "search.metric=rougeL", "search.rouge_samples=4",
                                "evaluation.max_new_tokens=16"])
    outcome = run_experiment(config, name="by-rouge")

    rows, best = outcome.rows, outcome.best
    completed = [row for row in rows if row.stop_reason == "completed"]
    assert completed and all(row.rougeL is not None for row in completed)
    assert all(row.rougeL is None for row in rows if row.stop_reason != "completed")  # early rungs stay cheap
    for row in rows:  # scored once, at the last step
        results = [json.loads(line) for line in (outcome.folder / f"trial_{row.trial_id}" / "result.json").read_text().splitlines()]
        assert [result["step"] for result in results if "rougeL" in result] == ([20] if row in completed else [])
    winner = max(completed, key=lambda row: row.rougeL)
    assert (best.trial_id, best.selected_by, best.metrics["rougeL"]) == (winner.trial_id, "rougeL", winner.rougeL)
    assert best.metrics["eval_loss"] == pytest.approx(winner.last_eval_loss) and best.metrics["step"] == 20
    assert rows[0] is winner  # the table is sorted by the selection metric
    header = format_table(rows).splitlines()[0]
    assert "best_eval_loss" in header and "rougeL" in header
    assert "rougeL" in (outcome.folder / "results.csv").read_text().splitlines()[0].split(",")

    study = optuna.load_study(study_name="by-rouge", storage=database_url(None, workspace))
    assert study.direction == StudyDirection.MAXIMIZE
    values = {trial.user_attrs["tune_trial_id"]: trial.value for trial in study.trials if trial.state.name == "COMPLETE"}
    assert values == {row.trial_id: pytest.approx(row.rougeL) for row in completed}

    registry = Registry(workspace=workspace)
    version = registry.register_from_experiment(outcome.folder, "tiny-rouge")
    assert version.metrics["rougeL"] == pytest.approx(winner.rougeL) and "eval_loss" in version.metrics
    registry.promote("tiny-rouge", version.version, alias="production", if_better="rougeL")
    worse = registry.register(best.adapter_path, "tiny-rouge", metrics={"rougeL": winner.rougeL - 1.0})
    with pytest.raises(PromotionRefused):  # ROUGE-L: higher is better
        registry.promote("tiny-rouge", worse.version, alias="production", if_better="rougeL")


def test_random_algorithm_is_rays_random_sampling_limited_to_the_concurrency(tmp_path):
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from loraops.tune.strategy import build_searcher

    config = load_config(TINY, ["search.algorithm=random", "search.seed=7"])
    searcher = build_searcher(config, database_url(None, tmp_path), "random-test", concurrency=2)
    assert isinstance(searcher, BasicVariantGenerator) and searcher.max_concurrent == 2
    with pytest.raises(ConfigError, match=r"search\.algorithm: .*'tpe' or 'random'"):
        load_config(TINY, ["search.algorithm=grid"])


@pytest.mark.parametrize(("overrides", "expected"), [([], 4), (["search.num_samples=40"], 10), (["search.startup_trials=3"], 3)])
def test_tpe_samples_search_startup_trials_at_random_first(tmp_path, overrides, expected):
    from loraops.tune.strategy import build_searcher

    config = load_config(TINY, ["search.num_samples=8", *overrides])
    searcher = build_searcher(config, database_url(None, tmp_path), "startup-test", concurrency=2)
    assert searcher._sampler._n_startup_trials == expected  # Optuna's own setting of the sampler the search uses
    with pytest.raises(ConfigError, match=r"search\.startup_trials"):
        load_config(TINY, ["search.startup_trials=0"])
