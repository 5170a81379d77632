"""What every request of the API passes before FastAPI sees it, and the JSON error answer it shares with the API.

:class:`RequestGuard` checks the bearer token, the body size and the time the body takes to
arrive; :func:`error_response` is the ``{"error": {"type", "message", "field"?, "request_id"?}}``
body of every error answer (on the OpenAI-compatible routes OpenAI's ``{"error": {"message", "type",
"param", "code"}}``); :func:`request_id_of` is the id that ties an answer to its log line.
"""

from __future__ import annotations

import asyncio
import hmac
import re
import uuid

from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.types import ASGIApp, Message, Receive, Scope, Send

#: Paths that answer without the bearer token: health checks and the API docs.
OPEN_PATHS = frozenset({"/healthz", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
#: Routes whose errors take OpenAI's shape, so that OpenAI clients read them.
OPENAI_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})
#: OpenAI's error ``type`` for a status; loraops' own type goes into ``code``.
OPENAI_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error", 405: "invalid_request_error",
                      408: "invalid_request_error", 413: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error",
                      503: "service_unavailable_error"}  # fmt: skip
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


class ErrorDetail(BaseModel):
    type: str
    message: str
    field: str | None = None
    request_id: str | None = Field(None, description="On 500 answers: the id of the server log line with the details.")


class ErrorResponse(BaseModel):
    error: ErrorDetail


def error_response(
    status: int,
    type: str,
    message: str,
    field: str | None = None,
    headers: dict[str, str] | None = None,
    request_id: str | None = None,
    openai: bool = False,
) -> JSONResponse:
    """The error answer; ``openai``: in OpenAI's shape (``type`` its category, ``code`` loraops' type, ``param`` the field)."""
    if openai:
        detail = {"message": message, "type": OPENAI_ERROR_TYPES.get(status, "server_error"), "param": field, "code": type}
        if request_id:
            detail["request_id"] = request_id
    else:
        detail = ErrorDetail(type=type, message=message, field=field, request_id=request_id).model_dump(exclude_none=True)
    return JSONResponse({"error": detail}, status_code=status, headers=headers)


def route_of(scope: Scope) -> str:
    """The request's path inside the application (without Serve's route prefix)."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :] or "/"
    return path


def is_openai_route(scope: Scope) -> bool:
    return route_of(scope) in OPENAI_PATHS


def request_id_of(scope: Scope) -> str:
    """Serve's id of this request (its proxy sets the ``x-request-id`` header, and echoes it as ``X-Request-ID``)."""
    given = dict(scope.get("headers") or []).get(b"x-request-id", b"").decode("latin-1")
    return given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex


class RequestGuard:
    """Checks every HTTP request before the application sees it, cheapest first, so that no client
    holds one of the ingress's ``max_ongoing_requests`` slots longer than ``body_timeout_s``:

    1. the bearer token, from the headers (401): a client without it never gets to send a body;
    2. a declared Content-Length over ``max_body_bytes`` (413);
    3. the body, read within ``body_timeout_s`` in all (408: a client that declares 100 bytes and
       sends 10 is cut off) and up to ``max_body_bytes`` (413), then replayed to the application.

    Serve's proxy streams the body to this replica as it arrives, so without the deadline a stalled
    client would hold its slot for as long as it keeps the connection open.
    """

    def __init__(self, inner: ASGIApp):
        self.inner = inner

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.inner(scope, receive, send)
            return
        # scope["app"], not the module's `app`: Serve ships the ingress class with its own copy of the app.
        state = scope["app"].state
        if not _authorized(scope, state.auth_token):
            await _answer(scope, send, 401, "unauthorized", "missing or wrong bearer token (Authorization: Bearer TOKEN)", {"WWW-Authenticate": "Bearer"})
            return
        limit = int(state.max_body_bytes)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await _too_large(scope, send, limit)
            return
        chunks: list[bytes] = []
        size = 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + float(state.body_timeout_s)
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0.0))
            except asyncio.TimeoutError:
                message = f"the request body did not arrive within {float(state.body_timeout_s):g} s ({size} bytes received)"
                await _answer(scope, send, 408, "request_timeout", message, {"Connection": "close"}, field="body")
                return
            if message["type"] != "http.request":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await _too_large(scope, send, limit)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.inner(scope, replay, send)


def _authorized(scope: Scope, expected: str | None) -> bool:
    """True when auth is off, the path is open (health, docs) or the request carries the bearer token."""
    if not expected:
        return True
    if route_of(scope) in OPEN_PATHS:
        return True
    header = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
    scheme, _, given = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), expected.encode())


async def _answer(scope: Scope, send: Send, status: int, type: str, message: str, headers: dict[str, str] | None = None, field: str | None = None) -> None:
    async def nothing() -> Message:  # the response never reads the request
        return {"type": "http.disconnect"}

    await error_response(status, type, message, field=field, headers=headers, openai=is_openai_route(scope))(scope, nothing, send)


async def _too_large(scope: Scope, send: Send, limit: int) -> None:
    await _answer(scope, send, 413, "payload_too_large", f"the request body is over the limit of {limit} bytes", field="body")
