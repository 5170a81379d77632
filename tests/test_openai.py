"""Several adapters on one base and the OpenAI-compatible routes, for real: the session's shared Serve
application (conftest's ``shared_app``, on the session's local Ray) serving ``tiny@production`` (v1)
and ``tiny:2`` at once, real HTTP, and the official ``openai`` Python package as the client
(non-streaming and streaming, completions and chat).
"""

from __future__ import annotations

import concurrent.futures
import json
from pathlib import Path

import httpx
import pytest

openai = pytest.importorskip("openai")

pytestmark = [pytest.mark.slow, pytest.mark.ray]

DIALOGUE = "#Person1#: Is the shop open on Sunday?\n#Person2#: Yes, from ten until four.\n#Person1#: Great, I'll come then."
OTHER = "#Person1#: Can you send me the report?\n#Person2#: Sure, I will email it tonight."
TOKENS = 16
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def url(shared_app):
    """The session's shared application (conftest): the production alias (v1) and a pinned v2 on one base, bearer auth on."""
    return shared_app.url()


@pytest.fixture(scope="module")
def http(shared_app):
    with shared_app.http() as client:
        yield client


@pytest.fixture(scope="module")
def client(shared_app):
    return shared_app.openai_client()


def _summary(http, dialogue: str, model: str | None = None) -> dict:
    body = {"dialogue": dialogue, "max_new_tokens": TOKENS} | ({"model": model} if model else {})
    response = http.post("/v1/summarize", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def _events(response: httpx.Response) -> list:
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: ") :]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def test_two_versions_are_served_at_once_each_request_by_the_one_it_names(http):
    listed = http.get("/v1/models").json()
    assert {entry["id"] for entry in listed["data"]} >= {"tiny", "tiny@production", "tiny:2"}
    names = [("tiny@production", 1), ("tiny:2", 2), (None, 1), ("tiny", 1)] * 3
    with concurrent.futures.ThreadPoolExecutor(len(names)) as pool:  # concurrent: the engine mixes adapters in its batches
        answers = list(pool.map(lambda named: _summary(http, DIALOGUE if named[1] == 1 else OTHER, named[0]), names))
    for (_, version), answer in zip(names, answers, strict=True):
        assert answer["model"] == {"name": "tiny", "version": version}
    # Greedy: the same request gives the same tokens whichever batch-mates it had.
    assert len({a["summary"] for a, (_, v) in zip(answers, names, strict=True) if v == 1}) == 1
    assert len({a["summary"] for a, (_, v) in zip(answers, names, strict=True) if v == 2}) == 1


def test_a_model_that_is_not_served_is_a_404_naming_the_served_ones(http, client):
    response = http.post("/v1/summarize", json={"dialogue": DIALOGUE, "model": "tiny:9"})
    assert response.status_code == 404
    error = response.json()["error"]
    assert error["type"] == "model_not_found" and error["field"] == "model"
    assert "tiny@production" in error["message"] and "tiny:2" in error["message"]
    with pytest.raises(openai.NotFoundError) as raised:
        client.completions.create(model="other@production", prompt=DIALOGUE, max_tokens=TOKENS)
    assert raised.value.code == "model_not_found" and raised.value.param == "model"


def test_openai_completions_and_chat_answer_what_summarize_answers(http, client):
    expected = _summary(http, DIALOGUE)
    completion = client.completions.create(model="tiny", prompt=DIALOGUE, max_tokens=TOKENS, temperature=0)
    assert completion.choices[0].text == expected["summary"]
    assert completion.model == "tiny:1" and completion.choices[0].finish_reason == expected["finish_reason"]
    assert completion.usage.completion_tokens == expected["usage"]["completion_tokens"]
    assert completion.usage.total_tokens == expected["usage"]["prompt_tokens"] + expected["usage"]["completion_tokens"]

    chat = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "system", "content": "Summarize the dialogue."}, {"role": "user", "content": DIALOGUE}],
        max_tokens=TOKENS,
    )
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == expected["summary"]

    pinned = client.chat.completions.create(model="tiny:2", messages=[{"role": "user", "content": OTHER}], max_completion_tokens=TOKENS)
    assert pinned.model == "tiny:2" and pinned.choices[0].message.content == _summary(http, OTHER, "tiny:2")["summary"]
    assert {model.id for model in client.models.list()} >= {"tiny", "tiny:2"}


def test_openai_streams_give_the_same_text_chunk_by_chunk(http, client):
    expected = _summary(http, DIALOGUE)["summary"]
    chunks = list(client.completions.create(model="tiny", prompt=DIALOGUE, max_tokens=TOKENS, stream=True))
    texts = [chunk.choices[0].text for chunk in chunks if chunk.choices]
    assert "".join(texts) == expected
    assert sum(1 for text in texts if text) > 1  # token by token, not one piece at the end
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")

    stream = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": DIALOGUE}], max_tokens=TOKENS, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    content = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert content == expected
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_summarize_streams_server_sent_events(http):
    expected = _summary(http, DIALOGUE)
    with http.stream("POST", "/v1/summarize", params={"stream": "true"}, json={"dialogue": DIALOGUE, "max_new_tokens": TOKENS}) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        events = _events(response)
    assert events[-1] == "[DONE]"
    final = events[-2]
    assert final["summary"] == expected["summary"] and final["model"] == {"name": "tiny", "version": 1}
    assert "".join(event["text"] for event in events[:-2]) == expected["summary"]


def test_openai_routes_refuse_bad_input_in_openai_shape(url, client):
    with pytest.raises(openai.UnprocessableEntityError) as raised:
        client.completions.create(model="tiny", prompt=DIALOGUE, n=2)
    assert raised.value.param == "n" and "n=1" in raised.value.message
    with pytest.raises(openai.UnprocessableEntityError) as raised:
        client.chat.completions.create(model="tiny", messages=[{"role": "system", "content": "Be brief."}])
    assert raised.value.param == "messages" and "user message" in raised.value.message
    with pytest.raises(openai.UnprocessableEntityError) as raised:
        client.completions.create(model="tiny", prompt=DIALOGUE, max_tokens=100_000)
    assert raised.value.param == "max_tokens"
    with pytest.raises(openai.AuthenticationError) as raised:
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).completions.create(model="tiny", prompt=DIALOGUE)
    assert raised.value.body["type"] == "authentication_error"


# --- OpenAI exactly: error params, 405, strict booleans, one model per stream, cheap length refusal ---


@pytest.mark.parametrize(
    ("route", "body", "param"),
    [
        ("/v1/completions", {"model": "tiny", "prompt": ""}, "prompt"),
        ("/v1/completions", {"model": "tiny", "prompt": 42}, "prompt"),
        ("/v1/completions", {"model": "tiny", "prompt": [" "]}, "prompt[0]"),
        ("/v1/completions", {"model": "tiny", "prompt": DIALOGUE, "stream": "yes"}, "stream"),
        ("/v1/completions", {"model": "tiny", "prompt": DIALOGUE, "stream": 1}, "stream"),
        ("/v1/completions", {"model": "tiny", "prompt": DIALOGUE, "stream": True, "stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
        ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": 42}]}, "messages[0].content"),
        ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages[0].content[0].text"),
        ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "system", "content": "Be brief."}, {"content": DIALOGUE}]}, "messages[1].role"),
        ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "system", "content": "x"}, {"role": "user", "content": " "}]}, "messages[1].content"),
        ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": DIALOGUE}], "stream": "true"}, "stream"),
    ],
)
def test_openai_errors_name_the_field_as_the_client_wrote_it(http, route, body, param):
    response = http.post(route, json=body)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert (error["param"], error["type"]) == (param, "invalid_request_error")
    assert error["message"].startswith(f"{param}: ")


def test_the_summarize_routes_keep_their_dotted_fields(http):
    error = http.post("/v1/summarize/batch", json={"dialogues": [DIALOGUE, " "]}).json()["error"]
    assert error["field"] == "dialogues.1"


def test_a_wrong_method_on_an_openai_route_is_an_invalid_request(http):
    response = http.get("/v1/chat/completions")
    assert response.status_code == 405
    assert response.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("model", ["tiny", "tiny:2"])
def test_every_chunk_of_a_stream_names_the_version_that_answers(client, model):
    version = "tiny:1" if model == "tiny" else "tiny:2"
    chunks = list(client.completions.create(model=model, prompt=DIALOGUE, max_tokens=TOKENS, stream=True))
    assert len(chunks) > 2 and {chunk.model for chunk in chunks} == {version}
    stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": DIALOGUE}], max_tokens=TOKENS, stream=True)
    chunks = list(stream)
    assert len(chunks) > 2 and {chunk.model for chunk in chunks} == {version}
    assert chunks[0].choices[0].delta.role == "assistant"


def test_a_prompt_far_over_the_context_is_refused_before_it_is_tokenized(http, serving_home):
    import time

    from loraops.config import load_config
    from loraops.training.model import load_tokenizer

    prompt = ("#Person1#: " + "The weather is lovely today, shall we walk? " * 22_000)[:1_000_000]
    tokenizer = load_tokenizer(load_config(REPO / "tune" / "tiny.yaml", [f"workspace={serving_home}"]))
    started = time.perf_counter()
    tokenizer(prompt)
    tokenizing_s = time.perf_counter() - started

    started = time.perf_counter()
    response = http.post("/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": TOKENS})
    refused_s = time.perf_counter() - started
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert (error["param"], error["code"]) == ("prompt", "context_length_exceeded")
    assert "the dialogue is at least" in error["message"] and "over the model's context of" in error["message"]
    # Before the bound, the refusal took the tokenizer's time and more; now it takes the upload's.
    print(f"1 MB prompt: refused in {refused_s:.3f} s; tokenizing it takes {tokenizing_s:.3f} s")
    assert refused_s < tokenizing_s
