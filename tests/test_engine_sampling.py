"""Per-request sampling parameters in the serving engine (:mod:`loraops.serve.engine.sampler`), in-process
without Ray on the merged tiny model: each parameter's effect on the tokens, and a batch of rows with
different parameters giving each row the tokens it gets alone."""

from __future__ import annotations

import pytest

ADAPTER = "tiny"  # what the serving_home fixture registers
TOKENS = 24


@pytest.fixture(scope="module")
def served(serving_home):
    from loraops.registry import Registry
    from loraops.serve.model import load_registered

    return load_registered(Registry(workspace=serving_home), f"{ADAPTER}:2", "merged")


@pytest.fixture(scope="module")
def prompts(served) -> list[list[int]]:
    from loraops.bench.serve import builtin_test_dialogues
    from loraops.training.data import prompt_ids

    return [prompt_ids(served.tokenizer, text, served.config.data, budget=10**9) for text in builtin_test_dialogues(3)]


def _engine(served):
    from loraops.serve.engine.buckets import Buckets
    from loraops.serve.engine.core import Engine

    return Engine(served, Buckets((1, 2, 4, 8), (256, 512, 1024), (1, 2, 4)))


def _run(engine, requests: list[tuple[list[int], int, object]]):
    """Submit every ``(prompt, max_new_tokens, SamplingParams)`` at once and run the engine until all are done: one batch."""
    futures = [engine.submit(prompt, limit, sampling=params) for prompt, limit, params in requests]
    while not all(f.done() for f in futures):
        engine.run_once(wait=False)
    return [f.result() for f in futures]


def _params(**fields):
    from loraops.serve.engine.params import SamplingParams

    return SamplingParams(**fields)


@pytest.fixture(scope="module")
def greedy(served, prompts):
    """Each prompt's greedy answer as evaluation generates it."""
    from loraops.generate import generate_completions

    return [generate_completions(served.model, served.tokenizer, [p], TOKENS)[0] for p in prompts]


# --- the processors, on plain tensors ----------------------------------------------------------


def test_penalties_and_bias_change_the_logits_as_vllm_does():
    import torch

    from loraops.serve.engine.sampler import process, truncate

    logits = torch.tensor([2.0, -1.0, 0.5, 3.0])
    out = process(logits, _params(presence_penalty=0.5, frequency_penalty=0.25), prompt=[2], output=[0, 0, 1])
    assert out.tolist() == [2.0 - 0.5 - 0.5, -1.0 - 0.5 - 0.25, 0.5, 3.0]  # the prompt's token is not penalized
    out = process(logits, _params(repetition_penalty=2.0), prompt=[2], output=[1])
    assert out.tolist() == [2.0, -2.0, 0.25, 3.0]  # prompt and answer: positive divided, negative multiplied
    out = process(logits, _params(logit_bias=((1, 10.0), (3, -100.0))), prompt=[], output=[])
    assert out.tolist() == [2.0, 9.0, 0.5, -97.0]
    assert process(logits, _params(min_tokens=2), prompt=[], output=[5], eos=3)[3] == -float("inf")
    assert process(logits, _params(min_tokens=2), prompt=[], output=[5, 6], eos=3)[3] == 3.0
    assert logits.tolist() == [2.0, -1.0, 0.5, 3.0]  # the engine's logits are left alone
    assert torch.isinf(truncate(logits, top_k=2, top_p=1.0)).tolist() == [False, True, True, False]
    probs = torch.softmax(logits, -1)  # 3.0 holds about 0.69 of the mass: top_p 0.5 keeps it alone, 0.8 adds 2.0
    assert torch.isinf(truncate(logits, top_k=0, top_p=0.5)).tolist() == [True, True, True, False]
    assert torch.isinf(truncate(logits, top_k=0, top_p=float(probs[3]) + 0.01)).tolist() == [False, True, True, False]


def test_a_streamed_text_never_shows_the_start_of_a_stop_text(served):
    from loraops.generate import TextStream, held_back

    assert held_back("the cat sa", ("sat down",)) == "the cat "
    assert held_back("the cat sat down here", ("sat down", "cat")) == "the "
    assert held_back("plain", ("xyz",)) == "plain"
    ids = served.tokenizer.encode(" the cat sat down on the mat")
    stream = TextStream(served.tokenizer, stop=("sat down",))
    pieces = [stream.add(token) for token in ids]
    assert "".join(pieces) == "the cat"
    assert all("s" not in piece for piece in pieces)  # "sat" could have been a stop text's start: it was held back


# --- each parameter's effect on the tokens ------------------------------------------------------


@pytest.mark.slow
def test_each_parameter_changes_the_tokens_as_it_means_to(served, prompts, greedy):
    eos = served.tokenizer.eos_token_id
    plain = greedy[0]
    first = plain.token_ids[0]
    favourite = 1000  # any ordinary token id
    assert len(plain.text) >= 8, plain.text  # long enough to hold a stop text
    cut = plain.text[len(plain.text) // 2 :][:4]  # a text the greedy answer holds: the answer ends before it
    runs = _run(
        _engine(served),
        [
            (prompts[0], TOKENS, _params(top_k=1, temperature=1.0, seed=3)),  # top-k 1 leaves only the argmax: greedy
            (prompts[0], TOKENS, _params(top_p=1e-6, temperature=1.0, seed=3)),  # likewise the smallest top-p
            (prompts[0], TOKENS, _params(logit_bias=((first, -100.0),))),  # the greedy first token banned
            (prompts[0], 5, _params(logit_bias=((favourite, 100.0),))),  # one token forced
            (prompts[0], TOKENS, _params(logit_bias=((eos, 100.0),), min_tokens=4)),  # end-of-text forced, not before 4 tokens
            (prompts[0], 6, _params(logit_bias=((eos, 100.0),), ignore_eos=True)),  # end-of-text forced, and ignored
            (prompts[0], TOKENS, _params(stop=(cut,))),
            (prompts[0], TOKENS, _params(frequency_penalty=2.0, presence_penalty=2.0, repetition_penalty=1.5)),
        ],
    )
    top_k, top_p, banned, forced, at_least, ignored, stopped, penalized = runs
    assert top_k.completion.token_ids == top_p.completion.token_ids == plain.token_ids
    assert banned.completion.token_ids[0] != first
    assert forced.completion.token_ids == [favourite] * 5 and forced.finish_reason == "length"
    assert at_least.completion.token_ids[4:] == [eos] and len(at_least.completion.token_ids) == 5 and at_least.finish_reason == "stop"
    assert ignored.completion.token_ids == [eos] * 6 and ignored.finish_reason == "length"
    assert plain.text.startswith(stopped.completion.text) and cut not in stopped.completion.text and stopped.finish_reason == "stop"
    assert len(stopped.completion.token_ids) < len(plain.token_ids)
    repeats = lambda ids: len(ids) - len(set(ids))  # noqa: E731
    assert repeats(penalized.completion.token_ids) < repeats(plain.token_ids) or repeats(plain.token_ids) == 0


@pytest.mark.slow
def test_a_seed_gives_the_same_sample_and_other_seeds_other_samples(served, prompts):
    runs = _run(_engine(served), [(prompts[1], TOKENS, _params(temperature=1.5, seed=seed)) for seed in (7, 7, 8, 9)])
    tokens = [r.completion.token_ids for r in runs]
    assert tokens[0] == tokens[1]
    assert len({tuple(t) for t in tokens}) >= 2


@pytest.mark.slow
def test_a_rows_parameters_do_not_change_another_rows_tokens(served, prompts, greedy):
    """One batch of rows with mixed parameters: every row gets what it gets alone, the plain greedy rows what evaluation generates."""
    eos = served.tokenizer.eos_token_id
    requests = [
        (prompts[0], TOKENS, _params()),
        (prompts[1], TOKENS, _params(temperature=0.9, top_k=20, seed=11)),
        (prompts[2], TOKENS, _params(stop=(greedy[2].text[3:6],))),
        (prompts[0], TOKENS, _params(temperature=1.0, top_p=0.8, seed=5, presence_penalty=1.0, frequency_penalty=0.5)),
        (prompts[1], TOKENS, _params(logit_bias=((eos, 100.0),), min_tokens=3, repetition_penalty=1.3)),
        (prompts[2], 10, _params(ignore_eos=True, temperature=0.7, seed=2)),
        (prompts[2], TOKENS, _params()),
        (prompts[1], TOKENS, _params(logprobs=2)),
    ]
    engine = _engine(served)
    together = _run(engine, requests)
    alone = [_run(engine, [request])[0] for request in requests]

    assert [r.completion.token_ids for r in together] == [r.completion.token_ids for r in alone]
    assert [r.completion.text for r in together] == [r.completion.text for r in alone]
    assert together[0].completion.token_ids == greedy[0].token_ids and together[6].completion.token_ids == greedy[2].token_ids
    assert together[7].completion.token_ids == greedy[1].token_ids  # asking for log probabilities changes no token
    # Other batch shapes run other kernels: the numbers agree to rounding, the ranking exactly.
    for (logprob, top), (alone_logprob, alone_top) in zip(together[7].logprobs, alone[7].logprobs, strict=True):
        assert [t for t, _ in top] == [t for t, _ in alone_top]
        assert [logprob, *(v for _, v in top)] == pytest.approx([alone_logprob, *(v for _, v in alone_top)], abs=1e-4)
    assert [top[0][0] for _, top in together[7].logprobs] == together[7].completion.token_ids  # greedy: the likeliest token each time
    assert all(logprob == top[0][1] <= 0 for logprob, top in together[7].logprobs) and together[0].logprobs is None
