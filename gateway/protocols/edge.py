"""The edge of a request served in another API's terms: the ASGI ``send`` the pipeline writes its chat completions
answer to, which tells the client that answer in its own API's terms as it passes.

Every way an answer leaves the pipeline goes through here unchanged: an upstream's whole answer or stream, the
cache's, the cascade's, and the gateway's own errors (before or in the middle of a stream). An answer an upstream
gave in the client's own API (``ctx.native_answer``: a request sent on as it came) passes untouched.
"""

from __future__ import annotations

from typing import Protocol

import orjson

from gateway.asgi import EVENT_STREAM, Send
from gateway.pipeline.context import RequestContext
from gateway.upstreams.replay import as_stream
from gateway.upstreams.sse import EventSplitter, event_data

_FINAL_EVENTS = (b"response.completed", b"response.incomplete", b"response.failed")
_SNAPSHOT_EVENTS = (b"response.created", b"response.in_progress", b"response.queued")
_INCOMPLETE = {"message": "The stream ended before the answer was complete.", "type": "upstream_error",
               "code": "stream_incomplete"}


def first_choice(chunk: dict) -> tuple[dict, str, list[dict]] | None:
    """A chat completion chunk's first choice (the one the other APIs tell), its text (or refusal) and its tool
    call deltas; None when the chunk has none (a usage chunk)."""
    for choice in chunk.get("choices") or ():
        if isinstance(choice, dict) and choice.get("index", 0) == 0:
            delta = choice.get("delta")
            delta = delta if isinstance(delta, dict) else {}
            text = delta.get("content") or delta.get("refusal")
            calls = [call for call in delta.get("tool_calls") or () if isinstance(call, dict)]
            return choice, text if isinstance(text, str) else "", calls
    return None


class StreamTranslator(Protocol):
    def chunk(self, chunk: dict) -> bytes: ...

    def done(self) -> bytes: ...

    def error(self, status: int, openai_error: dict) -> bytes: ...

    def closing(self) -> bytes:
        """The last event, written after ``Dialect.settle``."""

    finished: bool


class Dialect(Protocol):
    """What the edge needs of an API: its whole answers, its streams and its errors."""

    keeps_answers: bool  # settle() keeps the answer: an upstream's own answer in the API is read for it too

    def whole(self, ctx: RequestContext, answer: dict) -> bytes: ...

    def stream(self, ctx: RequestContext) -> StreamTranslator: ...

    def error(self, status: int, openai_error: dict) -> tuple[int, bytes]: ...

    async def settle(self, ctx: RequestContext) -> None:
        """What must be done before the client has the whole answer (a stored response, so the next turn finds
        it)."""

    def closing(self, ctx: RequestContext) -> bytes:
        """The rest of a whole answer, written after ``settle``."""

    def native_error(self, status: int, openai_error: dict) -> bytes:
        """The event that ends a stream in the API's own terms, for a stream an upstream gave in that API."""

    def native_final(self, ctx: RequestContext, answer: dict) -> None:
        """Read an upstream's own final answer in the API (``keeps_answers``), before ``settle``."""

    def final_event(self, ctx: RequestContext, kind: str, sequence: int) -> bytes:
        """The final event of an upstream's own stream, told again after ``settle``."""

    def native_snapshot(self, ctx: RequestContext, event: dict) -> bytes:
        """An event of an upstream's own stream that shows the answer so far, told as the client sees it."""


class Outbound:
    """``send`` for one request: holds a whole answer until its last byte (its length changes), translates a stream
    event by event."""

    __slots__ = ("ctx", "send", "dialect", "mode", "start", "held", "stream", "events", "settled")

    def __init__(self, ctx: RequestContext, send: Send, dialect: Dialect) -> None:
        self.ctx, self.send, self.dialect = ctx, send, dialect
        self.mode = ""
        self.start: dict | None = None
        self.held: list[bytes] = []
        self.stream: StreamTranslator | None = None
        self.events = EventSplitter()
        self.settled = False

    async def __call__(self, message: dict) -> None:
        if message["type"] == "http.response.start":
            await self._started(message)
            return
        if self.mode in ("raw", "native"):
            body = message.get("body", b"")
            if body.startswith(b'data: {"error"'):  # the gateway's own event ending a stream that broke
                error = orjson.loads(body[5:])["error"]
                message = {**message, "body": self.dialect.native_error(self.ctx.status, error)}
            elif self.mode == "native":
                message = {**message, "body": await self._native_events(body, message.get("more_body", False))}
            await self.send(message)
            return
        if message["type"] != "http.response.body":
            await self.send(message)
            return
        body, more = message.get("body", b""), message.get("more_body", False)
        if self.mode == "stream":
            out = self._events(body)
            if not more:
                out += self._end()
            out += await self._closing()
            await self.send({"type": "http.response.body", "body": out, "more_body": more})
            return
        self.held.append(body)
        if not more and self.mode == "native-whole":
            await self._native_whole(b"".join(self.held))
        elif not more:
            await self._whole(b"".join(self.held))

    async def _started(self, message: dict) -> None:
        status = message["status"]
        content_type = next((v for k, v in message["headers"] if k == b"content-type"), b"")
        if self.ctx.native_answer and status < 400 and self.dialect.keeps_answers:
            if content_type.startswith(EVENT_STREAM):
                self.mode = "native"
                await self.send(message)
            else:
                self.mode = "native-whole"
                self.start = message
        elif self.ctx.native_answer:
            self.mode = "raw"
            await self.send(message)
        elif status < 400 and content_type.startswith(EVENT_STREAM):
            self.mode = "stream"
            self.stream = self.dialect.stream(self.ctx)
            await self.send(message)
        else:
            self.mode = "error" if status >= 400 else "whole"
            self.start = message

    def _events(self, data: bytes) -> bytes:
        return b"".join(self._event(event) for event in self.events.feed(data))

    def _event(self, event: bytes) -> bytes:
        payload = event_data(event)
        if not payload or self.stream.finished:
            return b""
        if payload == b"[DONE]":
            return self.stream.done()
        try:
            chunk = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return b""
        if not isinstance(chunk, dict):
            return b""
        error = chunk.get("error")
        if isinstance(error, dict) and not chunk.get("choices"):
            return self.stream.error(self.ctx.status if self.ctx.status >= 400 else 502, error)
        return self.stream.chunk(chunk)

    def _end(self) -> bytes:
        rest = self.events.rest()
        out = self._event(rest) if rest.strip() else b""
        if not self.stream.finished:
            out += self.stream.error(502, _INCOMPLETE)
        return out

    async def _native_events(self, data: bytes, more: bool) -> bytes:
        """An upstream's own stream, passed on as it came but for its final event: read, kept (``settle``), and
        told again as the client asked for it."""
        events = self.events.feed(data)
        if not more and self.events.pending.strip():
            events.append(self.events.rest())
        out = b""
        for event in events:
            head = event[:160]
            if not self.settled and any(name in head for name in _FINAL_EVENTS + _SNAPSHOT_EVENTS):
                try:
                    parsed = orjson.loads(event_data(event))
                except orjson.JSONDecodeError:
                    parsed = None
                kind = parsed.get("type", "").encode() if isinstance(parsed, dict) else b""
                if kind in _SNAPSHOT_EVENTS and isinstance(parsed.get("response"), dict):
                    out += self.dialect.native_snapshot(self.ctx, parsed)
                    continue
                if kind in _FINAL_EVENTS and isinstance(parsed.get("response"), dict):
                    self.settled = True
                    self.dialect.native_final(self.ctx, parsed["response"])
                    await self.dialect.settle(self.ctx)
                    out += self.dialect.final_event(self.ctx, parsed["type"], parsed.get("sequence_number", 0))
                    continue
            out += event + b"\n\n"
        return out

    async def _closing(self) -> bytes:
        if not self.stream.finished or self.settled:
            return b""
        self.settled = True
        await self.dialect.settle(self.ctx)
        return self.stream.closing()

    async def _whole(self, body: bytes) -> None:
        start = self.start
        status = start["status"]
        try:
            parsed = orjson.loads(body)
        except orjson.JSONDecodeError:
            parsed = None
        if self.mode == "error":
            error = parsed.get("error") if isinstance(parsed, dict) else None
            status, body = self.dialect.error(status, error if isinstance(error, dict) else {
                "message": body.decode("utf-8", "replace")[:500] or "Request failed.", "type": "api_error"})
            await self._send_whole(status, body, start["headers"], b"application/json")
            return
        if not isinstance(parsed, dict):  # not a chat completion: nothing to translate from
            status, body = self.dialect.error(502, {"message": "The upstream's answer could not be read.",
                                                    "type": "upstream_error"})
            await self._send_whole(status, body, start["headers"], b"application/json")
            return
        if self.ctx.stream:  # an answer given whole (a cached one, say) to a client that asked for a stream
            self.stream = self.dialect.stream(self.ctx)
            self.mode = "stream"
            events = self._events(as_stream(parsed, include_usage=True)) + self._end()
            events += await self._closing()
            await self._send_whole(status, events, start["headers"], EVENT_STREAM)
            return
        body = self.dialect.whole(self.ctx, parsed)
        await self.dialect.settle(self.ctx)
        await self._send_whole(status, body + self.dialect.closing(self.ctx), start["headers"], b"application/json")

    async def _native_whole(self, body: bytes) -> None:
        try:
            answer = orjson.loads(body)
        except orjson.JSONDecodeError:
            answer = None
        if isinstance(answer, dict):
            self.dialect.native_final(self.ctx, answer)
            await self.dialect.settle(self.ctx)
            body = self.dialect.closing(self.ctx)
        await self._send_whole(self.start["status"], body, self.start["headers"], b"application/json")

    async def _send_whole(self, status: int, body: bytes, headers: list, content_type: bytes) -> None:
        kept = [(k, v) for k, v in headers if k not in (b"content-type", b"content-length")]
        head = [(b"content-type", content_type)]
        if content_type != EVENT_STREAM:
            head.append((b"content-length", str(len(body)).encode()))
        await self.send({"type": "http.response.start", "status": status, "headers": head + kept})
        await self.send({"type": "http.response.body", "body": body})
