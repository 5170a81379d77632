"""The LLM ecosystem's own clients against a real Serve application (conftest's ``shared_app``, on the session's
local Ray): the official ``openai`` package with each sampling field loraops accepts, the routes benchmark
tools call first (``/health``, ``/version``), and GuideLLM 0.8.1 end to end (``guidellm run`` in its own
virtual environment, built once per machine: it brings its own torch and datasets)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")

pytestmark = [pytest.mark.slow, pytest.mark.ray]

DIALOGUE = "#Person1#: Is the shop open on Sunday?\n#Person2#: Yes, from ten until four.\n#Person1#: Great, I'll come then."
TOKENS = 16
GUIDELLM = "guidellm==0.8.1"
TORCH = "torch==2.13.0"  # installed first: pip would otherwise pull a multi-GB CUDA build for GuideLLM
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"


@pytest.fixture(scope="module")
def url(shared_app) -> str:
    """The session's shared application (conftest's ``shared_app``: bearer auth on, ``tiny@production`` the default)."""
    return shared_app.url()


@pytest.fixture(scope="module")
def token(shared_app) -> str:
    return shared_app.token


@pytest.fixture(scope="module")
def http(shared_app):
    with shared_app.http() as client:
        yield client


@pytest.fixture(scope="module")
def client(shared_app):
    return shared_app.openai_client()


def _complete(client, **fields):
    return client.completions.create(model="tiny", prompt=DIALOGUE, max_tokens=TOKENS, **fields)


# --- the official client, field by field -------------------------------------------------------


def test_neutral_values_of_every_field_change_nothing(client):
    """What clients send by default (vLLM's benchmark sends logprobs null and best_of 1 with every request) answers as the bare request."""
    plain = _complete(client, temperature=0)
    neutral = _complete(
        client, temperature=0, top_p=1, stop=None, seed=None, presence_penalty=0, frequency_penalty=0, logprobs=None, best_of=1,
        extra_body={"top_k": -1, "min_tokens": 0, "ignore_eos": False, "repetition_penalty": 1.0, "logit_bias": {}},
    )  # fmt: skip
    assert neutral.choices[0].text == plain.choices[0].text and neutral.usage == plain.usage
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": DIALOGUE}], max_tokens=TOKENS, logprobs=False, top_logprobs=0)
    assert chat.choices[0].message.content == plain.choices[0].text


def test_sampling_fields_change_the_answer_as_they_mean_to(client):
    plain = _complete(client, temperature=0)
    text = plain.choices[0].text
    assert len(text) >= 8, text  # long enough to cut
    stop = text[len(text) // 2 :][:3]
    stopped = _complete(client, temperature=0, stop=[stop, "never appears"])
    assert text.startswith(stopped.choices[0].text) and stop not in stopped.choices[0].text
    assert stopped.choices[0].finish_reason == "stop" and stopped.usage.completion_tokens < plain.usage.completion_tokens

    seeded = [_complete(client, temperature=1.5, seed=seed).choices[0].text for seed in (1, 1, 2, 3)]
    assert seeded[0] == seeded[1] and len(set(seeded)) >= 2
    assert _complete(client, temperature=1.0, seed=4, extra_body={"top_k": 1}).choices[0].text == text  # top-k 1: the argmax
    assert _complete(client, temperature=1.0, seed=4, top_p=1e-6).choices[0].text == text

    forced = _complete(client, temperature=0, logit_bias={"1000": 100})
    assert forced.usage.completion_tokens == TOKENS and forced.choices[0].finish_reason == "length"
    long = _complete(client, temperature=0, extra_body={"ignore_eos": True, "min_tokens": TOKENS})
    assert long.usage.completion_tokens == TOKENS and long.choices[0].finish_reason == "length"
    penalized = _complete(client, temperature=0, presence_penalty=2.0, frequency_penalty=2.0, extra_body={"repetition_penalty": 2.0})
    assert penalized.choices[0].text != text or len(set(text.split())) == len(text.split())


def test_log_probabilities_of_each_token_in_openai_shapes(client):
    import math

    plain = _complete(client, temperature=0)
    listed = _complete(client, temperature=0, logprobs=3).choices[0]
    assert listed.text == plain.choices[0].text  # asking for them changes no token
    logprobs = listed.logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == plain.usage.completion_tokens
    for token, logprob, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs, strict=True):
        assert logprob <= 0 and 1 <= len(top) <= 3 and math.isclose(max(top.values()), logprob, abs_tol=1e-5)  # greedy: the likeliest
        assert top.get(token, logprob) == pytest.approx(logprob, abs=1e-5)
    assert logprobs.text_offset[0] == 0 and logprobs.text_offset == sorted(logprobs.text_offset)

    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": DIALOGUE}], max_tokens=TOKENS, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens and all(len(entry.top_logprobs) == 2 for entry in content)
    assert [entry.logprob for entry in content] == pytest.approx(logprobs.token_logprobs, abs=1e-5)  # the same tokens, the same numbers
    assert all(bytes(entry.bytes).decode("utf-8") == entry.token for entry in content)
    assert client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": DIALOGUE}], max_tokens=TOKENS).choices[0].logprobs is None


def test_a_stream_with_stop_and_continuous_usage(client):
    plain = _complete(client, temperature=0).choices[0].text
    stop = plain[len(plain) // 2 :][:3]
    stream = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": [{"type": "text", "text": DIALOGUE}]}], max_completion_tokens=TOKENS, stream=True,
        stop=stop, stream_options={"include_usage": True, "continuous_usage_stats": True},
    )  # fmt: skip
    chunks = list(stream)
    content = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert content == plain[: plain.index(stop)].strip()
    assert all(chunk.usage is not None for chunk in chunks)  # every chunk, vLLM's continuous usage
    counts = [chunk.usage.completion_tokens for chunk in chunks]
    assert counts == sorted(counts) and counts[-1] > 0 and chunks[-2].choices[0].finish_reason == "stop"


@pytest.mark.parametrize(
    ("route", "fields", "status", "param"),
    [
        ("/v1/completions", {"logprobs": 2, "stream": True}, 400, "logprobs"),
        ("/v1/completions", {"logprobs": 21}, 422, "logprobs"),
        ("/v1/completions", {"best_of": 2}, 400, "best_of"),
        ("/v1/chat/completions", {"logprobs": True, "stream": True}, 400, "logprobs"),
        ("/v1/chat/completions", {"top_logprobs": 3}, 400, "top_logprobs"),
        ("/v1/completions", {"min_tokens": TOKENS + 1}, 400, "min_tokens"),
        ("/v1/completions", {"logit_bias": {"99999999": 5}}, 400, "logit_bias"),
        ("/v1/completions", {"logit_bias": {"the": 5}}, 422, "logit_bias"),
        ("/v1/completions", {"top_p": 0}, 422, "top_p"),
        ("/v1/completions", {"stop": [""]}, 422, "stop"),
        ("/v1/completions", {"n": 2}, 422, "n"),
        ("/v1/completions", {"stream_options": {"continuous_usage": True}}, 422, "stream_options.continuous_usage"),
        ("/v1/chat/completions", {"echo": True}, 422, "echo"),
    ],
)
def test_a_value_that_cannot_be_honoured_is_refused_by_name(http, route, fields, status, param):
    text = {"prompt": DIALOGUE} if route == "/v1/completions" else {"messages": [{"role": "user", "content": DIALOGUE}]}
    body = {"model": "tiny", "max_tokens": TOKENS} | text
    response = http.post(route, json=body | fields)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["message"].startswith(f"{param}: ")


def test_health_and_version_answer_as_vllm_does(http):
    from loraops import __version__

    assert http.get("/health").status_code == 200
    assert http.get("/version").json() == {"version": __version__}


# --- GuideLLM, end to end ----------------------------------------------------------------------


def guidellm_python() -> Path:
    """The Python of a virtual environment holding GuideLLM, built once per machine into loraops' cache
    (``$XDG_CACHE_HOME/loraops/guidellm-0.8.1``): built in a scratch folder and renamed into place, so two
    sessions building at once both end with a complete one."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "loraops" / GUIDELLM.replace("==", "-")
    python = cache / "bin" / "python"
    if python.exists():
        return python
    cache.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{cache.name}-", dir=cache.parent))
    try:
        subprocess.run([sys.executable, "-m", "venv", str(staging)], check=True)
        pip = [str(staging / "bin" / "python"), "-m", "pip", "install", "-qq"]
        if subprocess.run([*pip, TORCH]).returncode != 0:  # no local CPU build: the CPU index, as `make install` does
            subprocess.run([*pip, TORCH, "--index-url", TORCH_CPU_INDEX], check=True)
        subprocess.run([*pip, GUIDELLM], check=True)
        with contextlib.suppress(OSError):  # another session finished first: its environment is the same
            staging.rename(cache)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return python


def _guidellm_run(url: str, token: str, tokenizer: Path, out: Path, output_tokens: int, requests: int) -> list[dict]:
    """``guidellm run`` at concurrency 1 then 8 (the command docs/serving.md shows); its benchmarks."""
    command = [
        str(guidellm_python()), "-m", "guidellm", "run",
        "--backend", f"kind=openai_http,target={url},model=tiny,api_key={token}",
        "--tokenizer", f"kind=hf_auto,model={tokenizer}",
        "--data", f"kind=synthetic_text,prompt_tokens=120,output_tokens={output_tokens}",
        "--profile", "kind=concurrent", "--override", "profile.streams", "1,8",
        "--constraint", f"kind=max_requests,count={requests}",
        "--output", f"kind=json,path={out}", "--disable-progress",
    ]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, timeout=600, env=os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return json.loads(out.read_text())["benchmarks"]


def _lost_by_guidellm(benchmark: dict) -> bool:
    """GuideLLM 0.8.1's own race (seen once in eight runs here, at concurrency 1): its scheduler ends a benchmark still
    counting one request as processing, with nothing errored or incomplete; the server answered it."""
    totals = benchmark["metrics"]["request_totals"]
    return benchmark["scheduler_state"]["processing_requests"] > 0 and totals["errored"] == totals["incomplete"] == 0


def test_guidellm_completes_every_request_at_concurrency_1_and_8(url, token, serving_home, tmp_path):
    output_tokens, requests = 24, 24
    tokenizer = serving_home / "models" / "tiny-phi"
    benchmarks = _guidellm_run(url, token, tokenizer, tmp_path / "guidellm.json", output_tokens, requests)
    if any(_lost_by_guidellm(b) for b in benchmarks):  # its accounting, not a request that failed: run it once more
        benchmarks = _guidellm_run(url, token, tokenizer, tmp_path / "guidellm-again.json", output_tokens, requests)

    assert [b["config"]["strategy"]["streams"] for b in benchmarks] == [1, 8]
    for benchmark in benchmarks:
        totals = benchmark["metrics"]["request_totals"]
        assert (totals["successful"], totals["errored"], totals["incomplete"]) == (requests, 0, 0), totals
        lengths = {r["output_metrics"]["text_tokens"] for r in benchmark["requests"]["successful"]}
        assert lengths == {output_tokens}, lengths
