"""The engine's thread: calls the engine's pass until it says stop, and fails every waiting request if it dies."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


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
