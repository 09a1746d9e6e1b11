"""What both translated providers share: OpenAI's chunks and answers written out, errors in OpenAI's shape, and the
parts of a chat request every provider reads the same way."""

from __future__ import annotations

import base64
import binascii
import os
import time
from dataclasses import dataclass
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


@dataclass(frozen=True, slots=True)
class Part:
    """A part of a user's message, read once for every provider: ``text``; ``inline`` (base64 ``data`` of a media
    type: an image or a file); ``url`` (an image's http(s) URL); ``audio`` (base64 ``data``)."""

    kind: str
    data: str
    media_type: str = ""
    at: str = ""  # where it is in the request ("messages.1.content.0"), for an error naming it


def user_parts(content: Any, where: str, provider: str) -> list[Part]:
    """A user message's content as parts; a part no provider can be sent is a 400 naming it."""
    if isinstance(content, str):
        return [Part("text", content)] if content else []
    parts = []
    for index, part in enumerate(content or ()):
        kind = part.get("type") if isinstance(part, dict) else None
        at = f"{where}.content.{index}"
        if kind == "text":
            if part.get("text"):
                parts.append(Part("text", part["text"], at=at))
        elif kind == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            inline = data_url(url) if isinstance(url, str) else None
            if inline is not None:
                parts.append(Part("inline", inline[1], inline[0], at))
            elif isinstance(url, str) and url.startswith(("http://", "https://")):
                parts.append(Part("url", url, at=at))
            else:
                raise UnsupportedRequest(provider, f"{at}.image_url", "an image is a data: URL in base64 or an "
                                                                      "http(s) URL")
        elif kind == "file":
            file = part.get("file") if isinstance(part.get("file"), dict) else {}
            inline = data_url(file.get("file_data", "")) if isinstance(file.get("file_data"), str) else None
            if inline is None:
                raise UnsupportedRequest(provider, f"{at}.file", "a file is sent as file_data (a base64 data: URL); "
                                                                 "uploaded file ids are not")
            parts.append(Part("inline", inline[1], inline[0], at))
        elif kind == "input_audio":
            audio = part.get("input_audio") if isinstance(part.get("input_audio"), dict) else {}
            if not isinstance(audio.get("data"), str):
                raise UnsupportedRequest(provider, f"{at}.input_audio.data", "audio is sent as base64 data")
            parts.append(Part("audio", audio["data"], f"audio/{audio.get('format') or 'wav'}", at))
        else:
            raise UnsupportedRequest(provider, f"{at}.type", f"'{str(kind)[:40]}' parts cannot be sent to this "
                                                             "provider")
    return parts


class Turns:
    """A conversation's turns, those of one role in a row merged into one (both APIs want the roles to alternate,
    and the results of parallel tool calls in one turn)."""

    def __init__(self, items: str) -> None:
        self.items = items  # what a turn's list is called: "content" (Anthropic), "parts" (Gemini)
        self.turns: list[dict] = []

    def add(self, role: str, items: list[dict]) -> None:
        if not items:
            return
        if self.turns and self.turns[-1]["role"] == role:
            self.turns[-1][self.items].extend(items)
        else:
            self.turns.append({"role": role, self.items: items})
