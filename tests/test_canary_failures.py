"""A canary whose candidate cannot load, on a live Serve application: the session's local Ray, two model
replicas, a registry of its own (``tiny`` v1..3, their training config naming the base model by its
local folder), the candidate's file corrupted on disk behind the registry's back, replicas killed.

What an operator reads (``loraops canary status``, ``/healthz``, ``/v1/models``), the retry once the
file is restored, requests that name a version counted apart, and the automatic abort when no
replica can load the candidate.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import pytest

import helpers
from helpers import run_main, save_random_adapters, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.ray]

REPO = Path(__file__).resolve().parents[1]
NAME = "tiny"
APP = "canary-failures"
DIALOGUE = "#Person1#: Is the shop open on Sunday?\n#Person2#: Yes, from ten until four."


@pytest.fixture(scope="module")
def home(tmp_path_factory, tiny_model_home) -> Path:
    """tiny:1..3 registered with a training config whose base model is a local folder; production -> 1."""
    from loraops.config import load_config
    from loraops.registry import Lineage, Registry

    workspace = tmp_path_factory.mktemp("canary-failures-home")
    shutil.copytree(tiny_model_home / "models", workspace / "models")
    local = workspace / "models" / "tiny-phi"
    assert (local / "config.json").is_file()
    config = load_config(REPO / "tune" / "tiny.yaml", [f"workspace={workspace}", f"model.name={local}"]).model_dump(mode="json")
    registry = Registry(workspace=workspace)
    for folder in save_random_adapters(load_config(REPO / "tune" / "tiny.yaml", [f"workspace={workspace}"]), workspace / "adapters", 3):
        registry.register(folder, NAME, lineage=Lineage(config=config))
    registry.promote(NAME, 1)
    return workspace


@pytest.fixture(scope="module")
def url(deploy_tiny_app, home):

    try:
        yield deploy_tiny_app(
            [
                f"name={APP}",
                f"args.workspace={home}",
                "args.registry_poll_s=1",
                "args.auth_token_env=LORAOPS_TEST_NO_TOKEN",
                "deployments.SummarizerModel.num_replicas=2",
            ]
        )
    finally:
        helpers.remove_applications()


@pytest.fixture(scope="module")
def http(url):
    with httpx.Client(base_url=url, timeout=120) as client:
        yield client


@pytest.fixture(autouse=True)
def no_canary_left(home):
    """A test that fails with its canary running aborts it, so the next test can start its own."""
    yield
    from loraops.registry import Registry

    registry = Registry(workspace=home)
    if registry.canary(NAME) is not None:
        registry.abort_canary(NAME, actor="test", reason="left running by a failed test")


def _artifact(home: Path, version: int) -> Path:
    return home / "registry" / NAME / f"v{version}" / "adapter_model.safetensors"


def _flip_a_byte(path: Path) -> bytes:
    original = path.read_bytes()
    data = bytearray(original)
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    return original


def _start_unchecked(home: Path, version: int, percent: float, min_requests: int):
    """Start a canary the way a start that raced the corruption would: its files are not verified."""
    from loraops.registry import Registry, canary
    from loraops.registry import db as registry_db

    registry = Registry(workspace=home)
    return registry_db.run_write(registry.engine, lambda s: canary.start(s, NAME, version, "production", percent, 0.05, min_requests, "test", "drill"))


def _model_replicas() -> list[str]:
    import ray

    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(f"SERVE_REPLICA::{APP}#SummarizerModel#"))


def _answered(http: httpx.Client, ids: list[str], model: str | None = None) -> dict[str, int]:
    answered = {}
    for request_id in ids:
        body = {"dialogue": DIALOGUE, "max_new_tokens": 2} | ({"model": model} if model else {})
        response = http.post("/v1/summarize", json=body, headers={"X-Request-Id": request_id})
        assert response.status_code == 200, response.text
        answered[request_id] = response.json()["model"]["version"]
    return answered


def test_models_shows_no_path_for_a_local_base_model(http, home):
    text = http.get("/v1/models").text
    assert str(home) not in text and "/models/" not in text
    assert http.get("/v1/models").json()["models"][0]["base_model"] == "local:tiny-phi"


def test_a_candidate_that_cannot_load_is_reported_retried_and_then_served(http, home, cli_env):
    from loraops.registry import Registry
    from loraops.serve.canary import bucket

    registry = Registry(workspace=home)
    original = _flip_a_byte(_artifact(home, 3))
    try:
        canary = _start_unchecked(home, 3, 50, min_requests=1000)  # a high bar: this canary must not be aborted

        def all_failed():
            replicas = registry.canary_status(NAME).replicas
            return len(replicas) == 2 and all(r.error for r in replicas)

        wait_until(all_failed, 120, "both replicas to report the candidate failed", 0.5)
        helpers.wait_for_the_ingress_canary(lambda: http.get("/v1/models").json(), canary.id, 30)
        shown = run_main("canary", "status", NAME, env=cli_env(home))
        print(f"\n$ loraops canary status {NAME}\n{shown.stdout}")
        assert shown.returncode == 0, shown.stderr
        assert "FAILED" in shown.stdout and "checksum" in shown.stdout.lower()

        health = http.get("/healthz")
        print(f"$ curl -s localhost:8000/healthz\n{health.text}")
        assert health.status_code == 200 and health.json()["status"] == "degraded"
        assert "cannot serve the canary candidate tiny:3" in health.json()["problem"]
        assert http.get("/healthz", params={"strict": "true"}).status_code == 503
        models = http.get("/v1/models")
        assert models.json()["models"][0]["canary"]["loaded"] is False and "tiny:3" in models.json()["models"][0]["problem"]
        assert str(home) not in models.text and str(home) not in health.text

        ids = [f"fail-{i}" for i in range(16)]
        assert set(_answered(http, ids).values()) == {1}  # the candidate's share goes to the baseline meanwhile
        _answered(http, ids[:3], model="tiny@production")  # named: counted apart
        _answered(http, ids[:2], model="tiny:1")
        to_candidate = sum(bucket(canary.id, i) < 50 for i in ids)

        def figures() -> tuple:
            status = registry.canary_status(NAME)
            named = {v.version: v.requests for v in status.named}
            return status.baseline.requests, status.candidate.requests, status.missed, named.get(1)

        wait_until(
            lambda: figures() == (16, 0, to_candidate, 5), 30, "the split's 16 requests, the missed ones and the 5 named ones to be counted apart",
            0.5, lambda: f"(baseline, candidate, missed, named v1) = {figures()}",
        )  # fmt: skip
        assert registry.canary(NAME) is not None
    finally:
        _artifact(home, 3).write_bytes(original)

    wait_until(lambda: all(r.error is None for r in registry.canary_status(NAME).replicas), 90, "both replicas to load the restored candidate", 0.5)
    answered = _answered(http, [f"ok-{i}" for i in range(16)])
    assert {i for i, v in answered.items() if v == 3} == {i for i in answered if bucket(canary.id, i) < 50}
    health = http.get("/healthz", params={"strict": "true"})
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert run_main("canary", "abort", NAME, env=cli_env(home)).returncode == 0


def test_a_candidate_no_replica_loads_after_a_restart_is_aborted_automatically(http, home, cli_env):
    import ray

    from loraops.registry import Registry

    registry = Registry(workspace=home)
    original = _flip_a_byte(_artifact(home, 3))
    try:
        killed = _model_replicas()
        canary = _start_unchecked(home, 3, 50, min_requests=6)
        for name in killed:
            ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)

        def replacements_failed():
            fresh = [r for r in registry.canary_status(NAME).replicas if not any(r.replica in name for name in killed)]
            return len(fresh) == 2 and all(r.error for r in fresh)

        wait_until(replacements_failed, 240, "the replacement replicas to report that they cannot load the candidate", 0.5)
        def degraded():
            health = http.get("/healthz")
            return health.status_code == 200 and health.json()["status"] == "degraded" and "tiny:3" in health.json()["problem"]

        wait_until(degraded, 180, "a replacement replica to answer /healthz as degraded, naming the candidate", 0.5)

        sent = 0
        while registry.canary(NAME) is not None and sent < 200:
            _answered(http, [f"abort-{sent}"])
            sent += 1
        ended = wait_until(lambda: registry.canary_status(NAME).canary.state == "aborted" and registry.canary_status(NAME), 30, "the automatic abort", 0.5)
        assert ended.canary.id == canary.id and ended.canary.ended_by == "auto"
        assert ended.canary.end_reason.startswith("candidate v3 could not be loaded by any replica")
        assert "answered by v1" in ended.canary.end_reason
        shown = run_main("canary", "status", NAME, env=cli_env(home))
        print(f"\n$ loraops canary status {NAME}\n{shown.stdout}")
        wait_until(lambda: http.get("/healthz", params={"strict": "true"}).status_code == 200, 30, "the replicas to drop the ended canary's failure", 0.5)
    finally:
        _artifact(home, 3).write_bytes(original)
