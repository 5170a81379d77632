"""Health tells the truth while the registry database is down (issue #29 item 1): a Serve application on
a PostgreSQL server of the test's own, which is stopped then started, and frozen (SIGSTOP) then thawed.
Meanwhile ``/healthz`` says ``degraded`` with since when and what is served, ``/v1/models`` shows it,
``?strict=true`` answers 503, summaries keep coming; after, ``ok`` again and nothing in the registry changed."""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import pytest

import helpers
from helpers import save_random_adapters, wait_until

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.reliability]

REPO = Path(__file__).resolve().parents[1]
ADAPTER = "tiny"
POLL_S = 1
DIALOGUE = "#Person1#: Hi, I'd like to book a table for two tonight.\n#Person2#: Sure, what time?\n#Person1#: Eight, please."


@pytest.fixture(scope="module")
def home(tmp_path_factory, tiny_model_home, postgres) -> Path:
    """A workspace with the tiny model; tiny:1 and tiny:2 registered on the server, production -> 1."""
    from loraops.config import load_config
    from loraops.registry import Lineage, Registry

    workspace = tmp_path_factory.mktemp("outage-home")
    shutil.copytree(tiny_model_home / "models", workspace / "models")
    config = load_config(REPO / "tune" / "tiny.yaml", [f"workspace={workspace}"])
    registry = Registry(db_url=postgres.url, workspace=workspace)
    for folder in save_random_adapters(config, workspace / "adapters", 2):
        registry.register(folder, ADAPTER, lineage=Lineage(config=config.model_dump(mode="json")))
    registry.promote(ADAPTER, 1)
    return workspace


@pytest.fixture(scope="module")
def http(deploy_tiny_app, home, postgres):

    try:
        url = deploy_tiny_app(
            ["name=outage", f"args.workspace={home}", f"args.db_url={postgres.url}", f"args.adapter={ADAPTER}@production",
             f"args.registry_poll_s={POLL_S}", "args.default_max_new_tokens=8"]
        )  # fmt: skip
        with httpx.Client(base_url=url, timeout=120) as client:
            yield client
    finally:
        helpers.remove_applications()


def health(http: httpx.Client) -> dict:
    return http.get("/healthz", timeout=30).json()


def audit(postgres) -> list[tuple]:
    from loraops.registry import Registry

    return [(e.action, e.from_version, e.to_version) for e in Registry(db_url=postgres.url).audit_log(ADAPTER)]


def assert_degraded_then_ok(http: httpx.Client, outage, recovery) -> None:
    """Start the outage: degraded (with the reason) while it lasts, answers meanwhile; end it: ok again."""
    assert health(http)["status"] == "ok"
    outage()
    try:
        body = wait_until(lambda: (b := health(http))["status"] == "degraded" and b, 60, "/healthz to say degraded", 0.5, lambda: health(http))
        assert body["problem"].startswith("registry unreachable since "), body
        assert "promotions and canary changes are not followed; serving tiny:1 (" in body["problem"], body
        assert http.get("/healthz", params={"strict": "true"}).status_code == 503
        models = http.get("/v1/models").json()
        assert models["models"][0]["problem"].startswith("registry unreachable since "), models
        answer = http.post("/v1/summarize", json={"dialogue": DIALOGUE})
        assert answer.status_code == 200 and answer.json()["model"] == {"name": ADAPTER, "version": 1}, answer.text
    finally:
        recovery()
    wait_until(lambda: health(http)["status"] == "ok", 60, "/healthz to say ok again", 0.5, lambda: health(http))


def test_postgres_stopped_then_started(http, postgres):
    before = audit(postgres)
    assert_degraded_then_ok(http, postgres.stop, postgres.start)
    assert audit(postgres) == before


def test_postgres_frozen_then_thawed(http, postgres):
    """SIGSTOP keeps the replica's connections open with nothing answering: only the bound on each call turns it into a failure."""
    before = audit(postgres)
    assert_degraded_then_ok(http, postgres.freeze, postgres.thaw)
    assert audit(postgres) == before


def model_replicas() -> list[str]:
    import ray

    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith("SERVE_REPLICA::outage#SummarizerModel#"))


def test_a_replica_replaced_while_postgres_is_stopped_serves_what_was_last_resolved(http, postgres, home):
    """The only model replica dies during the outage: its replacement starts from the resolution recorded beside
    the cache (files verified against the recorded checksums), serves, says degraded, and catches up after."""
    import ray

    records = list((home / "cache" / "registry" / "resolved").glob("*.json"))
    assert records, "the running replica recorded no resolution"
    victim = wait_until(model_replicas, 30, "the model replica's actor")[0]
    postgres.stop()
    try:
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        wait_until(lambda: model_replicas() not in ([], [victim]), 60, "a replacement replica", 0.5, model_replicas)
        body = wait_until(lambda: (b := health(http)).get("status") == "degraded" and b, 120, "the replacement to answer", 1.0, lambda: health(http))
        assert body["problem"].startswith("registry unreachable since ") and "serving tiny:1" in body["problem"], body
        answer = http.post("/v1/summarize", json={"dialogue": DIALOGUE})
        assert answer.status_code == 200 and answer.json()["model"] == {"name": ADAPTER, "version": 1}, answer.text
        assert model_replicas() != [victim]
    finally:
        postgres.start()
    wait_until(lambda: health(http).get("status") == "ok", 60, "/healthz to say ok again", 0.5, lambda: health(http))
