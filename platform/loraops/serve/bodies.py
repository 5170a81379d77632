"""The bodies of the HTTP API: requests and answers of the summarize routes, and the error the routes raise.

Shared by the ingress (:mod:`loraops.serve.app`) and the OpenAI-compatible routes (:mod:`loraops.serve.openai`).
"""

# No `from __future__ import annotations`: FastAPI reads these classes' annotations at runtime.

from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictStr

from loraops.serve.guard import ErrorResponse

#: The lowest sampling temperature a request may ask for (0 is greedy). Far below it, at about 1e-35,
#: logits / temperature overflow and sampling fails; 0.01 is already indistinguishable from greedy.
MIN_TEMPERATURE = 0.01
EXAMPLE_DIALOGUE = "#Person1#: Hi, I'd like to book a table for two tonight.\n#Person2#: Sure, what time?\n#Person1#: Eight, please."


def valid_text(value: str) -> str:
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


Dialogue = Annotated[StrictStr, AfterValidator(valid_text)]
MaxNewTokens = Annotated[int, Field(strict=True, ge=1, description="Summary length limit in tokens (default and maximum: see /v1/models).")] | None
ModelName = (
    Annotated[
        StrictStr,
        Field(
            min_length=1,
            max_length=200,
            description="A served registry reference (NAME@ALIAS or NAME:VERSION, see /v1/models); absent or the bare adapter NAME: the deployment's default, "
            "or the canary candidate for the canary's share of requests.",
        ),
    ]
    | None
)
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
    model: ModelName = None


class BatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"dialogues": [EXAMPLE_DIALOGUE, EXAMPLE_DIALOGUE]}]})

    dialogues: list[Dialogue] = Field(min_length=1, description="The dialogues; at most max_batch_dialogues (see /v1/models).")
    max_new_tokens: MaxNewTokens = None
    temperature: Temperature = None
    model: ModelName = None


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
    finish_reason: str = Field(description="'stop': the summary ended with end-of-text; 'length': it reached max_new_tokens.")


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in {
        401: "missing or wrong bearer token",
        404: "the request names a model this deployment does not serve",
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


def field_of(loc: tuple | list, body: Any = None, missing: bool = False, brackets: bool = False) -> str:
    """The field at pydantic's ``loc`` as the client wrote it: ``("body", "dialogues", 2)`` -> ``dialogues.2``
    (``brackets``: ``dialogues[2]``, OpenAI's notation); the body itself -> ``body``.

    Steps of ``loc`` that are not in the client's ``body`` are pydantic's own (the member of a union it
    tried, e.g. ``function-after[valid_text(), str]``) and are dropped; the last step of a ``missing``
    field is kept, since it names what the client left out.
    """
    parts = list(loc)
    if parts and parts[0] == "body":
        parts = parts[1:]
    path: list[str | int] = []
    value = body
    for index, part in enumerate(parts):
        in_body = (isinstance(value, dict) and isinstance(part, str) and part in value) or (
            isinstance(value, list) and type(part) is int and 0 <= part < len(value)
        )
        if in_body:
            value = value[part]
        elif not (missing and index == len(parts) - 1 and isinstance(part, str) and isinstance(value, dict)):
            continue
        path.append(part)
    text = ""
    for part in path:
        text += (f"[{part}]" if brackets else f".{part}") if isinstance(part, int) else f".{part}"
    return text.lstrip(".") or "body"
