"""Sampling: the next token of a row from its logits, handing it to the row's listener, and the engine's thread.

Greedy rows (temperature 0) take the argmax, as ``generate`` does, so they produce the tokens
:func:`loraops.generate.generate_completions` produces; other rows draw at their temperature. A row whose
probabilities are not finite fails alone (:class:`~loraops.serve.engine.scheduler.RowFailed`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import torch

from loraops.serve.engine.scheduler import Row, RowFailed

log = logging.getLogger("loraops.serve.engine.core")  # one logger for the engine, as before the split


def pick(logits: torch.Tensor, temperature: float) -> int:
    """The next token: argmax at temperature 0 (as ``generate`` does), else a sample at that temperature."""
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / temperature, dim=-1)
    if not bool(torch.isfinite(probs).all()) or float(probs.sum()) <= 0:
        raise RowFailed("sampling failed: the next-token probabilities are not finite")
    return int(torch.multinomial(probs, 1))


def sample_into(row: Row, logits: torch.Tensor) -> None:
    """Pick ``row``'s next token and append it, telling its ``on_token`` listener (raises :class:`RowFailed`)."""
    token = pick(logits, row.request.temperature)
    row.tokens.append(token)
    if row.request.on_token is not None:
        try:
            row.request.on_token(token)
        except Exception as exc:  # noqa: BLE001 - a listener that went away must not stop generation
            log.warning("a token listener failed (%s: %s); generation goes on", type(exc).__name__, exc)


class LoopThread:
    """The background thread that calls ``step(wait=True)`` until it returns False; ``on_failure`` gets what killed it."""

    def __init__(self, step: Callable[[bool], bool], on_failure: Callable[[BaseException], None]):
        self._step, self._on_failure = step, on_failure
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="loraops-engine", daemon=True)
            self._thread.start()

    def join(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _loop(self) -> None:
        try:
            while self._step(True):
                pass
        except BaseException as exc:  # noqa: BLE001 - a dead loop must fail every waiting request, not hang them
            log.exception("the engine loop stopped")
            self._on_failure(exc)
