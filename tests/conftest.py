"""Shared fixtures. Every test gets its own workspace (LORAOPS_HOME), except the tiny model, which
is built once per session into a shared workspace and copied, because building it is the slow part."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DIALOGSUM = REPO.parent / "shared" / "data" / "dialogsum" / "dialogsum.dev.jsonl"


@pytest.fixture(scope="session")
def tiny_model_home(tmp_path_factory) -> Path:
    """A workspace holding the built tiny model (built once per test session)."""
    from loraops.tiny_model import ensure_tiny_model

    home = tmp_path_factory.mktemp("tiny-home")
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
