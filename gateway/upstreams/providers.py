"""Providers that do not speak OpenAI's API (Anthropic, Gemini, Vertex AI, Bedrock, Azure OpenAI), through LiteLLM's
async SDK.

Importing this module imports litellm (seconds, and well over a hundred megabytes): the gateway imports it only when
the loaded config has such a deployment, in a worker thread at load, never on a request. OpenAI-compatible upstreams
never come here.

An answer comes back shaped like the response the forwarding stage reads from OpenAI-compatible upstreams:
a status, a content type, the OpenAI-shaped body (``read``), or its SSE events (``content.iter_any``) ending in one
``[DONE]``; a provider's error becomes an OpenAI-shaped body with the provider's status, a failure to reach it a
ConnectionError, its timeout an asyncio.TimeoutError, so fallbacks, cooldowns, usage, the cascade and the cache work
the same on both paths. LiteLLM is told never to fetch anything by itself and never to retry (the gateway's
fallbacks do), and to drop the OpenAI parameters a provider lacks (Anthropic has no logprobs: a cascade judges its
answers by their words alone).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from typing import AsyncIterator

os.environ.setdefault("LITELLM_OFFLINE_MODE", "true")  # no price map or header list fetched from the internet
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import litellm  # noqa: E402
import orjson  # noqa: E402

from gateway.config.types import Deployment  # noqa: E402
from gateway.observability import metrics  # noqa: E402
from gateway.upstreams.errors import Unreachable  # noqa: E402

# LiteLLM writes an INFO line of its own per call, in plain text beside the gateway's JSON lines: its loggers speak
# only of warnings, through the gateway's handler.
for _name in ("LiteLLM", "LiteLLM Router", "LiteLLM Proxy"):
    _logger = logging.getLogger(_name)
    _logger.handlers.clear()
    _logger.setLevel(max(logging.WARNING, logging.getLogger().getEffectiveLevel()))
    _logger.propagate = True

litellm.drop_params = True
litellm.num_retries = 0
litellm.suppress_debug_info = True
litellm.telemetry = False

_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 413: "invalid_request_error", 422: "invalid_request_error",
                429: "rate_limit_error"}
_NOT_SENT = frozenset(("model", "messages", "prompt", "input", "stream", "stream_options"))


class ProviderUnreachable(Unreachable):
    pass


class ProviderStreamBroken(ConnectionError):
    """The provider's stream broke off after it began."""


class ProviderResponse:
    """What the forwarding stage reads of an upstream's answer, made from LiteLLM's."""

    def __init__(self, status: int, body: bytes | None = None, events: AsyncIterator[bytes] | None = None,
                 stream=None) -> None:
        self.status = status
        self._body = body
        self._events = events
        self._stream = stream  # LiteLLM's, to close when the client goes away
        self.content_type = "text/event-stream" if events is not None else "application/json"
        self.headers = {"Content-Type": self.content_type}
        self.content = self

    async def read(self) -> bytes:
        return self._body or b""

    def iter_any(self) -> AsyncIterator[bytes]:
        return self._events

    def release(self) -> None:
        if self._stream is not None:
            stream, self._stream = self._stream, None
            asyncio.get_running_loop().create_task(_close(stream))


async def _close(stream) -> None:
    try:
        await stream.aclose()
    except Exception:  # closing what is already closed, or broken: nothing left to free
        pass


class Providers:
    async def post(self, deployment: Deployment, route: str, body: dict, stream: bool,
                   api_key: str | None = None) -> ProviderResponse:
        """Send ``body`` (OpenAI's request, ``model`` already the deployment's) through LiteLLM."""
        call = deployment.litellm
        provider = call.model.split("/", 1)[0]
        params = {k: v for k, v in body.items() if k not in _NOT_SENT}
        params.update(call.params)
        if api_key is not None:  # the tenant's own key
            params["api_key"] = api_key
        params["timeout"] = deployment.read_timeout
        params["num_retries"] = 0  # the gateway's fallbacks retry, across deployments
        params["max_retries"] = 0
        try:
            if route == "embeddings":
                answer = await litellm.aembedding(model=call.model, input=body.get("input"), **params)
                return self._whole(provider, answer)
            if route == "completions":
                answer = await litellm.atext_completion(model=call.model, prompt=body.get("prompt"), **params)
                return self._whole(provider, answer)
            if stream:
                params["stream_options"] = body.get("stream_options") or {"include_usage": True}
            answer = await litellm.acompletion(model=call.model, messages=body.get("messages"), stream=stream,
                                               **params)
            if stream:
                # Some providers (Gemini) say their refusal only when the stream is first read: read the first
                # chunk here, so that a 429 before any byte is a 429 (and falls back) as on the direct path.
                chunks = answer.__aiter__()
                try:
                    first = await chunks.__anext__()
                except StopAsyncIteration:
                    first = None
        except litellm.Timeout:
            metrics.PROVIDER_CALLS.labels(provider, "timeout").inc()
            raise asyncio.TimeoutError from None
        except litellm.APIConnectionError:
            metrics.PROVIDER_CALLS.labels(provider, "unreachable").inc()
            raise ProviderUnreachable(f"{provider} could not be reached") from None
        except Exception as exc:
            if getattr(exc, "status_code", None) is None:
                raise
            return self._error(provider, exc)
        if stream:
            metrics.PROVIDER_CALLS.labels(provider, "200").inc()
            return ProviderResponse(200, events=_events(chunks, first), stream=answer)
        return self._whole(provider, answer)

    @staticmethod
    def _whole(provider: str, answer) -> ProviderResponse:
        metrics.PROVIDER_CALLS.labels(provider, "200").inc()
        return ProviderResponse(200, orjson.dumps(_openai(answer.model_dump(exclude_none=True))))

    @staticmethod
    def _error(provider: str, exc: Exception) -> ProviderResponse:
        # LiteLLM folds some statuses into its own (Anthropic's 529 into a 500): the provider's, when it kept it.
        status = int(getattr(exc, "provider_status_code", None) or getattr(exc, "status_code", 500) or 500)
        metrics.PROVIDER_CALLS.labels(provider, str(status)).inc()
        message = _provider_message(str(getattr(exc, "message", None) or exc))
        body = {"error": {"message": f"{provider}: {message}", "type": _ERROR_TYPES.get(status, "upstream_error"),
                          "param": None, "code": None}}
        return ProviderResponse(status, orjson.dumps(body))


_RAW_BODY = re.compile(r"""b?'(\{.*\})'|(\{.*\})""", re.S)
_LITELLM_WORDS = re.compile(r"\s*(?:Handle with `litellm\.\w+`|Received Model Group=|LiteLLM Retried:).*$", re.S)


def _provider_message(text: str) -> str:
    """The provider's own message out of LiteLLM's words around it ("litellm.RateLimitError: GeminiException -
    b'{...}'. Handle with `litellm.RateLimitError`")."""
    text = _LITELLM_WORDS.sub("", text.removeprefix("litellm."))
    found = _RAW_BODY.search(text)
    if found is not None:
        try:
            document = orjson.loads(found.group(1) or found.group(2))
        except orjson.JSONDecodeError:
            document = None
        error = document.get("error") if isinstance(document, dict) else None
        said = (error.get("message") if isinstance(error, dict) else error if isinstance(error, str)
                else document.get("message") if isinstance(document, dict) else None)
        if isinstance(said, str) and said.strip():
            return said.strip()[:1000]
    if " - " in text:
        text = text.split(" - ", 1)[-1]
    return text.strip()[:1000]


async def _events(chunks, first) -> AsyncIterator[bytes]:
    """LiteLLM's chunks as OpenAI's SSE events (the first read already), then ``[DONE]``; a stream that breaks off
    is a ConnectionError."""
    try:
        if first is not None:
            yield b"data: " + orjson.dumps(_openai(first.model_dump(exclude_none=True))) + b"\n\n"
        async for chunk in chunks:
            yield b"data: " + orjson.dumps(_openai(chunk.model_dump(exclude_none=True))) + b"\n\n"
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # whatever LiteLLM raises mid-stream, for the client it is a broken stream
        raise ProviderStreamBroken(f"{type(exc).__name__}") from None
    yield b"data: [DONE]\n\n"


def _openai(answer: dict) -> dict:
    """LiteLLM's dump of an answer, without what it adds of its own."""
    answer.pop("provider_specific_fields", None)
    if isinstance(answer.get("usage"), dict):
        answer["usage"].pop("cost", None)  # LiteLLM's estimate; the gateway prices usage itself
    for choice in answer.get("choices") or ():
        choice.pop("provider_specific_fields", None)
        for part in ("message", "delta"):
            if isinstance(choice.get(part), dict):
                choice[part].pop("provider_specific_fields", None)
    return answer
