"""The OpenAI-compatible subset of the API: request bodies, answers and stream chunks.

``POST /v1/completions`` takes the dialogue as ``prompt``; ``POST /v1/chat/completions`` takes it as
the last user message. Both answer with the summary in OpenAI's shapes, so the official ``openai``
client works against the endpoint unchanged (``base_url=http://HOST:PORT/v1``), and so do the clients
built for vLLM (benchmarks such as GuideLLM). OpenAI's sampling parameters and the extensions vLLM
accepts (``top_k``, ``min_tokens``, ``ignore_eos``, ``repetition_penalty``...) have vLLM's meaning
(:class:`~loraops.serve.engine.params.SamplingParams`); a value that cannot be honoured (``best_of``
above 1, ``logprobs`` in a stream) is a 400 naming the field, and an unknown field a 422 naming it:
nothing that would change the answer is silently ignored. The routes themselves are methods of the ingress (:mod:`loraops.serve.app`).
"""

# No `from __future__ import annotations`: FastAPI reads these classes' annotations at runtime.

import json
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictStr, field_validator

from loraops.serve.bodies import EXAMPLE_DIALOGUE, ApiError, Dialogue, MaxNewTokens, ModelName, Temperature
from loraops.serve.engine.params import SamplingParams

OWNER = "loraops"


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = Field(False, strict=True, description="Send a last chunk with the token usage (choices empty).")
    continuous_usage_stats: bool = Field(False, strict=True, description="With include_usage: every chunk carries the usage so far (vLLM's extension).")


def _one_choice(value: int) -> int:
    if value != 1:
        raise ValueError(f"only n=1 is supported (one summary per request), got {value}")
    return value


def _stop_texts(value: str | list[str] | None) -> str | list[str] | None:
    texts = [value] if isinstance(value, str) else value or []
    if any(not text for text in texts):
        raise ValueError("stop texts must not be empty")
    return value


def _bias_keys(value: dict[str, float] | None) -> dict[str, float] | None:
    for key in value or {}:
        if not key.isdigit():
            raise ValueError(f"keys are token ids, got {key!r}")
    return value


Choices = Annotated[int, Field(strict=True), AfterValidator(_one_choice)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)] | None
Stop = Annotated[StrictStr | Annotated[list[StrictStr], Field(max_length=16)] | None, AfterValidator(_stop_texts)]
LogitBias = Annotated[dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None, Field(max_length=300), AfterValidator(_bias_keys)]


class _OpenAIRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: ModelName = None
    max_tokens: MaxNewTokens = None
    temperature: Temperature = None
    n: Choices = 1
    stream: bool = Field(False, strict=True)  # strict like every other field: "yes" or 1 is a 422, not a stream
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, description="Accepted for compatibility; not used.")
    # OpenAI's sampling parameters, with their meaning in vLLM (see SamplingParams for each).
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    seed: Annotated[int, Field(strict=True)] | None = None
    stop: Stop = None
    presence_penalty: Penalty = None
    frequency_penalty: Penalty = None
    logit_bias: LogitBias = None
    # vLLM's extensions, as benchmark clients send them.
    top_k: Annotated[int, Field(strict=True, ge=-1)] | None = None
    min_tokens: Annotated[int, Field(strict=True, ge=0)] | None = None
    ignore_eos: bool | None = Field(None, strict=True)
    repetition_penalty: Annotated[float, Field(gt=0.0, le=10.0)] | None = None
    best_of: Annotated[int, Field(strict=True, ge=1)] | None = None

    def sampling(self, max_new_tokens: int) -> SamplingParams:
        """The engine's parameters of this request (``max_new_tokens``: its limit, the default filled in); 400 naming a
        field whose value cannot be honoured."""
        self._refuse_unsupported()
        if self.min_tokens is not None and self.min_tokens > max_new_tokens:
            raise ApiError(400, "invalid_value", f"min_tokens: must be at most the token limit ({max_new_tokens}), got {self.min_tokens}", field="min_tokens")
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return SamplingParams(
            temperature=float(self.temperature or 0.0),
            top_p=float(self.top_p if self.top_p is not None else 1.0),
            top_k=max(self.top_k or 0, 0),
            seed=self.seed,
            presence_penalty=float(self.presence_penalty or 0.0),
            frequency_penalty=float(self.frequency_penalty or 0.0),
            repetition_penalty=float(self.repetition_penalty or 1.0),
            stop=stop,
            min_tokens=self.min_tokens or 0,
            ignore_eos=bool(self.ignore_eos),
            logit_bias=tuple((int(token), float(bias)) for token, bias in sorted((self.logit_bias or {}).items())),
            logprobs=self.top_logprobs_asked(),
        )

    def top_logprobs_asked(self) -> int | None:
        """How many most likely tokens to list beside each chosen one's log probability; None: no log probabilities."""
        return None

    def _refuse_unsupported(self) -> None:
        if self.best_of is not None and self.best_of > 1:
            raise ApiError(400, "unsupported_value", f"best_of: only 1 is supported (one answer per request), got {self.best_of}", field="best_of")
        if self.stream and self.top_logprobs_asked() is not None:  # a stream's pieces of text are not tokens: nothing to attach them to
            raise ApiError(400, "unsupported_value", "logprobs: log probabilities are not supported when streaming", field="logprobs")

    def usage_per_chunk(self) -> bool:
        """vLLM's continuous usage: every chunk carries the usage so far (only with include_usage, as there)."""
        return bool(self.stream_options and self.stream_options.include_usage and self.stream_options.continuous_usage_stats)


class CompletionRequest(_OpenAIRequest):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"model": "tiny", "prompt": EXAMPLE_DIALOGUE, "max_tokens": 48}]})

    prompt: Dialogue | list[Dialogue] = Field(description="The dialogue to summarize (a list must hold exactly one).")
    logprobs: Annotated[int, Field(strict=True, ge=0, le=20)] | None = Field(None, description="Log probabilities of each token and of the N most likely.")

    def top_logprobs_asked(self) -> int | None:
        return self.logprobs

    @field_validator("prompt")
    @classmethod
    def _single_prompt(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and len(value) != 1:
            raise ValueError(f"one prompt per request, got {len(value)} (use /v1/summarize/batch for several dialogues)")
        return value

    def dialogue(self) -> str:
        return self.prompt[0] if isinstance(self.prompt, list) else self.prompt

    def new_tokens(self) -> int | None:
        return self.max_tokens


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: StrictStr


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool fields...: accepted, unused

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatRequest(_OpenAIRequest):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"model": "tiny", "messages": [{"role": "user", "content": EXAMPLE_DIALOGUE}]}]})

    messages: list[Message] = Field(min_length=1, description="The conversation; the last user message is the dialogue to summarize.")
    max_completion_tokens: MaxNewTokens = None
    logprobs: bool | None = Field(None, strict=True, description="Log probabilities of each token of the answer.")
    top_logprobs: Annotated[int, Field(strict=True, ge=0, le=20)] | None = Field(None, description="With logprobs: also the N most likely at each token.")

    def top_logprobs_asked(self) -> int | None:
        if self.top_logprobs and not self.logprobs:
            raise ApiError(400, "invalid_value", "top_logprobs: needs logprobs true", field="top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None

    def dialogue_index(self) -> int | None:
        """Index of the last user message, the dialogue; None when there is none."""
        users = [i for i, message in enumerate(self.messages) if message.role == "user"]
        return users[-1] if users else None

    def new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


def usage(result: dict[str, Any]) -> dict[str, int]:
    prompt, completion = result["usage"]["prompt_tokens"], result["usage"]["completion_tokens"]
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def model_id(result: dict[str, Any]) -> str:
    """The version that answered, as a reference: ``NAME:VERSION``."""
    return f"{result['model']['name']}:{result['model']['version']}"


class Answer:
    """One OpenAI answer in the making: its id, creation time and kind (``completion`` or ``chat``)."""

    def __init__(self, kind: Literal["completion", "chat"], request_id: str, model: str):
        self.kind, self.model, self.created = kind, model, int(time.time())
        self.id = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{request_id}"

    def body(self, result: dict[str, Any]) -> dict[str, Any]:
        """The whole answer to a request that did not stream."""
        logprobs = result.get("logprobs")
        if self.kind == "chat":
            content = chat_logprobs(logprobs) if logprobs is not None else None
            choice = {"index": 0, "message": {"role": "assistant", "content": result["summary"]}, "logprobs": content, "finish_reason": result["finish_reason"]}
            kind = "chat.completion"
        else:
            listed = completion_logprobs(logprobs) if logprobs is not None else None
            choice = {"index": 0, "text": result["summary"], "logprobs": listed, "finish_reason": result["finish_reason"]}
            kind = "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": model_id(result), "choices": [choice], "usage": usage(result)}

    def chunk(self, text: str | None = None, finish_reason: str | None = None, first: bool = False) -> dict[str, Any]:
        """A stream chunk with new ``text``, or the closing one with ``finish_reason``."""
        if self.kind == "chat":
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else ({"content": text} if text is not None else {})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            kind = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
            kind = "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": [choice]}

    def usage_chunk(self, result: dict[str, Any]) -> dict[str, Any]:
        kind = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": [], "usage": usage(result)}

    async def stream(self, events: AsyncIterator[dict[str, Any]], include_usage: bool, usage_per_chunk: bool = False) -> AsyncIterator[str]:
        """Server-sent events from the model's stream events (``{"model", "prompt_tokens"}``, ``{"text", "tokens"}`` ..., then
        ``{"done": True, ...}``). ``usage_per_chunk``: every chunk carries the usage so far (vLLM's ``continuous_usage_stats``)."""
        opened = self.kind != "chat"  # a chat stream opens with the assistant's role
        counts = {"prompt_tokens": 0, "completion_tokens": 0}

        def out(chunk: dict[str, Any], final: dict[str, Any] | None = None) -> str:
            if usage_per_chunk:
                prompt, completion = counts["prompt_tokens"], counts["completion_tokens"]
                chunk["usage"] = usage(final) if final else {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
            return sse(chunk)

        async for event in events:
            if "model" in event and not event.get("done"):  # the version that answers: every chunk names it
                self.model = model_id(event)
                counts["prompt_tokens"] = event.get("prompt_tokens", 0)
            if not opened:
                opened = True
                yield out(self.chunk(first=True))
            if "text" in event:
                counts["completion_tokens"] = event.get("tokens", counts["completion_tokens"])
                if event["text"]:
                    yield out(self.chunk(event["text"]))
            elif event.get("done"):
                self.model = model_id(event)
                yield out(self.chunk(finish_reason=event["finish_reason"]), final=event)
                if include_usage:
                    yield sse(self.usage_chunk(event))
            elif "error" in event:
                yield sse({"error": event["error"]})
                return
        yield "data: [DONE]\n\n"


def completion_logprobs(tokens: list[dict[str, Any]]) -> dict[str, Any]:
    """OpenAI's completions ``logprobs``: the tokens, their log probabilities, the most likely at each, text offsets."""
    offsets, at = [], 0
    for token in tokens:
        offsets.append(at)
        at += len(token["token"])
    return {
        "tokens": [t["token"] for t in tokens],
        "token_logprobs": [t["logprob"] for t in tokens],
        "top_logprobs": [dict(t["top"]) for t in tokens],
        "text_offset": offsets,
    }


def chat_logprobs(tokens: list[dict[str, Any]]) -> dict[str, Any]:
    """OpenAI's chat ``logprobs``: ``content``, one entry per token with its bytes and the most likely tokens."""

    def entry(token: str, logprob: float) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

    return {"content": [entry(t["token"], t["logprob"]) | {"top_logprobs": [entry(k, v) for k, v in t["top"]]} for t in tokens]}


def sse(payload: dict[str, Any]) -> str:
    """One server-sent event carrying ``payload`` as JSON."""
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def model_list(adapters: list[dict[str, Any]], default_name: str) -> list[dict[str, Any]]:
    """``/v1/models``' ``data``: one OpenAI model object per served reference, plus the bare adapter name (the default)."""
    created = int(time.time())
    entries = [{"id": default_name, "object": "model", "created": created, "owned_by": OWNER}]
    for adapter in adapters:
        if adapter["ref"] != default_name:
            entries.append({"id": adapter["ref"], "object": "model", "created": created, "owned_by": OWNER, "version": adapter.get("version")})
    return entries
