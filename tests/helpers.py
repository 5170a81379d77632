"""Helpers shared by the test files (plain functions; the fixtures are in conftest.py).

Importable as ``helpers`` because pyproject puts tests/ on pytest's ``pythonpath``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def free_ports(count: int) -> list[int]:
    """``count`` distinct local TCP ports nothing listens on now (all bound at once, so they differ)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def free_port() -> int:
    """A local TCP port nothing listens on now (a connection to it is refused)."""
    return free_ports(1)[0]


def run_cli(*args: str, env: Mapping[str, str] | None = None, cwd: str | Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """``python -m loraops ARGS`` in a subprocess, its output captured as text."""
    command = [sys.executable, "-m", "loraops", *args]
    return subprocess.run(command, capture_output=True, text=True, env=dict(env) if env is not None else None, cwd=cwd, timeout=timeout)


#: The loggers whose handlers, propagation or level a command changes (loraops.console, quiet_http_log): restored after run_main.
_COMMAND_LOGGERS = ("", "ray", "ray.serve", "optuna", "transformers", "httpx")


def run_main(*args: str, env: Mapping[str, str], cwd: str | Path | None = None) -> subprocess.CompletedProcess:
    """``loraops ARGS`` in this process through :func:`loraops.cli.main`, as :func:`run_cli` runs it in a
    subprocess: environment ``env`` (the whole of it) and folder ``cwd`` for the call, stdout, stderr and
    the exit code captured. Far cheaper than a subprocess, which pays the imports of Python and the
    libraries each time; the subprocess tests keep the console entry point itself covered. What a
    command changes in the process's logging (loraops.console) is put back afterwards."""
    import contextlib
    import io
    import logging

    from loraops.cli import main

    stdout, stderr = io.StringIO(), io.StringIO()
    saved_env, saved_cwd = dict(os.environ), os.getcwd()
    loggers = {name: logging.getLogger(name) for name in _COMMAND_LOGGERS}
    saved_loggers = {name: (list(logger.handlers), logger.propagate, logger.level) for name, logger in loggers.items()}
    capturing_warnings = logging._warnings_showwarning is not None  # logging's own record of captureWarnings
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd or saved_cwd)
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                code = main(list(args))
            except SystemExit as exc:  # argparse's errors and --help
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    finally:
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
        for name, logger in loggers.items():
            handlers, propagate, level = saved_loggers[name]
            for handler in [h for h in logger.handlers if h not in handlers]:  # they write to the StringIO above, or a log file
                handler.close()
            logger.handlers[:] = handlers
            logger.propagate, logger.level = propagate, level
        logging.captureWarnings(capturing_warnings)
    return subprocess.CompletedProcess(["loraops", *args], code, stdout.getvalue(), stderr.getvalue())


def forbid_ray(monkeypatch) -> None:
    """Make connecting to Ray fail in this process (``loraops.cluster.connect`` and ``ray.init`` raise), for
    run_main tests of commands that must not start Ray: here the session's instance may already run, and
    a command would use it rather than start one, so "no Ray started" could not be seen otherwise."""
    import ray

    from loraops import cluster

    def tripwire(*_args, **_kwargs):
        raise AssertionError("the command connected to Ray")

    monkeypatch.setattr(cluster, "connect", tripwire)
    monkeypatch.setattr(ray, "init", tripwire)


def cli_env(home: Path) -> dict[str, str]:
    """The environment of a ``loraops`` subprocess working in workspace ``home``."""
    # The workspace decides where the registry is: a developer's own settings must not leak in.
    env = {key: value for key, value in os.environ.items() if key not in ("LORAOPS_DATABASE_URL", "LORAOPS_ARTIFACT_URI")}
    env["LORAOPS_HOME"] = str(home)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def wait_until(condition: Callable[[], T], timeout_s: float, what: str, interval_s: float = 0.05, detail: Callable[[], Any] | None = None) -> T:
    """Poll ``condition`` until it returns something true (returned) or ``timeout_s`` passes (AssertionError naming ``what``).

    ``detail``, if given, is called on a timeout and its value added to the message (the state that did not come)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            extra = f"; {detail()}" if detail is not None else ""
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}{extra}")
        time.sleep(interval_s)


def wait_for_the_ingress_canary(models: Callable[[], dict], canary_id: int, timeout_s: float = 60) -> None:
    """Until ``models()`` (a ``/v1/models`` body) shows the ingress's view of canary ``canary_id``. The ingress routes
    and counts by the canary it read at its own registry poll, apart from the model replicas' polls: requests it
    answered before reading this one are not counted."""
    wait_until(lambda: (models().get("canary") or {}).get("id") == canary_id, timeout_s, "the ingress to read the canary", 0.2)


def elapsed_until(condition: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.25, detail: Callable[[], Any] | None = None) -> float:
    """Seconds until ``condition`` held (see :func:`wait_until`)."""
    started = time.monotonic()
    wait_until(condition, timeout_s, what, interval_s, detail)
    return time.monotonic() - started


def s3_objects(server, prefix: str) -> dict[str, bytes]:
    """Every object under ``bucket/prefix`` of an S3 server (``s3_server.S3Server``) with its bytes, read with the server's own credentials."""
    import pyarrow.fs as pafs

    filesystem = server.filesystem()
    infos = filesystem.get_file_info(pafs.FileSelector(f"{server.bucket}/{prefix}", recursive=True, allow_not_found=True))
    found = {}
    for info in infos:
        if info.type == pafs.FileType.File:
            with filesystem.open_input_stream(info.path) as stream:
                found[info.path] = stream.read()
    return found


def save_random_adapters(config, folder: Path, count: int) -> list[Path]:
    """``count`` LoRA adapters for ``config``'s base model under ``folder``, each with its own random lora_B
    (so their outputs differ): versions to register without training."""
    import torch
    from peft import get_peft_model

    from loraops.training.model import load_base_model, lora_config

    model = get_peft_model(load_base_model(config), lora_config(config.lora))
    folders = []
    for index in range(count):
        generator = torch.Generator().manual_seed(index)
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "lora_B" in name:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
        target = folder / f"a{index + 1}"
        model.save_pretrained(target)
        folders.append(target)
    return folders


def serve_actors() -> list[str]:
    """Serve's controller and proxies alive in the connected Ray instance."""
    import ray

    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(("SERVE_CONTROLLER_ACTOR", "SERVE_PROXY_ACTOR")))


def serve_is_running() -> bool:
    import ray

    return any(a["name"] == "SERVE_CONTROLLER_ACTOR" for a in ray.util.list_named_actors(all_namespaces=True))


def start_serve(port: int) -> None:
    """Serve on 127.0.0.1:``port``: the session's instance when it runs (modules share it and remove only their
    applications, see :func:`remove_applications`: a controller and proxy start cost seconds per module), else a
    new one once a previous one has exited: a Serve started while an earlier ``serve.shutdown()`` is still
    draining has its new proxy killed by the old controller (seen in CI)."""
    from ray import serve

    if serve_is_running():
        return
    wait_until(lambda: not serve_actors(), 120, "the previous Serve controller and proxies to exit", 0.5, serve_actors)
    serve.start(http_options={"host": "127.0.0.1", "port": port})


def remove_applications() -> None:
    """Delete every Serve application and wait until each is gone (its replicas exit, the CPUs go back to the
    other tests); the controller and proxy stay for the next module."""
    from ray import serve

    for name in list(serve.status().applications):
        serve.delete(name)


def stop_serve() -> None:
    """Shut Serve down and wait until its controller and proxies have exited (for a test that needs none running)."""
    from ray import serve

    serve.shutdown()
    wait_until(lambda: not serve_actors(), 120, "Serve's controller and proxies to exit", 0.5, serve_actors)
