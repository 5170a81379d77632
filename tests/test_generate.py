"""Batched generation (:mod:`loraops.generate`) and the serving model (:mod:`loraops.serve.model`), in-process without Ray: left
padding, merged-vs-nf4 numerics on the built-in test dialogues, and adapter swaps that equal a fresh load."""

from __future__ import annotations

from pathlib import Path

import pytest

ADAPTER = "tiny"  # what the serving_home fixture registers: v1 and v2
DIALOGUE = "#Person1#: Hi, I'd like to book a table for two tonight.\n#Person2#: Sure, what time?\n#Person1#: Eight, please."


def test_left_pad_aligns_the_ends_of_the_prompts():
    from loraops.generate import left_pad

    left = left_pad([[1, 2, 3], [4]], pad_id=0)
    assert left["input_ids"].tolist() == [[1, 2, 3], [0, 0, 4]] and left["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]


def _served(home: Path, ref: str, mode: str):
    from loraops.registry import Registry
    from loraops.serve.model import load_registered

    registry = Registry(workspace=home)
    return load_registered(registry, ref, mode), registry


def _greedy_tokens(served, dialogues: list[str], max_new_tokens: int) -> list[list[int]]:
    from loraops.generate import generate_completions
    from loraops.training.data import prompt_ids

    prompts = [prompt_ids(served.tokenizer, d, served.config.data, budget=10**9) for d in dialogues]
    tokens = []
    for start in range(0, len(prompts), 32):
        tokens += [c.token_ids for c in generate_completions(served.model, served.tokenizer, prompts[start:start + 32], max_new_tokens)]
    return tokens


def token_agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Share of generated positions where both sequences have the same token (a position only one has counts as a miss)."""
    same = sum(x == y for seq_a, seq_b in zip(a, b, strict=True) for x, y in zip(seq_a, seq_b, strict=False))
    total = sum(max(len(seq_a), len(seq_b)) for seq_a, seq_b in zip(a, b, strict=True))
    return same / total


@pytest.mark.slow
def test_merged_mode_agrees_with_nf4_on_the_builtin_test_dialogues(serving_home):
    from loraops.bench.serve import builtin_test_dialogues

    dialogues = builtin_test_dialogues(64)
    nf4, _ = _served(serving_home, f"{ADAPTER}:2", "nf4")
    merged, _ = _served(serving_home, f"{ADAPTER}:2", "merged")

    agreement = token_agreement(_greedy_tokens(nf4, dialogues, 32), _greedy_tokens(merged, dialogues, 32))

    print(f"\nmerged vs nf4 greedy token agreement on {len(dialogues)} built-in test dialogues: {100 * agreement:.2f}%")
    assert agreement >= 0.99


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["nf4", "merged"])
def test_adapter_swap_equals_a_fresh_load(serving_home, mode):
    import torch

    from loraops.generate import left_pad
    from loraops.serve.model import adapter_slot
    from loraops.training.data import prompt_ids

    swapped, registry = _served(serving_home, f"{ADAPTER}:1", mode)
    fresh, _ = _served(serving_home, f"{ADAPTER}:2", mode)
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
