"""Plain batched generation, shared by evaluation and serving: left-padded ``generate`` calls and their completions.

Evaluation (:mod:`loraops.training.evaluate`) generates through :func:`generate_completions`; the serving
engine produces the same greedy tokens and cuts them with :func:`completion_from_ids`, so the endpoint
answers what evaluation scored. The serving model itself lives in :mod:`loraops.serve.model`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from loraops.errors import LoraopsError

# --- batched generation ------------------------------------------------------------------------


def left_pad(sequences: Sequence[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-pad prompts for batched generation, so every row continues at the same position."""
    width = max(len(seq) for seq in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        input_ids[i, width - len(seq):] = torch.tensor(seq)
        attention[i, width - len(seq):] = 1
    return {"input_ids": input_ids, "attention_mask": attention}


@dataclass(frozen=True)
class Completion:
    """One generated continuation of a prompt."""

    text: str
    #: The generated token ids, cut after the first end-of-text token (which is included).
    token_ids: list[int]
    prompt_tokens: int


@torch.no_grad()
def generate_completions(
    model,
    tokenizer,
    prompts: Sequence[list[int]],
    max_new_tokens: int | Sequence[int],
    temperature: float = 0.0,
    **generate_options: Any,
) -> list[Completion]:
    """One ``generate`` call for a batch of tokenized prompts, left-padded so every row continues at the same position.

    ``max_new_tokens`` may differ per row: the batch generates up to the largest and each row is cut
    to its own limit (a row's tokens do not depend on how long the call runs). ``temperature`` 0
    is greedy decoding; above 0 it samples. ``generate_options`` go to ``model.generate`` as they are.
    """
    limits = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(limits) != len(prompts):
        raise ValueError(f"{len(limits)} max_new_tokens for {len(prompts)} prompts")
    target = next(model.parameters()).device  # the model's own device: this module stays below the training code
    batch = {key: value.to(target) for key, value in left_pad(prompts, tokenizer.pad_token_id).items()}
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    generated = model.generate(
        **batch,
        max_new_tokens=max(limits),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **sampling,
        **generate_options,
    )
    new_tokens = generated[:, batch["input_ids"].shape[1]:].tolist()
    return [completion_from_ids(tokenizer, row[:limit], len(prompt)) for prompt, row, limit in zip(prompts, new_tokens, limits, strict=True)]


def completion_from_ids(tokenizer, ids: list[int], prompt_tokens: int, until_eos: bool = True) -> Completion:
    """The completion of generated ``ids``: cut after the first end-of-text token (unless not ``until_eos``: a request
    that ignores end-of-text), decoded without special tokens."""
    if until_eos and tokenizer.eos_token_id in ids:
        ids = ids[: ids.index(tokenizer.eos_token_id) + 1]
    return Completion(text=tokenizer.decode(ids, skip_special_tokens=True).strip(), token_ids=list(ids), prompt_tokens=prompt_tokens)


def find_stop(text: str, stop: Sequence[str]) -> int | None:
    """Where the first of the ``stop`` texts starts in ``text`` (the answer ends there), or None."""
    found = [index for index in (text.find(s) for s in stop) if index >= 0]
    return min(found) if found else None


def held_back(text: str, stop: Sequence[str]) -> str:
    """``text`` cut before its first stop text, or without an end that may be the start of one (not certain yet)."""
    if (index := find_stop(text, stop)) is not None:
        return text[:index]
    keep = len(text)
    for s in stop:
        for size in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:size]):
                keep = min(keep, len(text) - size)
                break
    return text[:keep]


class TextStream:
    """The text of tokens as they are generated, handed out in pieces whose concatenation is the completion's text.

    Each :meth:`add` decodes all tokens so far as :func:`completion_from_ids` does (up to end-of-text,
    special tokens skipped, stripped) and hands out only what can no longer change: trailing whitespace
    (the final text is stripped), an unfinished multi-byte character, and an end that may be the start of
    one of the ``stop`` texts wait for the next token. ``until_eos=False``: the request ignores end-of-text.
    """

    def __init__(self, tokenizer, stop: Sequence[str] = (), until_eos: bool = True):
        self.tokenizer, self.stop, self.until_eos = tokenizer, tuple(stop), until_eos
        self.ids: list[int] = []
        self.sent = ""

    def add(self, token: int) -> str:
        """The new text after ``token`` ("" while nothing new is certain)."""
        if self.until_eos and self.ids and self.ids[-1] == self.tokenizer.eos_token_id:
            return ""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        stable = (held_back(text, self.stop) if self.stop else text).strip().rstrip("\ufffd").rstrip()
        if not stable.startswith(self.sent):  # decoding more tokens changed earlier text: wait for the end
            return ""
        piece, self.sent = stable[len(self.sent) :], stable
        return piece

    def finish(self, text: str) -> str:
        """What is left of the final ``text`` after the pieces handed out."""
        if not text.startswith(self.sent):
            raise LoraopsError(f"streamed text {self.sent!r} is not a prefix of the completion {text!r}")
        rest, self.sent = text[len(self.sent) :], text
        return rest
