"""Liveness in ``canary status`` (issue #29 item 6): each model replica's row carries a heartbeat (its last
poll and its poll interval); a replica not seen for a few poll intervals is shown as gone, is not counted as
loaded, and does not keep the automatic abort from seeing that every replica still present failed."""

from __future__ import annotations

from datetime import timedelta

import pytest

from helpers import cli_env, run_cli
from loraops.registry import Registry
from loraops.registry import db as registry_db
from loraops.registry.canary import GONE_AFTER_MIN_S, MISSED, Totals, judge, status

NAME = "hb"
POLL_S = 1.0


@pytest.fixture
def registry(db_url, make_run, tmp_path) -> Registry:
    """Two versions of ``hb``, production -> v1, and a canary of v2 that needs 4 requests."""
    registry = Registry(db_url=db_url, artifact_uri=str(tmp_path / "store"), workspace=tmp_path / "ws")
    for seed in (1, 2):
        registry.register(make_run(tmp_path / f"run{seed}", seed=seed), NAME)
    registry.promote(NAME, 1)
    registry.start_canary(f"{NAME}:2", 50, min_requests=4)
    return registry


def read_status(registry: Registry, now):
    with registry_db.read_session(registry.engine) as session:
        return status(session, NAME, now=now)


def test_a_replica_without_heartbeat_is_gone_and_not_loaded(registry, tmp_path):
    canary_id = registry.canary(NAME).id
    registry.record_canary_load(canary_id, "alive", None, POLL_S)
    registry.record_canary_load(canary_id, "failing", "boom", POLL_S)
    first = {r.replica: r for r in registry.canary_status(NAME).replicas}
    assert first["alive"].loaded and not first["alive"].gone and first["alive"].seen_at is not None
    assert not first["failing"].loaded and first["failing"].attempts == 1

    # A heartbeat moves only the time last seen: not the state, its time, or the count of failed tries.
    registry.record_canary_load(canary_id, "failing", "boom", POLL_S, beat=True)
    registry.record_canary_load(canary_id, "alive", None, POLL_S, beat=True)
    beaten = {r.replica: r for r in registry.canary_status(NAME).replicas}
    assert beaten["failing"].attempts == 1 and beaten["failing"].updated_at == first["failing"].updated_at
    assert beaten["alive"].seen_at > first["alive"].seen_at and beaten["alive"].updated_at == first["alive"].updated_at

    later = read_status(registry, beaten["alive"].seen_at + timedelta(seconds=GONE_AFTER_MIN_S + 1))
    assert sorted((r.replica, r.gone, r.loaded) for r in later.replicas) == [("alive", True, False), ("failing", True, False)]
    assert [r["loaded"] for r in later.to_dict()["replicas"]] == [False, False]

    env = cli_env(tmp_path / "ws")
    env["LORAOPS_DATABASE_URL"], env["LORAOPS_ARTIFACT_URI"] = registry.db_url, registry.artifact_uri
    with registry_db.write_transaction(registry.engine) as session:  # "alive" died a minute ago: its heartbeat stopped then
        row = session.get(registry_db.CanaryLoadRow, (canary_id, "alive"))
        row.seen_at = registry_db.utcnow() - timedelta(seconds=60)
    shown = run_cli("canary", "status", NAME, env=env, cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    line = next(line for line in shown.stdout.splitlines() if line.startswith("alive "))
    assert line.split()[1] == "gone", shown.stdout


def test_a_dead_replica_that_had_loaded_does_not_hold_off_the_automatic_abort(registry):
    """The one replica that loaded the candidate died; the one still polling cannot load it: no replica present
    can serve the candidate, so the split's requests for it (answered by the baseline) abort the canary."""
    canary_id = registry.canary(NAME).id
    registry.record_canary_load(canary_id, "dead", None, POLL_S)
    registry.record_canary_load(canary_id, "alive", "cannot load", POLL_S)
    registry.record_canary_stats(canary_id, f"api{MISSED}", 1, Totals(requests=4))
    alive_seen = {r.replica: r for r in registry.canary_status(NAME).replicas}["alive"].seen_at
    with registry_db.write_transaction(registry.engine) as session:
        session.get(registry_db.CanaryLoadRow, (canary_id, "dead")).seen_at = alive_seen - timedelta(seconds=GONE_AFTER_MIN_S + 5)
    now = read_status(registry, alive_seen + timedelta(seconds=1))
    assert [(r.replica, r.gone) for r in now.replicas if r.replica == "dead"] == [("dead", True)]
    reason = judge(now)
    assert reason is not None and reason.startswith("candidate v2 could not be loaded by any replica"), reason
