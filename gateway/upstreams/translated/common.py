"""What both translated providers share: OpenAI's chunks and answers written out, errors in OpenAI's shape, and the
parts of a chat request every provider reads the same way."""

from __future__ import annotations

import base64
import binascii
import os
import time
from typing import Any

import orjson

from gateway.errors import GatewayError

_ERROR_TYPES = {400: "invalid_request_error", 404: "not_found_error", 413: "invalid_request_error",
                422: "invalid_request_error", 429: "rate_limit_error"}


class UnsupportedRequest(GatewayError):
    """A request the provider cannot be asked in its own API (audio to Anthropic, n > 1): a 400 naming the field."""

    def __init__(self, provider: str, param: str, why: str) -> None:
        super().__init__(400, f"{param}: {why} ({provider}).", type="invalid_request_error", param=param,
                         code="unsupported_by_provider")


class BrokenAnswer(ConnectionError):
    """A provider's answer that cannot be read (not JSON, or an error event in the middle of a stream)."""


def error_body(provider: str, status: int, raw: bytes) -> bytes:
    """A provider's error answer in OpenAI's shape, its message kept and its provider named."""
    try:
        document = orjson.loads(raw)
    except orjson.JSONDecodeError:
        document = None
    error = document.get("error") if isinstance(document, dict) else None
    message = error.get("message") if isinstance(error, dict) else None
    if not isinstance(message, str) or not message.strip():
        message = raw.decode("utf-8", "replace").strip()[:500] or f"status {status}"
    kind = _ERROR_TYPES.get(status, "upstream_error" if status >= 500 else "invalid_request_error")
    return orjson.dumps({"error": {"message": f"{provider}: {message.strip()[:1000]}", "type": kind, "param": None,
                                   "code": None}})


def completion_id() -> str:
    return "chatcmpl-" + os.urandom(12).hex()


def usage(prompt: int, completion: int, cached: int = 0) -> dict:
    counted: dict[str, Any] = {"prompt_tokens": prompt, "completion_tokens": completion,
                               "total_tokens": prompt + completion}
    if cached:
        counted["prompt_tokens_details"] = {"cached_tokens": cached}
    return counted


def completion(answer_id: str, model: str, choices: list[dict], counted: dict | None) -> dict:
    answer = {"id": answer_id, "object": "chat.completion", "created": int(time.time()), "model": model,
              "choices": choices}
    if counted is not None:
        answer["usage"] = counted
    return answer


class ChunkWriter:
    """OpenAI's chunk events for one streamed answer."""

    __slots__ = ("id", "model", "created", "head")

    def __init__(self, answer_id: str, model: str) -> None:
        self.id, self.model, self.created = answer_id, model, int(time.time())
        self.head = None

    def _head(self) -> bytes:
        if self.head is None:
            self.head = (b'data: {"id":' + orjson.dumps(self.id) + b',"object":"chat.completion.chunk","created":'
                         + str(self.created).encode() + b',"model":' + orjson.dumps(self.model) + b',"choices":')
        return self.head

    def delta(self, index: int, delta: dict, finish: str | None = None) -> bytes:
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        return self._head() + orjson.dumps([choice]) + b"}\n\n"

    def usage(self, counted: dict) -> bytes:
        return self._head() + b'[],"usage":' + orjson.dumps(counted) + b"}\n\n"


DONE = b"data: [DONE]\n\n"


def text_of(content: Any) -> str:
    """A message's words: a string, or its text parts joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content
                       if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str))
    return ""


def data_url(url: str) -> tuple[str, str] | None:
    """``data:<media type>;base64,<data>`` as (media type, data); None for any other URL."""
    if not url.startswith("data:"):
        return None
    head, _, data = url[5:].partition(",")
    media_type, _, encoding = head.partition(";")
    if encoding != "base64" or not media_type:
        return None
    try:
        base64.b64decode(data[:64] + "=" * (-len(data[:64]) % 4), validate=True)
    except (binascii.Error, ValueError):
        return None
    return media_type, data


def stops(body: dict) -> list[str] | None:
    stop = body.get("stop")
    if isinstance(stop, str):
        return [stop]
    if isinstance(stop, list) and stop:
        return [s for s in stop if isinstance(s, str)]
    return None


def max_tokens(body: dict) -> int | None:
    for name in ("max_completion_tokens", "max_tokens"):
        value = body.get(name)
        if type(value) is int and value > 0:
            return value
    return None


def arguments(text: Any) -> dict:
    """A tool call's arguments (JSON text) as the object the provider wants; not JSON: kept as it was written."""
    try:
        value = orjson.loads(text) if isinstance(text, str) and text.strip() else {}
    except orjson.JSONDecodeError:
        return {"_raw": text}
    return value if isinstance(value, dict) else {"value": value}
