"""No request lost to a model replica's crash (issue #29 item 4): two model replicas under load with a canary
running, one killed with ``ray.kill``. A request whose replica died is sent once more to another replica
(generation is stateless), so every client gets a 2xx, and the crash is charged to neither version in the
canary's figures. Then the Serve proxy is killed under load: the endpoint must be back soon (item 5), and
the figures count only the answers clients received (not those the ingress finished for a dead proxy)."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import httpx
import pytest

import helpers
from helpers import save_random_adapters, wait_until

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.reliability]

REPO = Path(__file__).resolve().parents[1]
ADAPTER = "tiny"
APP = "crash"
DIALOGUE = "#Person1#: Hi, I'd like to book a table for two tonight.\n#Person2#: Sure, what time?\n#Person1#: Eight, please."


@pytest.fixture(scope="module")
def home(tmp_path_factory, tiny_model_home) -> Path:
    """A workspace with tiny:1 (production) and tiny:2 registered."""
    from loraops.config import load_config
    from loraops.registry import Lineage, Registry

    workspace = tmp_path_factory.mktemp("crash-home")
    shutil.copytree(tiny_model_home / "models", workspace / "models")
    config = load_config(REPO / "tune" / "tiny.yaml", [f"workspace={workspace}"])
    registry = Registry(workspace=workspace)
    for folder in save_random_adapters(config, workspace / "adapters", 2):
        registry.register(folder, ADAPTER, lineage=Lineage(config=config.model_dump(mode="json")))
    registry.promote(ADAPTER, 1)
    return workspace


@pytest.fixture(scope="module")
def url(deploy_tiny_app, home):

    try:
        yield deploy_tiny_app(
            [f"name={APP}", f"args.workspace={home}", f"args.adapter={ADAPTER}@production", "args.registry_poll_s=1",
             "args.default_max_new_tokens=4", "deployments.SummarizerModel.num_replicas=2"]
        )  # fmt: skip
    finally:
        helpers.remove_applications()


def model_replicas() -> list[str]:
    import ray

    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(f"SERVE_REPLICA::{APP}#SummarizerModel#"))


def load(url: str, stop: threading.Event, clients: int = 4, streams: int = 0) -> tuple[list[threading.Thread], list[tuple[int | None, str]]]:
    """``clients`` threads sending summaries back to back (no client retries) until ``stop``, the first ``streams`` of
    them streamed (``?stream=true``): (threads, [(status, body)])."""
    answers: list[tuple[int | None, str]] = []

    def client(stream: bool) -> None:
        with httpx.Client(base_url=url, timeout=120) as http:
            while not stop.is_set():
                try:
                    response = http.post("/v1/summarize", json={"dialogue": DIALOGUE}, params={"stream": "true"} if stream else None)
                    answers.append((response.status_code, response.text[-300:]))
                except httpx.HTTPError as exc:
                    answers.append((None, f"{type(exc).__name__}: {exc}"))

    threads = [threading.Thread(target=client, args=(i < streams,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    return threads, answers


def whole(answers: list[tuple[int | None, str]]) -> int:
    """How many whole answers the clients received: a 200 (a stream's without an ``{"error"}`` event)."""
    return sum(1 for status, body in answers if status == 200 and '{"error"' not in body)


def counted(registry) -> int:
    """The requests the canary's figures count, both versions together."""
    status = registry.canary_status(ADAPTER)
    return sum(v.requests for v in (status.baseline, status.candidate))


@pytest.fixture(scope="module")
def canary(url, home):
    """A canary of tiny:2 at 50%, never judged here (only its figures are read), running once the ingress has read it."""
    from loraops.registry import Registry

    registry = Registry(workspace=home)
    started = registry.start_canary(f"{ADAPTER}:2", 50, min_requests=1000)
    try:
        wait_until(lambda: sum(r.loaded for r in registry.canary_status(ADAPTER).replicas) == 2, 120, "both replicas to load the candidate", 0.5)
        helpers.wait_for_the_ingress_canary(lambda: httpx.get(f"{url}/v1/models", timeout=30).json(), started.id)
        yield registry
    finally:
        registry.abort_canary(ADAPTER, reason="test over")


def test_a_replica_killed_under_load_during_a_canary_loses_no_request_and_charges_no_version(url, canary):
    """One client streams: a stream whose replica died before its first event is retried like a plain request
    (a 200, not a 503); one that already sent text may end with an error event, counted for no version."""
    import ray

    victim = wait_until(lambda: len(model_replicas()) == 2 and model_replicas(), 30, "two model replicas")[0]
    stop = threading.Event()
    threads, answers = load(url, stop, streams=1)
    try:
        wait_until(lambda: len(answers) >= 6, 120, "answers before the kill", 0.2)
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        killed_at = len(answers)
        wait_until(lambda: len(answers) >= killed_at + 12, 180, "answers after the kill", 0.2)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    failed = [answer for answer in answers if answer[0] != 200]
    assert not failed, f"{len(failed)} of {len(answers)} requests failed: {failed[:3]}"
    figures = lambda: f"{whole(answers)} answers; figures {canary.canary_status(ADAPTER)}"  # noqa: E731
    wait_until(lambda: counted(canary) >= whole(answers), 30, "the canary figures to count every answer", 0.5, figures)
    versions = canary.canary_status(ADAPTER)
    assert [(v.version, v.errors) for v in (versions.baseline, versions.candidate)] == [(1, 0), (2, 0)], versions


def proxies() -> list[str]:
    import ray

    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith("SERVE_PROXY_ACTOR"))


def answers(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_the_endpoint_is_back_soon_after_its_proxy_is_killed_and_only_delivered_answers_count(url, canary):
    """Serve's controller replaces a dead proxy after 3 failed health checks: with loraops' local setting
    (every 2 s, not Serve's 10) the endpoint answers again within the issue's 10 s target, doubled for a
    loaded machine (32 s with Serve's default). The requests in flight when the proxy died are finished by
    the ingress but reach no client: the canary's figures count exactly the 200s clients received."""
    import time

    import ray

    victim = wait_until(proxies, 30, "the Serve proxy")[0]
    assert answers(url)
    before = counted(canary)  # the previous test's answers, all counted already
    stop = threading.Event()
    threads, replies = load(url, stop)
    try:
        wait_until(lambda: len(replies) >= 4, 120, "answers before the kill", 0.2)
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        killed = time.monotonic()
    finally:
        stop.set()  # the clients end with the requests the dead proxy held: cut off, finished by the ingress for no one
        for thread in threads:
            thread.join()
    wait_until(lambda: not answers(url), 30, "the endpoint to go down", 0.1)
    wait_until(lambda: answers(url), 120, "the endpoint to answer again", 0.2)
    back_after = time.monotonic() - killed
    cut = [body for status, body in replies if status is None and "RemoteProtocolError" in body]
    print(f"endpoint back {back_after:.1f} s after the proxy was killed; {whole(replies)} answers, {len(cut)} cut off mid-request")
    assert back_after < 20, back_after
    # The requests cut off were finished by the ingress by now (the endpoint was down for seconds), and their figures
    # flushed (every second). None may be counted. An answer the proxy wrote in the instant before it died cannot be
    # acknowledged: it is counted for no one too, so one of the delivered answers may be missing, never one more.
    received = whole(replies)
    figures = wait_until(lambda: (n := counted(canary) - before) >= received - 1 and n, 30, "the canary figures", 0.5, lambda: counted(canary) - before)
    print(f"the canary figures grew by {figures} for {received} answers received")
    assert received - 1 <= figures <= received, f"{figures} counted, {received} answers received ({len(cut)} cut off mid-request)"
