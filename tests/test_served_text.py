"""The served answer is the evaluated answer, whatever whitespace and line endings the caller sends:
one function (:func:`loraops.training.data.prompt_ids`) builds the prompt for training, evaluation, every
HTTP route and so the CLI. The session's shared Serve application (conftest's ``shared_app``: nf4 mode,
base in 4 bits plus the adapter unmerged, as ``loraops evaluate`` computes), real HTTP."""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.ray]

REF = "tiny:2"  # registered by the serving_home fixture; the shared application serves it beside tiny@production (v1)
DEFAULT = "tiny:1"  # what the shared application answers a request that names no model (the CLI's)
TOKENS = 12
COUNT = 4


@pytest.fixture(scope="module")
def url(shared_app):
    return shared_app.url()


def _evaluated(home, dialogues: list[str], ref: str = REF) -> list[str]:
    """Greedy summaries through `loraops evaluate`'s own code path (generate_summaries) on the registered version."""
    from loraops.registry import Registry
    from loraops.serve.model import training_config
    from loraops.training.evaluate import generate_summaries
    from loraops.training.model import attach_adapter, load_base_model, load_tokenizer

    registry = Registry(workspace=home)
    version = registry.get(ref)
    config = training_config(version, str(home))
    config = config.model_copy(update={"evaluation": config.evaluation.model_copy(update={"max_new_tokens": TOKENS})})
    model = load_base_model(config)
    model.config.use_cache = True
    model.eval()
    tuned = attach_adapter(model, registry.resolve(version.ref))
    return generate_summaries(tuned, load_tokenizer(config), dialogues, config, progress=False)


def _mangled(dialogue: str) -> str:
    """What a pasted Windows file looks like: CRLF line endings, blank lines and spaces around."""
    return "\r\n  " + dialogue.replace("\n", "\r\n") + " \t\r\n\r\n"


def test_greedy_served_text_equals_evaluated_text_with_crlf_and_padding(url, shared_app, serving_home, cli_env, tmp_path):
    import json
    import subprocess
    import sys

    import httpx

    from loraops.bench.serve import builtin_test_dialogues

    dialogues = builtin_test_dialogues(COUNT)
    expected = _evaluated(serving_home, dialogues)
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {shared_app.token}"}, timeout=120) as http:
        summarize = [http.post("/v1/summarize", json={"dialogue": _mangled(d), "max_new_tokens": TOKENS, "model": REF}).json() for d in dialogues]
        completions = [http.post("/v1/completions", json={"prompt": _mangled(d), "max_tokens": TOKENS, "model": REF}).json() for d in dialogues]
        chat = [http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": _mangled(d)}], "max_tokens": TOKENS, "model": REF}).json()
                for d in dialogues]
        clean = [http.post("/v1/summarize", json={"dialogue": d, "max_new_tokens": TOKENS, "model": REF}).json() for d in dialogues]

    dialogue_file = tmp_path / "dialogue.txt"
    dialogue_file.write_bytes(_mangled(dialogues[0]).encode())
    command = [sys.executable, "-m", "loraops", "summarize", "--url", url, "--file", str(dialogue_file), "--max-new-tokens", str(TOKENS), "--json"]
    cli = subprocess.run(command, capture_output=True, text=True, env=cli_env(serving_home) | {"LORAOPS_API_TOKEN": shared_app.token}, timeout=120)

    assert cli.returncode == 0, cli.stderr
    assert json.loads(cli.stdout)["summary"] == _evaluated(serving_home, dialogues[:1], DEFAULT)[0]  # summarize has no --model: the default
    assert [answer["summary"] for answer in summarize] == expected
    assert [answer["choices"][0]["text"] for answer in completions] == expected
    assert [answer["choices"][0]["message"]["content"] for answer in chat] == expected
    # The same prompt, token for token: padding and CRLF add nothing.
    assert [answer["usage"]["prompt_tokens"] for answer in summarize] == [answer["usage"]["prompt_tokens"] for answer in clean]
