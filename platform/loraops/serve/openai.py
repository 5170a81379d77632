"""The OpenAI-compatible subset of the API: request bodies, answers and stream chunks.

``POST /v1/completions`` takes the dialogue as ``prompt``; ``POST /v1/chat/completions`` takes it as
the last user message. Both answer with the summary in OpenAI's shapes, so the official ``openai``
client works against the endpoint unchanged (``base_url=http://HOST:PORT/v1``). What applies of
OpenAI's parameters is accepted (``model``, ``max_tokens``/``max_completion_tokens``, ``temperature``,
``n=1``, ``stream``, ``stream_options.include_usage``, ``user``); any other is refused by name rather
than silently ignored. The routes themselves are methods of the ingress (:mod:`loraops.serve.app`).
"""

# No `from __future__ import annotations`: FastAPI reads these classes' annotations at runtime.

import json
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictStr, field_validator

from loraops.serve.bodies import EXAMPLE_DIALOGUE, Dialogue, MaxNewTokens, ModelName, Temperature

OWNER = "loraops"


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = Field(False, strict=True, description="Send a last chunk with the token usage (choices empty).")


def _one_choice(value: int) -> int:
    if value != 1:
        raise ValueError(f"only n=1 is supported (one summary per request), got {value}")
    return value


Choices = Annotated[int, Field(strict=True), AfterValidator(_one_choice)]


class _OpenAIRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: ModelName = None
    max_tokens: MaxNewTokens = None
    temperature: Temperature = None
    n: Choices = 1
    stream: bool = Field(False, strict=True)  # strict like every other field: "yes" or 1 is a 422, not a stream
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, description="Accepted for compatibility; not used.")


class CompletionRequest(_OpenAIRequest):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"model": "tiny", "prompt": EXAMPLE_DIALOGUE, "max_tokens": 48}]})

    prompt: Dialogue | list[Dialogue] = Field(description="The dialogue to summarize (a list must hold exactly one).")

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
        if self.kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": result["summary"]}, "logprobs": None, "finish_reason": result["finish_reason"]}
            kind = "chat.completion"
        else:
            choice = {"index": 0, "text": result["summary"], "logprobs": None, "finish_reason": result["finish_reason"]}
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

    async def stream(self, events: AsyncIterator[dict[str, Any]], include_usage: bool) -> AsyncIterator[str]:
        """Server-sent events from the model's stream events (``{"text"}`` ..., then ``{"done": True, ...}``)."""
        opened = self.kind != "chat"  # a chat stream opens with the assistant's role
        async for event in events:
            if "model" in event and not event.get("done"):  # the version that answers: every chunk names it
                self.model = model_id(event)
            if not opened:
                opened = True
                yield sse(self.chunk(first=True))
            if "text" in event:
                if event["text"]:
                    yield sse(self.chunk(event["text"]))
            elif event.get("done"):
                self.model = model_id(event)
                yield sse(self.chunk(finish_reason=event["finish_reason"]))
                if include_usage:
                    yield sse(self.usage_chunk(event))
            elif "error" in event:
                yield sse({"error": event["error"]})
                return
        yield "data: [DONE]\n\n"


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
