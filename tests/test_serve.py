"""The summarization endpoint, for real: a Serve application on the session's local Ray, the tiny
model with adapters trained here and registered in a temporary registry, real HTTP.

Two applications share one Serve instance: ``loraops`` (merged mode, bearer auth on, autoscaling
1..3 replicas, watching ``tiny@production``) and ``open`` (nf4 mode, one replica, auth off by
default). The merged-vs-nf4 numerics and the adapter swap are in test_generate.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

import helpers
from helpers import forbid_ray, run_main

REPO = Path(__file__).resolve().parents[1]


TOKEN = "s3cret-test-token"
TOKEN_ENV = "LORAOPS_TEST_API_TOKEN"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ADAPTER = "tiny"  # what the serving_home fixture registers: v1 (production) and v2
DIALOGUE = "#Person1#: Hi, I'd like to book a table for two tonight.\n#Person2#: Sure, what time?\n#Person1#: Eight, please."
#: The issue's promise: after a promotion every replica serves the new version within 30 s.
SWITCH_DEADLINE_S = 30.0
#: With registry_poll_s=1 the switch takes about a second: requests started this long after the
#: promotion must all carry the new version.
SETTLE_S = 8.0


# --- set-up: two Serve applications on the serving_home registry (conftest) ---------------------------


@pytest.fixture(scope="module")
def serve_urls(serve_port, serving_home):
    """Deploy both applications from serve/tiny.yaml through the code path of `loraops serve`; yields their URLs."""

    from loraops.serve.deploy import deploy
    from loraops.serve.settings import load_serve_config

    port = serve_port
    helpers.start_serve(port)
    common = [
        f"http_options.port={port}",
        f"args.workspace={serving_home}",
        f"args.adapter={ADAPTER}",
        "args.registry_poll_s=1",
        "args.max_new_tokens_limit=128",
        "args.default_max_new_tokens=24",
        "args.max_batch_dialogues=4",
        "args.max_body_bytes=65536",
        # Small replicas, so both applications fit on CI's 2 CPUs beside other tests.
        "deployments.SummarizerModel.ray_actor_options.num_cpus=0.25",
        "deployments.SummarizerAPI.ray_actor_options.num_cpus=0.05",
    ]
    main = load_serve_config(
        REPO / "serve" / "tiny.yaml",
        common
        + [
            "name=loraops",
            "args.mode=merged",
            f"args.auth_token_env={TOKEN_ENV}",
            f"deployments.SummarizerAPI.ray_actor_options.runtime_env.env_vars.{TOKEN_ENV}={TOKEN}",
            # Quick decisions both ways (the session pushes autoscaling metrics every 2 s: conftest's ray_address).
            "deployments.SummarizerModel.autoscaling_config.upscale_delay_s=2",
            "deployments.SummarizerModel.autoscaling_config.downscale_delay_s=3",
            "deployments.SummarizerModel.autoscaling_config.look_back_period_s=4",
        ],
    )
    open_app = load_serve_config(
        REPO / "serve" / "tiny.yaml",
        common
        + [
            "name=open",
            "route_prefix=/open",
            "args.mode=nf4",
            # Serve's user_config (applied by reconfigure) pins this application to v2.
            f"deployments.SummarizerModel.user_config.adapter={ADAPTER}:2",
            "deployments.SummarizerModel.autoscaling_config=null",
            "deployments.SummarizerModel.num_replicas=1",
        ],
    )
    try:
        urls = {"main": deploy(main), "open": deploy(open_app)}
        yield urls
    finally:
        helpers.remove_applications()  # the CPUs go back to the other tests


@pytest.fixture(scope="module")
def http(serve_urls):
    with httpx.Client(base_url=serve_urls["main"], headers=AUTH, timeout=120) as client:
        yield client


def _replica_states(app: str = "loraops") -> dict[str, int]:
    from ray import serve

    states = serve.status().applications[app].deployments["SummarizerModel"].replica_states
    return {str(getattr(state, "value", state)): int(count) for state, count in states.items() if count}


def _model_replicas(app: str = "loraops") -> int:
    """Model replicas serving traffic."""
    return _replica_states(app).get("RUNNING", 0)


def _added_replicas(app: str = "loraops") -> int:
    """Model replicas running or starting (what the autoscaler asked for)."""
    states = _replica_states(app)
    return states.get("RUNNING", 0) + states.get("STARTING", 0)


def _settled_on_one_replica() -> bool:
    """One replica running and none starting or stopping: the autoscaler is at rest at min_replicas."""
    return _replica_states() == {"RUNNING": 1}


# --- answers -----------------------------------------------------------------------------------


@pytest.mark.ray
@pytest.mark.slow
def test_summary_comes_back_with_the_version_that_made_it(http):
    response = http.post("/v1/summarize", json={"dialogue": DIALOGUE, "max_new_tokens": 16})

    assert response.status_code == 200, response.text
    answer = response.json()
    assert isinstance(answer["summary"], str)
    assert answer["model"] == {"name": ADAPTER, "version": 1}
    assert answer["usage"]["prompt_tokens"] > 10
    assert 1 <= answer["usage"]["completion_tokens"] <= 16
    # The model's own time, in the body and in the Server-Timing header: the rest is Serve's overhead.
    assert 0 <= answer["usage"]["queue_ms"] <= answer["usage"]["model_ms"]
    assert response.headers["server-timing"] == f"model;dur={answer['usage']['model_ms']}, queue;dur={answer['usage']['queue_ms']}"


@pytest.mark.ray
@pytest.mark.slow
def test_default_summary_length_and_sampling(http):
    greedy = [http.post("/v1/summarize", json={"dialogue": DIALOGUE}).json() for _ in range(2)]
    sampled = http.post("/v1/summarize", json={"dialogue": DIALOGUE, "temperature": 1.5, "max_new_tokens": 8})

    assert greedy[0]["summary"] == greedy[1]["summary"]  # greedy is deterministic
    assert greedy[0]["usage"]["completion_tokens"] <= 24  # args.default_max_new_tokens
    assert sampled.status_code == 200 and sampled.json()["usage"]["completion_tokens"] <= 8


@pytest.mark.ray
@pytest.mark.slow
def test_batch_endpoint_answers_each_dialogue_in_order(http):
    dialogues = [DIALOGUE, DIALOGUE + "\n#Person2#: See you then.", "#Person1#: Is the shop open?\n#Person2#: Yes, until six."]
    singles = [http.post("/v1/summarize", json={"dialogue": d, "max_new_tokens": 8}).json() for d in dialogues]

    response = http.post("/v1/summarize/batch", json={"dialogues": dialogues, "max_new_tokens": 8})

    assert response.status_code == 200, response.text
    answers = response.json()
    assert len(answers) == 3
    assert [a["usage"]["prompt_tokens"] for a in answers] == [s["usage"]["prompt_tokens"] for s in singles]
    assert all(a["model"] == {"name": ADAPTER, "version": 1} for a in answers)


@pytest.mark.ray
@pytest.mark.slow
def test_models_healthz_and_docs(http, serve_urls):
    main = http.get("/v1/models").json()["models"][0]
    open_model = httpx.get(serve_urls["open"] + "/v1/models").json()["models"][0]
    health = httpx.get(serve_urls["main"] + "/healthz")  # no token needed
    docs = httpx.get(serve_urls["main"] + "/docs")
    spec = httpx.get(serve_urls["main"] + "/openapi.json").json()

    assert (main["name"], main["version"], main["mode"], main["adapter"]) == (ADAPTER, 1, "merged", f"{ADAPTER}@production")
    assert (open_model["mode"], open_model["dtype"], open_model["adapter"], open_model["version"]) == ("nf4", "float32", f"{ADAPTER}:2", 2)
    assert main["limits"]["max_new_tokens_limit"] == 128
    buckets = main["buckets"]
    assert (main["batching"], buckets["batch"], buckets["length"]) == ("continuous", [1, 2, 4, 8], [256, 512, 1024])
    # The replica ran every prefill and decode shape before it took traffic (nothing compiles on a CPU).
    assert main["warm_up"]["shapes"] == len(buckets["length"]) * (len(buckets["prefill_batch"]) + len(buckets["batch"]))
    assert health.status_code == 200 and health.json()["model"]["version"] == 1
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    assert {"/v1/summarize", "/v1/summarize/batch", "/v1/models", "/healthz"} <= set(spec["paths"])


@pytest.mark.ray
@pytest.mark.slow
def test_nf4_mode_serves_the_pinned_version_and_auth_is_off_by_default(serve_urls):
    response = httpx.post(serve_urls["open"] + "/v1/summarize", json={"dialogue": DIALOGUE, "max_new_tokens": 8}, timeout=120)

    assert response.status_code == 200, response.text
    assert response.json()["model"] == {"name": ADAPTER, "version": 2}


@pytest.mark.ray
@pytest.mark.slow
def test_auth_when_enabled(serve_urls):
    url = serve_urls["main"] + "/v1/summarize"
    body = {"dialogue": DIALOGUE, "max_new_tokens": 4}

    missing = httpx.post(url, json=body, timeout=120)
    wrong = httpx.post(url, json=body, headers={"Authorization": "Bearer nope"}, timeout=120)
    right = httpx.post(url, json=body, headers=AUTH, timeout=120)

    for refused in (missing, wrong):
        assert refused.status_code == 401
        assert refused.json()["error"]["type"] == "unauthorized"
        assert refused.headers["www-authenticate"] == "Bearer"
    assert right.status_code == 200
    assert httpx.get(serve_urls["main"] + "/v1/models").status_code == 401


# Bad input (the catalogue of bad HTTP input and the answer each gets) is in test_reliability_serve.py.


# --- clients -----------------------------------------------------------------------------------


@pytest.mark.ray
@pytest.mark.slow
def test_cli_summarize_against_the_endpoint(cli_env, serve_urls, serving_home, tmp_path):
    dialogue_file = tmp_path / "dialogue.txt"
    dialogue_file.write_text(DIALOGUE)
    env = cli_env(serving_home) | {"LORAOPS_API_TOKEN": TOKEN}

    # In this process (run_main): test_served_text runs `loraops summarize` as a subprocess.
    done = run_main("summarize", "--url", serve_urls["main"], "--file", str(dialogue_file), "--max-new-tokens", "6", "--json", env=env)
    refused = run_main("summarize", "--url", serve_urls["main"], "--token", "wrong", DIALOGUE, env=env)

    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["model"]["name"] == ADAPTER
    assert refused.returncode == 2
    assert "HTTP 401" in refused.stderr and "bearer token" in refused.stderr


def _cli_serve(ray_address: str, port: int, home, name: str, *options: str) -> list[str]:
    """``loraops serve`` of one small nf4 application ``name`` at ``/name`` on the running cluster."""
    return [
        sys.executable, "-m", "loraops", "serve", "--config", str(REPO / "serve" / "tiny.yaml"), "--address", ray_address, *options,
        "--set", f"name={name}", "--set", f"route_prefix=/{name}", "--set", f"http_options.port={port}",
        "--set", f"args.workspace={home}", "--set", f"args.adapter={ADAPTER}:1", "--set", "args.mode=nf4",
        "--set", "deployments.SummarizerModel.autoscaling_config=null", "--set", "deployments.SummarizerModel.num_replicas=1",
        "--set", "deployments.SummarizerModel.ray_actor_options.num_cpus=0.25", "--set", "deployments.SummarizerAPI.ray_actor_options.num_cpus=0.05",
    ]  # fmt: skip


@pytest.mark.ray
@pytest.mark.slow
def test_cli_serve_detached_deploys_a_config_on_a_running_cluster(cli_env, serve_urls, serving_home, ray_address):
    from ray import serve

    port = httpx.URL(serve_urls["main"]).port
    try:
        command = _cli_serve(ray_address, port, serving_home, "cli", "--detach")
        done = subprocess.run(command, capture_output=True, text=True, env=cli_env(serving_home), timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        assert f"at http://127.0.0.1:{port}/cli" in done.stdout
        answer = httpx.post(f"http://127.0.0.1:{port}/cli/v1/summarize", json={"dialogue": DIALOGUE, "max_new_tokens": 4}, timeout=120)
        assert answer.status_code == 200 and answer.json()["model"] == {"name": ADAPTER, "version": 1}
    finally:
        serve.delete("cli")


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize("stop", ["SIGTERM", "SIGINT, ignored by the shell that started it"])
def test_cli_serve_in_the_foreground_removes_its_application_on_sigterm_and_sigint(cli_env, serve_urls, serving_home, ray_address, stop, tmp_path):
    """``kill``, ``docker stop`` and Ctrl-C end the foreground ``loraops serve`` cleanly: its application
    leaves the cluster. A background job of a non-interactive shell starts with SIGINT ignored."""
    import signal

    from ray import serve

    port = httpx.URL(serve_urls["main"]).port
    number = signal.SIGTERM if stop == "SIGTERM" else signal.SIGINT
    ignore_sigint = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if number == signal.SIGINT else None
    command = _cli_serve(ray_address, port, serving_home, "fg")
    log = tmp_path / "stderr.log"  # Ray's many lines go to a file: a full pipe would block the process
    with log.open("w") as stderr:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True, env=cli_env(serving_home), preexec_fn=ignore_sigint)
    watchdog = threading.Timer(300, process.kill)
    watchdog.start()
    try:
        printed = []
        for line in process.stdout:  # the signal goes in once the command waits for it, as a user's Ctrl-C would
            printed.append(line)
            if "press Ctrl-C to stop" in line:
                break
        assert printed and "press Ctrl-C to stop" in printed[-1], log.read_text()[-2000:]
        assert "fg" in serve.status().applications
        process.send_signal(number)
        printed.append(process.communicate(timeout=120)[0])
    finally:
        watchdog.cancel()
        if process.poll() is None:
            process.kill()
        if "fg" in serve.status().applications:
            serve.delete("fg")
    assert process.returncode == 0, log.read_text()[-2000:]
    assert "shutting down" in printed[-1] and f"{number.name} received" not in log.read_text()
    assert "fg" not in serve.status().applications


# --- promotion under load and autoscaling ------------------------------------------------------


@pytest.mark.ray
@pytest.mark.slow
def test_autoscaling_adds_a_replica_under_load_and_removes_it_after(serve_urls):
    from loraops.bench.load import run_load
    from loraops.bench.serve import builtin_test_dialogues

    def wait_for(condition, timeout_s: float, what: str) -> float:
        return helpers.elapsed_until(condition, timeout_s, what, 0.5, lambda: f"replicas: {_replica_states()}")

    wait_for(_settled_on_one_replica, 120, "one replica at rest")  # a previous test's load may have scaled it up
    stop = threading.Event()
    load = threading.Thread(
        target=run_load,
        args=(serve_urls["main"], builtin_test_dialogues(16), 16, 150),
        kwargs={"body": lambda text: {"dialogue": text, "max_new_tokens": 16}, "headers": AUTH, "stop": stop},
    )
    load.start()
    try:
        # The autoscaler's decision is what is tested: a second replica starting (its start is a replica start like any)
        scaled_up_after = wait_for(lambda: _added_replicas() >= 2, 120, "a second replica running or starting")
        peak = _added_replicas()
    finally:
        stop.set()
        load.join()
    scaled_down_after = wait_for(_settled_on_one_replica, 120, "back to one replica")
    print(f"\nautoscaling 1..3: {peak} replicas running or starting {scaled_up_after:.1f} s into the load; "
          f"back to 1 replica {scaled_down_after:.1f} s after it stopped")


@pytest.mark.ray
@pytest.mark.slow
def test_promotion_under_load_drops_nothing_and_switches_every_replica(serve_urls, serving_home):
    from loraops.bench.load import run_load
    from loraops.bench.serve import builtin_test_dialogues
    from loraops.registry import Registry

    registry = Registry(workspace=serving_home)
    promoted_at: list[float] = []

    def promote_in_the_middle() -> None:
        time.sleep(4)  # answers from v1 first
        promoted_at.append(time.monotonic())
        registry.promote(ADAPTER, 2, reason="test: promotion under load")

    promoter = threading.Thread(target=promote_in_the_middle)
    promoter.start()
    records = run_load(
        serve_urls["main"],
        builtin_test_dialogues(32),
        clients=16,
        duration_s=16,  # 4 s of v1, the switch, and 4 s of answers after SETTLE_S
        body=lambda text: {"dialogue": text, "max_new_tokens": 16},
        headers=AUTH,
    )
    promoter.join()

    failures = [r for r in records if r.status != 200]
    assert not failures, f"{len(failures)} of {len(records)} requests failed, e.g. {failures[0]}"
    promoted = promoted_at[0]
    before = [r for r in records if r.ended < promoted]
    first_v2 = min(r.ended for r in records if r.version == 2)
    settled = [r for r in records if r.started > promoted + SETTLE_S]
    print(
        f"\npromotion under load: {len(records)} requests, 0 failed; first v2 answer {first_v2 - promoted:.1f} s after the promotion; "
        f"{len(settled)} requests checked after the switch; model replicas at the end: {_model_replicas()}"
    )
    assert before and all(r.version == 1 for r in before)
    assert first_v2 - promoted < SWITCH_DEADLINE_S
    assert len(settled) >= 16
    assert all(r.version == 2 for r in settled), [r.version for r in settled]
    assert httpx.get(serve_urls["main"] + "/healthz").json()["model"]["version"] == 2


# --- numerics and swaps, in-process ------------------------------------------------------------


# --- configuration and registry ----------------------------------------------------------------


def test_cli_serve_rejects_a_bad_config_with_one_line(cli_env, tmp_path, monkeypatch):
    forbid_ray(monkeypatch)  # the config is refused before any connection
    done = run_main("serve", "--config", str(REPO / "serve" / "tiny.yaml"), "--set", "args.mode=fast", env=cli_env(tmp_path))
    assert done.returncode == 2
    assert done.stderr.startswith("loraops: error:") and "mode" in done.stderr


