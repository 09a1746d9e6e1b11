"""Providers whose own APIs the gateway speaks itself (Anthropic's Messages API, Gemini's generateContent): a chat
completions request is translated, sent on the pooled client that OpenAI-compatible upstreams use, and the
answer translated back, whole or event by event.

What comes back reads like the response the forwarding stage gets from an OpenAI-compatible upstream: a
status, a content type, OpenAI's body (``read``) or OpenAI's SSE events (``content.iter_any``) ending in one
``[DONE]``, a provider's error in OpenAI's shape with the provider's status; so fallbacks, cooldowns, usage, the
cascade, the cache and the relay are the same on every path. A stream that breaks off, or an answer that cannot be
read, is a ConnectionError. The providers without such a path (Vertex AI, Bedrock, Azure's own URLs) go through
LiteLLM (``gateway.upstreams.providers``).
"""

from __future__ import annotations

from typing import AsyncIterator

import orjson

from gateway.config.types import Deployment
from gateway.observability import metrics
from gateway.upstreams.client import UpstreamClient
from gateway.upstreams.http1 import Response
from gateway.upstreams.sse import EventSplitter, event_data
from gateway.upstreams.translated import anthropic, gemini
from gateway.upstreams.translated.common import BrokenAnswer, error_body

class TranslatedResponse:
    def __init__(self, provider: str, response: Response, stream, whole) -> None:
        self.provider = provider
        self.status = response.status
        self._response = response
        self._stream = stream  # the translator of an answer streamed, or None
        self._whole = whole  # raw body -> OpenAI's body
        streamed = stream is not None and response.status < 400 and response.content_type == "text/event-stream"
        self.content_type = "text/event-stream" if streamed else "application/json"
        self.headers = {"Content-Type": self.content_type}
        self.content = self
        metrics.PROVIDER_CALLS.labels(provider, str(response.status)).inc()

    async def read(self) -> bytes:
        raw = await self._response.read()
        if self.status >= 400:
            return error_body(self.provider, self.status, raw)
        return self._whole(raw)

    async def iter_any(self) -> AsyncIterator[bytes]:
        splitter = EventSplitter()
        stream = self._stream
        async for chunk in self._response.content.iter_any():
            out = b"".join(stream.event(data) for data in map(event_data, splitter.feed(chunk)) if data)
            if out:
                yield out
        rest = event_data(splitter.rest())
        last = stream.event(rest) if rest.strip() else b""
        yield last + stream.end()

    def release(self) -> None:
        self._response.release()


async def post(client: UpstreamClient, deployment: Deployment, body: dict, stream: bool,
               api_key: str | None) -> TranslatedResponse:
    """Send a chat completions request (``model`` already the deployment's) in the provider's own API."""
    key = api_key or deployment.api_key
    model = body["model"]
    if deployment.wire == "anthropic":
        path, asked, json_tool = anthropic.request(body, stream)
        headers = anthropic.headers(deployment.headers, key)
        translator = anthropic.Stream(model, json_tool) if stream else None
        whole = lambda raw: anthropic.answer(raw, model, json_tool)  # noqa: E731
    else:
        path, asked = gemini.request(body, stream)
        headers = gemini.headers(deployment.headers, key)
        translator = gemini.Stream(model) if stream else None
        whole = lambda raw: gemini.answer(raw, model)  # noqa: E731
    response = await client.post(deployment, path, orjson.dumps(asked), headers)
    return TranslatedResponse(deployment.wire, response, translator, whole)


__all__ = ["BrokenAnswer", "TranslatedResponse", "post"]
