"""The HTTP API: a FastAPI ingress deployment in front of the model deployment.

Routes (OpenAPI docs at ``/docs``)::

    POST /v1/summarize            {"dialogue", "max_new_tokens"?, "temperature"?, "model"?} -> Summary
                                  (?stream=true: server-sent events, the text as it is generated)
    POST /v1/summarize/batch      {"dialogues": [...], "max_new_tokens"?, "temperature"?, "model"?} -> [Summary, ...]
    POST /v1/completions          OpenAI's completions: ``prompt`` is the dialogue (stream or not)
    POST /v1/chat/completions     OpenAI's chat completions: the last user message is the dialogue
    GET  /v1/models               what is served (OpenAI's list in ``data``, loraops' details in ``models``)
    GET  /healthz                 200 {"status": "ok" | "degraded"} when a model replica answers, else 503
    GET  /health                  vLLM's, SGLang's and TGI's convention: 200 while a replica serves its target, else 503
    GET  /version                 {"version": loraops' version}

Every error is JSON ``{"error": {"type", "message", "field"?, "request_id"?}}`` (on the OpenAI
routes OpenAI's ``{"error": {"message", "type", "param", "code"}}``): 422 for invalid input (the
field is named), 404 for a model that is not served, 413 for a body over ``max_body_bytes``, 408
for a body that does not arrive within ``body_timeout_s``, 401 for a missing or wrong bearer token
(only when the token variable is set; checked before the body is read), 404/405 for unknown routes
and methods, 503 when no model replica can take the request (the client retries those), 500
"internal error" with a request id for anything unexpected (the details are in the log line with that id).

``build_app`` is the application builder for Ray's ``serve deploy`` / ``serve run``
(``import_path: loraops.serve.app:build_app``); ``loraops serve`` calls :func:`loraops.serve.deploy.deploy`.
"""

# No `from __future__ import annotations`: Serve rebuilds the routes of the ingress class, and
# FastAPI must see real classes in their signatures (with strings the body became a query parameter).

import asyncio
import dataclasses
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request, Response, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.security import HTTPBearer
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from loraops import __version__
from loraops.errors import LoraopsError
from loraops.registry.refs import normalize_ref
from loraops.serve.bodies import ERROR_RESPONSES, ApiError, BatchRequest, SummarizeRequest, Summary, field_of, valid_text
from loraops.serve.contract import Rejection, SummaryRequest, SummaryResult
from loraops.serve.delivery import DeliveryGate
from loraops.serve.guard import RequestGuard, error_response, is_openai_route, request_id_of
from loraops.serve.openai import Answer, ChatRequest, CompletionRequest, model_list, sse
from loraops.serve.replica import SummarizerModel
from loraops.serve.replica_board import BoardClient, listing
from loraops.serve.settings import API_DEPLOYMENT, MODEL_DEPLOYMENT, ServeSettings, validate_settings
from loraops.serve.traffic import Traffic

log = logging.getLogger("ray.serve")

#: Seconds /healthz waits for a model replica.
HEALTH_TIMEOUT_S = 5.0
#: Answers of the streaming routes.
EVENT_STREAM = {"media_type": "text/event-stream", "headers": {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}}

app = FastAPI(
    title="loraops summarization API",
    version=__version__,
    description="Dialogue summaries from a base model plus the LoRA adapter a registry alias points to.",
)
app.state.max_body_bytes = ServeSettings().max_body_bytes
app.state.body_timeout_s = ServeSettings().body_timeout_s
app.state.auth_token = None


@app.exception_handler(RequestValidationError)
async def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    openai = is_openai_route(request.scope)
    problems = exc.errors()
    first = problems[0] if problems else {"loc": ("body",), "msg": "invalid request"}
    if first.get("type") == "json_invalid":  # its location is a character offset, not a field
        position = first.get("loc", ("body", "?"))[-1]
        reason = first.get("ctx", {}).get("error", "decode error")
        return error_response(422, "validation_error", f"body: invalid JSON ({reason} at character {position})", field="body", openai=openai)

    def field(problem: dict[str, Any]) -> str:
        return field_of(problem.get("loc", ("body",)), exc.body, missing=problem.get("type") == "missing", brackets=openai)

    # A union (prompt: text or list of texts) fails once per member: name the member the client sent, the deepest path.
    same = [p for p in problems if tuple(p.get("loc", ()))[:2] == tuple(first.get("loc", ()))[:2]]
    first = max(same, key=lambda p: field(p).count(".") + field(p).count("["), default=first)
    message = "unknown field" if first.get("type") == "extra_forbidden" else first.get("msg", "invalid value")
    response = error_response(422, "validation_error", f"{field(first)}: {message}", field=field(first), openai=openai)
    if len(problems) > 1:
        body = json.loads(response.body)
        body["error"]["details"] = [{"field": field(p), "message": p.get("msg", "")} for p in problems]
        response = JSONResponse(body, status_code=422)
    return response


@app.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return error_response(exc.status, exc.type, exc.message, exc.field, exc.headers, openai=is_openai_route(request.scope))


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    if exc.status_code == 400:  # FastAPI's answer to a body json.loads cannot take: a client error like any invalid JSON
        return error_response(422, "validation_error", f"body: {_unparsable(exc.__cause__)}", field="body", openai=is_openai_route(request.scope))
    kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    message = f"no route {request.method} {request.url.path}" if exc.status_code in (404, 405) else str(exc.detail)
    return error_response(exc.status_code, kind, message, headers=getattr(exc, "headers", None), openai=is_openai_route(request.scope))


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
    message = f"internal error; the server log has the details under request id {request_id}"
    return error_response(500, "internal_error", message, request_id=request_id, openai=is_openai_route(request.scope))


app.add_middleware(RequestGuard)
app.add_middleware(DeliveryGate)  # outside the guard: it reads the proxy's receive after the answer was sent

#: Declares the bearer scheme in the OpenAPI document (the docs' "Authorize" button sends the
#: token); the check itself is :class:`RequestGuard`'s, done before the body is read.
bearer_token = HTTPBearer(auto_error=False, description="The token in the API replicas' environment variable `args.auth_token_env` (auth is off when unset).")


def server_timing(results: list[dict[str, Any]]) -> str:
    """``Server-Timing`` of an answer: ``model`` (time in the model engine) and ``queue`` (its wait for a slot), in ms.

    Defined above the ingress class: Serve ships that class with the module names defined before it.
    """
    slowest = max(results, key=lambda r: r["usage"]["model_ms"])["usage"]
    return f"model;dur={slowest['model_ms']}, queue;dur={slowest['queue_ms']}"


class ReplicaDied(ApiError):
    """A 503 because the model replica that held the request died (or was already gone): not the version's fault,
    and the request is worth one more try on another replica (generation is stateless)."""

    def __init__(self, cause: Exception):
        super().__init__(503, "unavailable", f"no model replica available ({type(cause).__name__}); retry later", headers={"Retry-After": "5"})


def replica_died(error: BaseException) -> bool:
    """True for the errors of a request whose model replica died under it, or was gone when it was sent."""
    from ray.exceptions import RayActorError
    from ray.serve.exceptions import ReplicaUnavailableError

    return isinstance(error, (RayActorError, ReplicaUnavailableError))


# --- the ingress deployment --------------------------------------------------------------------


@serve.deployment(name=API_DEPLOYMENT, max_ongoing_requests=256)
@serve.ingress(app)
class SummarizerAPI:
    """The HTTP front: validates, picks the adapter version (the request's ``model``, or the canary's
    share), forwards to the model deployment (whose engine batches requests), maps errors, streams."""

    def __init__(self, model: DeploymentHandle, settings: dict[str, Any]):
        self.model = model
        self.settings = ServeSettings.model_validate(settings)
        app.state.max_body_bytes = self.settings.max_body_bytes
        app.state.body_timeout_s = self.settings.body_timeout_s
        app.state.auth_token = os.environ.get(self.settings.auth_token_env) or None
        log.info("auth %s", f"on (bearer token from ${self.settings.auth_token_env})" if app.state.auth_token else "off")
        self.traffic = Traffic(self.settings)
        self.board = BoardClient(serve.get_replica_context().app_name)  # every model replica's on-demand state
        self._traffic_task = asyncio.get_running_loop().create_task(self.traffic.run(self.settings.registry_poll_s))

    @app.post("/v1/summarize", response_model=Summary, responses=ERROR_RESPONSES, dependencies=[Security(bearer_token)])
    async def summarize(self, body: SummarizeRequest, request: Request, response: Response, stream: bool = False) -> Any:
        """Summarize one dialogue. ``?stream=true``: server-sent events ``{"text"}`` as it is generated, then the whole
        answer, then ``[DONE]``. The ``Server-Timing`` header gives the model's share of the time (not when streaming)."""
        payload = self._payload(body.dialogue, body.max_new_tokens, body.temperature, body.model, request)
        if stream:
            return StreamingResponse(self._summary_events(await self._open_stream(payload, field="dialogue")), **EVENT_STREAM)
        result = await self._summarize(payload, field="dialogue")
        response.headers["Server-Timing"] = server_timing([result])
        return result

    @app.post("/v1/summarize/batch", response_model=list[Summary], responses=ERROR_RESPONSES, dependencies=[Security(bearer_token)])
    async def summarize_batch(self, body: BatchRequest, request: Request, response: Response) -> list[dict[str, Any]]:
        """Summarize several dialogues; the answers come in the same order (``Server-Timing``: the slowest one's model time)."""
        if len(body.dialogues) > self.settings.max_batch_dialogues:
            limit = self.settings.max_batch_dialogues
            raise ApiError(422, "validation_error", f"dialogues: at most {limit} per request, got {len(body.dialogues)}", field="dialogues")
        payloads = [self._payload(text, body.max_new_tokens, body.temperature, body.model, request, part=i) for i, text in enumerate(body.dialogues)]
        results = await asyncio.gather(*(self._summarize(p, field=f"dialogues.{i}") for i, p in enumerate(payloads)), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        response.headers["Server-Timing"] = server_timing(results)  # type: ignore[arg-type]
        return results  # type: ignore[return-value]

    @app.post("/v1/completions", dependencies=[Security(bearer_token)])
    async def completions(self, body: CompletionRequest, request: Request) -> Any:
        """OpenAI-compatible completions: ``prompt`` is the dialogue, the completion its summary."""
        payload = self._payload(body.dialogue(), body.new_tokens(), body.temperature, body.model, request, limit_field="max_tokens")
        payload = dataclasses.replace(payload, sampling=body.sampling(payload.max_new_tokens))
        return await self._openai_answer(Answer("completion", request_id_of(request.scope), body.model or self.traffic.name), payload, body, "prompt")

    @app.post("/v1/chat/completions", dependencies=[Security(bearer_token)])
    async def chat_completions(self, body: ChatRequest, request: Request) -> Any:
        """OpenAI-compatible chat completions: the last user message is the dialogue, the assistant's answer its summary."""
        index = body.dialogue_index()
        if index is None:
            raise ApiError(422, "validation_error", "messages: no user message (the last user message is the dialogue to summarize)", field="messages")
        field = f"messages[{index}].content"
        try:
            dialogue = valid_text(body.messages[index].text())
        except ValueError as exc:
            raise ApiError(422, "validation_error", f"{field}: {exc}", field=field) from None
        limit_field = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        payload = self._payload(dialogue, body.new_tokens(), body.temperature, body.model, request, limit_field=limit_field)
        payload = dataclasses.replace(payload, sampling=body.sampling(payload.max_new_tokens))
        return await self._openai_answer(Answer("chat", request_id_of(request.scope), body.model or self.traffic.name), payload, body, field)

    @app.get("/v1/models", responses=ERROR_RESPONSES, dependencies=[Security(bearer_token)])
    async def models(self) -> dict[str, Any]:
        """What is served. ``data``: OpenAI's model list (one entry per servable ``model`` value); ``models``: the
        replica's details (adapters and versions, mode, base model, buckets, limits, problem); with ``load_on_demand``,
        ``replicas``: every live model replica's resident on-demand references, loads and evictions."""
        info = await self._call(self.model.info.remote(), timeout=HEALTH_TIMEOUT_S * 2)
        limits = {
            "default_max_new_tokens": self.settings.default_max_new_tokens,
            "max_new_tokens_limit": self.settings.max_new_tokens_limit,
            "max_batch_dialogues": self.settings.max_batch_dialogues,
            "max_body_bytes": self.settings.max_body_bytes,
        }
        body = {"object": "list", "data": model_list(info.adapters, self.traffic.name), "models": [info.to_dict() | {"limits": limits}]}
        if info.on_demand is not None:  # each live model replica's, not only the one that answered
            body["replicas"] = listing(await self.board.read(), info.replica, info.on_demand)
        if self.traffic.canary is not None:
            body["canary"] = self.traffic.canary
        return body

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
        model = {"name": info.name, "version": info.version, "mode": info.mode, "adapter": info.adapter}
        body: dict[str, Any] = {"status": "degraded" if info.problem else "ok", "model": model}
        if info.problem:
            body["problem"] = info.problem
        return JSONResponse(body, status_code=503 if strict and info.problem else 200)

    @app.api_route("/health", methods=["GET", "HEAD"], responses={503: ERROR_RESPONSES[503]})
    async def health(self) -> JSONResponse:
        """The health route clients of vLLM, SGLang and TGI call before they start (GuideLLM does): ``/healthz?strict=true``."""
        return await self.healthz(strict=True)

    @app.get("/version")
    async def version(self) -> dict[str, str]:
        """The loraops version serving (vLLM's ``/version``)."""
        return {"version": __version__}

    # --- one request ---------------------------------------------------------------------------

    def _payload(
        self, dialogue: str, max_new_tokens: int | None, temperature: float | None, model: str | None, request: Request,
        part: int = 0, limit_field: str = "max_new_tokens",
    ) -> SummaryRequest:  # fmt: skip
        """What the model replica gets: the dialogue, its limits, and the adapter reference that answers it (None: the default)."""
        limit = self.settings.max_new_tokens_limit
        if max_new_tokens is not None and max_new_tokens > limit:
            raise ApiError(422, "validation_error", f"{limit_field}: must be at most {limit}, got {max_new_tokens}", field=limit_field)
        request_id = request_id_of(request.scope) + (f"/{part}" if part else "")
        chosen = self.traffic.choose(model, request_id)
        return SummaryRequest(
            dialogue=dialogue,
            max_new_tokens=max_new_tokens or self.settings.default_max_new_tokens,
            temperature=float(temperature or 0.0),
            model=chosen,
            canary=chosen is not None and self.traffic.names_default(model),
            split=self.traffic.names_default(model),
        )

    async def _summarize(self, payload: SummaryRequest, field: str) -> dict[str, Any]:
        started = time.perf_counter()
        try:
            result = await self._on_a_live_replica(
                lambda timeout: self._call(self._model_for(payload).summarize.remote(payload), timeout), started, "a request"
            )
        except ReplicaDied:
            raise  # a crash is no version's error: not charged in the canary figures
        except ApiError as exc:
            self.traffic.record_failure(payload.model, time.perf_counter() - started, server_side=exc.status >= 500, split=payload.split)
            raise
        except Exception:
            self.traffic.record_failure(payload.model, time.perf_counter() - started, server_side=True, split=payload.split)
            raise
        if isinstance(result, Rejection):
            self.traffic.record_failure(payload.model, time.perf_counter() - started, server_side=result.type == "generation_failed", split=payload.split)
            raise self._rejected(result, field)
        self.traffic.record(payload.model, result, time.perf_counter() - started, split=payload.split)
        return result.to_dict()

    async def _on_a_live_replica(self, attempt: Callable[[float], Awaitable[Any]], started: float, what: str) -> Any:
        """``attempt(timeout)``; one whose replica died is made once more, on another replica, within what is left of
        the request's deadline (generation is stateless)."""
        try:
            return await attempt(self.settings.request_timeout_s)
        except ReplicaDied:
            left = self.settings.request_timeout_s - (time.perf_counter() - started)
            if left < 1.0:
                raise  # no time left for another try
            log.warning("a model replica died holding %s; retrying it once (%.0f s left)", what, left)
            return await attempt(left)

    def _model_for(self, payload: SummaryRequest) -> DeploymentHandle:
        """The model deployment for ``payload``: a reference that loads on demand goes with Serve's model multiplexing,
        so repeated requests for it reach a replica that holds it (the replica checks the reference itself)."""
        if not self.settings.load_on_demand or payload.model is None or payload.canary:
            return self.model
        try:
            ref = normalize_ref(payload.model.strip())  # the id the replica loads it under: "od-a" and "od-a@production" meet
        except LoraopsError:
            return self.model  # not a reference: any replica refuses it
        return self.model if ref in self.settings.adapters else self.model.options(multiplexed_model_id=ref)

    def _rejected(self, rejection: Rejection, field: str) -> ApiError:
        if rejection.status == 404 or rejection.field == "model":  # the model named is at fault: the field is "model", not the text
            retry = {"Retry-After": "5"} if rejection.status == 503 else None  # an on-demand load that failed is tried again later
            return ApiError(rejection.status, rejection.type, rejection.message, field="model", headers=retry)
        if rejection.field not in (None, "dialogue"):  # a sampling field the replica checks (logit_bias): that one, not the text
            return ApiError(rejection.status, rejection.type, f"{rejection.field}: {rejection.message}", field=rejection.field)
        return ApiError(rejection.status, rejection.type, f"{field}: {rejection.message}", field=field)

    async def _open_stream(self, payload: SummaryRequest, field: str) -> AsyncIterator[dict[str, Any]]:
        """The model's stream of events, once its first event shows the request was taken (a refusal is an ordinary error answer)."""
        started = time.perf_counter()
        events, first = await self._on_a_live_replica(lambda timeout: self._first_event(payload, timeout), started, "a stream before its first event")
        if "rejection" in first:
            rejection = Rejection(**first["rejection"])
            self.traffic.record_failure(payload.model, time.perf_counter() - started, server_side=rejection.type == "generation_failed", split=payload.split)
            raise self._rejected(rejection, field)
        return self._recorded(first, events, payload, started)

    async def _first_event(self, payload: SummaryRequest, timeout: float) -> tuple[Any, dict[str, Any]]:
        events = self._model_for(payload).options(stream=True).summarize_stream.remote(payload)
        try:
            return events, await self._call(events.__anext__(), timeout=timeout)
        except ApiError:
            events.cancel()  # no replica answered in time (or it died): do not leave the request queued there
            raise

    async def _recorded(self, first: dict[str, Any], events, payload: SummaryRequest, started: float) -> AsyncIterator[dict[str, Any]]:
        """The events, recorded for the version that answered; a failure mid-stream becomes a last ``{"error"}`` event."""
        yield first
        try:
            async for event in events:
                if event.get("done"):
                    self.traffic.record(payload.model, SummaryResult.from_dict(event), time.perf_counter() - started, split=payload.split)
                yield event
        except Exception as exc:  # noqa: BLE001 - the status line is sent: the client learns of it in the stream
            if not replica_died(exc):  # a crash is no version's error: not charged in the canary figures
                self.traffic.record_failure(payload.model, time.perf_counter() - started, server_side=True, split=payload.split)
            log.error("stream of %s failed: %s: %s", payload.model or self.traffic.name, type(exc).__name__, exc)
            yield {"error": {"type": "internal_error", "message": "the model failed while streaming; the server log has the details"}}

    async def _summary_events(self, events: AsyncIterator[dict[str, Any]]) -> AsyncIterator[str]:
        async for event in events:
            if event.get("done"):
                yield sse({key: event[key] for key in ("summary", "model", "usage", "finish_reason")})
            elif "model" in event:
                continue  # the version is in the last event of this stream
            else:
                yield sse(event)
        yield "data: [DONE]\n\n"

    async def _openai_answer(self, answer: Answer, payload: SummaryRequest, body, field: str) -> Any:
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            events = answer.stream(await self._open_stream(payload, field), include_usage, body.usage_per_chunk())
            return StreamingResponse(events, **EVENT_STREAM)
        return answer.body(await self._summarize(payload, field))

    async def _call(self, response, timeout: float) -> Any:
        """Await a model call; unavailability and overload become 503 (clients retry), its own errors pass."""
        from ray.exceptions import RayActorError
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError

        async def result() -> Any:
            return await response

        try:
            return await asyncio.wait_for(result(), timeout)
        except asyncio.TimeoutError:
            if hasattr(response, "cancel"):  # a DeploymentResponse; a stream's first event is cancelled by its caller
                response.cancel()
            raise ApiError(503, "unavailable", f"no model replica answered within {timeout:g} s; retry later", headers={"Retry-After": "5"}) from None
        except BackPressureError as exc:
            raise ApiError(503, "overloaded", f"the model is overloaded ({exc}); retry later", headers={"Retry-After": "1"}) from None
        except (ReplicaUnavailableError, RayActorError) as exc:
            raise ReplicaDied(exc) from None
        except DeploymentUnavailableError as exc:
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
