"""Every model replica's on-demand state in ``/v1/models``, whichever replica answers the request.

Ray Serve has no broadcast to the replicas of a deployment, and a handle call reaches one replica.
So each model replica publishes its :meth:`~loraops.serve.on_demand.OnDemand.info` to a small named
Ray actor of the application (the *board*, :class:`Board`): every registry poll (a heartbeat, also
when watching is off) and at once after each on-demand load or eviction. The API reads the board and
lists the replicas seen in the last :data:`STALE_POLLS` polls; a replica that died or was scaled
down stops publishing and drops out. No database is involved: the board lives as long as the
replica that created it (whichever asked first, ``get_if_exists``), and when that one goes the next
publisher or reader creates it again, empty until the replicas' next beats.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("ray.serve")

#: A replica not heard from for this many of its polls is dropped (dead, or scaled down).
STALE_POLLS = 3
#: The least time before a replica is dropped: a poll interval of 0 (watching off) still beats every second.
MIN_STALE_S = 5.0
#: How long a publish or a read waits for the board.
CALL_TIMEOUT_S = 5.0


class Board:
    """The replicas' last published states, kept by receipt time on the board's own clock (no skew between nodes)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._entries: dict[str, tuple[float, float, dict[str, Any]]] = {}

    def publish(self, replica: str, state: dict[str, Any], poll_s: float) -> None:
        self._entries[replica] = (self._clock(), max(STALE_POLLS * poll_s, MIN_STALE_S), state)

    def read(self) -> list[dict[str, Any]]:
        """The live replicas (sorted by id), each with how many seconds ago it published; stale ones are forgotten."""
        now = self._clock()
        self._entries = {r: e for r, e in self._entries.items() if now - e[0] <= e[1]}
        return [{"replica": r, "seen_s_ago": round(now - e[0], 1)} | e[2] for r, e in sorted(self._entries.items())]


def board_name(app_name: str) -> str:
    return f"loraops-replica-board-{app_name}"


class BoardClient:
    """A replica's handle on its application's board: created or found by name, found again after the board died."""

    def __init__(self, app_name: str):
        self.name = board_name(app_name)
        self._actor = None

    def _board(self):
        import ray

        if self._actor is None:
            actor = ray.remote(num_cpus=0, max_restarts=0)(Board)
            self._actor = actor.options(name=self.name, namespace="loraops", get_if_exists=True).remote()
        return self._actor

    async def _call(self, method: str, *args: Any) -> Any:
        try:
            return await asyncio.wait_for(getattr(self._board(), method).remote(*args), CALL_TIMEOUT_S)
        except Exception:
            self._actor = None  # gone (its owner replica died) or unreachable: look it up, or create it, next time
            raise

    async def publish(self, replica: str, state: dict[str, Any], poll_s: float) -> None:
        """Publish ``state``; a failure is logged and left to the next beat (the listing is informative, serving goes on)."""
        try:
            await self._call("publish", replica, state, poll_s)
        except Exception as exc:  # noqa: BLE001
            log.warning("could not publish this replica's on-demand state: %s", exc)

    async def read(self) -> list[dict[str, Any]] | None:
        """The live replicas' states, or None when the board cannot be read (the caller shows the answering replica's)."""
        try:
            return await self._call("read")
        except Exception as exc:  # noqa: BLE001
            log.warning("could not read the replicas' on-demand states: %s", exc)
            return None


def listing(published: list[dict[str, Any]] | None, replica: str, state: dict[str, Any]) -> list[dict[str, Any]]:
    """The board's replicas with the answering one's state as of now (it may not have published yet, or since a load)."""
    others = [entry for entry in published or [] if entry["replica"] != replica]
    return sorted([*others, {"replica": replica, "seen_s_ago": 0.0} | state], key=lambda entry: entry["replica"])
