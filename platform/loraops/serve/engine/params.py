"""A request's sampling parameters, as the engine takes them (no torch here: the HTTP ingress builds them).

The meaning of each is vLLM's (``SamplingParams``), so clients written for vLLM get what they expect:
the processors run in vLLM's order (logit bias, ``min_tokens``, penalties, temperature, top-k, top-p) and
touch only the row that asked (see :mod:`loraops.serve.engine.sampler`). The defaults change nothing: a
greedy row with them takes the argmax of the model's own logits, as evaluation does.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class SamplingParams:
    #: 0: greedy (argmax); above 0: a sample at this temperature.
    temperature: float = 0.0
    #: Sample only from the smallest set of tokens whose probabilities add up to ``top_p`` (1: all).
    top_p: float = 1.0
    #: Sample only from the ``top_k`` most likely tokens (0 or -1: all).
    top_k: int = 0
    #: Seeds this row's own random generator: the same seed gives the same sample, whatever shares the batch.
    seed: int | None = None
    #: Subtracted from the logit of every token the answer already holds (OpenAI's and vLLM's meaning).
    presence_penalty: float = 0.0
    #: Subtracted once per occurrence in the answer so far.
    frequency_penalty: float = 0.0
    #: Above 1: tokens of the prompt or the answer so far are less likely (positive logits divided, negative multiplied).
    repetition_penalty: float = 1.0
    #: The answer ends before the first of these texts (which it does not include), finish_reason "stop".
    stop: tuple[str, ...] = ()
    #: End-of-text cannot come (and stop texts do not end the answer) before this many tokens.
    min_tokens: int = 0
    #: Go on past end-of-text, to ``max_tokens``.
    ignore_eos: bool = False
    #: Token id -> a number added to its logit (-100 bans it, 100 all but forces it).
    logit_bias: tuple[tuple[int, float], ...] = field(default=())
    #: Return each chosen token's log probability and those of the ``logprobs`` most likely tokens (None: none), from
    #: the model's own distribution, before any parameter above changed it (vLLM's default, "raw" log probabilities).
    logprobs: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0

    @property
    def processes_logits(self) -> bool:
        """Whether anything changes the logits before the pick (False keeps a greedy row bit-identical to ``generate``)."""
        return bool(self.logit_bias or self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0 or self.min_tokens)

    @property
    def truncates(self) -> bool:
        """Whether top-k or top-p cut the distribution a sample is drawn from."""
        return self.top_k > 0 or self.top_p < 1.0


GREEDY = SamplingParams()
