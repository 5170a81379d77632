"""The ``loraops`` command line (:mod:`loraops.cli`, :mod:`loraops.commands`): every command's help, and
errors as one ``loraops: error:`` line with exit code 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from helpers import run_cli

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
    run = run_cli("train", "--config", str(REPO / "tune" / "tiny.yaml"), *args, env=cli_env(tmp_path), cwd=tmp_path, timeout=300)
    assert run.returncode == 2, run.stderr
    assert expected in run.stderr
    assert "Traceback" not in run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("loraops: error:")]
    assert len(errors) == 1 and expected in errors[0]


def test_missing_config_file_exits_2(cli_env, tmp_path):
    run = run_cli("train", "--config", "nope.yaml", env=cli_env(tmp_path), cwd=tmp_path)
    assert run.returncode == 2 and "config file not found: nope.yaml" in run.stderr
