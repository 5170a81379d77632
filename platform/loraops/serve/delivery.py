"""Whether an answer reached its client: only then is its outcome counted in the canary figures and metrics.

Serve's proxy holds the client's connection; the ingress only hands its answer to the proxy. When the
proxy dies mid-request (``ray.kill``, its node lost), the ingress is not cancelled: it finishes, and
its answer goes nowhere. Counting that answer as a success would make a version look better than what
clients saw. What tells the two apart (checked with Ray Serve 2.60, proxy killed mid-request):

- after the response is complete, the proxy's ``receive`` answers ``http.disconnect`` (uvicorn says so
  once it has written the whole response to the client's socket; Serve forwards it to the replica);
- if the proxy died, the replica's pending ``receive`` call to it fails (``ActorDiedError``);
- if the client went away first, the proxy cancels the request (``asyncio.CancelledError``).

:class:`DeliveryGate` holds the outcomes a request records (:func:`once_delivered`) until that
acknowledgement, and drops them otherwise: an undelivered answer counts neither as a success nor as
the version's failure. It runs after the response is sent, so it costs the client nothing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from contextvars import ContextVar

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from loraops.serve.guard import request_id_of

log = logging.getLogger("ray.serve")

#: Seconds the gate waits for the proxy's acknowledgement (it comes within milliseconds of the last byte).
ACK_TIMEOUT_S = 5.0

#: The outcomes the current request recorded, kept until its answer is delivered (None: outside a gated request).
_pending: ContextVar[list[Callable[[], None]] | None] = ContextVar("loraops_pending_outcomes", default=None)


def once_delivered(record: Callable[[], None]) -> None:
    """Run ``record`` once the current request's answer has reached its client (at once outside a gated request)."""
    pending = _pending.get()
    if pending is None:
        record()
    else:
        pending.append(record)  # the batch route's tasks share this list: they copy the context, not the list


async def acknowledged(receive: Receive, timeout_s: float = ACK_TIMEOUT_S) -> str | None:
    """None once the server has sent the whole response (``http.disconnect`` after it), else why not."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    try:
        while True:
            message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0.0))
            if message["type"] == "http.disconnect":
                return None
            # an unread request body (a route that never reads it) comes first: skip it
    except asyncio.TimeoutError:
        return f"no acknowledgement within {timeout_s:g} s"
    except Exception as exc:  # noqa: BLE001 - Ray's ActorDiedError: the proxy holding the client's connection died
        return f"the proxy is gone ({type(exc).__name__})"


class DeliveryGate:
    """ASGI middleware: applies a request's recorded outcomes once its answer was delivered, drops them if not."""

    def __init__(self, inner: ASGIApp, ack_timeout_s: float = ACK_TIMEOUT_S):
        self.inner = inner
        self.ack_timeout_s = ack_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.inner(scope, receive, send)
            return
        pending: list[Callable[[], None]] = []
        started = complete = False

        async def sending(message: Message) -> None:
            nonlocal started, complete
            started = started or message["type"] == "http.response.start"
            complete = complete or (message["type"] == "http.response.body" and not message.get("more_body", False))
            await send(message)

        token = _pending.set(pending)
        try:
            await self.inner(scope, receive, sending)
        except asyncio.CancelledError:
            _dropped(scope, pending, "the client went away")
            raise
        except Exception:
            # Nothing sent yet: Starlette's outer handler answers 500, and a failure recorded before counts. Part of
            # the answer sent: the client got no whole answer.
            if started:
                _dropped(scope, pending, "the response broke off")
            else:
                _apply(pending)
            raise
        finally:
            _pending.reset(token)
        if not pending:
            return
        problem = await acknowledged(receive, self.ack_timeout_s) if complete else "the response was not completed"
        if problem:
            _dropped(scope, pending, problem)
        else:
            _apply(pending)


def _apply(pending: list[Callable[[], None]]) -> None:
    for record in pending:
        record()


def _dropped(scope: Scope, pending: list[Callable[[], None]], why: str) -> None:
    if pending:
        log.warning("request %s: answer not delivered (%s); not counted in the figures", request_id_of(scope), why)
