"""The ``loraops`` command line (:mod:`loraops.cli`, :mod:`loraops.commands`): every command's help, and
errors as one ``loraops: error:`` line with exit code 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from helpers import run_cli, run_main

REPO = Path(__file__).resolve().parents[1]


def all_commands(parser=None, prefix=()):
    """Every command path of the ``loraops`` parser, e.g. ("bench", "serve")."""
    import argparse

    from loraops.cli import build_parser

    parser = parser or build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*prefix, name)
                yield from all_commands(sub, (*prefix, name))


def test_every_command_has_help(capsys):
    from loraops.cli import main

    commands = list(all_commands())
    assert {("train",), ("tune",), ("serve",), ("bench", "serve"), ("registry", "show"), ("promote",)} <= set(commands)
    for command in [(), *commands]:
        with pytest.raises(SystemExit) as done:
            main([*command, "--help"])
        assert done.value.code == 0, command
        assert "usage: loraops" in capsys.readouterr().out


def test_the_command_line_loads_no_heavy_library():
    """``loraops --help`` stays fast: Ray, torch, SQLAlchemy and httpx load only in the handlers."""
    probe = "import sys, loraops.cli; print(sorted({'ray', 'torch', 'sqlalchemy', 'httpx', 'transformers'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--set", "training.lerning_rate=1"], "training.lerning_rate: unknown key"),
        (["--set", "training.max_steps=0"], "training.max_steps"),
        (["--set", "data.source=./missing.jsonl"], "no such file or folder: ./missing.jsonl"),
    ],
)
def test_train_cli_exits_2_with_one_line(cli_env, tmp_path, args, expected):
    run = run_main("train", "--config", str(REPO / "tune" / "tiny.yaml"), *args, env=cli_env(tmp_path), cwd=tmp_path)
    assert run.returncode == 2, run.stderr
    assert expected in run.stderr
    assert "Traceback" not in run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("loraops: error:")]
    assert len(errors) == 1 and expected in errors[0]


def test_missing_config_file_exits_2(cli_env, tmp_path):
    """In a subprocess: the console entry point's own exit code and stderr (the catalogues run in-process)."""
    run = run_cli("train", "--config", "nope.yaml", env=cli_env(tmp_path), cwd=tmp_path)
    assert run.returncode == 2 and "config file not found: nope.yaml" in run.stderr


def test_a_reader_that_stops_early_ends_the_command_quietly(tmp_path, cli_env):
    """``loraops ... | head``: the reader closes the pipe; loraops stops without an error line, as Unix tools do."""
    import os

    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before loraops writes its first line
    try:
        command = [sys.executable, "-m", "loraops", "registry", "list"]
        done = subprocess.run(command, stdout=write_end, stderr=subprocess.PIPE, text=True, env=cli_env(tmp_path / "ws"), timeout=120)
    finally:
        os.close(write_end)

    assert done.stderr == ""
    assert done.returncode == 141  # 128 + SIGPIPE, what a shell shows for `seq 100000 | head -1`


@pytest.mark.slow
def test_train_and_evaluate_keep_library_noise_in_the_log_file(workspace, cli_env, tmp_path):
    """The terminal shows loraops' own lines; bitsandbytes' and torch's warnings go to the log file, as for tune."""
    quick = ["--set", "data.builtin_size=60", "--set", "training.max_steps=2", "--set", "training.eval_steps=2", "--set", "training.save_steps=2",
             "--set", "training.eval_max_samples=8", "--set", "training.per_device_train_batch_size=4"]  # fmt: skip
    env = cli_env(workspace) | {"OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "loraops", "train", "--config", str(REPO / "tune" / "tiny.yaml"), "--output-dir", str(tmp_path / "run"), *quick]
    trained = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)
    assert trained.returncode == 0, trained.stderr[-3000:]
    evaluated = subprocess.run(
        [sys.executable, "-m", "loraops", "evaluate", "--config", str(REPO / "tune" / "tiny.yaml"), "--adapter", str(tmp_path / "run" / "adapter"),
         "--set", "evaluation.max_samples=4", "--set", "evaluation.max_new_tokens=4", "--no-base"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900,
    )  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]

    for done in (trained, evaluated):
        terminal = done.stdout + done.stderr
        for noise in ("trust_remote_code", "Warning", 'state["state1"]', "bitsandbytes"):
            assert noise not in terminal, terminal[-3000:]
        log_file = Path(done.stdout.split("log: ", 1)[1].split()[0])
        assert log_file.is_file() and log_file.parent == workspace / "logs"
    assert "adapter: " in trained.stdout and "rougeL" in evaluated.stdout
