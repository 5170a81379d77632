"""The registry commands (:mod:`loraops.commands.registry`) as a user runs them: ``register``, ``promote``,
``rollback``, ``registry list|show|audit`` through ``loraops.cli.main`` in this process (one Python
start per command cost more than the commands), against SQLite and (when set) PostgreSQL.
``tests/test_cli.py`` runs ``registry list`` in a subprocess, as the console entry point."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from helpers import run_main


@pytest.fixture
def loraops(cli_env):
    """A function: run ``loraops ARGS --db DB_URL`` (in this process) with workspace TMP_PATH/ws."""

    def run(tmp_path: Path, db_url: str, *args: str) -> subprocess.CompletedProcess:
        command = list(args)
        if args[0] == "registry":
            command[0:2] = [args[0], args[1], "--db", db_url]
        else:
            command[1:1] = ["--db", db_url]
        return run_main(*command, env=cli_env(tmp_path / "ws"), cwd=tmp_path)

    return run


def test_cli_register_promote_rollback(loraops, make_run, db_url, tmp_path):
    first = make_run(tmp_path / "r1", seed=1, eval_losses=(1.5,))
    second = make_run(tmp_path / "r2", seed=2, eval_losses=(1.9,))
    ok = loraops(tmp_path, db_url, "register", "--adapter", str(first), "--name", "cli", "--metrics", '{"rougeL": 33.5}')
    assert ok.returncode == 0, ok.stderr
    assert "registered cli:1" in ok.stdout
    assert loraops(tmp_path, db_url, "register", "--adapter", str(second), "--name", "cli").returncode == 0
    assert loraops(tmp_path, db_url, "promote", "cli", "1", "--reason", "baseline").returncode == 0

    refused = loraops(tmp_path, db_url, "promote", "cli", "2", "--if-better", "eval_loss")
    assert refused.returncode == 2
    assert "1.9" in refused.stderr and "1.5" in refused.stderr and "Traceback" not in refused.stderr

    assert loraops(tmp_path, db_url, "promote", "cli", "v2").returncode == 0
    rolled = loraops(tmp_path, db_url, "rollback", "cli", "--reason", "regression")
    assert rolled.returncode == 0 and "from version 2 to 1" in rolled.stdout

    shown = json.loads(loraops(tmp_path, db_url, "registry", "show", "cli@production", "--json").stdout)
    assert (shown["version"], shown["metrics"]["rougeL"], shown["aliases"]) == (1, 33.5, ["production"])
    audit = json.loads(loraops(tmp_path, db_url, "registry", "audit", "cli", "--json").stdout)
    assert [(e["action"], e["to_version"], e["reason"]) for e in audit] == [("promote", 1, "baseline"), ("promote", 2, None), ("rollback", 1, "regression")]
    table = loraops(tmp_path, db_url, "registry", "list")
    assert table.returncode == 0 and "production->v1" in table.stdout


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def test_cli_verify_promote_rollback_refuse_a_corrupt_version(loraops, make_run, db_url, tmp_path):
    for seed in (1, 2):
        assert loraops(tmp_path, db_url, "register", "--adapter", str(make_run(tmp_path / f"r{seed}", seed=seed)), "--name", "cli").returncode == 0
    assert loraops(tmp_path, db_url, "promote", "cli", "1").returncode == 0
    ok = loraops(tmp_path, db_url, "registry", "verify", "cli:2")
    assert ok.returncode == 0 and "all sha256 match" in ok.stdout, ok.stderr
    weights = tmp_path / "ws" / "registry" / "cli" / "v2" / "adapter_model.safetensors"
    _flip_last_byte(weights)
    for args in (("registry", "verify", "cli"), ("promote", "cli", "2"), ("promote", "cli", "2", "--alias", "staging")):
        result = loraops(tmp_path, db_url, *args)
        assert result.returncode == 2, (args, result.stderr)
        assert result.stderr.startswith("loraops: error: ") and result.stderr.count("\n") == 1, result.stderr
        assert "checksum mismatch for file adapter_model.safetensors" in result.stderr
    _flip_last_byte(weights)  # repaired
    assert loraops(tmp_path, db_url, "promote", "cli", "2").returncode == 0
    _flip_last_byte(tmp_path / "ws" / "registry" / "cli" / "v1" / "adapter_model.safetensors")
    refused = loraops(tmp_path, db_url, "rollback", "cli")
    assert refused.returncode == 2 and "refusing to roll back cli@production to version 1" in refused.stderr and "Traceback" not in refused.stderr
    shown = json.loads(loraops(tmp_path, db_url, "registry", "show", "cli@production", "--json").stdout)
    assert shown["version"] == 2


def test_cli_errors_exit_2_without_traceback(loraops, db_url, tmp_path):
    for args, message in [
        (("registry", "show", "ghost"), "unknown adapter 'ghost'"),
        (("promote", "ghost", "1"), "unknown adapter 'ghost'"),
        (("rollback", "ghost"), "unknown adapter 'ghost'"),
        (("register", "--adapter", str(tmp_path), "--name", "a/b"), "invalid adapter name 'a/b'"),
        (("register", "--from-experiment", str(tmp_path), "--name", "x"), "best_trial.json not found"),
    ]:
        result = loraops(tmp_path, db_url, *args)
        assert result.returncode == 2, (args, result.stderr)
        assert f"loraops: error: {message}" in result.stderr or message in result.stderr
        assert "Traceback" not in result.stderr


def test_cli_registering_the_same_adapter_again_says_which_version_it_equals(loraops, make_run, db_url, tmp_path):
    """The duplicate is still created (registries do), but the output and --json say whose files it repeats."""
    first = make_run(tmp_path / "r1", seed=1)
    other = make_run(tmp_path / "r2", seed=2)
    assert loraops(tmp_path, db_url, "register", "--adapter", str(first), "--name", "dup").returncode == 0
    assert loraops(tmp_path, db_url, "register", "--adapter", str(other), "--name", "dup").returncode == 0

    again = loraops(tmp_path, db_url, "register", "--adapter", str(first), "--name", "dup")
    again_json = loraops(tmp_path, db_url, "register", "--adapter", str(first), "--name", "dup", "--json")
    different = loraops(tmp_path, db_url, "register", "--adapter", str(other), "--name", "fresh", "--json")

    assert again.returncode == 0 and "registered dup:3" in again.stdout
    assert "its files equal version 1 (dup:1)" in again.stdout
    assert json.loads(again_json.stdout)["same_files_as"] == 3  # the latest equal version
    assert json.loads(different.stdout)["same_files_as"] is None
