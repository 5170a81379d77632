"""A canary on a live Serve application: the session's local Ray, the tiny model, the ``serving_home``
registry (``tiny`` v1 in production, v2 the candidate), real HTTP, the real ``loraops canary`` CLI (its
``main``, in this process: test_cli runs the console entry point).

The share of requests, the figures ``canary status`` reads, promote and abort, the state surviving
the replicas' restart, and the per-version Ray metrics on Ray's Prometheus endpoint.
"""

from __future__ import annotations

import collections
import json
import subprocess
from pathlib import Path

import httpx
import pytest

import helpers
from helpers import run_main, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.ray]

DIALOGUE = "#Person1#: Is the shop open on Sunday?\n#Person2#: Yes, from ten until four."
REQUESTS = 100
PERCENT = 30.0


@pytest.fixture(scope="module")
def registry(serving_home):
    from loraops.registry import Registry

    registry = Registry(workspace=serving_home)
    yield registry
    # Leave the shared registry as the other serving tests expect it: no canary, v1 in production.
    if registry.canary("tiny") is not None:
        registry.abort_canary("tiny", reason="test cleanup")
    if registry.get("tiny@production").version != 1:
        registry.promote("tiny", 1, reason="test cleanup")


@pytest.fixture(scope="module")
def url(deploy_tiny_app, serving_home, registry):

    try:
        yield deploy_tiny_app(
            [
                f"args.workspace={serving_home}",
                "args.registry_poll_s=1",
                "args.auth_token_env=LORAOPS_TEST_NO_TOKEN",
            ]
        )
    finally:
        helpers.remove_applications()


def _cli(cli_env, home: Path, *args: str) -> subprocess.CompletedProcess:
    return run_main(*args, env=cli_env(home))


def _versions(http: httpx.Client, ids: list[str]) -> dict[str, int]:
    """Which version answered each request id (short answers: the share is what is measured), 8 requests at a time
    (the version is chosen per request id, so concurrency changes nothing but the time)."""
    from concurrent.futures import ThreadPoolExecutor

    def version(request_id: str) -> int:
        response = http.post("/v1/summarize", json={"dialogue": DIALOGUE, "max_new_tokens": 4}, headers={"X-Request-Id": request_id})
        assert response.status_code == 200, response.text
        return response.json()["model"]["version"]

    with ThreadPoolExecutor(8) as pool:
        return dict(zip(ids, pool.map(version, ids), strict=True))


def _serving(http: httpx.Client, canary_running: bool, candidate_loaded: bool) -> bool:
    body = http.get("/v1/models").json()
    loaded = {adapter["ref"] for adapter in body["models"][0].get("adapters", [])}
    return (("canary" in body) == canary_running) and (("tiny:2" in loaded) == candidate_loaded)


def _restart_replicas() -> int:
    """Kill every replica of the application; Serve starts new ones (the canary must come back from the registry). Returns how many."""
    import ray

    killed = 0
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if "SERVE_REPLICA" in actor["name"] and ("SummarizerModel" in actor["name"] or "SummarizerAPI" in actor["name"]):
            ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=True)
            killed += 1
    return killed


def test_canary_share_status_restart_abort_and_promote(url, registry, serving_home, cli_env):
    from loraops.serve.canary import bucket

    ids = [f"canary-test-{i}" for i in range(REQUESTS)]
    http = httpx.Client(base_url=url, timeout=120)
    started = _cli(cli_env, serving_home, "canary", "start", "tiny:2", "--percent", str(PERCENT), "--reason", "test")
    assert started.returncode == 0, started.stderr
    canary = registry.canary("tiny")
    wait_until(lambda: _serving(http, canary_running=True, candidate_loaded=True), 60, "the replicas to load the candidate", 0.5)

    answered = _versions(http, ids)
    to_candidate = {i for i in ids if bucket(canary.id, i) < PERCENT}
    assert 20 <= len(to_candidate) <= 40
    assert {i for i, version in answered.items() if version == 2} == to_candidate  # deterministic per request id
    assert _versions(http, ids[:20]) == {i: answered[i] for i in ids[:20]}  # a retry lands on the same version

    sent = collections.Counter(answered.values()) + collections.Counter(answered[i] for i in ids[:20])

    def counted() -> dict[int, int]:
        status = registry.canary_status("tiny")
        return {status.baseline.version: status.baseline.requests, status.candidate.version: status.candidate.requests}

    wait_until(lambda: counted() == dict(sent), 60, f"canary status to count {dict(sent)}", 0.5)
    shown = _cli(cli_env, serving_home, "canary", "status", "tiny", "--json")
    assert shown.returncode == 0, shown.stderr
    versions = {entry["version"]: entry for entry in json.loads(shown.stdout)["versions"]}
    assert versions[2]["requests"] == sent[2] and versions[1]["requests"] == sent[1] and versions[2]["errors"] == 0
    assert versions[2]["p50_s"] > 0 and versions[2]["mean_completion_tokens"] > 0

    replica = http.get("/v1/models").json()["models"][0]["replica"]
    assert _restart_replicas() == 2  # the state lives in the registry: new replicas pick it up
    wait_until(lambda: _alive(http) and _serving(http, canary_running=True, candidate_loaded=True), 60, "new replicas with the canary", 0.5)
    assert http.get("/v1/models").json()["models"][0]["replica"] != replica
    assert _versions(http, ids) == answered

    _metrics_show_versions({1, 2})

    aborted = _cli(cli_env, serving_home, "canary", "abort", "tiny", "--reason", "test abort")
    assert aborted.returncode == 0, aborted.stderr
    wait_until(lambda: _serving(http, canary_running=False, candidate_loaded=False), 60, "the replicas to drop the candidate", 0.5)
    assert set(_versions(http, ids[:30]).values()) == {1}
    assert registry.get("tiny@production").version == 1

    assert _cli(cli_env, serving_home, "canary", "start", "tiny:2", "--percent", "50").returncode == 0
    promoted = _cli(cli_env, serving_home, "canary", "promote", "tiny", "--force")  # no request reached it yet
    assert promoted.returncode == 0, promoted.stderr
    assert registry.get("tiny@production").version == 2
    assert registry.audit_log("tiny", "production")[-1].action == "canary-promote"
    wait_until(lambda: set(_versions(http, ids[:10]).values()) == {2}, 60, "every request to go to the promoted version", 0.5)


def _alive(http: httpx.Client) -> bool:
    try:
        return http.get("/healthz", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def _metrics_show_versions(versions: set[int]) -> None:
    """Ray's Prometheus endpoint carries loraops_requests_total per version (exported every few seconds)."""
    import ray

    port = ray._private.worker.global_worker.node.metrics_export_port

    def exported() -> bool:
        try:
            text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        except httpx.HTTPError:
            return False
        lines = [line for line in text.splitlines() if line.startswith("ray_loraops_requests_total{")]
        return all(any(f'version="{v}"' in line and 'adapter="tiny"' in line for line in lines) for v in versions)

    wait_until(exported, 90, "Ray's metrics endpoint to export loraops_requests_total per version", 0.5)
