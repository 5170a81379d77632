"""The HTTP API: a FastAPI ingress deployment in front of the model deployment.

Routes (OpenAPI docs at ``/docs``)::

    POST /v1/summarize        {"dialogue", "max_new_tokens"?, "temperature"?} -> Summary
    POST /v1/summarize/batch  {"dialogues": [...], "max_new_tokens"?, "temperature"?} -> [Summary, ...]
    GET  /v1/models           what is served: adapter name, version, mode, limits, problem
    GET  /healthz             200 {"status": "ok" | "degraded"} when a model replica answers, else 503

Every error is JSON ``{"error": {"type", "message", "field"?, "request_id"?}}``: 422 for invalid
input (the field is named), 413 for a body over ``max_body_bytes``, 408 for a body that does not
arrive within ``body_timeout_s``, 401 for a missing or wrong bearer token (only when the token
variable is set; checked before the body is read), 404/405 for unknown routes and methods, 503
when no model replica can take the request (the client retries those), 500 "internal error" with
a request id for anything unexpected (the details are in the log line with that id).

``build_app`` is the application builder for Ray's ``serve deploy`` / ``serve run``
(``import_path: loraops.serve.app:build_app``); ``loraops serve`` calls :func:`deploy`.
"""

# No `from __future__ import annotations`: Serve rebuilds the routes of the ingress class, and
# FastAPI must see real classes in their signatures (with strings the body became a query parameter).

import asyncio
import json
import logging
import os
from typing import Annotated, Any

from fastapi import FastAPI, Request, Response, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBearer
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictStr
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from loraops import __version__
from loraops.errors import LoraopsError
from loraops.serve.guard import ErrorResponse, RequestGuard, error_response, request_id_of
from loraops.serve.replica import Rejection, SummarizerModel
from loraops.serve.settings import API_DEPLOYMENT, MODEL_DEPLOYMENT, ServeSettings, validate_settings

log = logging.getLogger("ray.serve")

#: Seconds /healthz waits for a model replica.
HEALTH_TIMEOUT_S = 5.0
#: The lowest sampling temperature a request may ask for (0 is greedy). Far below it, at about 1e-35,
#: logits / temperature overflow and sampling fails; 0.01 is already indistinguishable from greedy.
MIN_TEMPERATURE = 0.01
EXAMPLE_DIALOGUE = "#Person1#: Hi, I'd like to book a table for two tonight.\n#Person2#: Sure, what time?\n#Person1#: Eight, please."


# --- request and response bodies ---------------------------------------------------------------


def _valid_text(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty or whitespace only")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:  # JSON's "\ud800" escape: a lone surrogate no tokenizer can take
        raise ValueError(f"invalid Unicode: lone surrogate {value[exc.start]!r} at character {exc.start}") from None
    return value


def _usable_temperature(value: float) -> float:
    if 0.0 < value < MIN_TEMPERATURE:
        raise ValueError(f"must be 0 (greedy) or at least {MIN_TEMPERATURE:g}, got {value:g}")
    return value


Dialogue = Annotated[StrictStr, AfterValidator(_valid_text)]
MaxNewTokens = Annotated[int, Field(strict=True, ge=1, description="Summary length limit in tokens (default and maximum: see /v1/models).")] | None
Temperature = (
    Annotated[
        float,
        Field(strict=True, ge=0.0, le=2.0, description=f"0 or absent: greedy decoding; {MIN_TEMPERATURE:g} to 2: sampling."),
        AfterValidator(_usable_temperature),
    ]
    | None
)


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
    model_ms: float = Field(description="Milliseconds the request spent in the model replica's engine (queue_ms waiting for a slot, then generating).")
    queue_ms: float = Field(description="Milliseconds it waited for a slot in the running batch.")


class Summary(BaseModel):
    summary: str
    model: ModelRef = Field(description="The registered adapter version that generated this summary.")
    usage: Usage


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in {
        401: "missing or wrong bearer token",
        408: "the body did not arrive in time",
        413: "body too large",
        422: "invalid input",
        503: "no model replica available; retry",
    }.items()
}


# --- errors ------------------------------------------------------------------------------------


class ApiError(Exception):
    """An error answer: HTTP status, a machine-readable type, a message and the field at fault."""

    def __init__(self, status: int, type: str, message: str, field: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.type, self.message, self.field, self.headers = status, type, message, field, headers


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
app.state.body_timeout_s = ServeSettings().body_timeout_s
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
    if exc.status_code == 400:  # FastAPI's answer to a body json.loads cannot take: a client error like any invalid JSON
        return error_response(422, "validation_error", f"body: {_unparsable(exc.__cause__)}", field="body")
    kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    message = f"no route {request.method} {request.url.path}" if exc.status_code in (404, 405) else str(exc.detail)
    return error_response(exc.status_code, kind, message, headers=getattr(exc, "headers", None))


def _unparsable(cause: BaseException | None) -> str:
    if isinstance(cause, UnicodeDecodeError):
        return f"invalid UTF-8 (byte 0x{cause.object[cause.start]:02x} at position {cause.start})"
    if isinstance(cause, RecursionError):
        return "invalid JSON (nested too deeply)"
    return f"cannot be parsed as JSON ({type(cause).__name__ if cause else 'unknown error'})"


@app.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    # The details (for Ray errors a remote traceback with paths, hosts and actor ids) go to the log
    # only; the answer carries the id of that log line.
    request_id = request_id_of(request.scope)
    log.error("request %s (%s %s) failed: %s: %s", request_id, request.method, request.url.path, type(exc).__name__, exc, exc_info=exc)
    return error_response(500, "internal_error", f"internal error; the server log has the details under request id {request_id}", request_id=request_id)


app.add_middleware(RequestGuard)

#: Declares the bearer scheme in the OpenAPI document (the docs' "Authorize" button sends the
#: token); the check itself is :class:`RequestGuard`'s, done before the body is read.
bearer_token = HTTPBearer(auto_error=False, description="The token in the API replicas' environment variable `args.auth_token_env` (auth is off when unset).")


def server_timing(results: list[dict[str, Any]]) -> str:
    """``Server-Timing`` of an answer: ``model`` (time in the model engine) and ``queue`` (its wait for a slot), in ms.

    Defined above the ingress class: Serve ships that class with the module names defined before it.
    """
    slowest = max(results, key=lambda r: r["usage"]["model_ms"])["usage"]
    return f"model;dur={slowest['model_ms']}, queue;dur={slowest['queue_ms']}"


# --- the ingress deployment --------------------------------------------------------------------


@serve.deployment(name=API_DEPLOYMENT, max_ongoing_requests=256)
@serve.ingress(app)
class SummarizerAPI:
    """The HTTP front: validates, forwards to the model deployment (whose batching groups requests), maps errors."""

    def __init__(self, model: DeploymentHandle, settings: dict[str, Any]):
        self.model = model
        self.settings = ServeSettings.model_validate(settings)
        app.state.max_body_bytes = self.settings.max_body_bytes
        app.state.body_timeout_s = self.settings.body_timeout_s
        app.state.auth_token = os.environ.get(self.settings.auth_token_env) or None
        log.info("auth %s", f"on (bearer token from ${self.settings.auth_token_env})" if app.state.auth_token else "off")

    @app.post("/v1/summarize", response_model=Summary, responses=ERROR_RESPONSES, dependencies=[Security(bearer_token)])
    async def summarize(self, body: SummarizeRequest, response: Response) -> dict[str, Any]:
        """Summarize one dialogue with the served adapter. The ``Server-Timing`` header gives the model's share of the time."""
        payload = self._payload(body.dialogue, body.max_new_tokens, body.temperature)
        result = await self._summarize(payload, field="dialogue")
        response.headers["Server-Timing"] = server_timing([result])
        return result

    @app.post("/v1/summarize/batch", response_model=list[Summary], responses=ERROR_RESPONSES, dependencies=[Security(bearer_token)])
    async def summarize_batch(self, body: BatchRequest, response: Response) -> list[dict[str, Any]]:
        """Summarize several dialogues; the answers come in the same order (``Server-Timing``: the slowest one's model time)."""
        if len(body.dialogues) > self.settings.max_batch_dialogues:
            limit = self.settings.max_batch_dialogues
            raise ApiError(422, "validation_error", f"dialogues: at most {limit} per request, got {len(body.dialogues)}", field="dialogues")
        payloads = [self._payload(text, body.max_new_tokens, body.temperature) for text in body.dialogues]
        results = await asyncio.gather(*(self._summarize(p, field=f"dialogues.{i}") for i, p in enumerate(payloads)), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        response.headers["Server-Timing"] = server_timing(results)  # type: ignore[arg-type]
        return results  # type: ignore[return-value]

    @app.get("/v1/models", responses=ERROR_RESPONSES, dependencies=[Security(bearer_token)])
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

    @app.api_route("/healthz", methods=["GET", "HEAD"], responses={503: ERROR_RESPONSES[503]})
    async def healthz(self, strict: bool = False) -> JSONResponse:
        """Health of the model replica that answers (no auth; HEAD works too).

        200 ``{"status": "ok"}``: it serves its reference's target. 200 ``{"status": "degraded",
        "problem"}``: it serves, but not that target (e.g. the target failed its checksums and an
        earlier version is served): keep routing traffic, alert an operator. 503: no model replica
        answered within a few seconds. ``?strict=true`` answers 503 for degraded too, for monitors
        that only read status codes.
        """
        info = await self._call(self.model.info.remote(), timeout=HEALTH_TIMEOUT_S)
        model = {key: info[key] for key in ("name", "version", "mode", "adapter")}
        body: dict[str, Any] = {"status": "degraded" if info.get("problem") else "ok", "model": model}
        if info.get("problem"):
            body["problem"] = info["problem"]
        return JSONResponse(body, status_code=503 if strict and info.get("problem") else 200)

    def _payload(self, dialogue: str, max_new_tokens: int | None, temperature: float | None) -> dict[str, Any]:
        limit = self.settings.max_new_tokens_limit
        if max_new_tokens is not None and max_new_tokens > limit:
            raise ApiError(422, "validation_error", f"max_new_tokens: must be at most {limit}, got {max_new_tokens}", field="max_new_tokens")
        return {"dialogue": dialogue, "max_new_tokens": max_new_tokens or self.settings.default_max_new_tokens, "temperature": float(temperature or 0.0)}

    async def _summarize(self, payload: dict[str, Any], field: str) -> dict[str, Any]:
        result = await self._call(self.model.summarize.remote(payload), timeout=self.settings.request_timeout_s)
        if isinstance(result, Rejection):
            raise ApiError(422, result.type, f"{field}: {result.message}", field=field)
        return result

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


def target_version(config):
    """The registered version a serve config's adapter reference names now, if it may be served here.

    An unknown reference, an unreachable registry or a version trained with
    ``model.trust_remote_code: true`` (unless ``args.allow_trust_remote_code``) is an error. Needs no
    Ray: ``loraops serve`` calls it before starting a cluster, so such a mistake costs no cluster start.
    """
    from loraops.registry import Registry
    from loraops.serve.replica import training_config

    settings = config.settings.with_absolute_paths()
    version = Registry(db_url=settings.db_url, artifact_uri=settings.artifact_uri, workspace=settings.workspace).get(settings.adapter)
    training_config(version, str(settings.workspace), settings.allow_trust_remote_code)
    return version


def deploy(config) -> str:
    """Run a validated serve config (:class:`~loraops.serve.settings.ServeConfigFile`) on the connected Ray cluster.

    Starts Serve with the file's ``http_options`` (if Serve is not running yet), checks the adapter
    reference (:func:`target_version`) before any replica starts, and returns the application's URL.
    """
    from ray.exceptions import RayTaskError

    settings = config.settings.with_absolute_paths()
    version = target_version(config)
    log.info("deploying %s: %s (%s mode)", config.app_name, version.ref, settings.mode)
    try:
        serve.start(http_options=config.http_options or None)
        serve.run(build(settings, config.deployment_options), name=config.app_name, route_prefix=config.route_prefix)
    except RayTaskError as exc:
        if "Failed to bind to address" not in str(exc):  # Serve's proxy could not listen
            raise
        raise LoraopsError(f"http_options: port {_port(config)} is in use on the cluster's head node: stop what listens there or pick another port") from None
    return app_url(config)


def _host(config) -> str:
    return str(config.http_options.get("host") or "127.0.0.1")


def _port(config) -> int:
    return int(config.http_options.get("port") or 8000)


def app_url(config) -> str:
    """``http://HOST:PORT/PREFIX`` of a serve config's application (0.0.0.0 shown as 127.0.0.1)."""
    host = "127.0.0.1" if _host(config) in ("0.0.0.0", "::") else _host(config)
    return f"http://{host}:{_port(config)}{config.route_prefix.rstrip('/')}"


def check_port_free(config) -> None:
    """Refuse, in one line, to start a local Serve whose HTTP port is taken (Ray would fail with actor tracebacks)."""
    import socket

    host, port = _host(config), _port(config)
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Serve's server does: TIME_WAIT leftovers don't count
        try:
            sock.bind((host, port))
        except OSError as exc:
            reason = f"http_options: cannot listen on {host}:{port} ({exc.strerror})"
            raise LoraopsError(f"{reason}: stop what uses it or pick another port with --set http_options.port=N") from None
