"""Shared fixtures. Every test gets its own workspace (LORAOPS_HOME), except the tiny model, which
is built once per session into a shared workspace and copied, because building it is the slow part."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DIALOGSUM = REPO.parent / "shared" / "data" / "dialogsum" / "dialogsum.dev.jsonl"


def _tiny_model_key() -> str:
    """Changes whenever the code that builds the tiny model (or its corpus) changes."""
    import hashlib

    import loraops.builtin_data
    import loraops.tiny_model

    digest = hashlib.sha256()
    for module in (loraops.tiny_model, loraops.builtin_data):
        digest.update(Path(module.__file__).read_bytes())
    return digest.hexdigest()[:16]


@pytest.fixture(scope="session")
def tiny_model_home() -> Path:
    """A workspace holding the built tiny model.

    Building it (tokenizer + a short pre-training) takes a minute or two, so it is cached in the
    git-ignored ``.loraops/test-cache/<key>`` and rebuilt only when its code changes.
    """
    from loraops.tiny_model import ensure_tiny_model

    home = REPO / ".loraops" / "test-cache" / _tiny_model_key()
    ensure_tiny_model(home)
    return home


@pytest.fixture
def workspace(tmp_path, tiny_model_home, monkeypatch) -> Path:
    """A fresh workspace for one test, with the tiny model already in it."""
    home = tmp_path / "ws"
    shutil.copytree(tiny_model_home / "models", home / "models")
    monkeypatch.setenv("LORAOPS_HOME", str(home))
    return home


def cli_env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["LORAOPS_HOME"] = str(home)
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.fixture(scope="session")
def ray_address():
    """One real local Ray instance for the whole test session, sized for CI's 2 cores.

    Yields its address, so CLI subprocesses can join it through RAY_ADDRESS. Always shut down.
    """
    import ray

    context = ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
        object_store_memory=200 * 1024 * 1024,
    )
    try:
        yield context.address_info["gcs_address"]
    finally:
        ray.shutdown()
