"""The summarization endpoint, for real: a Serve application on the session's local Ray, the tiny
model with adapters trained here and registered in a temporary registry, real HTTP.

Two applications share one Serve instance: ``loraops`` (merged mode, bearer auth on, autoscaling
1..3 replicas, watching ``tiny@production``) and ``open`` (nf4 mode, one replica, auth off by
default). The merged-vs-nf4 numerics and the adapter swap are checked in-process, without Ray.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from conftest import REPO, cli_env

TOKEN = "s3cret-test-token"
TOKEN_ENV = "LORAOPS_TEST_API_TOKEN"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ADAPTER = "tiny"
DIALOGUE = "#Person1#: Hi, I'd like to book a table for two tonight.\n#Person2#: Sure, what time?\n#Person1#: Eight, please."
#: The issue's promise: after a promotion every replica serves the new version within 30 s.
SWITCH_DEADLINE_S = 30.0
#: With registry_poll_s=1 the switch takes about a second: requests started this long after the
#: promotion must all carry the new version.
SETTLE_S = 8.0


# --- set-up: a trained adapter, two versions, two Serve applications ---------------------------


@pytest.fixture(scope="module")
def home(tmp_path_factory, tiny_model_home) -> Path:
    """A workspace with the tiny model, one short training run and its two checkpoints registered as v1 and v2."""
    from loraops.config import load_config
    from loraops.registry import Registry
    from loraops.train import train

    workspace = tmp_path_factory.mktemp("serve-home")
    shutil.copytree(tiny_model_home / "models", workspace / "models")
    config = load_config(
        REPO / "tune" / "tiny.yaml",
        [
            f"workspace={workspace}",
            "name=serve-test",
            "data.builtin_size=200",
            "training.max_steps=12",
            "training.per_device_train_batch_size=8",
            "training.save_steps=6",
            "training.eval_steps=6",
            "training.logging_steps=6",
            "training.eval_max_samples=16",
            "training.save_total_limit=null",
        ],
    )
    run = train(config, progress=False)
    registry = Registry(workspace=workspace)
    registry.register(run.output_dir / "checkpoint-6", ADAPTER)  # v1
    registry.register(run.output_dir / "checkpoint-12", ADAPTER)  # v2: six more steps, different weights
    registry.promote(ADAPTER, 1)
    return workspace


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def serve_urls(ray_address, home):
    """Deploy both applications from serve/tiny.yaml through the code path of `loraops serve`; yields their URLs."""
    from ray import serve

    from loraops.serve.app import deploy
    from loraops.serve.settings import load_serve_config

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    common = [
        f"http_options.port={port}",
        f"args.workspace={home}",
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
            "deployments.SummarizerModel.autoscaling_config.upscale_delay_s=2",
            "deployments.SummarizerModel.autoscaling_config.downscale_delay_s=6",
            "deployments.SummarizerModel.autoscaling_config.look_back_period_s=11",
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
        serve.shutdown()  # the CPUs go back to the other tests


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


def _settled_on_one_replica() -> bool:
    """One replica running and none starting or stopping: the autoscaler is at rest at min_replicas."""
    return _replica_states() == {"RUNNING": 1}


# --- answers -----------------------------------------------------------------------------------


def test_summary_comes_back_with_the_version_that_made_it(http):
    response = http.post("/v1/summarize", json={"dialogue": DIALOGUE, "max_new_tokens": 16})

    assert response.status_code == 200, response.text
    answer = response.json()
    assert isinstance(answer["summary"], str)
    assert answer["model"] == {"name": ADAPTER, "version": 1}
    assert answer["usage"]["prompt_tokens"] > 10
    assert 1 <= answer["usage"]["completion_tokens"] <= 16


def test_default_summary_length_and_sampling(http):
    greedy = [http.post("/v1/summarize", json={"dialogue": DIALOGUE}).json() for _ in range(2)]
    sampled = http.post("/v1/summarize", json={"dialogue": DIALOGUE, "temperature": 1.5, "max_new_tokens": 8})

    assert greedy[0]["summary"] == greedy[1]["summary"]  # greedy is deterministic
    assert greedy[0]["usage"]["completion_tokens"] <= 24  # args.default_max_new_tokens
    assert sampled.status_code == 200 and sampled.json()["usage"]["completion_tokens"] <= 8


def test_batch_endpoint_answers_each_dialogue_in_order(http):
    dialogues = [DIALOGUE, DIALOGUE + "\n#Person2#: See you then.", "#Person1#: Is the shop open?\n#Person2#: Yes, until six."]
    singles = [http.post("/v1/summarize", json={"dialogue": d, "max_new_tokens": 8}).json() for d in dialogues]

    response = http.post("/v1/summarize/batch", json={"dialogues": dialogues, "max_new_tokens": 8})

    assert response.status_code == 200, response.text
    answers = response.json()
    assert len(answers) == 3
    assert [a["usage"]["prompt_tokens"] for a in answers] == [s["usage"]["prompt_tokens"] for s in singles]
    assert all(a["model"] == {"name": ADAPTER, "version": 1} for a in answers)


def test_models_healthz_and_docs(http, serve_urls):
    main = http.get("/v1/models").json()["models"][0]
    open_model = httpx.get(serve_urls["open"] + "/v1/models").json()["models"][0]
    health = httpx.get(serve_urls["main"] + "/healthz")  # no token needed
    docs = httpx.get(serve_urls["main"] + "/docs")
    spec = httpx.get(serve_urls["main"] + "/openapi.json").json()

    assert (main["name"], main["version"], main["mode"], main["adapter"]) == (ADAPTER, 1, "merged", f"{ADAPTER}@production")
    assert (open_model["mode"], open_model["dtype"], open_model["adapter"], open_model["version"]) == ("nf4", "float32", f"{ADAPTER}:2", 2)
    assert main["limits"]["max_new_tokens_limit"] == 128
    assert health.status_code == 200 and health.json()["model"]["version"] == 1
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    assert {"/v1/summarize", "/v1/summarize/batch", "/v1/models", "/healthz"} <= set(spec["paths"])


def test_nf4_mode_serves_the_pinned_version_and_auth_is_off_by_default(serve_urls):
    response = httpx.post(serve_urls["open"] + "/v1/summarize", json={"dialogue": DIALOGUE, "max_new_tokens": 8}, timeout=120)

    assert response.status_code == 200, response.text
    assert response.json()["model"] == {"name": ADAPTER, "version": 2}


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


# --- bad input: always a 4xx naming the field, never a 500 -------------------------------------

LONG_DIALOGUE = "\n".join(f"#Person{1 + i % 2}#: I would like to talk about the weather and the trains number {i}." for i in range(400))

BAD_INPUTS = [
    # (id, path, json body or raw bytes, status, field)
    ("empty dialogue", "/v1/summarize", {"dialogue": ""}, 422, "dialogue"),
    ("whitespace dialogue", "/v1/summarize", {"dialogue": " \n\t "}, 422, "dialogue"),
    ("dialogue not a string", "/v1/summarize", {"dialogue": 42}, 422, "dialogue"),
    ("dialogue a list", "/v1/summarize", {"dialogue": ["a", "b"]}, 422, "dialogue"),
    ("missing dialogue", "/v1/summarize", {"max_new_tokens": 5}, 422, "dialogue"),
    ("max_new_tokens a string", "/v1/summarize", {"dialogue": DIALOGUE, "max_new_tokens": "12"}, 422, "max_new_tokens"),
    ("max_new_tokens a float", "/v1/summarize", {"dialogue": DIALOGUE, "max_new_tokens": 12.5}, 422, "max_new_tokens"),
    ("max_new_tokens zero", "/v1/summarize", {"dialogue": DIALOGUE, "max_new_tokens": 0}, 422, "max_new_tokens"),
    ("max_new_tokens over the limit", "/v1/summarize", {"dialogue": DIALOGUE, "max_new_tokens": 129}, 422, "max_new_tokens"),
    ("temperature negative", "/v1/summarize", {"dialogue": DIALOGUE, "temperature": -0.5}, 422, "temperature"),
    ("temperature a string", "/v1/summarize", {"dialogue": DIALOGUE, "temperature": "hot"}, 422, "temperature"),
    ("unknown field", "/v1/summarize", {"dialogue": DIALOGUE, "prompt": "x"}, 422, "prompt"),
    ("body not an object", "/v1/summarize", ["just", "a", "list"], 422, "body"),
    ("invalid JSON", "/v1/summarize", b'{"dialogue": "unterminated', 422, "body"),
    ("empty body", "/v1/summarize", b"", 422, "body"),
    ("body over the size limit", "/v1/summarize", {"dialogue": "x" * 70_000}, 413, "body"),
    ("dialogue longer than the context", "/v1/summarize", {"dialogue": LONG_DIALOGUE}, 422, "dialogue"),
    ("batch without dialogues", "/v1/summarize/batch", {}, 422, "dialogues"),
    ("batch empty list", "/v1/summarize/batch", {"dialogues": []}, 422, "dialogues"),
    ("batch blank item", "/v1/summarize/batch", {"dialogues": [DIALOGUE, "  "]}, 422, "dialogues.1"),
    ("batch wrong item type", "/v1/summarize/batch", {"dialogues": [DIALOGUE, 7]}, 422, "dialogues.1"),
    ("batch too many", "/v1/summarize/batch", {"dialogues": [DIALOGUE] * 5}, 422, "dialogues"),
    ("batch item longer than the context", "/v1/summarize/batch", {"dialogues": [DIALOGUE, LONG_DIALOGUE]}, 422, "dialogues.1"),
]


@pytest.mark.parametrize(("path", "body", "status", "field"), [case[1:] for case in BAD_INPUTS], ids=[case[0] for case in BAD_INPUTS])
def test_bad_input_gets_a_4xx_naming_the_field(http, path, body, status, field):
    if isinstance(body, bytes):
        response = http.post(path, content=body, headers={"content-type": "application/json"})
    else:
        response = http.post(path, json=body)

    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["field"] == field
    assert error["message"]


def test_context_error_gives_the_token_counts(http):
    error = http.post("/v1/summarize", json={"dialogue": LONG_DIALOGUE}).json()["error"]

    assert error["type"] == "context_length_exceeded"
    assert "over the model's context of 1024 tokens" in error["message"]
    assert "traceback" not in error["message"].lower() and "ray::" not in error["message"]


def test_unknown_route_and_method_are_json(http):
    missing = http.get("/v2/whatever")
    wrong_method = http.get("/v1/summarize")

    assert (missing.status_code, missing.json()["error"]["type"]) == (404, "not_found")
    assert (wrong_method.status_code, wrong_method.json()["error"]["type"]) == (405, "method_not_allowed")


# --- clients -----------------------------------------------------------------------------------


def test_cli_summarize_against_the_endpoint(serve_urls, home, tmp_path):
    dialogue_file = tmp_path / "dialogue.txt"
    dialogue_file.write_text(DIALOGUE)
    env = cli_env(home) | {"LORAOPS_API_TOKEN": TOKEN}

    done = subprocess.run(
        [sys.executable, "-m", "loraops", "summarize", "--url", serve_urls["main"], "--file", str(dialogue_file), "--max-new-tokens", "6", "--json"],
        capture_output=True, text=True, env=env, timeout=120,
    )
    refused = subprocess.run(
        [sys.executable, "-m", "loraops", "summarize", "--url", serve_urls["main"], "--token", "wrong", DIALOGUE],
        capture_output=True, text=True, env=env, timeout=120,
    )

    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["model"]["name"] == ADAPTER
    assert refused.returncode == 2
    assert "HTTP 401" in refused.stderr and "bearer token" in refused.stderr


def test_cli_serve_detached_deploys_a_config_on_a_running_cluster(serve_urls, home, ray_address):
    from ray import serve

    port = httpx.URL(serve_urls["main"]).port
    command = [
        sys.executable, "-m", "loraops", "serve", "--config", str(REPO / "serve" / "tiny.yaml"), "--address", ray_address, "--detach",
        "--set", "name=cli", "--set", "route_prefix=/cli", "--set", f"http_options.port={port}",
        "--set", f"args.workspace={home}", "--set", f"args.adapter={ADAPTER}:1", "--set", "args.mode=nf4",
        "--set", "deployments.SummarizerModel.autoscaling_config=null", "--set", "deployments.SummarizerModel.num_replicas=1",
        "--set", "deployments.SummarizerModel.ray_actor_options.num_cpus=0.25", "--set", "deployments.SummarizerAPI.ray_actor_options.num_cpus=0.05",
    ]
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=cli_env(home), timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        assert f"at http://127.0.0.1:{port}/cli" in done.stdout
        answer = httpx.post(f"http://127.0.0.1:{port}/cli/v1/summarize", json={"dialogue": DIALOGUE, "max_new_tokens": 4}, timeout=120)
        assert answer.status_code == 200 and answer.json()["model"] == {"name": ADAPTER, "version": 1}
    finally:
        serve.delete("cli")


def test_client_retries_503_and_reports_errors_with_the_field():
    from loraops.serve.client import ServeError, SummarizerClient

    answers = iter([
        httpx.Response(503, json={"error": {"type": "overloaded", "message": "busy"}}, headers={"Retry-After": "0"}),
        httpx.Response(503, json={"error": {"type": "overloaded", "message": "busy"}}),
        httpx.Response(200, json={"summary": "ok", "model": {"name": "x", "version": 2}, "usage": {"prompt_tokens": 3, "completion_tokens": 1}}),
    ])
    calls = []

    def respond(request: httpx.Request) -> httpx.Response:
        calls.append(json.loads(request.content))
        return next(answers)

    with SummarizerClient("http://test", token="t", backoff_s=0.01, transport=httpx.MockTransport(respond)) as client:
        assert client.summarize("hello", max_new_tokens=5)["model"]["version"] == 2
    assert calls == [{"dialogue": "hello", "max_new_tokens": 5}] * 3

    invalid = httpx.MockTransport(lambda _r: httpx.Response(422, json={"error": {"type": "validation_error", "message": "dialogue: empty", "field": "dialogue"}}))
    with SummarizerClient("http://test", transport=invalid) as client, pytest.raises(ServeError) as caught:
        client.summarize(" ")
    assert (caught.value.status, caught.value.field) == (422, "dialogue")

    always_busy = httpx.MockTransport(lambda _r: httpx.Response(503, json={"error": {"type": "unavailable", "message": "no replica"}}))
    with SummarizerClient("http://test", retries=2, backoff_s=0.001, transport=always_busy) as client, pytest.raises(ServeError, match="HTTP 503: no replica"):
        client.health()


# --- promotion under load and autoscaling ------------------------------------------------------


def test_promotion_under_load_drops_nothing_and_switches_every_replica(serve_urls, home):
    from loraops.bench.serve import builtin_test_dialogues, run_load
    from loraops.registry import Registry

    registry = Registry(workspace=home)
    promoted_at: list[float] = []

    def promote_in_the_middle() -> None:
        time.sleep(6)
        promoted_at.append(time.monotonic())
        registry.promote(ADAPTER, 2, reason="test: promotion under load")

    promoter = threading.Thread(target=promote_in_the_middle)
    promoter.start()
    records = run_load(
        serve_urls["main"],
        builtin_test_dialogues(32),
        clients=16,
        duration_s=22,
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


def test_autoscaling_adds_a_replica_under_load_and_removes_it_after(serve_urls):
    from loraops.bench.serve import builtin_test_dialogues, run_load

    def wait_for(condition, timeout_s: float) -> float:
        started = time.monotonic()
        while not condition():
            assert time.monotonic() - started < timeout_s, f"timed out; replicas: {_replica_states()}"
            time.sleep(0.5)
        return time.monotonic() - started

    wait_for(_settled_on_one_replica, 120)  # a previous test's load may have scaled it up
    stop = threading.Event()
    load = threading.Thread(
        target=run_load,
        args=(serve_urls["main"], builtin_test_dialogues(16), 16, 150),
        kwargs={"body": lambda text: {"dialogue": text, "max_new_tokens": 16}, "headers": AUTH, "stop": stop},
    )
    load.start()
    try:
        scaled_up_after = wait_for(lambda: _model_replicas() >= 2, 120)
        peak = _model_replicas()
    finally:
        stop.set()
        load.join()
    scaled_down_after = wait_for(_settled_on_one_replica, 120)
    print(f"\nautoscaling 1..3: {peak} replicas running {scaled_up_after:.1f} s into the load; back to 1 replica {scaled_down_after:.1f} s after it stopped")


# --- numerics and swaps, in-process ------------------------------------------------------------


def _served(home: Path, ref: str, mode: str):
    from loraops.generate import load_for_serving
    from loraops.registry import Registry
    from loraops.serve.replica import adapter_slot, training_config

    registry = Registry(workspace=home)
    version = registry.get(ref)
    config = training_config(version, str(home))
    return load_for_serving(config, registry.resolve(version.ref), mode, adapter_name=adapter_slot(version.name, version.version)), registry


def _greedy_tokens(served, dialogues: list[str], max_new_tokens: int) -> list[list[int]]:
    from loraops.data import prompt_ids
    from loraops.generate import generate_completions

    prompts = [prompt_ids(served.tokenizer, d, served.config.data, budget=10**9) for d in dialogues]
    tokens = []
    for start in range(0, len(prompts), 32):
        tokens += [c.token_ids for c in generate_completions(served.model, served.tokenizer, prompts[start:start + 32], max_new_tokens)]
    return tokens


def token_agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Share of generated positions where both sequences have the same token (a position only one has counts as a miss)."""
    same = sum(x == y for seq_a, seq_b in zip(a, b, strict=True) for x, y in zip(seq_a, seq_b))
    total = sum(max(len(seq_a), len(seq_b)) for seq_a, seq_b in zip(a, b, strict=True))
    return same / total


def test_merged_mode_agrees_with_nf4_on_the_builtin_test_dialogues(home):
    from loraops.bench.serve import builtin_test_dialogues

    dialogues = builtin_test_dialogues(64)
    nf4, _ = _served(home, f"{ADAPTER}:2", "nf4")
    merged, _ = _served(home, f"{ADAPTER}:2", "merged")

    agreement = token_agreement(_greedy_tokens(nf4, dialogues, 32), _greedy_tokens(merged, dialogues, 32))

    print(f"\nmerged vs nf4 greedy token agreement on {len(dialogues)} built-in test dialogues: {100 * agreement:.2f}%")
    assert agreement >= 0.99


@pytest.mark.parametrize("mode", ["nf4", "merged"])
def test_adapter_swap_equals_a_fresh_load(home, mode):
    import torch

    from loraops.data import prompt_ids
    from loraops.generate import left_pad
    from loraops.serve.replica import adapter_slot

    swapped, registry = _served(home, f"{ADAPTER}:1", mode)
    fresh, _ = _served(home, f"{ADAPTER}:2", mode)
    before = _logits(swapped, prompt_ids, left_pad)

    swapped.swap(registry.resolve(f"{ADAPTER}:2"), adapter_slot(ADAPTER, 2))

    after, expected = _logits(swapped, prompt_ids, left_pad), _logits(fresh, prompt_ids, left_pad)
    assert not torch.equal(before, after)  # v1 and v2 really differ
    assert torch.equal(after, expected)  # bit for bit: the restored base plus v2, as if freshly loaded
    assert list(swapped.model.peft_config) == [adapter_slot(ADAPTER, 2)]


def _logits(served, prompt_ids, left_pad):
    import torch

    prompts = [prompt_ids(served.tokenizer, d, served.config.data, budget=10**9) for d in (DIALOGUE, DIALOGUE + " Thanks.")]
    with torch.no_grad():
        return served.model(**left_pad(prompts, served.tokenizer.pad_token_id)).logits


# --- configuration and registry ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("args.mode=fp8", "args: mode: Input should be 'nf4' or 'merged'"),
        ("args.adapter=a@@b", "args: adapter"),
        ("args.colour=blue", "args: colour: unknown key"),
        ("args.max_new_tokens_limit=8", "default_max_new_tokens (64) is above max_new_tokens_limit (8)"),
        ("deployments.Bogus.num_replicas=2", "unknown deployment 'Bogus'"),
        ("deployments.SummarizerModel.num_cpus=2", "(SummarizerModel).num_cpus: unknown deployment option"),
        ("deployments.SummarizerModel.autoscaling_config.max_replica=2", "autoscaling_config.max_replica: unknown key"),
        ("deployments.SummarizerModel.autoscaling_config.max_replicas=0", "autoscaling_config: max_replicas"),
        ("deployments.SummarizerModel.ray_actor_options.num_gpu=1", "ray_actor_options.num_gpu: unknown key"),
    ],
)
def test_serve_config_errors_name_the_key(override, message):
    from loraops.config import ConfigError
    from loraops.serve.settings import load_serve_config

    with pytest.raises(ConfigError) as caught:
        load_serve_config(REPO / "serve" / "tiny.yaml", [override])
    assert message in str(caught.value)


def test_shipped_serve_configs_are_valid_for_loraops_and_ray():
    from ray.serve.schema import ServeDeploySchema

    from loraops.serve.settings import load_serve_config

    for name in ("tiny.yaml", "phi2.yaml"):
        config = load_serve_config(REPO / "serve" / name)
        ServeDeploySchema.model_validate(config.raw)
        assert config.deployment_options["SummarizerModel"]["autoscaling_config"]["max_replicas"] >= 3
    assert load_serve_config(REPO / "serve" / "phi2.yaml").deployment_options["SummarizerModel"]["ray_actor_options"]["num_gpus"] > 0


def test_cli_serve_rejects_a_bad_config_with_one_line(home):
    done = subprocess.run(
        [sys.executable, "-m", "loraops", "serve", "--config", str(REPO / "serve" / "tiny.yaml"), "--set", "args.mode=fast"],
        capture_output=True, text=True, env=cli_env(home), timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.startswith("loraops: error:") and "mode" in done.stderr


def test_registry_keeps_the_training_config_and_upgrades_old_databases(home, tmp_path):
    from sqlalchemy import create_engine, text

    from loraops.registry import Registry
    from loraops.registry import db as registry_db

    url = f"sqlite:///{tmp_path / 'old.db'}"
    Registry(db_url=url, artifact_uri=str(tmp_path / "store"), workspace=home).list_adapters()  # creates the tables
    registry_db.dispose_engine(url)
    old = create_engine(url)
    with old.begin() as connection:  # the schema before the config column existed
        connection.execute(text("ALTER TABLE registry_versions DROP COLUMN config"))
    old.dispose()

    registry = Registry(db_url=url, artifact_uri=str(tmp_path / "store"), workspace=home)
    version = registry.register(home / "runs" / "serve-test" / "checkpoint-6", "upgraded")

    assert registry.get("upgraded:1").config == version.config
    assert version.config["model"]["name"] == "builtin:tiny-phi"
    assert version.config["data"]["prompt_template"].startswith("Instruct:")
    registry_db.dispose_engine(url)
