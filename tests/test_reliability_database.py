"""Reliability drill "database unavailable": the registry, tune and serve commands against a PostgreSQL
server that is down or silent, a SQLite file another process keeps locked, and a read-only one. Each
must fail within a bounded time with one ``loraops: error:`` line naming the database, exit code 2,
no traceback, and leave nothing half-written (no version files, no experiment folder, no Ray)."""

from __future__ import annotations

import socket
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from helpers import forbid_ray, free_port, run_cli, run_main

pytestmark = pytest.mark.reliability

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def loraops(cli_env, tmp_path, monkeypatch):
    """A function: run ``loraops ARGS`` with LORAOPS_DATABASE_URL=url; returns (result, seconds). In a
    subprocess, as a user runs it; ``in_process``: through ``loraops.cli.main`` in this process (no
    Python start to pay), where connecting to Ray raises (helpers.forbid_ray)."""

    def run(url: str, *args: str, in_process: bool = False) -> tuple[subprocess.CompletedProcess, float]:
        env = cli_env(tmp_path / "ws")
        env["LORAOPS_DATABASE_URL"] = url
        env["LORAOPS_ARTIFACT_URI"] = str(tmp_path / "store")
        env.pop("RAY_ADDRESS", None)
        started = time.monotonic()
        if in_process:
            forbid_ray(monkeypatch)
            done = run_main(*args, env=env, cwd=tmp_path)
        else:
            done = run_cli(*args, env=env, cwd=tmp_path, timeout=180)
        return done, time.monotonic() - started

    return run


def one_error_line(done: subprocess.CompletedProcess) -> str:
    """The single ``loraops: error:`` line of a failed command (other stderr lines are log lines)."""
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("loraops: error: ")]
    assert len(errors) == 1, done.stderr[-3000:]
    return errors[0]


def assert_nothing_written(tmp_path: Path) -> None:
    store = tmp_path / "store"
    assert not store.exists() or not [p for p in store.rglob("*") if p.is_file()], sorted(store.rglob("*"))
    assert not (tmp_path / "ws" / "experiments").exists() or not any((tmp_path / "ws" / "experiments").iterdir())


COMMANDS = {
    "registry-list": ["registry", "list"],
    "registry-show": ["registry", "show", "drill:1"],
    "registry-verify": ["registry", "verify", "drill@production"],
    "registry-audit": ["registry", "audit", "drill"],
    "register": ["register", "--adapter", "{adapter}", "--name", "drill"],
    "promote": ["promote", "drill", "1"],
    "rollback": ["rollback", "drill"],
    "tune": ["tune", "--config", str(REPO / "tune" / "tiny.yaml"), "--name", "drill"],
    "serve": ["serve", "--config", str(REPO / "serve" / "tiny.yaml"), "--set", "args.adapter=drill@production"],
}


@pytest.mark.parametrize("command", list(COMMANDS), ids=list(COMMANDS))
def test_postgresql_server_down(loraops, make_run, tmp_path, command):
    """Nothing listens on the port: the connection is refused at once."""
    adapter = make_run(tmp_path / "run", seed=1)
    url = f"postgresql://loraops:secret@127.0.0.1:{free_port()}/loraops"
    # The commands that could reach Ray run as a user runs them; the others in this process (cheaper).
    done, seconds = loraops(url, *(part.format(adapter=adapter) for part in COMMANDS[command]), in_process=command not in ("tune", "serve"))
    error = one_error_line(done)
    assert "cannot use the database postgresql+psycopg2://loraops:***@127.0.0.1:" in error and "Connection refused" in error, error
    assert "secret" not in done.stderr + done.stdout
    assert seconds < 60, seconds
    assert "Started a local Ray instance" not in done.stderr + done.stdout
    assert_nothing_written(tmp_path)


def test_postgresql_server_that_never_answers_times_out(loraops, tmp_path):
    """A port that accepts TCP but never speaks: libpq's connect_timeout (5 s by default) bounds the wait."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"postgresql://loraops@127.0.0.1:{silent.getsockname()[1]}/loraops"
        done, seconds = loraops(url, "registry", "list")
    assert "timeout expired" in one_error_line(done)
    assert seconds < 90, seconds


@pytest.fixture
def sqlite_db(loraops, tmp_path) -> str:
    """A SQLite registry with its tables, as a path."""
    path = tmp_path / "loraops.db"
    done, _ = loraops(f"sqlite:///{path}", "registry", "list")
    assert done.returncode == 0, done.stderr
    return str(path)


def test_sqlite_locked_by_another_process(loraops, make_run, sqlite_db, tmp_path):
    """A writer waits a bounded, configurable time (?timeout=), says so while waiting, then fails clearly;
    readers are not blocked by another process's write lock."""
    adapter = make_run(tmp_path / "run", seed=1)
    holder = sqlite3.connect(sqlite_db, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another process's open write transaction
    try:
        listed, _ = loraops(f"sqlite:///{sqlite_db}", "registry", "list")
        assert listed.returncode == 0, listed.stderr
        done, seconds = loraops(f"sqlite:///{sqlite_db}?timeout=4", "register", "--adapter", str(adapter), "--name", "drill")
    finally:
        holder.rollback()
        holder.close()
    error = one_error_line(done)
    assert f"the database sqlite:///{sqlite_db}?timeout=4 is locked by another process: gave up after 4 s" in error, error
    assert "?timeout=SECONDS" in error
    assert "is locked by another process; waiting up to 4 s" in done.stderr  # not silent meanwhile
    assert 4 <= seconds < 60, seconds
    assert_nothing_written(tmp_path)
    retried, _ = loraops(f"sqlite:///{sqlite_db}", "register", "--adapter", str(adapter), "--name", "drill")
    assert retried.returncode == 0 and "registered drill:1" in retried.stdout, retried.stderr


def test_sqlite_read_only(loraops, make_run, sqlite_db, tmp_path):
    """Opened read-only (a read-only mount, or a file the user may not write): reading works, writing is one line."""
    read_only = f"sqlite:///file:{sqlite_db}?mode=ro&uri=true"
    listed, _ = loraops(read_only, "registry", "list")
    assert listed.returncode == 0 and "no adapters registered yet" in listed.stdout, listed.stderr
    done, _ = loraops(read_only, "register", "--adapter", str(make_run(tmp_path / "run", seed=1)), "--name", "drill")
    assert "is read-only (attempt to write a readonly database)" in one_error_line(done)
    assert_nothing_written(tmp_path)


def test_sqlite_path_that_cannot_be_opened(loraops, tmp_path):
    (tmp_path / "a-folder.db").mkdir()
    done, _ = loraops(f"sqlite:///{tmp_path / 'a-folder.db'}", "registry", "list")
    assert "cannot open the database" in one_error_line(done)
