"""What the HTTP ingress and the model replicas pass each other: typed, so a field added to the API is a
change of these types that the checker and the tests see.

The ingress sends a :class:`SummaryRequest` (validated: limits checked, the version chosen); a replica
answers a :class:`SummaryResult`, or a :class:`Rejection` when the request's own input is at fault. The
JSON the API returns is :meth:`SummaryResult.to_dict` (the shape of :class:`loraops.serve.bodies.Summary`).
Streams carry dict events (``{"model"}``, ``{"text"}`` ..., then ``{"done": True, **result.to_dict()}``, or one
``Rejection.event()``): Serve ships each event on its own. A request with ``sampling`` (the OpenAI routes)
also gets ``prompt_tokens`` in its ``{"model"}`` event and the tokens so far (``tokens``) in each ``{"text"}``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

from loraops.serve.engine.params import SamplingParams


@dataclass(frozen=True)
class SummaryRequest:
    """One dialogue to summarize, as the ingress validated it."""

    dialogue: str
    #: None: the replica's ``default_max_new_tokens``.
    max_new_tokens: int | None = None
    temperature: float = 0.0
    #: The reference that answers (``NAME:VERSION``, ``NAME@ALIAS``); None: the replica's default.
    model: str | None = None
    #: The canary's share: a replica that has not loaded the candidate yet answers with its default.
    canary: bool = False
    #: The split chose the version (the request named none): the canary's figures count only these.
    split: bool = True
    #: The OpenAI routes' sampling parameters (their temperature replaces ``temperature``); None: ``temperature`` alone.
    sampling: SamplingParams | None = None


@dataclass(frozen=True)
class AnsweredBy:
    """The registered version that generated a summary."""

    name: str
    version: int


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    #: Milliseconds the request spent in the model engine: its wait for a slot (``queue_ms``) plus generating.
    model_ms: float
    queue_ms: float


@dataclass(frozen=True)
class SummaryResult:
    summary: str
    model: AnsweredBy
    usage: Usage
    finish_reason: Literal["stop", "length"]
    #: When the request asked (the OpenAI routes' ``logprobs``): per token ``{"token", "logprob", "top": [[token, logprob], ...]}``.
    logprobs: list[dict[str, Any]] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The API's JSON answer."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SummaryResult:
        return cls(data["summary"], AnsweredBy(**data["model"]), Usage(**data["usage"]), data["finish_reason"], data.get("logprobs"))


@dataclass(frozen=True)
class Rejection:
    """A request the model deployment turns down because of its own input: an HTTP ``status`` (422, 404), a ``type``, the ``field`` at fault.

    Returned instead of raised: Serve logs every exception a replica method raises with its
    traceback, and a client's mistake is not worth one.
    """

    status: int
    type: str
    message: str
    field: str | None = None

    def event(self) -> dict[str, Any]:
        """The one event of a refused stream."""
        return {"rejection": {"status": self.status, "type": self.type, "message": self.message, "field": self.field}}


@dataclass(frozen=True)
class ReplicaInfo:
    """What one model replica serves and how (``/v1/models``' ``models`` entry, ``/healthz``' ``model``).

    ``name``, ``version`` and ``adapter`` are the default reference's; ``adapters`` lists every served
    reference (``{"ref", "name", "version"}``); ``problem`` says why a reference does not serve its target.
    """

    replica: str
    name: str
    version: int
    adapter: str
    adapters: list[dict[str, Any]]
    max_adapters: int
    mode: str
    base_model: str
    dtype: str
    device: str
    context_tokens: int
    max_batch_size: int
    batch_wait_timeout_s: float
    registry_poll_s: float
    batching: str
    buckets: dict[str, list[int]]
    warm_up: dict[str, Any] | None
    canary: dict[str, Any] | None
    problem: str | None
    #: With ``load_on_demand``: the references resident on demand, the LRU's capacity, ``loads`` and ``evictions``.
    on_demand: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The JSON of ``/v1/models``' ``models`` entry."""
        return asdict(self)
