"""A small Python client of the summarization API: timeouts, retries on 503, clear errors.

    from loraops.serve.client import SummarizerClient

    with SummarizerClient("http://127.0.0.1:8000") as client:
        answer = client.summarize("#Person1#: ...\\n#Person2#: ...")
        print(answer["summary"], answer["model"]["version"])

Only httpx is imported, so applications can use it without torch or Ray.
"""

from __future__ import annotations

import os
import time
from typing import Any

import httpx

from loraops.errors import LoraopsError

#: Environment variables the client (and ``loraops summarize``) read their defaults from.
URL_ENV = "LORAOPS_SERVE_URL"
TOKEN_ENV = "LORAOPS_API_TOKEN"
DEFAULT_URL = "http://127.0.0.1:8000"


class ServeError(LoraopsError):
    """The API answered with an error (or could not be reached); ``status`` is None for the latter."""

    def __init__(self, message: str, status: int | None = None, type: str | None = None, field: str | None = None):
        super().__init__(message)
        self.status, self.type, self.field = status, type, field


class SummarizerClient:
    """Calls the API at ``url``. 503 answers and refused connections are retried with backoff;
    other errors raise :class:`ServeError` with the server's message and the field at fault."""

    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        timeout: float = 120.0,
        retries: int = 5,
        backoff_s: float = 0.5,
        transport: httpx.BaseTransport | None = None,
    ):
        self.url = (url or os.environ.get(URL_ENV) or DEFAULT_URL).rstrip("/")
        token = token if token is not None else os.environ.get(TOKEN_ENV)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.retries, self.backoff_s, self.timeout = retries, backoff_s, timeout
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout, transport=transport)

    def __enter__(self) -> SummarizerClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def summarize(self, dialogue: str, max_new_tokens: int | None = None, temperature: float | None = None) -> dict[str, Any]:
        """``{"summary", "model": {"name", "version"}, "usage": {...}}`` for one dialogue."""
        return self._request("POST", "/v1/summarize", _body(dialogue=dialogue, max_new_tokens=max_new_tokens, temperature=temperature))

    def summarize_batch(self, dialogues: list[str], max_new_tokens: int | None = None, temperature: float | None = None) -> list[dict[str, Any]]:
        """One answer per dialogue, in order."""
        return self._request("POST", "/v1/summarize/batch", _body(dialogues=dialogues, max_new_tokens=max_new_tokens, temperature=temperature))

    def models(self) -> dict[str, Any]:
        return self._request("GET", "/v1/models")

    def health(self) -> dict[str, Any]:
        return self._request("GET", "/healthz")

    def _request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            try:
                response = self._http.request(method, path, json=body)
            except httpx.ConnectError as exc:
                # Nothing reached the server: always safe to try again (e.g. a proxy restarting).
                if last:
                    raise ServeError(f"cannot connect to {self.url}: {exc}") from None
                time.sleep(self._delay(attempt))
                continue
            except httpx.TimeoutException:
                raise ServeError(f"{method} {self.url}{path} timed out after {self.timeout:g} s") from None
            except httpx.HTTPError as exc:
                raise ServeError(f"{method} {self.url}{path} failed: {exc}") from None
            if response.status_code == 503 and not last:
                time.sleep(self._delay(attempt, response.headers.get("retry-after")))
                continue
            if response.is_success:
                return response.json()
            raise _error_of(response)
        raise AssertionError("unreachable")

    def _delay(self, attempt: int, retry_after: str | None = None) -> float:
        """The server's Retry-After when it gives one, else exponential backoff; never over 30 s."""
        if retry_after and retry_after.replace(".", "", 1).isdigit():
            return min(float(retry_after), 30.0)
        return min(self.backoff_s * 2**attempt, 30.0)


def _body(**fields: Any) -> dict[str, Any]:
    return {key: value for key, value in fields.items() if value is not None}


def _error_of(response: httpx.Response) -> ServeError:
    try:
        error = response.json().get("error") or {}
    except (ValueError, AttributeError):
        error = {}
    message = error.get("message") or response.text[:200] or response.reason_phrase
    return ServeError(f"HTTP {response.status_code}: {message}", status=response.status_code, type=error.get("type"), field=error.get("field"))
