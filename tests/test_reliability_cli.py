"""Reliability: a catalogue of bad command lines. Every one must end with exit code 2, print exactly one
error line naming the problem (``loraops: error: ...``, or argparse's ``loraops COMMAND: error: ...``
after its usage lines) and no traceback, and must not start Ray.

The catalogue runs in this process through ``loraops.cli.main`` (a subprocess per case cost seconds of
imports each); a few cases also run as a user runs them, ``python -m loraops`` in a subprocess, which
checks the entry point, the real streams and that no Ray instance starts."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from helpers import forbid_ray, run_cli, run_main

pytestmark = pytest.mark.reliability

REPO = Path(__file__).resolve().parents[1]
TUNE = str(REPO / "tune" / "tiny.yaml")
SERVE = str(REPO / "serve" / "tiny.yaml")
ERROR_LINE = re.compile(r"^loraops( [a-z-]+)*: error: ", re.MULTILINE)

#: (id, arguments, a fragment the error line must contain). In the arguments, {tmp} is a scratch
#: folder, {adapter} a valid adapter folder, {file} a regular file, {bad_yaml} / {unknown_key_yaml} configs;
#: literal braces are doubled (str.format).
CASES = [
    ("no-command", [], "the following arguments are required: COMMAND"),
    ("unknown-command", ["nosuch"], "invalid choice: 'nosuch'"),
    ("train-without-config", ["train"], "the following arguments are required: --config"),
    ("config-not-found", ["train", "--config", "{tmp}/missing.yaml"], "config file not found"),
    ("config-invalid-yaml", ["train", "--config", "{bad_yaml}"], "invalid YAML (line 2"),
    ("config-unknown-key", ["train", "--config", "{unknown_key_yaml}"], "bogus: unknown key"),
    ("set-not-a-number", ["train", "--config", TUNE, "--set", "training.learning_rate=abc"], "training.learning_rate: Input should be a valid number"),
    ("set-without-value", ["train", "--config", TUNE, "--set", "training.learning_rate"], "expected KEY=VALUE"),
    ("set-out-of-range", ["train", "--config", TUNE, "--set", "training.max_steps=0"], "training.max_steps: Input should be greater than or equal to 1"),
    ("run-folder-not-creatable", ["train", "--config", TUNE, "--output-dir", "{file}/run"], "cannot create the run folder"),
    ("missing-local-model", ["train", "--config", TUNE, "--set", "model.name={tmp}/no-such-model"], "no-such-model': no such local folder"),
    ("missing-data-file", ["train", "--config", TUNE, "--set", "data.source={tmp}/missing.jsonl"], "data.source: no such file or folder"),
    ("evaluate-not-an-adapter", ["evaluate", "--config", TUNE, "--adapter", "{tmp}"], "is not a PEFT adapter folder"),
    ("register-missing-adapter", ["register", "--adapter", "{tmp}/nowhere", "--name", "x"], "adapter folder not found"),
    ("register-bad-name", ["register", "--adapter", "{adapter}", "--name", "a/b"], "invalid adapter name 'a/b'"),
    ("register-metrics-bad-json", ["register", "--adapter", "{adapter}", "--name", "x", "--metrics", "{{bad json"], "--metrics: invalid JSON"),
    ("register-metric-not-a-number", ["register", "--adapter", "{adapter}", "--name", "x", "--metrics", '{{"rougeL": "high"}}'], "must be a finite number"),
    ("store-without-bucket", ["register", "--adapter", "{adapter}", "--name", "x", "--store", "s3://"], "names no bucket or folder"),
    ("database-unknown-dialect", ["registry", "list", "--db", "foo://x"], "cannot use the database URL foo://x"),
    ("database-not-a-url", ["registry", "list", "--db", "notaurl"], "not a database URL"),
    ("database-folder-is-a-file", ["registry", "list", "--db", "sqlite:///{file}/loraops.db"], "cannot create the folder"),
    ("promote-bad-version", ["promote", "ghost", "notanumber"], "invalid version 'notanumber'"),
    ("promote-unknown-adapter", ["promote", "ghost", "1"], "unknown adapter 'ghost'"),
    ("show-empty-alias", ["registry", "show", "a@"], "invalid alias ''"),
    ("rollback-bad-alias", ["rollback", "ghost", "--alias", "bad alias!"], "invalid alias 'bad alias!'"),
    ("tune-without-config", ["tune"], "tune needs --config FILE"),
    ("tune-show-not-an-experiment", ["tune", "--show", "{tmp}/nowhere"], "is not a loraops experiment"),
    ("tune-show-with-options", ["tune", "--show", "{tmp}", "--config", TUNE], "--show PATH takes no other option"),
    ("tune-bad-name", ["tune", "--config", TUNE, "--name", "bad/name"], "--name 'bad/name'"),
    ("tune-unknown-database", ["tune", "--config", TUNE, "--set", "search.database_url=foo://x"], "cannot use the database URL foo://x"),
    ("serve-unknown-key", ["serve", "--config", SERVE, "--set", "args.bogus=1"], "args: bogus: unknown key"),
    ("serve-unknown-adapter", ["serve", "--config", SERVE, "--set", "args.adapter=ghost@production"], "unknown adapter 'ghost'"),
    ("summarize-no-text", ["summarize"], "give the dialogue as TEXT"),
    ("summarize-missing-file", ["summarize", "--file", "{tmp}/nowhere.txt"], "--file {tmp}/nowhere.txt: No such file"),
    ("summarize-negative-timeout", ["summarize", "hi", "--timeout", "-1"], "--timeout: must be a number above 0"),
    ("summarize-nothing-listening", ["summarize", "hi", "--url", "http://127.0.0.1:1", "--timeout", "5", "--retries", "1"], "cannot connect to http://127.0.0.1:1"),
    ("summarize-negative-retries", ["summarize", "hi", "--retries", "-1"], "--retries: must be 0 or more, got -1"),
]


@pytest.fixture(scope="module")
def scene(tmp_path_factory, make_run) -> dict[str, str]:
    """The files the cases refer to, and an empty workspace."""
    tmp = tmp_path_factory.mktemp("bad-cli")
    (tmp / "bad.yaml").write_text("a: [1\n")
    (tmp / "unknown.yaml").write_text("name: x\nbogus: 1\n")
    (tmp / "a-file").write_text("not a folder\n")
    return {
        "tmp": str(tmp),
        "adapter": str(make_run(tmp / "run", seed=1)),
        "file": str(tmp / "a-file"),
        "bad_yaml": str(tmp / "bad.yaml"),
        "unknown_key_yaml": str(tmp / "unknown.yaml"),
    }


#: The cases also run in a subprocess: argparse's own error, a config error, and the ones that come
#: nearest to starting Ray (serve and tune validate before they connect).
SUBPROCESS_CASES = ["no-command", "config-invalid-yaml", "serve-unknown-adapter", "tune-unknown-database"]


@pytest.mark.parametrize(("arguments", "fragment"), [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_bad_command_line_is_one_error_line_and_exit_2(scene, cli_env, arguments, fragment, monkeypatch):
    forbid_ray(monkeypatch)
    env = cli_env(Path(scene["tmp"]) / "ws")
    env.pop("RAY_ADDRESS", None)
    done = run_main(*(argument.format(**scene) for argument in arguments), env=env, cwd=scene["tmp"])
    assert_one_error_line(done, fragment.format(**scene))


@pytest.mark.parametrize(
    ("arguments", "fragment"), [case[1:] for case in CASES if case[0] in SUBPROCESS_CASES], ids=[case[0] for case in CASES if case[0] in SUBPROCESS_CASES]
)
def test_bad_command_line_in_a_subprocess_is_one_error_line_and_exit_2(scene, cli_env, arguments, fragment):
    env = cli_env(Path(scene["tmp"]) / "ws")
    env.pop("RAY_ADDRESS", None)
    done = run_cli(*(argument.format(**scene) for argument in arguments), env=env, cwd=scene["tmp"], timeout=180)
    assert_one_error_line(done, fragment.format(**scene))
    assert "Started a local Ray instance" not in done.stderr + done.stdout


def assert_one_error_line(done: subprocess.CompletedProcess, fragment: str) -> None:
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if ERROR_LINE.match(line)]
    assert len(errors) == 1, done.stderr[-2000:]
    assert fragment in errors[0], errors[0]


@pytest.mark.slow
def test_a_diverging_training_run_is_one_error_line_and_exit_2(workspace, cli_env, tmp_path):
    """A non-finite loss is the user's settings, not a crash: the line names the step and the setting to lower.

    The tiny model's LayerNorms keep its loss finite at any learning rate the config accepts (at most 1),
    so an absurd weight decay makes step 1's update overflow; the loss is NaN from step 2."""
    settings = ["training.learning_rate=1", "training.weight_decay=1e40", "training.max_steps=2", "training.warmup_steps=0"]
    settings += ["data.builtin_size=120", "training.per_device_train_batch_size=4"]
    done = run_cli("train", "--config", TUNE, *[arg for item in settings for arg in ("--set", item)], env=cli_env(workspace), cwd=tmp_path, timeout=300)
    assert_one_error_line(done, "training diverged: the loss became nan at step 2; lower training.learning_rate (now 1)")
    assert not (workspace / "runs" / "tiny" / "adapter").exists()


def test_the_catalogue_is_large_enough_and_ids_are_unique():
    assert len(CASES) >= 20 and len({case[0] for case in CASES}) == len(CASES)
