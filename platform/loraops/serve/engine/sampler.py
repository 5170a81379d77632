"""Sampling: the next token of a row from its logits, under the row's own :class:`~loraops.serve.engine.params.SamplingParams`.

Greedy rows (temperature 0) take the argmax, as ``generate`` does, so with the default parameters they
produce the tokens :func:`loraops.generate.generate_completions` produces; other rows draw at their
temperature. Each row's logits are processed on their own (its bias, penalties, top-k and top-p) and a row
with a ``seed`` draws from its own :class:`torch.Generator`, so a row's parameters never change another
row's tokens. A row whose probabilities are not finite fails alone (:class:`~loraops.serve.engine.scheduler.RowFailed`).
"""

from __future__ import annotations

import logging

import torch

from loraops.serve.engine.params import SamplingParams
from loraops.serve.engine.scheduler import Row, RowFailed

log = logging.getLogger(__name__)


def process(logits: torch.Tensor, params: SamplingParams, prompt: list[int], output: list[int], eos: int | None = None) -> torch.Tensor:
    """The logits after the row's logit bias, ``min_tokens`` and penalties, in vLLM's order (a new tensor; the input is left alone)."""
    logits = logits.float().clone()
    for token, bias in params.logit_bias:
        logits[token] += bias
    if len(output) < params.min_tokens and eos is not None:
        logits[eos] = -float("inf")  # vLLM's min_tokens: end-of-text cannot come yet
    if params.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(prompt) | set(output)), dtype=torch.long, device=logits.device)
        chosen = logits[seen]
        logits[seen] = torch.where(chosen > 0, chosen / params.repetition_penalty, chosen * params.repetition_penalty)
    if output and (params.presence_penalty or params.frequency_penalty):
        counts = torch.bincount(torch.tensor(output, device=logits.device), minlength=logits.shape[-1])[: logits.shape[-1]].to(logits.dtype)
        logits -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def truncate(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Keep the ``top_k`` largest logits, then the smallest set whose probabilities reach ``top_p``; the rest become -inf."""
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, -float("inf"))
    if top_p < 1.0:
        ordered, order = torch.sort(logits, descending=True)
        before = torch.softmax(ordered, dim=-1).cumsum(-1) - torch.softmax(ordered, dim=-1)  # mass of the tokens ranked above each
        logits = logits.clone()
        logits[order[before >= top_p]] = -float("inf")  # the most likely token always stays (nothing is ranked above it)
    return logits


def pick(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> int:
    """The next token of already processed ``logits``: argmax when greedy (as ``generate`` does), else a sample."""
    if params.greedy:
        return int(logits.argmax())
    logits = logits / params.temperature  # before top-p, which depends on it (as in vLLM)
    if params.truncates:
        logits = truncate(logits.float(), params.top_k, params.top_p)
    probs = torch.softmax(logits, dim=-1)
    if not bool(torch.isfinite(probs).all()) or float(probs.sum()) <= 0:
        raise RowFailed("sampling failed: the next-token probabilities are not finite")
    return int(torch.multinomial(probs, 1, generator=generator))


def log_probabilities(logits: torch.Tensor, token: int, top: int) -> tuple[float, list[tuple[int, float]]]:
    """``token``'s log probability under the model's ``logits``, and the ``top`` most likely tokens with theirs."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    values, ids = torch.topk(logprobs, top) if top > 0 else (logprobs[:0], logprobs[:0].long())
    return float(logprobs[token]), [(int(i), float(v)) for i, v in zip(ids.tolist(), values.tolist(), strict=True)]


def generator_for(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    """The row's own random generator when it asked for a seed (None: the process-wide one)."""
    if params.seed is None or params.greedy:
        return None
    return torch.Generator(device=device).manual_seed(params.seed)


def sample_into(row: Row, logits: torch.Tensor, eos: int | None) -> None:
    """Pick ``row``'s next token and append it, telling its ``on_token`` listener (raises :class:`RowFailed`)."""
    params = row.request.sampling
    raw = logits
    if params.processes_logits:
        logits = process(logits, params, row.request.prompt, row.tokens, eos)
    if row.generator is None and params.seed is not None:
        row.generator = generator_for(params, logits.device)
    token = pick(logits, params, row.generator)
    if params.logprobs is not None:
        row.logprobs.append(log_probabilities(raw, token, params.logprobs))
    row.tokens.append(token)
    if row.request.on_token is not None:
        try:
            row.request.on_token(token)
        except Exception as exc:  # noqa: BLE001 - a listener that went away must not stop generation
            log.warning("a token listener failed (%s: %s); generation goes on", type(exc).__name__, exc)
