"""A served request's prompt: the training prompt of its dialogue, uncut, or an error that says it does not fit.

The replica and ``bench serve`` build prompts here, so a benchmark measures the prompts a replica serves.
"""

from __future__ import annotations

import re
import sys

from loraops.errors import LoraopsError


class DialogueTooLong(LoraopsError):
    """The prompt plus the requested summary does not fit the model's context."""

    def __init__(self, prompt_tokens: int, max_new_tokens: int, context_tokens: int, at_least: bool = False):
        # Positional args only, so the error pickles across the Ray handle unchanged.
        super().__init__(prompt_tokens, max_new_tokens, context_tokens, at_least)
        self.prompt_tokens, self.max_new_tokens, self.context_tokens, self.at_least = prompt_tokens, max_new_tokens, context_tokens, at_least

    def __str__(self) -> str:
        bound = "at least " if self.at_least else ""  # a bound from the dialogue's size, not a count: it was never tokenized
        return (
            f"the dialogue is {bound}{self.prompt_tokens} tokens as a prompt; with max_new_tokens {self.max_new_tokens} that is "
            f"{bound}{self.prompt_tokens + self.max_new_tokens}, over the model's context of {self.context_tokens} tokens"
        )


def prompt_of(served, dialogue: str) -> list[int]:
    """The training prompt of ``dialogue`` for the served model, uncut (no token budget)."""
    from loraops.training.data import prompt_ids

    return prompt_ids(served.tokenizer, dialogue, served.config.data, budget=sys.maxsize)


def max_token_bytes(tokenizer) -> int:
    """The longest token of the vocabulary in UTF-8 bytes (an overestimate for byte-level vocabularies, which keeps the bound safe)."""
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    return max(1, *(len(piece.encode("utf-8", "replace")) for piece in pieces if isinstance(piece, str)))


class PromptBuilder:
    """Prompts for one served model within a context of ``context_tokens``: a dialogue that cannot fit is refused,
    never truncated. The context is passed on each call, since a reconfigured replica may change it."""

    def __init__(self, served):
        self.served = served
        self.max_token_bytes = max_token_bytes(served.tokenizer)  # a scan of the vocabulary: once per model

    def check_size(self, dialogue: str, max_new_tokens: int, context_tokens: int) -> None:
        """Refuse a dialogue that cannot fit before tokenizing it (a megabyte takes the tokenizer most of a second).

        No token spans more than ``max_token_bytes`` bytes, so a text of B bytes is at least B / max_token_bytes
        tokens; whitespace is not counted, since the prompt may drop some of it.
        """
        budget = context_tokens - max_new_tokens
        if len(dialogue) <= budget * self.max_token_bytes:  # characters <= bytes: it might fit, tokenize it
            return
        least = -(-len(re.sub(r"\s+", "", dialogue).encode("utf-8", "replace")) // self.max_token_bytes)
        if least > budget:
            raise DialogueTooLong(least, max_new_tokens, context_tokens, True)

    def encode(self, dialogue: str, max_new_tokens: int, context_tokens: int) -> list[int]:
        """The training prompt for ``dialogue``, uncut: a dialogue that does not fit is an error, not truncated."""
        ids = prompt_of(self.served, dialogue)
        if len(ids) + max_new_tokens > context_tokens:
            raise DialogueTooLong(len(ids), max_new_tokens, context_tokens)
        return ids
