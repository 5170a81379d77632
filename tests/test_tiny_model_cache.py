"""The tiny model is built once per machine (a cache keyed by its recipe) and copied into each workspace."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from loraops.training import tiny_model


def _fake_cached_model(cache_root: Path) -> Path:
    """What a finished build leaves in the machine cache (a config file marks it complete)."""
    folder = cache_root / "loraops" / "tiny-phi" / tiny_model.recipe_key()
    folder.mkdir(parents=True)
    (folder / "config.json").write_text('{"model_type": "phi"}')
    (folder / "model.safetensors").write_bytes(b"weights")
    return folder


def test_a_workspace_gets_a_copy_of_the_machine_cache_without_a_build(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    cached = _fake_cached_model(tmp_path / "cache")
    assert tiny_model.machine_cache_dir() == cached

    def no_build(folder):
        raise AssertionError("the model was built although the machine cache holds it")

    monkeypatch.setattr(tiny_model, "build_tiny_model", no_build)
    first = tiny_model.ensure_tiny_model(tmp_path / "ws1")
    second = tiny_model.ensure_tiny_model(tmp_path / "ws2")
    for target in (first, second):
        assert (target / "model.safetensors").read_bytes() == b"weights"
    assert first != second and not first.is_symlink()  # copies: a workspace may be changed or deleted alone
    assert not [p for p in first.parent.iterdir() if p.name.startswith(".")]  # no staging folder left behind


def test_an_empty_cache_is_built_once_and_then_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    builds = []

    def counting_build(folder):
        builds.append(folder)
        (Path(folder) / "config.json").write_text("{}")

    monkeypatch.setattr(tiny_model, "build_tiny_model", counting_build)
    tiny_model.ensure_tiny_model(tmp_path / "ws1")
    tiny_model.ensure_tiny_model(tmp_path / "ws2")
    assert len(builds) == 1
    assert (tiny_model.machine_cache_dir() / "config.json").is_file()


def test_a_second_process_waits_for_the_build_under_way_instead_of_building_again(tmp_path, monkeypatch, caplog):
    """Two builders at once (two test workers, two trials): one builds, the other waits on the lock and copies."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    builds, building, release = [], threading.Event(), threading.Event()

    def held_build(folder):
        builds.append(folder)
        building.set()
        assert release.wait(30)
        (Path(folder) / "config.json").write_text("{}")

    monkeypatch.setattr(tiny_model, "build_tiny_model", held_build)
    caplog.set_level(logging.INFO, logger=tiny_model.log.name)
    # flock locks belong to open files, not processes: two threads contend exactly as two processes do
    first = threading.Thread(target=tiny_model.ensure_tiny_model, args=(tmp_path / "ws1",))
    second = threading.Thread(target=tiny_model.ensure_tiny_model, args=(tmp_path / "ws2",))
    first.start()
    assert building.wait(30)
    second.start()
    deadline = time.monotonic() + 30
    while not any("waiting for another process" in record.getMessage() for record in caplog.records):
        assert time.monotonic() < deadline, "the second builder did not wait for the first"
        time.sleep(0.01)
    release.set()
    first.join(30)
    second.join(30)
    assert len(builds) == 1
    assert all((tiny_model.tiny_model_dir(tmp_path / ws) / "config.json").is_file() for ws in ("ws1", "ws2"))


def test_the_recipe_key_changes_with_the_library_versions(monkeypatch):
    before = tiny_model.recipe_key()
    monkeypatch.setattr(tiny_model, "version", lambda package: "0.0-other")
    assert tiny_model.recipe_key() != before
