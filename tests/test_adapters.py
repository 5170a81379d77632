"""Several adapters on one base model: the serving model's add/remove (:mod:`loraops.serve.model`), mixed-adapter
batches in the engine (:mod:`loraops.serve.engine.core`) that answer per row what that adapter alone answers, token
streaming, the adapter settings, and a replica serving two versions at once (:mod:`loraops.serve.adapters`)."""

from __future__ import annotations

import pytest

import helpers

ADAPTER = "tiny"  # what the serving_home fixture registers: v1 (production) and v2


def _load(home, number: int, mode: str):
    from loraops.registry import Registry
    from loraops.serve.model import load_registered

    registry = Registry(workspace=home)
    return load_registered(registry, f"{ADAPTER}:{number}", mode), registry


@pytest.fixture(scope="module", params=["nf4", "merged"])
def two(request, serving_home):
    """(served with v1 and v2 loaded, {slot: served with that version alone})."""
    from loraops.serve.model import adapter_slot

    both, registry = _load(serving_home, 1, request.param)
    both.add(registry.resolve(f"{ADAPTER}:2"), adapter_slot(ADAPTER, 2))
    alone = {adapter_slot(ADAPTER, n): _load(serving_home, n, request.param)[0] for n in (1, 2)}
    return both, alone


def _prompts(served, count: int) -> list[list[int]]:
    from loraops.bench.serve import builtin_test_dialogues
    from loraops.training.data import prompt_ids

    return [prompt_ids(served.tokenizer, text, served.config.data, budget=10**9) for text in builtin_test_dialogues(count)]


def _engine(served, **options):
    from loraops.serve.engine.buckets import Buckets
    from loraops.serve.engine.core import Engine

    return Engine(served, Buckets((1, 2, 4), (256, 512), (1, 2)), **options)


_ALONE: dict[tuple, list[int]] = {}


def _alone(served, prompt, limit) -> list[int]:
    """The prompt through generate_completions with ``served``'s one adapter (computed once per mode, adapter, prompt and limit)."""
    from loraops.generate import generate_completions

    key = (served.mode, served.adapter_name, tuple(prompt), limit)
    if key not in _ALONE:
        _ALONE[key] = generate_completions(served.model, served.tokenizer, [prompt], limit)[0].token_ids
    return _ALONE[key]


# --- the serving model and the engine ------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["continuous", "static"])
def test_a_mixed_adapter_batch_answers_each_row_as_its_adapter_alone(two, policy):
    both, alone = two
    slots = list(alone)
    prompts = _prompts(both, 6)
    limits = [8 + (5 * i) % 17 for i in range(len(prompts))]
    names = [slots[i % 2] for i in range(len(prompts))]  # rows alternate adapters
    engine = _engine(both, policy=policy)
    futures = [engine.submit(p, n, adapter=a) for p, n, a in zip(prompts[:3], limits[:3], names[:3], strict=True)]
    for _ in range(3):  # the first rows are decoding when the others join
        engine.run_once(wait=False)
    futures += [engine.submit(p, n, adapter=a) for p, n, a in zip(prompts[3:], limits[3:], names[3:], strict=True)]
    while not all(f.done() for f in futures):
        engine.run_once(wait=False)

    answers = [f.result() for f in futures]

    assert both.mixed and [a.adapter for a in answers] == names
    expected = [_alone(alone[a], p, n) for p, n, a in zip(prompts, limits, names, strict=True)]
    assert [a.completion.token_ids for a in answers] == expected
    other = [_alone(alone[slots[(i + 1) % 2]], p, n) for i, (p, n) in enumerate(zip(prompts, limits, strict=True))]
    assert other != expected  # the two adapters do answer differently: a row on the wrong adapter would show


@pytest.mark.slow
def test_back_to_one_adapter_merges_again_and_answers_as_a_fresh_load(two, serving_home):
    from loraops.serve.model import adapter_slot

    both, alone = two
    served, registry = _load(serving_home, 1, both.mode)
    v1, v2 = adapter_slot(ADAPTER, 1), adapter_slot(ADAPTER, 2)
    served.add(registry.resolve(f"{ADAPTER}:2"), v2)
    served.remove(v1)  # v2 alone: merged into the restored base in merged mode
    prompt = _prompts(served, 1)[0]

    assert served.adapters == [v2] and not served.mixed
    assert _engine(served).generate([prompt], 12)[0].token_ids == _alone(alone[v2], prompt, 12)
    if served.mode == "merged":
        merged = {name for name, module in served.model.named_modules() if getattr(module, "merged", False)}
        assert merged  # the fast path again


@pytest.mark.slow
def test_streamed_tokens_arrive_before_the_end_and_make_up_the_answer(two):
    both, alone = two
    if both.mode != "merged":
        pytest.skip("streaming does not depend on the mode")
    prompt = _prompts(both, 1)[0]
    engine = _engine(both)
    engine.start()
    seen: list[tuple[int, bool]] = []
    future = None
    try:
        future = engine.submit(prompt, 16, adapter=list(alone)[1], on_token=lambda token: seen.append((token, future.done() if future else False)))
        generated = future.result(timeout=120)
    finally:
        engine.stop()

    assert [token for token, _ in seen] == generated.completion.token_ids
    assert len(seen) > 2 and not any(done for _, done in seen)  # every token was handed over before the request ended


@pytest.mark.slow
def test_a_request_for_an_unloaded_adapter_fails_alone(two):
    both, _ = two
    from loraops.serve.engine.core import RowFailed

    prompts = _prompts(both, 2)
    engine = _engine(both)
    bad, good = engine.submit(prompts[0], 6, adapter="tiny_v9"), engine.submit(prompts[1], 6)
    while not (bad.done() and good.done()):
        engine.run_once(wait=False)

    with pytest.raises(RowFailed, match="tiny_v9"):
        bad.result()
    assert good.result().adapter == both.adapter_name


@pytest.mark.slow
def test_swapping_one_of_several_adapters_keeps_the_others(two, serving_home):
    """A mixed swap (the alias of one of several references moved): the replaced rows get the new adapter, the others are untouched."""
    from loraops.serve.model import adapter_slot

    both, alone = two
    served, registry = _load(serving_home, 1, both.mode)
    v1, v2 = adapter_slot(ADAPTER, 1), adapter_slot(ADAPTER, 2)
    served.add(registry.resolve(f"{ADAPTER}:2"), v2)
    served.swap(registry.resolve(f"{ADAPTER}:1"), "v1_again", replace=v2)  # v1's weights under a new name
    prompts = _prompts(served, 2)
    engine = _engine(served)
    futures = [engine.submit(prompts[0], 10, adapter=v1), engine.submit(prompts[1], 10, adapter="v1_again")]
    while not all(f.done() for f in futures):
        engine.run_once(wait=False)

    assert served.adapters == [v1, "v1_again"] and list(served.model.peft_config) == [v1, "v1_again"]
    assert [f.result().completion.token_ids for f in futures] == [_alone(alone[v1], p, 10) for p in prompts]


# --- settings ------------------------------------------------------------------------------------


def test_adapters_setting_defaults_to_the_adapter_and_names_bad_entries():
    from loraops.config import ConfigError
    from loraops.serve.settings import validate_settings

    assert validate_settings({"adapter": "tiny:2"}).adapters == ["tiny:2"]
    both = validate_settings({"adapters": ["tiny", "tiny:2"]})
    assert both.adapters == ["tiny@production", "tiny:2"] and both.adapter == "tiny@production"
    for args, message in [
        ({"adapters": ["tiny@production", "tiny"]}, "adapters: tiny@production is listed twice"),
        ({"adapters": ["a", "b", "c"], "max_adapters": 2}, "adapters: 3 references, more than max_adapters (2)"),
        ({"adapters": ["tiny", "bad name!"]}, "adapters.1"),
        ({"adapters": []}, "adapters"),
        ({"max_adapters": 0}, "max_adapters"),
        ({"adapter": "tiny:1", "adapters": ["tiny:2"]}, "adapter: tiny:1 differs from the first of adapters (tiny:2)"),
    ]:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            validate_settings(args)


# --- the served references -----------------------------------------------------------------------


def test_references_share_the_version_they_serve_and_unknown_ones_are_not_found(serving_home):
    from loraops.errors import LoraopsError
    from loraops.registry import Registry
    from loraops.serve.adapters import AdapterSet
    from loraops.serve.settings import validate_settings

    settings = validate_settings({"workspace": str(serving_home), "adapters": [ADAPTER, f"{ADAPTER}:2", f"{ADAPTER}:1"], "max_adapters": 3, "mode": "nf4"})
    adapters = AdapterSet(Registry(workspace=serving_home), settings)
    for ref in settings.adapters:
        adapters.load(ref)

    assert adapters.served.adapters == ["tiny_v1", "tiny_v2"]  # tiny@production and tiny:1 share v1's adapter
    assert [adapters.find(m).ref for m in (None, "tiny", " tiny@production", "tiny:2", "tiny:1")] == [
        "tiny@production", "tiny@production", "tiny@production", "tiny:2", "tiny:1",
    ]  # fmt: skip
    assert [adapters.find(m) for m in ("tiny:7", "tiny@candidate", "other", "not a ref!", "", 3)] == [None] * 6
    with pytest.raises(LoraopsError, match=r"already serves max_adapters \(3\) references: tiny@production, tiny:2, tiny:1"):
        adapters.load(f"{ADAPTER}@candidate")


def test_a_reference_follows_its_alias_between_shared_and_own_adapters(serving_home):
    """An alias moving onto a version another reference serves shares its adapter (back to one: merged again); moving off loads its own."""
    import contextlib

    from loraops.registry import Registry
    from loraops.serve.adapters import AdapterSet
    from loraops.serve.settings import validate_settings

    registry = Registry(workspace=serving_home)
    adapters = AdapterSet(registry, validate_settings({"workspace": str(serving_home), "adapters": [ADAPTER, f"{ADAPTER}:2"], "mode": "merged"}))
    for ref in (ADAPTER + "@production", f"{ADAPTER}:2"):
        adapters.load(ref)
    production = adapters.default

    moved = adapters.follow(production, registry.get(f"{ADAPTER}:2"), contextlib.nullcontext)
    merged = lambda: any(getattr(m, "merged", False) for m in adapters.served.model.modules())  # noqa: E731
    shared = (list(adapters.served.adapters), merged(), adapters.adapter_of(production))
    adapters.follow(production, registry.get(f"{ADAPTER}:1"), contextlib.nullcontext)

    assert moved and shared == (["tiny_v2"], True, "tiny_v2")  # one adapter left: merged again
    assert adapters.served.mixed and not merged()  # two again: both unmerged
    assert adapters.served.adapters == ["tiny_v2", "tiny_v1"] and adapters.adapter_of(production) == "tiny_v1"
    assert not adapters.follow(production, registry.get(f"{ADAPTER}:1"), contextlib.nullcontext)  # already there



def test_a_canary_candidate_that_failed_to_load_is_tried_again_while_its_canary_runs(serving_home, tmp_path):
    """A candidate that failed to load is retried while its canary runs (after a back-off, so a broken file is not
    reloaded at every poll): once its files are repaired it is served; a canary that ends unloads it and a later one,
    of the same version, loads it afresh. A copy of the serving registry; the replica's candidate loader runs on a
    real adapter set without Serve."""
    import contextlib
    import shutil

    from helpers import wait_until
    from loraops.registry import Registry
    from loraops.serve.adapters import AdapterSet
    from loraops.serve.candidate import CandidateLoader
    from loraops.serve.settings import validate_settings

    home = tmp_path / "home"
    shutil.copytree(serving_home, home)
    registry = Registry(workspace=home)
    adapters = AdapterSet(registry, validate_settings({"workspace": str(home), "adapters": [ADAPTER], "max_adapters": 2, "mode": "nf4"}))
    adapters.load(f"{ADAPTER}@production")
    loader = CandidateLoader(registry, adapters, "replica-a")
    follow = lambda: loader.follow(contextlib.nullcontext, 0.2)  # noqa: E731
    served = lambda: adapters.find(f"{ADAPTER}:2") is not None  # noqa: E731
    weights = home / "registry" / ADAPTER / "v2" / "adapter_model.safetensors"
    original = weights.read_bytes()

    registry.start_canary(f"{ADAPTER}:2", 30)
    weights.write_bytes(original[:100] + bytes(64) + original[164:])  # broken behind the registry's back
    follow()
    failed, problem = served(), loader.problem
    weights.write_bytes(original)
    wait_until(lambda: follow() or served(), 10, "the repaired candidate is loaded by a later poll of the same canary")
    registry.abort_canary(ADAPTER)
    follow()
    unloaded = not served()
    registry.start_canary(f"{ADAPTER}:2", 30)
    follow()

    assert not failed and problem is not None and f"{ADAPTER}:2" in problem
    assert unloaded and served() and loader.loaded == f"{ADAPTER}:2" and loader.problem is None
    registry.abort_canary(ADAPTER)
    follow()
    assert not served() and loader.loaded is None


# --- a replica on Ray Serve ----------------------------------------------------------------------

DIALOGUE = "#Person1#: Hi, I'd like to book a table for two tonight.\n#Person2#: Sure, what time?\n#Person1#: Eight, please."


@pytest.fixture(scope="module")
def replica(serve_port, serving_home):
    """The model deployment alone (no HTTP ingress) serving tiny@production (v1), room for one more; yields its handle."""

    from ray import serve

    from loraops.serve.replica import SummarizerModel
    from loraops.serve.settings import validate_settings

    port = serve_port
    helpers.start_serve(port)
    settings = validate_settings({"workspace": str(serving_home), "adapter": ADAPTER, "max_adapters": 2, "max_batch_size": 4, "registry_poll_s": 1})
    deployment = SummarizerModel.options(num_replicas=1, ray_actor_options={"num_cpus": 0.25}, user_config=settings.live())
    try:
        yield serve.run(deployment.bind(settings.with_absolute_paths().model_dump()), name="adapters", route_prefix=None)
    finally:
        helpers.remove_applications()


def _served_alone(home, number: int, max_new_tokens: int) -> str:
    from loraops.generate import generate_completions
    from loraops.training.data import prompt_ids

    served, _ = _load(home, number, "merged")
    prompt = prompt_ids(served.tokenizer, DIALOGUE, served.config.data, budget=10**9)
    return generate_completions(served.model, served.tokenizer, [prompt], max_new_tokens)[0].text


@pytest.mark.ray
@pytest.mark.slow
def test_each_request_is_answered_by_the_version_it_named(replica, serving_home):
    from loraops.serve.contract import Rejection, SummaryRequest

    listing = replica.load_extra.remote(f"{ADAPTER}:2").result(timeout_s=120)  # now two versions at once
    models = [None, f"{ADAPTER}:2", f"{ADAPTER}@production", ADAPTER, f"{ADAPTER}:1"]  # tiny:1 is what tiny@production serves
    responses = [replica.summarize.remote(SummaryRequest(DIALOGUE, 16, model=m)) for m in models]
    answers = [r.result(timeout_s=120) for r in responses]
    unknown = replica.summarize.remote(SummaryRequest(DIALOGUE, model=f"{ADAPTER}:7")).result(timeout_s=60)
    info = replica.info.remote().result(timeout_s=60)

    assert listing == {"ref": f"{ADAPTER}:2", "name": ADAPTER, "version": 2}
    assert [a.model.version for a in answers] == [2 if m == f"{ADAPTER}:2" else 1 for m in models]
    assert {a.summary for a in answers if a.model.version == 1} == {_served_alone(serving_home, 1, 16)}
    assert answers[1].summary == _served_alone(serving_home, 2, 16)
    assert all(a.finish_reason in ("stop", "length") for a in answers)
    assert isinstance(unknown, Rejection) and (unknown.status, unknown.type, unknown.field) == (404, "model_not_found", "model")
    assert "loaded: tiny@production, tiny:2" in unknown.message
    assert info.adapters == [{"ref": "tiny@production", "name": ADAPTER, "version": 1}, {"ref": "tiny:2", "name": ADAPTER, "version": 2}]
    assert (info.adapter, info.version) == ("tiny@production", 1)


@pytest.mark.ray
@pytest.mark.slow
def test_streamed_events_make_up_the_summary_and_a_refusal_is_one_event(replica):
    from loraops.serve.contract import SummaryRequest

    replica.load_extra.remote(f"{ADAPTER}:2").result(timeout_s=120)
    streaming = replica.options(stream=True)
    events = list(streaming.summarize_stream.remote(SummaryRequest(DIALOGUE, 24, model=f"{ADAPTER}:2")))
    refused = list(streaming.summarize_stream.remote(SummaryRequest(DIALOGUE, model="other@production")))
    plain = replica.summarize.remote(SummaryRequest(DIALOGUE, 24, model=f"{ADAPTER}:2")).result(timeout_s=60)

    named, *texts, done = events
    assert named == {"model": {"name": ADAPTER, "version": 2}}  # first the version that answers, for every chunk to name it
    assert texts and all(set(e) == {"text"} and e["text"] for e in texts)
    assert done["done"] is True and "".join(e["text"] for e in texts) == done["summary"] == plain.summary
    assert done["model"] == {"name": ADAPTER, "version": 2} and done["usage"]["completion_tokens"] == plain.usage.completion_tokens
    assert len(refused) == 1 and refused[0]["rejection"]["status"] == 404 and refused[0]["rejection"]["field"] == "model"


@pytest.mark.ray
@pytest.mark.slow
def test_an_extra_reference_loads_and_unloads_without_failing_requests(replica):
    from concurrent.futures import ThreadPoolExecutor

    from loraops.serve.contract import Rejection, SummaryRequest

    def call(model):
        return replica.summarize.remote(SummaryRequest(DIALOGUE, 12, model=model)).result(timeout_s=120)

    replica.unload_extra.remote(f"{ADAPTER}:2").result(timeout_s=120)
    with ThreadPoolExecutor(4) as pool:
        during = [pool.submit(call, None) for _ in range(6)]  # requests in flight while adapters load and unload
        loaded = replica.load_extra.remote(f"{ADAPTER}:2").result(timeout_s=120)
        extra = call(f"{ADAPTER}:2")
        removed = replica.unload_extra.remote(f"{ADAPTER}:2").result(timeout_s=120)
        answers = [f.result() for f in during]
    gone = call(f"{ADAPTER}:2")
    info = replica.info.remote().result(timeout_s=60)

    assert loaded["version"] == 2 and extra.model.version == 2 and removed is True
    assert all(a.model.version == 1 for a in answers)
    assert isinstance(gone, Rejection) and gone.status == 404
    assert [a["ref"] for a in info.adapters] == ["tiny@production"]
