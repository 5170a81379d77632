"""The HTTP API: a FastAPI ingress deployment in front of the model deployment.

Routes (OpenAPI docs at ``/docs``)::

    POST /v1/summarize        {"dialogue", "max_new_tokens"?, "temperature"?} -> Summary
    POST /v1/summarize/batch  {"dialogues": [...], "max_new_tokens"?, "temperature"?} -> [Summary, ...]
    GET  /v1/models           what is served: adapter name, version, mode, limits
    GET  /healthz             200 when a model replica answers, else 503

Every error is JSON ``{"error": {"type", "message", "field"?}}``: 422 for invalid input (the field
is named), 413 for a body over ``max_body_bytes``, 401 for a missing or wrong bearer token (only
when the token variable is set), 404/405 for unknown routes and methods, 503 when no model
replica can take the request (the client retries those), 500 for anything unexpected.

``build_app`` is the application builder for Ray's ``serve deploy`` / ``serve run``
(``import_path: loraops.serve.app:build_app``); ``loraops serve`` calls :func:`deploy`.
"""

# No `from __future__ import annotations`: Serve rebuilds the routes of the ingress class, and
# FastAPI must see real classes in their signatures (with strings the body became a query parameter).

import asyncio
import hmac
import json
import logging
import os
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictStr
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from loraops import __version__
from loraops.serve.replica import DialogueTooLong, SummarizerModel
from loraops.serve.settings import API_DEPLOYMENT, MODEL_DEPLOYMENT, ServeSettings, validate_settings

log = logging.getLogger("ray.serve")

#: Seconds /healthz waits for a model replica.
HEALTH_TIMEOUT_S = 5.0
EXAMPLE_DIALOGUE = "#Person1#: Hi, I'd like to book a table for two tonight.\n#Person2#: Sure, what time?\n#Person1#: Eight, please."


# --- request and response bodies ---------------------------------------------------------------


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty or whitespace only")
    return value


Dialogue = Annotated[StrictStr, AfterValidator(_not_blank)]
MaxNewTokens = Annotated[int, Field(strict=True, ge=1, description="Summary length limit in tokens (default and maximum: see /v1/models).")] | None
Temperature = Annotated[float, Field(strict=True, ge=0.0, le=2.0, description="0 or absent: greedy decoding; above 0: sampling.")] | None


class SummarizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"dialogue": EXAMPLE_DIALOGUE, "max_new_tokens": 48}]})

    dialogue: Dialogue = Field(description="The dialogue, turns like '#Person1#: ...' on their own lines.")
    max_new_tokens: MaxNewTokens = None
    temperature: Temperature = None


class BatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"dialogues": [EXAMPLE_DIALOGUE, EXAMPLE_DIALOGUE]}]})

    dialogues: list[Dialogue] = Field(min_length=1, description="The dialogues; at most max_batch_dialogues (see /v1/models).")
    max_new_tokens: MaxNewTokens = None
    temperature: Temperature = None


class ModelRef(BaseModel):
    name: str
    version: int


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int = Field(description="Generated tokens, the end-of-text token included.")


class Summary(BaseModel):
    summary: str
    model: ModelRef = Field(description="The registered adapter version that generated this summary.")
    usage: Usage


class ErrorDetail(BaseModel):
    type: str
    message: str
    field: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in {401: "missing or wrong bearer token", 413: "body too large", 422: "invalid input", 503: "no model replica available; retry"}.items()
}


# --- errors ------------------------------------------------------------------------------------


class ApiError(Exception):
    """An error answer: HTTP status, a machine-readable type, a message and the field at fault."""

    def __init__(self, status: int, type: str, message: str, field: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.type, self.message, self.field, self.headers = status, type, message, field, headers


def error_response(status: int, type: str, message: str, field: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    detail = ErrorDetail(type=type, message=message, field=field).model_dump(exclude_none=True)
    return JSONResponse({"error": detail}, status_code=status, headers=headers)


def _field_of(loc: tuple | list) -> str:
    """``("body", "dialogues", 2)`` -> ``dialogues.2``; the body itself -> ``body``."""
    parts = [str(part) for part in loc]
    if parts and parts[0] == "body":
        parts = parts[1:]
    return ".".join(parts) or "body"


app = FastAPI(
    title="loraops summarization API",
    version=__version__,
    description="Dialogue summaries from a base model plus the LoRA adapter a registry alias points to.",
)
app.state.max_body_bytes = ServeSettings().max_body_bytes
app.state.auth_token = None


@app.exception_handler(RequestValidationError)
async def _invalid_request(_request: Request, exc: RequestValidationError) -> JSONResponse:
    problems = exc.errors()
    first = problems[0] if problems else {"loc": ("body",), "msg": "invalid request"}
    if first.get("type") == "json_invalid":  # its location is a character offset, not a field
        position = first.get("loc", ("body", "?"))[-1]
        reason = first.get("ctx", {}).get("error", "decode error")
        return error_response(422, "validation_error", f"body: invalid JSON ({reason} at character {position})", field="body")
    field = _field_of(first.get("loc", ("body",)))
    message = "unknown field" if first.get("type") == "extra_forbidden" else first.get("msg", "invalid value")
    response = error_response(422, "validation_error", f"{field}: {message}", field=field)
    if len(problems) > 1:
        body = json.loads(response.body)
        body["error"]["details"] = [{"field": _field_of(p.get("loc", ())), "message": p.get("msg", "")} for p in problems]
        response = JSONResponse(body, status_code=422)
    return response


@app.exception_handler(ApiError)
async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
    return error_response(exc.status, exc.type, exc.message, exc.field, exc.headers)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    message = f"no route {request.method} {request.url.path}" if exc.status_code in (404, 405) else str(exc.detail)
    return error_response(exc.status_code, kind, message, headers=getattr(exc, "headers", None))


@app.exception_handler(Exception)
async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
    log.exception("unexpected error")
    return error_response(500, "internal_error", f"{type(exc).__name__}: {exc}")


class BodySizeLimit:
    """Answer 413 to bodies over the app's ``state.max_body_bytes`` before anything parses them.

    A declared Content-Length is checked up front; a body without one (chunked) is read up to the
    limit and then replayed to the application.
    """

    def __init__(self, inner: ASGIApp):
        self.inner = inner

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.inner(scope, receive, send)
            return
        # scope["app"], not the module's `app`: Serve ships the ingress class with its own copy of the app.
        limit = int(scope["app"].state.max_body_bytes)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await self._reject(scope, receive, send, limit)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await self._reject(scope, receive, send, limit)
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

    @staticmethod
    async def _reject(scope: Scope, receive: Receive, send: Send, limit: int) -> None:
        response = error_response(413, "payload_too_large", f"the request body is over the limit of {limit} bytes", field="body")
        await response(scope, receive, send)


app.add_middleware(BodySizeLimit)


async def require_token(request: Request) -> None:
    """Bearer-token auth, on when the token environment variable is set in the API replicas."""
    expected = request.app.state.auth_token
    if not expected:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), expected.encode()):
        raise ApiError(401, "unauthorized", "missing or wrong bearer token (Authorization: Bearer TOKEN)", headers={"WWW-Authenticate": "Bearer"})


# --- the ingress deployment --------------------------------------------------------------------


@serve.deployment(name=API_DEPLOYMENT, max_ongoing_requests=256)
@serve.ingress(app)
class SummarizerAPI:
    """The HTTP front: validates, forwards to the model deployment (whose batching groups requests), maps errors."""

    def __init__(self, model: DeploymentHandle, settings: dict[str, Any]):
        self.model = model
        self.settings = ServeSettings.model_validate(settings)
        app.state.max_body_bytes = self.settings.max_body_bytes
        app.state.auth_token = os.environ.get(self.settings.auth_token_env) or None
        log.info("auth %s", f"on (bearer token from ${self.settings.auth_token_env})" if app.state.auth_token else "off")

    @app.post("/v1/summarize", response_model=Summary, responses=ERROR_RESPONSES, dependencies=[Depends(require_token)])
    async def summarize(self, body: SummarizeRequest) -> dict[str, Any]:
        """Summarize one dialogue with the served adapter."""
        payload = self._payload(body.dialogue, body.max_new_tokens, body.temperature)
        return await self._summarize(payload, field="dialogue")

    @app.post("/v1/summarize/batch", response_model=list[Summary], responses=ERROR_RESPONSES, dependencies=[Depends(require_token)])
    async def summarize_batch(self, body: BatchRequest) -> list[dict[str, Any]]:
        """Summarize several dialogues; the answers come in the same order."""
        if len(body.dialogues) > self.settings.max_batch_dialogues:
            limit = self.settings.max_batch_dialogues
            raise ApiError(422, "validation_error", f"dialogues: at most {limit} per request, got {len(body.dialogues)}", field="dialogues")
        payloads = [self._payload(text, body.max_new_tokens, body.temperature) for text in body.dialogues]
        results = await asyncio.gather(*(self._summarize(p, field=f"dialogues.{i}") for i, p in enumerate(payloads)), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return results  # type: ignore[return-value]

    @app.get("/v1/models", responses=ERROR_RESPONSES, dependencies=[Depends(require_token)])
    async def models(self) -> dict[str, Any]:
        """What is served: adapter name and version, mode, base model and the request limits."""
        info = await self._call(self.model.info.remote(), timeout=HEALTH_TIMEOUT_S * 2)
        limits = {
            "default_max_new_tokens": self.settings.default_max_new_tokens,
            "max_new_tokens_limit": self.settings.max_new_tokens_limit,
            "max_batch_dialogues": self.settings.max_batch_dialogues,
            "max_body_bytes": self.settings.max_body_bytes,
        }
        return {"models": [info | {"limits": limits}]}

    @app.get("/healthz", responses={503: ERROR_RESPONSES[503]})
    async def healthz(self) -> dict[str, Any]:
        """200 when a model replica answers within a few seconds (no auth)."""
        info = await self._call(self.model.info.remote(), timeout=HEALTH_TIMEOUT_S)
        return {"status": "ok", "model": {"name": info["name"], "version": info["version"], "mode": info["mode"]}}

    def _payload(self, dialogue: str, max_new_tokens: int | None, temperature: float | None) -> dict[str, Any]:
        limit = self.settings.max_new_tokens_limit
        if max_new_tokens is not None and max_new_tokens > limit:
            raise ApiError(422, "validation_error", f"max_new_tokens: must be at most {limit}, got {max_new_tokens}", field="max_new_tokens")
        return {"dialogue": dialogue, "max_new_tokens": max_new_tokens or self.settings.default_max_new_tokens, "temperature": float(temperature or 0.0)}

    async def _summarize(self, payload: dict[str, Any], field: str) -> dict[str, Any]:
        try:
            return await self._call(self.model.summarize.remote(payload), timeout=self.settings.request_timeout_s)
        except DialogueTooLong as exc:
            # Ray re-raises it wrapped (with the replica's traceback in str()); the cause has the figures.
            cause = exc.cause if isinstance(getattr(exc, "cause", None), DialogueTooLong) else exc
            raise ApiError(422, "context_length_exceeded", f"{field}: {cause}", field=field) from None

    async def _call(self, response, timeout: float) -> Any:
        """Await a model call; unavailability and overload become 503 (clients retry), its own errors pass."""
        from ray.exceptions import RayActorError
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError

        async def result() -> Any:
            return await response

        try:
            return await asyncio.wait_for(result(), timeout)
        except asyncio.TimeoutError:
            response.cancel()
            raise ApiError(503, "unavailable", f"no model replica answered within {timeout:g} s; retry later", headers={"Retry-After": "5"}) from None
        except BackPressureError as exc:
            raise ApiError(503, "overloaded", f"the model is overloaded ({exc}); retry later", headers={"Retry-After": "1"}) from None
        except (DeploymentUnavailableError, ReplicaUnavailableError, RayActorError) as exc:
            raise ApiError(503, "unavailable", f"no model replica available ({type(exc).__name__}); retry later", headers={"Retry-After": "5"}) from None


# --- building the application ------------------------------------------------------------------


def build(settings: ServeSettings, deployment_options: dict[str, dict[str, Any]] | None = None):
    """The Serve application: the API deployment bound to the model deployment, with per-deployment options.

    The model deployment's ``user_config`` defaults to the live settings (adapter reference, batch
    settings, poll interval), so Serve can change them later without restarting replicas.
    """
    options = deployment_options or {}
    model_options = dict(options.get(MODEL_DEPLOYMENT, {}))
    model_options.setdefault("user_config", settings.live())
    data = settings.model_dump()
    model = SummarizerModel.options(**model_options).bind(data)
    return SummarizerAPI.options(**options.get(API_DEPLOYMENT, {})).bind(model, data)


def build_app(args: dict[str, Any]):
    """Application builder for Ray's ``serve deploy`` / ``serve run``: ``args`` are the loraops serve settings.

    With ``serve deploy``, give ``workspace``/``db_url``/``artifact_uri`` as absolute paths (or set
    $LORAOPS_HOME in the application's runtime_env): relative ones resolve in the Ray worker's
    directory. Deployment options come from the config file's ``deployments`` section.
    """
    return build(validate_settings(args).with_absolute_paths())


def deploy(config) -> str:
    """Run a validated serve config (:class:`~loraops.serve.settings.ServeConfigFile`) on the connected Ray cluster.

    Starts Serve with the file's ``http_options`` (if Serve is not running yet), checks that the
    adapter reference resolves before any replica starts, and returns the application's URL.
    """
    from loraops.registry import Registry

    settings = config.settings.with_absolute_paths()
    version = Registry(db_url=settings.db_url, artifact_uri=settings.artifact_uri, workspace=settings.workspace).get(settings.adapter)
    log.info("deploying %s: %s (%s mode)", config.app_name, version.ref, settings.mode)
    serve.start(http_options=config.http_options or None)
    serve.run(build(settings, config.deployment_options), name=config.app_name, route_prefix=config.route_prefix)
    return app_url(config)


def app_url(config) -> str:
    """``http://HOST:PORT/PREFIX`` of a serve config's application (0.0.0.0 shown as 127.0.0.1)."""
    host = str(config.http_options.get("host") or "127.0.0.1")
    host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    port = int(config.http_options.get("port") or 8000)
    prefix = config.route_prefix.rstrip("/")
    return f"http://{host}:{port}{prefix}"
