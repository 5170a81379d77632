"""Health tells the truth while the registry database is down (issue #29 item 1): a Serve application with 2
model replicas on a PostgreSQL server of the test's own, which is stopped then started, and frozen (SIGSTOP)
then thawed. Meanwhile every replica says ``degraded`` with since when and what is served (``/healthz``,
``/v1/models``), ``?strict=true`` answers 503, summaries keep coming; after, every replica says ``ok`` again
and nothing in the registry changed. Replicas that start during the outage: with a recorded resolution they
serve within 30 s of the kill."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import httpx
import pytest

import helpers
from helpers import save_random_adapters, wait_until

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.reliability]

REPO = Path(__file__).resolve().parents[1]
ADAPTER = "tiny"
POLL_S = 1
#: The application's bounds on each database call, shorter than loraops' defaults (5 s connect, 5 s statements) so
#: that the frozen drill is short: its replicas see the outage after about 2 + 1 + 2 s instead of 12.
BOUNDS = "connect_timeout=2&options=-c%20statement_timeout%3D2000"
#: One request at a time here: an engine of few shapes, so that each replica start warms up less.
SMALL_ENGINE = ["args.max_batch_size=2", "args.length_buckets=[256]", "args.prefill_batch_size=1"]
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
            ["name=outage", f"args.workspace={home}", f"args.db_url={postgres.url}?{BOUNDS}", f"args.adapter={ADAPTER}@production",
             f"args.registry_poll_s={POLL_S}", "args.default_max_new_tokens=8", "deployments.SummarizerModel.num_replicas=2", *SMALL_ENGINE]
        )  # fmt: skip
        with httpx.Client(base_url=url, timeout=120) as client:
            yield client
    finally:
        helpers.remove_applications()


def health(http: httpx.Client) -> dict:
    return http.get("/healthz", timeout=30).json()


def problems(http: httpx.Client, seen: dict[str, str | None]) -> dict[str, str | None]:
    """``seen`` updated with what the replica that answers ``/v1/models`` says: replica id -> its problem (None: ok).
    Each call reaches one replica (Serve picks it), so repeated calls see every one."""
    model = http.get("/v1/models", timeout=30).json()["models"][0]
    seen[model["replica"]] = model["problem"]
    return seen


def every_replica(http: httpx.Client, says, what: str, timeout_s: float = 60) -> float:
    """Seconds until each of the 2 model replicas' latest answer satisfies ``says(problem)`` (polled, 0.2 s apart)."""
    seen: dict[str, str | None] = {}
    started = time.monotonic()
    wait_until(lambda: len(problems(http, seen)) == 2 and all(says(p) for p in seen.values()), timeout_s, what, 0.2, lambda: seen)
    return time.monotonic() - started


def outage_problem(problem: str | None) -> bool:
    return problem is not None and problem.startswith("registry unreachable since ") and "serving tiny:1 (" in problem


def audit(postgres) -> list[tuple]:
    from loraops.registry import Registry

    return [(e.action, e.from_version, e.to_version) for e in Registry(db_url=postgres.url).audit_log(ADAPTER)]


def assert_degraded_then_ok(http: httpx.Client, outage, recovery) -> None:
    """Start the outage: every replica degraded (with the reason) while it lasts, answers meanwhile; end it: every replica ok again."""
    every_replica(http, lambda p: p is None, "both replicas to say ok")
    outage()
    try:
        took = every_replica(http, outage_problem, "both replicas to say degraded")
        print(f"both replicas degraded {took:.1f} s after the outage began")
        body = health(http)
        assert body["status"] == "degraded" and body["problem"].startswith("registry unreachable since "), body
        assert "promotions and canary changes are not followed; serving tiny:1 (" in body["problem"], body
        assert http.get("/healthz", params={"strict": "true"}).status_code == 503
        answer = http.post("/v1/summarize", json={"dialogue": DIALOGUE})
        assert answer.status_code == 200 and answer.json()["model"] == {"name": ADAPTER, "version": 1}, answer.text
    finally:
        recovery()
    print(f"both replicas ok {every_replica(http, lambda p: p is None, 'both replicas to say ok again'):.1f} s after it ended")
    assert health(http)["status"] == "ok"


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
    """The model replicas' ids (their actors are ``SERVE_REPLICA::outage#SummarizerModel#ID``)."""
    import ray

    names = (a["name"] for a in ray.util.list_named_actors(all_namespaces=True))
    return sorted(name.rsplit("#", 1)[1] for name in names if name.startswith("SERVE_REPLICA::outage#SummarizerModel#"))


def kill_replica(replica: str) -> float:
    """Kill a model replica's actor; the monotonic time of the kill."""
    import ray

    ray.kill(ray.get_actor(f"SERVE_REPLICA::outage#SummarizerModel#{replica}", namespace="serve"), no_restart=True)
    return time.monotonic()


def test_a_replica_replaced_while_postgres_is_stopped_serves_what_was_last_resolved_within_30_s(http, postgres, home):
    """A model replica dies during the outage: its replacement starts from the resolution recorded beside the cache
    (files verified against the recorded checksums), serves within the issue's 30 s of the kill, says degraded,
    and catches up after. (A replica with no recorded resolution waits for the database instead:
    tests/test_registry_outage.py, on the constructor's own code; a Serve drill of it costs another replica start.)"""
    assert list((home / "cache" / "registry" / "resolved").glob("*.json")), "the running replicas recorded no resolution"
    before = wait_until(lambda: len(r := model_replicas()) == 2 and r, 30, "two model replicas")
    postgres.stop()
    try:
        killed = kill_replica(before[0])
        seen: dict[str, str | None] = {}
        new = lambda: [r for r, problem in problems(http, seen).items() if r not in before and outage_problem(problem)]  # noqa: E731
        wait_until(new, 60, "the replacement to answer, degraded", 0.2, lambda: seen)
        serving_after = time.monotonic() - killed
        print(f"the replacement answered (degraded) {serving_after:.1f} s after the kill")
        answer = http.post("/v1/summarize", json={"dialogue": DIALOGUE})
        assert answer.status_code == 200 and answer.json()["model"] == {"name": ADAPTER, "version": 1}, answer.text
        assert serving_after < 30, serving_after
    finally:
        postgres.start()
    every_replica(http, lambda p: p is None, "both replicas to say ok again")
