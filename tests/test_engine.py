"""The serving engine (:mod:`loraops.serve.engine.core`, :mod:`loraops.serve.engine.cache`, :mod:`loraops.serve.engine.buckets`), in-process
without Ray: fixed shapes, warm-up covering every shape a request can reach, continuous batching that
answers what ``generate_completions`` answers, and failures that stay with their own request."""

from __future__ import annotations

import threading
import time
from concurrent.futures import TimeoutError as FutureTimeout

import pytest

from helpers import wait_until

ADAPTER = "tiny"  # what the serving_home fixture registers: v1 and v2


# --- buckets -----------------------------------------------------------------------------------


def test_default_buckets_are_powers_of_two_capped_by_the_limit():
    from loraops.serve.engine.buckets import Buckets, batch_buckets, length_buckets

    assert batch_buckets(16) == (1, 2, 4, 8, 16)
    assert batch_buckets(6) == (1, 2, 4, 6)
    assert batch_buckets(8, [1, 4, 16, 32]) == (1, 4, 8)
    assert length_buckets(2048) == (256, 512, 1024, 2048)
    assert length_buckets(1000) == (256, 512, 1000)
    assert length_buckets(1024, [300, 2048]) == (300, 1024)
    buckets = Buckets.build(8, 1024, prefill_batch_size=2)
    assert (buckets.batch, buckets.length, buckets.prefill_batch) == ((1, 2, 4, 8), (256, 512, 1024), (1, 2))
    assert (buckets.batch_for(3), buckets.length_for(257), buckets.prefill_batch_for(2)) == (4, 512, 2)
    assert len(buckets.shapes()) == 2 * 3 + 4 * 3
    with pytest.raises(ValueError, match="over the largest length bucket"):
        buckets.length_for(1025)
    with pytest.raises(ValueError, match="ascending"):
        Buckets((4, 2), (256,))


# --- fixtures: the served model in both modes, real tokens ---------------------------------------


@pytest.fixture(scope="module", params=["nf4", "merged"])
def served(request, serving_home):
    from loraops.registry import Registry
    from loraops.serve.model import load_registered

    return load_registered(Registry(workspace=serving_home), f"{ADAPTER}:2", request.param)


def _prompts(served, count: int, long: int = 0) -> list[list[int]]:
    """Prompts of the built-in test dialogues; ``long`` of them made longer (several dialogues joined) to reach the larger length buckets."""
    from loraops.bench.serve import builtin_test_dialogues
    from loraops.training.data import prompt_ids

    dialogues = builtin_test_dialogues(count + 4 * long)
    texts = dialogues[:count]
    texts += ["\n".join(dialogues[count + 4 * i : count + 4 * i + k]) for i, k in zip(range(long), [2, 4, 3, 4], strict=False)]
    return [prompt_ids(served.tokenizer, text, served.config.data, budget=10**9) for text in texts]


def _engine(served, batch=(1, 2, 4), length=(256, 512, 1024), prefill=(1, 2), **options):
    from loraops.serve.engine.buckets import Buckets
    from loraops.serve.engine.core import Engine

    return Engine(served, Buckets(tuple(batch), tuple(length), tuple(prefill)), **options)


_REFERENCES: dict[tuple, list[int]] = {}


def _reference(served, prompts, limits) -> list[list[int]]:
    """Each prompt alone through generate_completions: the answer evaluation scores (computed once per mode, prompt and limit)."""
    from loraops.generate import generate_completions

    answers = []
    for prompt, limit in zip(prompts, limits, strict=True):
        key = (served.mode, tuple(prompt), limit)
        if key not in _REFERENCES:
            _REFERENCES[key] = generate_completions(served.model, served.tokenizer, [prompt], limit)[0].token_ids
        answers.append(_REFERENCES[key])
    return answers


def _merged_only(served) -> None:
    """Scheduling, shapes and failures do not depend on the mode: these run once, on the merged model."""
    if served.mode != "merged":
        pytest.skip("mode-independent: runs on the merged model")


# --- answers -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_padding_rows_never_change_a_real_rows_tokens(served):
    prompts = _prompts(served, 3)
    engine = _engine(served)

    alone = [engine.generate([p], 24)[0].token_ids for p in prompts]  # batch bucket 1, prefill bucket 1
    together = [c.token_ids for c in engine.generate(prompts, 24)]  # 3 rows: batch bucket 4 with a padding row, prefill 2 + 1

    assert together == alone
    assert all(len(tokens) > 3 for tokens in alone)


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["continuous", "static"])
def test_greedy_answers_equal_generate_completions_with_rows_joining_and_leaving(served, policy):
    prompts = _prompts(served, 6, long=1)
    limits = [6 + (7 * i) % 30 for i in range(len(prompts))]  # rows leave at different steps
    engine = _engine(served, policy=policy)
    futures = [engine.submit(p, n) for p, n in zip(prompts[:3], limits[:3], strict=True)]
    for _ in range(4):  # the first rows are decoding when the others arrive
        engine.run_once(wait=False)
    futures += [engine.submit(p, n) for p, n in zip(prompts[3:], limits[3:], strict=True)]
    while not all(f.done() for f in futures):
        engine.run_once(wait=False)

    answers = [f.result().completion.token_ids for f in futures]

    assert answers == _reference(served, prompts, limits)


# --- fixed shapes and warm-up ------------------------------------------------------------------


@pytest.mark.slow
def test_no_request_reaches_the_model_at_a_shape_warm_up_did_not_run(served):
    """Record the shapes of every tensor the model's forward receives: warm-up covers all a mixed workload produces."""
    _merged_only(served)
    seen: list[tuple] = []

    def record(_module, _args, kwargs):
        # The mask's last dimension is the cache window a step attends over.
        seen.append((tuple(kwargs["input_ids"].shape), tuple(kwargs["attention_mask"].shape), tuple(kwargs["position_ids"].shape)))

    engine = _engine(served, batch=(1, 2, 4, 8), length=(256, 512, 1024), prefill=(1, 2, 4))
    hook = engine.slots._model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        shapes, seconds = engine.warm_up()
        warmed = set(seen)
        seen.clear()
        prompts = _prompts(served, 14, long=4)
        limits = [4 + (5 * i) % 40 for i in range(len(prompts))]
        waves = [prompts[:1], prompts[1:3], prompts[3:9], prompts[9:]]  # batch sizes 1..8, lengths up to the 1024 bucket
        futures = []
        for wave in waves:
            futures += [engine.submit(p, limits[len(futures) + i]) for i, p in enumerate(wave)]
            for _ in range(3):
                engine.run_once(wait=False)
        while not all(f.done() for f in futures):
            engine.run_once(wait=False)
    finally:
        hook.remove()

    at_request_time = set(seen)
    print(f"\nwarm-up: {shapes} shapes in {seconds:.1f} s; requests used {len(at_request_time)} distinct input shapes")
    assert len(warmed) == shapes == len(engine.buckets.shapes())
    assert at_request_time <= warmed, f"shapes not warmed: {sorted(at_request_time - warmed)}"
    assert {shape[0] for shape in at_request_time} >= {(1, 1), (4, 1), (8, 1)}  # decode steps at several batch buckets
    assert max(shape[1][-1] for shape in at_request_time) == 1024  # the longest prompts reached the largest length bucket
    assert all(f.result().completion.token_ids for f in futures)


@pytest.mark.slow
def test_compiled_decode_steps_compile_during_warm_up_only(served):
    """torch.compile on the CPU: every compilation happens in warm-up, none while requests run."""
    import torch
    from torch._dynamo.utils import counters

    if served.mode != "merged":
        pytest.skip("compilation is for merged mode (the 4-bit graph does not compile usefully)")
    torch._dynamo.reset()
    engine = _engine(served, batch=(1, 2), length=(256,), prefill=(1,), compile=True)
    engine.warm_up()
    compiled_in_warm_up = counters["stats"]["unique_graphs"]
    prompts = _prompts(served, 3)

    answers = [c.token_ids for c in engine.generate(prompts, 12)]

    assert compiled_in_warm_up >= 2
    assert counters["stats"]["unique_graphs"] == compiled_in_warm_up
    assert answers == _reference(served, prompts, [12] * 3)
    torch._dynamo.reset()


# --- failures stay with their request, swaps wait for a quiet engine ---------------------------


@pytest.mark.slow
def test_a_request_whose_sampling_fails_fails_alone(served):
    _merged_only(served)
    from loraops.serve.engine.core import RowFailed

    prompts = _prompts(served, 3)
    engine = _engine(served)
    futures = [engine.submit(prompts[0], 12), engine.submit(prompts[1], 12, temperature=1e-45), engine.submit(prompts[2], 12)]
    while not all(f.done() for f in futures):
        engine.run_once(wait=False)

    with pytest.raises(RowFailed, match="sampling failed"):
        futures[1].result()
    assert [futures[0].result().completion.token_ids, futures[2].result().completion.token_ids] == _reference(served, [prompts[0], prompts[2]], [12, 12])


@pytest.mark.slow
def test_a_failed_forward_pass_is_retried_one_request_at_a_time(served):
    _merged_only(served)
    prompts = _prompts(served, 3)
    failures = []

    def fail_first_shared_step(phase, batch, _length):
        if phase == "decode" and batch > 1 and not failures:
            failures.append(batch)
            raise RuntimeError("simulated failure of a batched step")

    engine = _engine(served, observer=fail_first_shared_step)

    answers = [c.token_ids for c in engine.generate(prompts, 10)]

    assert failures and answers == _reference(served, prompts, [10] * 3)


@pytest.mark.slow
def test_exclusive_waits_for_running_requests_and_holds_new_ones(served):
    _merged_only(served)
    prompts = _prompts(served, 3)
    engine = _engine(served)
    engine.start()
    try:
        first = engine.submit(prompts[0], 16)
        wait_until(lambda: engine.running or first.done(), 60, "the first request to start")
        with engine.exclusive():
            assert first.done()  # it finished before the swap could start
            later = engine.submit(prompts[1], 8)
            held = time.perf_counter()
            with pytest.raises(FutureTimeout):
                later.result(timeout=0.3)  # held while the model is being swapped
            held = time.perf_counter() - held
        answers = [first.result(timeout=60), later.result(timeout=60)]
    finally:
        engine.stop()

    assert answers[1].queue_s >= held  # it waited for the swap to end
    assert all(0 <= a.queue_s <= a.model_s for a in answers)


@pytest.mark.slow
def test_cancelled_requests_are_dropped(served):
    _merged_only(served)
    prompts = _prompts(served, 2)
    engine = _engine(served)
    kept, dropped = engine.submit(prompts[0], 8), engine.submit(prompts[1], 40)
    engine.run_once(wait=False)  # both start
    dropped.cancel()
    while not kept.done():
        engine.run_once(wait=False)
    engine.run_once(wait=False)

    assert dropped.cancelled() and engine.running == 0 and engine.waiting == 0


@pytest.mark.slow
def test_bad_submissions_are_refused_up_front(served):
    _merged_only(served)
    engine = _engine(served, length=(256,))

    for prompt, limit, message in [([], 4, "empty prompt"), ([1, 2], 0, "at least 1"), ([1] * 250, 10, "over the largest cache bucket")]:
        with pytest.raises(ValueError, match=message):
            engine.submit(prompt, limit)


@pytest.mark.slow
def test_engine_thread_serves_concurrent_callers(served):
    _merged_only(served)
    prompts = _prompts(served, 4)
    engine = _engine(served)
    engine.warm_up()
    engine.start()
    results: dict[int, list[int]] = {}

    def call(i: int) -> None:
        results[i] = engine.submit(prompts[i], 10).result(timeout=120).completion.token_ids

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(prompts))]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        engine.stop()

    assert [results[i] for i in range(len(prompts))] == _reference(served, prompts, [10] * len(prompts))


@pytest.mark.slow
def test_a_new_engine_takes_over_the_requests_waiting_in_the_old_one(served):
    _merged_only(served)
    prompts = _prompts(served, 2)
    old, new = _engine(served), _engine(served, batch=(1, 2, 4, 8))
    futures = [old.submit(p, 8) for p in prompts]

    new.adopt(old)
    while not all(f.done() for f in futures):
        new.run_once(wait=False)

    assert old.waiting == 0
    assert [f.result().completion.token_ids for f in futures] == _reference(served, prompts, [8, 8])


@pytest.mark.slow
def test_an_idle_engine_starts_over_wherever_the_last_request_ended(served):
    """Back-to-back long requests in a cache of one 256-token bucket: each starts at column 0, not where the previous one ended."""
    _merged_only(served)
    prompts = sorted(_prompts(served, 8), key=len)[-2:]  # the two longest: over 200 tokens each
    engine = _engine(served, length=(256,))

    answers = [engine.generate([prompt], 256 - len(prompt))[0].token_ids for prompt in prompts]

    assert answers == _reference(served, prompts, [256 - len(p) for p in prompts])


# --- construction from settings, and the benchmark's baseline ---------------------------------------


@pytest.mark.slow
def test_an_engine_from_serve_settings_takes_its_limits_from_them(served, serving_home):
    from loraops.serve.engine.core import Engine
    from loraops.serve.settings import validate_settings

    settings = validate_settings({"workspace": str(serving_home), "adapter": ADAPTER, "max_batch_size": 4, "batching": "static", "batch_wait_timeout_s": 0.05})
    engine = Engine.from_settings(served, settings)
    wider = Engine.from_settings(served, settings, 8, policy="continuous", batch_wait_s=0.0)

    assert (engine.policy, engine.max_batch_size, engine.buckets.max_batch, engine.batch_wait_s) == ("static", 4, 4, 0.05)
    assert engine.buckets.max_length == served.context_tokens  # no context_tokens setting: the model's context
    assert (wider.policy, wider.max_batch_size, wider.buckets.max_batch, wider.batch_wait_s) == ("continuous", 8, 8, 0.0)


@pytest.mark.slow
def test_the_generate_baseline_admits_with_the_engines_static_scheduler(served):
    """bench serve --batching generate: the engine's static admission, one generate call per batch."""
    from loraops.bench.load import GenerateBatcher
    from loraops.serve.engine.scheduler import Scheduler

    _merged_only(served)
    prompts = _prompts(served, 3)
    batcher = GenerateBatcher(served, max_batch_size=1, batch_wait_s=0.0, context_tokens=served.context_tokens)
    try:
        answers = [future.result(timeout=120) for future in [batcher.submit(prompt, 8) for prompt in prompts]]
    finally:
        batcher.stop()

    assert isinstance(batcher.scheduler, Scheduler) and batcher.scheduler.policy == "static"
    # One request per batch: each is generate_completions alone, so the tokens are the reference's.
    assert [a.completion.token_ids for a in answers] == _reference(served, prompts, [8] * len(prompts))
    assert all(0 <= a.queue_s <= a.model_s for a in answers)
