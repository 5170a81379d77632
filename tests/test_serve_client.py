"""The HTTP client of the endpoint (:mod:`loraops.serve.client`) against a mock transport: retries on
503, errors that name the field."""

from __future__ import annotations

import json

import httpx
import pytest


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

    error = {"type": "validation_error", "message": "dialogue: empty", "field": "dialogue"}
    invalid = httpx.MockTransport(lambda _r: httpx.Response(422, json={"error": error}))
    with SummarizerClient("http://test", transport=invalid) as client, pytest.raises(ServeError) as caught:
        client.summarize(" ")
    assert (caught.value.status, caught.value.field) == (422, "dialogue")

    always_busy = httpx.MockTransport(lambda _r: httpx.Response(503, json={"error": {"type": "unavailable", "message": "no replica"}}))
    with SummarizerClient("http://test", retries=2, backoff_s=0.001, transport=always_busy) as client, pytest.raises(ServeError, match="HTTP 503: no replica"):
        client.health()
