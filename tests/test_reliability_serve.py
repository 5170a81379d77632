"""Reliability of the summarization endpoint: hostile input, slow clients, broken versions, dying replicas.

One Serve application (``reliability``) on the session's local Ray: bearer auth on, two model
replicas, a small ingress (``max_ongoing_requests`` 8) and a 2 s body timeout, so the slow-client
test runs in seconds. Its registry holds three versions of ``tiny`` (untrained LoRA adapters with
distinct weights: reliability does not need good summaries) and ``production`` has pointed to 1,
then 2. The drills corrupt artifact files behind the registry's back and kill replicas.

The catalogue lists bad HTTP inputs with the answer each must get; the in-process tests check the
batch isolation, the 500 handler and the replica's fallback choice without Ray.
"""

from __future__ import annotations

import logging
import shutil
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

import helpers
from helpers import elapsed_until, run_cli, save_random_adapters

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.reliability


TOKEN = "reliability-token"
TOKEN_ENV = "LORAOPS_TEST_RELIABILITY_TOKEN"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ADAPTER = "tiny"
APP = "reliability"
MODEL_REPLICAS = 2
API_SLOTS = 8
BODY_TIMEOUT_S = 2.0
DIALOGUE = "#Person1#: Hi, I'd like to book a table for two tonight.\n#Person2#: Sure, what time?\n#Person1#: Eight, please."
LONG_DIALOGUE = "\n".join(f"#Person{1 + i % 2}#: I would like to talk about the weather and the trains number {i}." for i in range(400))


# --- set-up: three registered versions and one Serve application -------------------------------


def _tiny_config(workspace: Path, *overrides: str):
    from loraops.config import load_config

    return load_config(REPO / "tune" / "tiny.yaml", [f"workspace={workspace}", *overrides])


@pytest.fixture(scope="module")
def home(tmp_path_factory, tiny_model_home) -> Path:
    """A workspace with tiny:1..3 registered and production moved 1 -> 2."""
    from loraops.registry import Lineage, Registry

    workspace = tmp_path_factory.mktemp("reliability-home")
    shutil.copytree(tiny_model_home / "models", workspace / "models")
    config = _tiny_config(workspace).model_dump(mode="json")
    registry = Registry(workspace=workspace)
    for folder in save_random_adapters(_tiny_config(workspace), workspace / "adapters", 3):
        registry.register(folder, ADAPTER, lineage=Lineage(config=config))
    registry.promote(ADAPTER, 1)
    registry.promote(ADAPTER, 2)
    return workspace


@pytest.mark.ray
@pytest.mark.slow
def test_deploy_on_a_cluster_whose_http_port_is_taken_is_one_line(ray_address, home):
    """Serve must not be running on the session's Ray for this (an earlier module's instance is stopped first;
    the next module that serves starts a new one)."""
    from ray import serve

    from loraops.errors import LoraopsError
    from loraops.serve.deploy import deploy
    from loraops.serve.settings import load_serve_config

    helpers.stop_serve()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = load_serve_config(REPO / "serve" / "tiny.yaml", [f"http_options.port={port}", f"args.workspace={home}", f"args.adapter={ADAPTER}"])
        try:
            with pytest.raises(LoraopsError) as caught:
                deploy(config)
        finally:
            serve.shutdown()
    assert str(caught.value) == f"http_options: port {port} is in use on the cluster's head node: stop what listens there or pick another port"


@pytest.fixture(scope="module")
def url(deploy_tiny_app, home):
    """Deploy the application through the code path of `loraops serve`; yields its URL."""
    from ray import serve

    try:
        yield deploy_tiny_app(
            [
                f"name={APP}",
                f"args.workspace={home}",
                f"args.adapter={ADAPTER}",
                "args.registry_poll_s=1",
                "args.max_new_tokens_limit=128",
                "args.default_max_new_tokens=16",
                "args.max_batch_dialogues=4",
                "args.max_body_bytes=131072",
                f"args.body_timeout_s={BODY_TIMEOUT_S}",
                "args.batch_wait_timeout_s=0.05",
                f"args.auth_token_env={TOKEN_ENV}",
                f"deployments.SummarizerAPI.ray_actor_options.runtime_env.env_vars.{TOKEN_ENV}={TOKEN}",
                f"deployments.SummarizerAPI.max_ongoing_requests={API_SLOTS}",
                f"deployments.SummarizerModel.num_replicas={MODEL_REPLICAS}",
            ]
        )
    finally:
        serve.shutdown()


@pytest.fixture(scope="module")
def http(url):
    with httpx.Client(base_url=url, headers=AUTH, timeout=120) as client:
        yield client


# --- the catalogue: bad HTTP input, and the answer each gets -----------------------------------

# (id, method, path, body: JSON value | raw bytes | None, headers, expected status, expected error field or None)
_JSON = {"content-type": "application/json"}
CATALOGUE = [
    # the dialogue
    ("empty dialogue", "POST", "/v1/summarize", {"dialogue": ""}, AUTH, 422, "dialogue"),
    ("whitespace dialogue", "POST", "/v1/summarize", {"dialogue": " \n\t "}, AUTH, 422, "dialogue"),
    ("dialogue not a string", "POST", "/v1/summarize", {"dialogue": 42}, AUTH, 422, "dialogue"),
    ("dialogue a list", "POST", "/v1/summarize", {"dialogue": ["a", "b"]}, AUTH, 422, "dialogue"),
    ("dialogue null", "POST", "/v1/summarize", {"dialogue": None}, AUTH, 422, "dialogue"),
    ("dialogue an object", "POST", "/v1/summarize", {"dialogue": {"text": "hi"}}, AUTH, 422, "dialogue"),
    ("missing dialogue", "POST", "/v1/summarize", {"max_new_tokens": 5}, AUTH, 422, "dialogue"),
    ("lone surrogate in the dialogue", "POST", "/v1/summarize", b'{"dialogue": "hi \\ud800 there"}', AUTH | _JSON, 422, "dialogue"),
    ("low surrogate alone", "POST", "/v1/summarize", b'{"dialogue": "\\udfff"}', AUTH | _JSON, 422, "dialogue"),
    ("dialogue longer than the context", "POST", "/v1/summarize", {"dialogue": LONG_DIALOGUE}, AUTH, 422, "dialogue"),
    # max_new_tokens
    ("max_new_tokens a string", "POST", "/v1/summarize", {"dialogue": DIALOGUE, "max_new_tokens": "12"}, AUTH, 422, "max_new_tokens"),
    ("max_new_tokens a float", "POST", "/v1/summarize", {"dialogue": DIALOGUE, "max_new_tokens": 12.5}, AUTH, 422, "max_new_tokens"),
    ("max_new_tokens zero", "POST", "/v1/summarize", {"dialogue": DIALOGUE, "max_new_tokens": 0}, AUTH, 422, "max_new_tokens"),
    ("max_new_tokens negative", "POST", "/v1/summarize", {"dialogue": DIALOGUE, "max_new_tokens": -3}, AUTH, 422, "max_new_tokens"),
    ("max_new_tokens over the limit", "POST", "/v1/summarize", {"dialogue": DIALOGUE, "max_new_tokens": 129}, AUTH, 422, "max_new_tokens"),
    ("max_new_tokens huge", "POST", "/v1/summarize", {"dialogue": DIALOGUE, "max_new_tokens": 10**30}, AUTH, 422, "max_new_tokens"),
    ("max_new_tokens a boolean", "POST", "/v1/summarize", {"dialogue": DIALOGUE, "max_new_tokens": True}, AUTH, 422, "max_new_tokens"),
    # temperature
    ("temperature negative", "POST", "/v1/summarize", {"dialogue": DIALOGUE, "temperature": -0.5}, AUTH, 422, "temperature"),
    ("temperature a string", "POST", "/v1/summarize", {"dialogue": DIALOGUE, "temperature": "hot"}, AUTH, 422, "temperature"),
    ("temperature over 2", "POST", "/v1/summarize", {"dialogue": DIALOGUE, "temperature": 2.5}, AUTH, 422, "temperature"),
    ("temperature 1e-300 (NaN sampling)", "POST", "/v1/summarize", {"dialogue": DIALOGUE, "temperature": 1e-300}, AUTH, 422, "temperature"),
    ("temperature 1e-36", "POST", "/v1/summarize", {"dialogue": DIALOGUE, "temperature": 1e-36}, AUTH, 422, "temperature"),
    ("temperature smallest float", "POST", "/v1/summarize", {"dialogue": DIALOGUE, "temperature": 5e-324}, AUTH, 422, "temperature"),
    ("temperature NaN", "POST", "/v1/summarize", b'{"dialogue": "hi", "temperature": NaN}', AUTH | _JSON, 422, "temperature"),
    ("temperature Infinity", "POST", "/v1/summarize", b'{"dialogue": "hi", "temperature": Infinity}', AUTH | _JSON, 422, "temperature"),
    # the body
    ("unknown field", "POST", "/v1/summarize", {"dialogue": DIALOGUE, "prompt": "x"}, AUTH, 422, "prompt"),
    ("body not an object", "POST", "/v1/summarize", ["just", "a", "list"], AUTH, 422, "body"),
    ("body a bare string", "POST", "/v1/summarize", "hello", AUTH, 422, "body"),
    ("invalid JSON", "POST", "/v1/summarize", b'{"dialogue": "unterminated', AUTH | _JSON, 422, "body"),
    ("empty body", "POST", "/v1/summarize", b"", AUTH | _JSON, 422, "body"),
    ("invalid UTF-8", "POST", "/v1/summarize", b'{"dialogue": "caf\xe9 \xff"}', AUTH | _JSON, 422, "body"),
    ("JSON nested 50,000 deep", "POST", "/v1/summarize", b'{"dialogue": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", AUTH | _JSON, 422, "body"),
    ("body over the size limit", "POST", "/v1/summarize", {"dialogue": "x" * 140_000}, AUTH, 413, "body"),
    ("declared Content-Length over the limit", "POST", "/v1/summarize", b"{}", AUTH | _JSON | {"content-length": "9999999"}, 413, "body"),
    ("form-encoded body", "POST", "/v1/summarize", b"dialogue=hi", AUTH | {"content-type": "application/x-www-form-urlencoded"}, 422, "body"),
    ("duplicate keys, last one blank", "POST", "/v1/summarize", b'{"dialogue": "hi", "dialogue": " "}', AUTH | _JSON, 422, "dialogue"),
    # batches
    ("batch without dialogues", "POST", "/v1/summarize/batch", {}, AUTH, 422, "dialogues"),
    ("batch empty list", "POST", "/v1/summarize/batch", {"dialogues": []}, AUTH, 422, "dialogues"),
    ("batch not a list", "POST", "/v1/summarize/batch", {"dialogues": DIALOGUE}, AUTH, 422, "dialogues"),
    ("batch blank item", "POST", "/v1/summarize/batch", {"dialogues": [DIALOGUE, "  "]}, AUTH, 422, "dialogues.1"),
    ("batch wrong item type", "POST", "/v1/summarize/batch", {"dialogues": [DIALOGUE, 7]}, AUTH, 422, "dialogues.1"),
    ("batch item with a lone surrogate", "POST", "/v1/summarize/batch", b'{"dialogues": ["hi", "\\ud800"]}', AUTH | _JSON, 422, "dialogues.1"),
    ("batch too many", "POST", "/v1/summarize/batch", {"dialogues": [DIALOGUE] * 5}, AUTH, 422, "dialogues"),
    ("batch item longer than the context", "POST", "/v1/summarize/batch", {"dialogues": [DIALOGUE, LONG_DIALOGUE]}, AUTH, 422, "dialogues.1"),
    ("batch temperature 1e-300", "POST", "/v1/summarize/batch", {"dialogues": [DIALOGUE], "temperature": 1e-300}, AUTH, 422, "temperature"),
    # auth
    ("no token", "POST", "/v1/summarize", {"dialogue": DIALOGUE}, {}, 401, None),
    ("wrong token", "POST", "/v1/summarize", {"dialogue": DIALOGUE}, {"Authorization": "Bearer nope"}, 401, None),
    ("token without the Bearer scheme", "POST", "/v1/summarize", {"dialogue": DIALOGUE}, {"Authorization": TOKEN}, 401, None),
    ("basic auth instead of bearer", "POST", "/v1/summarize", {"dialogue": DIALOGUE}, {"Authorization": "Basic dXNlcjpwYXNz"}, 401, None),
    ("no token on /v1/models", "GET", "/v1/models", None, {}, 401, None),
    ("no token on the batch route", "POST", "/v1/summarize/batch", {"dialogues": [DIALOGUE]}, {}, 401, None),
    ("no token and an oversized body", "POST", "/v1/summarize", {"dialogue": "x" * 140_000}, {}, 401, None),
    # routes and methods
    ("unknown route", "GET", "/v2/whatever", None, AUTH, 404, None),
    ("GET on a POST route", "GET", "/v1/summarize", None, AUTH, 405, None),
    ("DELETE on /healthz", "DELETE", "/healthz", None, {}, 405, None),
    ("PUT on the batch route", "PUT", "/v1/summarize/batch", {"dialogues": [DIALOGUE]}, AUTH, 405, None),
    ("path traversal", "GET", "/v1/../../etc/passwd", None, AUTH, 404, None),
]


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize(("method", "path", "body", "headers", "status", "field"), [case[1:] for case in CATALOGUE], ids=[case[0] for case in CATALOGUE])
def test_catalogue_of_bad_http_input(url, method, path, body, headers, status, field):
    if "content-length" in headers:  # a header httpx would correct: sent as written
        response = _raw_request(httpx.URL(url).port, method, path, headers, body)
    else:
        with httpx.Client(base_url=url, timeout=120) as client:
            if isinstance(body, bytes):
                response = client.request(method, path, content=body, headers=headers)
            else:
                response = client.request(method, path, json=body, headers=headers)

    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"]
    assert error.get("field") == field
    assert "Traceback" not in response.text and "ray::" not in response.text


def _raw_request(port: int, method: str, path: str, headers: dict[str, str], body: bytes) -> httpx.Response:
    """One HTTP/1.1 request over a plain socket, headers exactly as given; the answer as an httpx.Response."""
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(head.encode() + b"\r\n" + body)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    status_line, _, rest = answer.partition(b"\r\n")
    raw_headers, _, content = rest.partition(b"\r\n\r\n")
    pairs = [line.decode("latin-1").split(":", 1) for line in raw_headers.split(b"\r\n") if b":" in line]
    return httpx.Response(int(status_line.split()[1]), headers=[(k.strip(), v.strip()) for k, v in pairs], content=content)


def test_catalogue_is_big_enough():
    assert len(CATALOGUE) >= 40
    assert len({case[0] for case in CATALOGUE}) == len(CATALOGUE)


@pytest.mark.ray
@pytest.mark.slow
def test_context_error_gives_the_token_counts_and_logs_no_traceback(http):
    error = http.post("/v1/summarize", json={"dialogue": LONG_DIALOGUE}).json()["error"]

    assert error["type"] == "context_length_exceeded"
    assert "over the model's context of 1024 tokens" in error["message"]
    time.sleep(1)  # replica logs are written by the replica processes
    assert not _serve_log_lines("DialogueTooLong"), "a client's too-long dialogue was logged as a failed request"


def _serve_log_lines(needle: str) -> list[str]:
    """Lines of this Ray session's Serve logs (replicas, proxy) that contain ``needle``."""
    import ray

    logs = Path(ray._private.worker._global_node.get_logs_dir_path()) / "serve"
    return [line for path in logs.glob("*.log") for line in path.read_text(errors="replace").splitlines() if needle in line]


@pytest.mark.ray
@pytest.mark.slow
def test_head_healthz_and_bearer_scheme_in_openapi(url):
    head = httpx.head(url + "/healthz", timeout=30)
    spec = httpx.get(url + "/openapi.json", timeout=30).json()

    assert head.status_code == 200 and head.content == b""
    schemes = spec["components"]["securitySchemes"]
    assert [(s["type"], s["scheme"]) for s in schemes.values()] == [("http", "bearer")]
    for path in ("/v1/summarize", "/v1/summarize/batch", "/v1/models"):
        operation = next(iter(spec["paths"][path].values()))
        assert operation["security"] == [{name: []} for name in schemes], path
    assert "security" not in spec["paths"]["/healthz"]["get"]


@pytest.mark.ray
@pytest.mark.slow
def test_models_needs_the_token_and_shows_no_paths(http, url, home):
    assert httpx.get(url + "/v1/models", timeout=30).status_code == 401
    text = http.get("/v1/models").text
    assert str(home) not in text and "/registry/" not in text


# --- 1. isolation: no request fails another -----------------------------------------------------


@pytest.mark.ray
@pytest.mark.slow
def test_hostile_requests_never_fail_their_batch_mates(http):
    good = [{"dialogue": f"{DIALOGUE}\n#Person2#: Table {i} is yours.", "max_new_tokens": 8} for i in range(7)]
    hostile = [
        {"dialogue": "hi", "temperature": 1e-300},
        {"dialogue": "hi", "temperature": 1e-36},
        {"dialogue": LONG_DIALOGUE},
        {"dialogue": "hi", "max_new_tokens": 10_000},
    ]
    raw_hostile = [b'{"dialogue": "hi \\ud800"}', b'{"dialogue": "\xff\xfe"}']

    def send(body):
        if isinstance(body, bytes):
            return http.post("/v1/summarize", content=body, headers={"content-type": "application/json"})
        return http.post("/v1/summarize", json=body)

    from concurrent.futures import ThreadPoolExecutor

    bodies = good + hostile + raw_hostile
    for _round in range(3):
        with ThreadPoolExecutor(len(bodies)) as pool:
            answers = list(pool.map(send, bodies))
        statuses = [answer.status_code for answer in answers]
        assert statuses[: len(good)] == [200] * len(good), [a.text for a in answers[: len(good)]]
        assert all(400 <= status < 500 for status in statuses[len(good):]), statuses


def _served_model(home: Path, ref: str):
    from loraops.registry import Registry
    from loraops.serve.model import load_registered

    return load_registered(Registry(workspace=home), ref, "merged")


def _engine_rows(served, rows):
    """(dialogue, temperature) rows through one engine, batched together: each row's result or its exception."""
    from loraops.serve.engine.buckets import Buckets
    from loraops.serve.engine.core import Engine
    from loraops.training.data import prompt_ids

    engine = Engine(served, Buckets((1, 2, 4), (256, 512, 1024), (1, 2)))
    futures = [engine.submit(prompt_ids(served.tokenizer, text, served.config.data, budget=10**9), 6, temperature) for text, temperature in rows]
    while not all(f.done() for f in futures):
        engine.run_once(wait=False)
    return [f.exception() or f.result().completion.text for f in futures]


def test_a_request_whose_generation_fails_fails_alone_and_only_the_culprit_is_rejected(home):
    import asyncio

    from loraops.serve.contract import Rejection
    from loraops.serve.engine.core import RowFailed
    from loraops.serve.replica import reject_or_raise

    served = _served_model(home, f"{ADAPTER}:1")
    rows = [(DIALOGUE, 0.0), ("#Person1#: hi", 1e-300), (DIALOGUE + " Thanks.", 0.0), ("#Person1#: Taxi?\n#Person2#: Yes.", 0.0)]

    results = _engine_rows(served, rows)

    assert isinstance(results[1], RowFailed)  # the hostile row's sampling overflowed: it alone failed
    for index in (0, 2, 3):
        assert results[index] == _engine_rows(served, [rows[index]])[0]

    async def probe():
        return None

    rejection = asyncio.run(reject_or_raise(results[1], probe))
    assert isinstance(rejection, Rejection) and rejection.type == "generation_failed"
    assert "Traceback" not in rejection.message


def test_a_lone_failing_request_is_rejected_when_the_model_works_and_a_broken_model_raises():
    import asyncio

    from loraops.serve.contract import Rejection
    from loraops.serve.engine.core import RowFailed
    from loraops.serve.replica import reject_or_raise

    async def works():
        return "a summary"

    async def broken():
        raise RuntimeError("CUDA error: device-side assert triggered")

    error = RowFailed("generation failed: RuntimeError: CUDA error: device-side assert triggered")
    assert isinstance(asyncio.run(reject_or_raise(error, works)), Rejection)
    with pytest.raises(RowFailed, match="device-side assert"):
        asyncio.run(reject_or_raise(error, broken))


# --- 2. slow clients ------------------------------------------------------------------------------


def _stalled_request(port: int, token: bool) -> socket.socket:
    """A POST that declares a 100-byte body and sends 13 bytes of it, then nothing."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=15)
    head = "POST /v1/summarize HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 100\r\n"
    head += f"Authorization: Bearer {TOKEN}\r\n" if token else ""
    sock.sendall(head.encode() + b"\r\n" + b'{"dialogue": ')
    return sock


def _status_of(sock: socket.socket) -> int:
    with sock:
        first = sock.recv(4096).split(b"\r\n", 1)[0]  # b"HTTP/1.1 408 Request Timeout"
    return int(first.split()[1])


@pytest.mark.ray
@pytest.mark.slow
def test_stalled_clients_do_not_stall_the_api(url, http):
    port = httpx.URL(url).port
    started = time.monotonic()
    stalled = [_stalled_request(port, token=True) for _ in range(API_SLOTS + 4)]  # more than the ingress's slots

    health = httpx.get(url + "/healthz", timeout=30)
    healthy_after = time.monotonic() - started
    answer = http.post("/v1/summarize", json={"dialogue": DIALOGUE, "max_new_tokens": 4}, timeout=60)
    answered_after = time.monotonic() - started
    statuses = [_status_of(sock) for sock in stalled]
    cut_off_after = time.monotonic() - started

    print(
        f"\n{len(stalled)} stalled clients (ingress max_ongoing_requests {API_SLOTS}, body_timeout_s {BODY_TIMEOUT_S:g}): /healthz answered "
        f"after {healthy_after:.2f} s, a summary after {answered_after:.2f} s, every stalled client had its 408 after {cut_off_after:.2f} s"
    )
    assert health.status_code == 200 and answer.status_code == 200, answer.text
    assert statuses == [408] * len(stalled)
    # Stalled bodies hold the API for at most about one body timeout (they are cut off at its deadline) ...
    assert healthy_after < 2 * BODY_TIMEOUT_S, f"/healthz waited {healthy_after:.2f} s behind stalled clients"
    # ... and each stalled client gets its 408 near the body deadline, not at its own 15 s socket timeout (read after the summary).
    assert cut_off_after < answered_after + 2 * BODY_TIMEOUT_S, f"the 408s came {cut_off_after:.2f} s after the stall"


@pytest.mark.ray
@pytest.mark.slow
def test_a_client_without_the_token_is_refused_before_it_sends_its_body(url):
    statuses = [_status_of(_stalled_request(httpx.URL(url).port, token=False)) for _ in range(3)]

    assert statuses == [401] * 3  # a 408 would mean its (never finished) body was waited for


# --- 4. errors: no internals in answers -----------------------------------------------------------


def test_internal_errors_answer_internal_error_with_the_request_id_of_the_log_line(caplog):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from loraops.serve.app import app as api

    probe = FastAPI()
    for key, handler in api.exception_handlers.items():
        probe.add_exception_handler(key, handler)
    remote_traceback = 'ray::SummarizerModel.summarize() (pid=4242, ip=10.0.0.7, actor_id=ab12)\n  File "/home/alice/loraops/replica.py", line 9'

    @probe.get("/boom")
    async def boom():
        raise RuntimeError(remote_traceback)

    serve_log = logging.getLogger("ray.serve")
    serve_log.addHandler(caplog.handler)
    try:
        with TestClient(probe, raise_server_exceptions=False) as client:
            response = client.get("/boom", headers={"x-request-id": "req-7f3a"})
    finally:
        serve_log.removeHandler(caplog.handler)

    assert response.status_code == 500
    error = response.json()["error"]
    assert error["type"] == "internal_error" and error["request_id"] == "req-7f3a"
    assert "internal error" in error["message"] and "req-7f3a" in error["message"]
    assert "pid=" not in response.text and "/home/alice" not in response.text and "RuntimeError" not in response.text
    assert any("req-7f3a" in record.getMessage() and "pid=4242" in record.getMessage() for record in caplog.records)


# --- 3. a broken version never blocks recovery ------------------------------------------------------


def test_fallback_order_is_the_alias_history_newest_first():
    from types import SimpleNamespace

    from loraops.serve.adapters import fallback_order

    def moved(source, target):
        return SimpleNamespace(from_version=source, to_version=target)

    history = [moved(None, 1), moved(1, 3), moved(3, 1), moved(1, 4), moved(4, 2), moved(2, 5)]

    assert fallback_order(history, failed=5) == [2, 4, 1, 3]
    assert fallback_order([moved(None, 1)], failed=1) == []


def test_without_paths_keeps_the_message_and_drops_the_locations():
    from loraops.serve.public import without_paths

    text = (
        "cannot load tiny:3: tiny:3 (s3://bucket/loraops/registry/tiny/v3): checksum mismatch for file adapter_model.safetensors "
        "(/srv/loraops/.loraops/registry/tiny/v3/adapter_model.safetensors): expected sha256 ab, found cd; 1/2 done"
    )

    assert without_paths(text) == (
        "cannot load tiny:3: tiny:3 (<path>): checksum mismatch for file adapter_model.safetensors (<path>): expected sha256 ab, found cd; 1/2 done"
    )
    unreachable = "cannot switch to tiny:2: s3://bucket/registry/tiny/v2: cannot connect to http://127.0.0.1:9000 (AWS_ENDPOINT_URL); still serving tiny:1"
    assert without_paths(unreachable) == "cannot switch to tiny:2: <path>: cannot connect to <path> (AWS_ENDPOINT_URL); still serving tiny:1"


def _replica_states() -> dict[str, int]:
    from ray import serve

    states = serve.status().applications[APP].deployments["SummarizerModel"].replica_states
    return {str(getattr(state, "value", state)): int(count) for state, count in states.items() if count}


def _wait_for(condition, timeout_s: float, what: str) -> float:
    return elapsed_until(condition, timeout_s, what, detail=lambda: f"replicas: {_replica_states()}")


def _answers_after(records: list[Answer], moment: float, count: int = 4) -> None:
    """Wait until ``count`` requests that started after ``moment`` have their answer: the load ran past it."""
    _wait_for(lambda: sum(r.started > moment for r in list(records)) >= count, 60, f"{count} answers to requests sent after the event")


def _versions_served(http, probes: int = 12) -> set[int]:
    return {http.post("/v1/summarize", json={"dialogue": DIALOGUE, "max_new_tokens": 2}).json()["model"]["version"] for _ in range(probes)}


def _settled(http, home: Path, version: int) -> None:
    """Both replicas running, serving ``version`` with no problem (a previous drill may have left another state)."""
    _wait_for(lambda: _replica_states() == {"RUNNING": MODEL_REPLICAS}, 180, "all replicas running")
    _wait_for(lambda: _versions_served(http) == {version}, 60, f"every replica serving v{version}")
    _wait_for(lambda: all(m["problem"] is None for m in _models(http, 6)), 60, "no replica reporting a problem")


def _models(http, probes: int) -> list[dict]:
    return [http.get("/v1/models").json()["models"][0] for _ in range(probes)]


def _artifact(home: Path, version: int) -> Path:
    return home / "registry" / ADAPTER / f"v{version}" / "adapter_model.safetensors"


def _corrupt(path: Path) -> bytes:
    """Overwrite the middle of a stored file behind the registry's back; returns the original bytes."""
    original = path.read_bytes()
    middle = len(original) // 2
    path.write_bytes(original[:middle] + bytes(256) + original[middle + 256:])
    return original


def _point_alias_without_checks(home: Path, version: int) -> None:
    """Move production the way an old client or a hand-edited database would: no checksum verification."""
    from sqlalchemy import select

    from loraops.registry import Registry
    from loraops.registry import db as registry_db

    registry = Registry(workspace=home)
    current = registry.get(f"{ADAPTER}@production").version

    def move(session):
        adapter = session.scalars(select(registry_db.AdapterRow).where(registry_db.AdapterRow.name == ADAPTER)).one()
        session.get(registry_db.AliasRow, (adapter.id, "production")).version = version
        session.add(registry_db.AliasEventRow(adapter_id=adapter.id, alias="production", action="promote", from_version=current, to_version=version))

    registry_db.run_write(registry.engine, move)


def _kill_one_model_replica() -> str:
    import ray

    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(f"SERVE_REPLICA::{APP}#SummarizerModel#")]
    victim = sorted(names)[0]
    ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
    return victim


@dataclass
class Answer:
    started: float
    ended: float
    status: int | None  # None: no HTTP answer at all
    version: int | None
    error: str | None


def _load(url: str, stop: threading.Event, clients: int = 4):
    """``clients`` threads sending requests back to back (no retries) until ``stop``; returns (threads, answers so far)."""
    answers: list[Answer] = []

    def client() -> None:
        with httpx.Client(base_url=url, headers=AUTH, timeout=120) as http:
            while not stop.is_set():
                started = time.monotonic()
                try:
                    response = http.post("/v1/summarize", json={"dialogue": DIALOGUE, "max_new_tokens": 4})
                except httpx.HTTPError as exc:
                    answers.append(Answer(started, time.monotonic(), None, None, f"{type(exc).__name__}: {exc}"))
                    continue
                version = response.json()["model"]["version"] if response.status_code == 200 else None
                answers.append(Answer(started, time.monotonic(), response.status_code, version, None if version else response.text[:300]))

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for thread in threads:
        thread.start()
    return threads, answers


def _stop(threads: list[threading.Thread], stop: threading.Event) -> None:
    stop.set()
    for thread in threads:
        thread.join()


@pytest.mark.ray
@pytest.mark.slow
def test_drill_promotion_to_a_corrupt_version(http, url, home):
    from loraops.registry import Registry

    _settled(http, home, 2)
    _corrupt(_artifact(home, 3))
    stop = threading.Event()
    load, records = _load(url, stop)
    try:
        _answers_after(records, 0.0)  # the load runs before the alias moves
        moved_at = time.monotonic()
        _point_alias_without_checks(home, 3)
        reported_after = _wait_for(lambda: any(m["problem"] for m in _models(http, 4)), 30, "a replica reporting the corrupt version")
        _answers_after(records, time.monotonic())  # and goes on after the problem is reported
    finally:
        _stop(load, stop)
    # Each replica finds the problem at its own next registry poll: wait until every probe's replica has.
    _wait_for(lambda: all(m["problem"] for m in _models(http, 6)), 30, "every replica reporting the corrupt version")
    models = _models(http, 6)
    health = httpx.get(url + "/healthz", timeout=30)
    strict = httpx.get(url + "/healthz?strict=true", timeout=30)

    print(
        f"\npromotion to a corrupt version under load: {len(records)} requests, {sum(r.status != 200 for r in records)} failed, versions "
        f"{sorted({r.version for r in records})}; problem reported {reported_after:.1f} s after the alias moved"
    )
    assert records and all(r.status == 200 and r.version == 2 for r in records)  # the running replicas keep v2
    assert all(m["version"] == 2 and "tiny:3" in m["problem"] and "checksum mismatch" in m["problem"] for m in models)
    assert all(str(home) not in m["problem"] and "/registry/" not in m["problem"] for m in models)
    assert health.status_code == 200 and health.json()["status"] == "degraded" and "tiny:3" in health.json()["problem"]
    assert strict.status_code == 503
    assert min(r.ended for r in records) < moved_at < max(r.started for r in records)

    Registry(workspace=home).rollback(ADAPTER, reason="drill: v3 is corrupt")  # production back to 2: how operators recover
    _wait_for(lambda: httpx.get(url + "/healthz?strict=true", timeout=30).status_code == 200, 30, "healthy again after the rollback")


@pytest.mark.ray
@pytest.mark.slow
def test_drill_replica_killed_under_load_while_production_is_corrupt(http, url, home):
    _settled(http, home, 2)
    original = _corrupt(_artifact(home, 2))  # the running replicas hold v2 in memory; a new one cannot verify it
    stop = threading.Event()
    load, records = _load(url, stop)
    try:
        _answers_after(records, 0.0)  # the load runs before the kill
        killed_at = time.monotonic()
        victim = _kill_one_model_replica()
        _wait_for(lambda: _replica_states().get("RUNNING", 0) < MODEL_REPLICAS, 30, "Serve noticing the dead replica")
        recovered_after = _wait_for(lambda: _replica_states() == {"RUNNING": MODEL_REPLICAS}, 180, "capacity back")
        _wait_for(lambda: any(r.version == 1 and r.started > killed_at for r in list(records)), 30, "answers from the fallback version")
        _answers_after(records, time.monotonic())  # and goes on after the fallback answers
    finally:
        _stop(load, stop)
    # /v1/models is answered by one replica per call, which Serve's router picks: probe until the replacement answers
    degraded: list[dict] = []
    _wait_for(lambda: degraded.extend(m for m in _models(http, 4) if m["problem"]) or degraded, 30, "the fallback replica's /v1/models")

    failed = [r for r in records if r.status != 200]
    first_fallback = min(r.ended for r in records if r.version == 1) - killed_at
    print(
        f"\nreplica {victim.rsplit('#', 1)[-1]} killed under load (4 clients), production v2 corrupt on disk: {len(records)} requests, "
        f"{len(failed)} failed (statuses {sorted({r.status for r in failed})}); {MODEL_REPLICAS} replicas running again {recovered_after:.1f} s "
        f"after the kill; first answer from the fallback v1 {first_fallback:.1f} s after it"
    )
    assert all(r.status == 503 for r in failed), [(r.status, r.error) for r in failed]
    assert {r.version for r in records if r.status == 200} == {1, 2}
    assert degraded and all(m["version"] == 1 and "tiny:2" in m["problem"] and "serving tiny:1" in m["problem"] for m in degraded)

    _artifact(home, 2).write_bytes(original)  # the other way to recover: repair the files; the fallback replica switches back
    _wait_for(lambda: _versions_served(http) == {2}, 60, "every replica back on v2 after the repair")


# --- 7. configuration and CLI -------------------------------------------------------------------


def test_trust_remote_code_of_a_registered_version_is_refused_unless_allowed(home, cli_env):
    from loraops.errors import LoraopsError
    from loraops.registry import Lineage, Registry
    from loraops.serve.model import training_config

    registry = Registry(workspace=home)
    config = _tiny_config(home, "model.trust_remote_code=true").model_dump(mode="json")
    registry.register(home / "adapters" / "a1", "remote", lineage=Lineage(config=config))
    version = registry.get("remote:1")

    with pytest.raises(LoraopsError, match="allow_trust_remote_code"):
        training_config(version, str(home))
    assert training_config(version, str(home), allow_trust_remote_code=True).model.trust_remote_code is True
    done = run_cli("serve", "--config", str(REPO / "serve" / "tiny.yaml"), "--detach", "--set", "args.adapter=remote:1", env=cli_env(home), timeout=120)
    assert done.returncode == 2
    assert done.stderr.startswith("loraops: error: remote:1 was trained with model.trust_remote_code: true") and done.stderr.count("\n") == 1


def test_cli_serve_on_a_port_in_use_is_one_line(home, cli_env):
    env = {key: value for key, value in cli_env(home).items() if key != "RAY_ADDRESS"}
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = run_cli("serve", "--config", str(REPO / "serve" / "tiny.yaml"), "--set", f"http_options.port={port}", env=env, timeout=120)

    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.startswith(f"loraops: error: http_options: cannot listen on 127.0.0.1:{port} (Address already in use): ")
    assert done.stderr.count("\n") == 1



def test_a_database_password_from_the_environment_is_not_copied_into_the_application(monkeypatch, tmp_path):
    from loraops.serve.settings import ServeSettings

    monkeypatch.setenv("LORAOPS_DATABASE_URL", "postgresql://loraops:hunter2@db.internal/loraops")
    from_env = ServeSettings(workspace=str(tmp_path)).with_absolute_paths()
    explicit = ServeSettings(workspace=str(tmp_path), db_url="postgresql://reader@db.internal/loraops").with_absolute_paths()
    monkeypatch.delenv("LORAOPS_DATABASE_URL")
    default = ServeSettings(workspace=str(tmp_path)).with_absolute_paths()

    assert from_env.db_url is None  # the replicas read $LORAOPS_DATABASE_URL themselves
    assert "hunter2" not in str(from_env.model_dump())  # what the deployments get as arguments
    assert explicit.db_url.endswith("://reader@db.internal/loraops")  # an explicit URL is the operator's choice
    assert default.db_url == f"sqlite:///{tmp_path.resolve() / 'loraops.db'}"
