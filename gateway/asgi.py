"""Plain ASGI helpers for the hot paths of the gateway and the simulator.

The OpenAI routes are served as bare ASGI callables rather than through a framework's request and response
objects: it keeps the gateway's own cost per request near that of a bare pass-through.
"""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]

JSON = b"application/json"
EVENT_STREAM = b"text/event-stream"

# Scope keys the gateway's layers share (ASGI allows extension keys in the scope).
REQUEST_ID = "gateway.request_id"  # the id of this request, given by the outermost layer
LOGGED = "gateway.logged"  # set by a route that wrote its own log line for this request
LOG_FIELDS = "gateway.log"  # fields a route adds to the log line the outermost layer writes (tenant, key)


class BodyTooLarge(Exception):
    pass


class ClientDisconnected(Exception):
    pass


def header(scope: Scope, name: bytes) -> bytes | None:
    """The first value of header ``name`` (lower-case), or None."""
    for key, value in scope["headers"]:
        if key == name:
            return value
    return None


async def read_body(receive: Receive, limit: int, declared_length: bytes | None = None) -> bytes:
    """The whole request body; BodyTooLarge past ``limit`` bytes, ClientDisconnected if the client left."""
    if declared_length is not None and declared_length.isdigit() and int(declared_length) > limit:
        raise BodyTooLarge
    message = await receive()
    if message["type"] == "http.disconnect":
        raise ClientDisconnected
    body = message.get("body", b"")
    if not message.get("more_body"):
        if len(body) > limit:
            raise BodyTooLarge
        return body
    parts = [body]
    size = len(body)
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnected
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        parts.append(chunk)
        if not message.get("more_body"):
            return b"".join(parts)


async def send_response(
    send: Send, status: int, body: bytes, headers: Headers | None = None, content_type: bytes = JSON
) -> None:
    response_headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
    if headers:
        response_headers.extend(headers)
    await send({"type": "http.response.start", "status": status, "headers": response_headers})
    await send({"type": "http.response.body", "body": body})


async def start_stream(send: Send, status: int, headers: Headers | None = None) -> None:
    response_headers = [(b"content-type", EVENT_STREAM), (b"cache-control", b"no-cache")]
    if headers:
        response_headers.extend(headers)
    await send({"type": "http.response.start", "status": status, "headers": response_headers})


async def send_chunk(send: Send, chunk: bytes) -> None:
    await send({"type": "http.response.body", "body": chunk, "more_body": True})


async def end_stream(send: Send) -> None:
    await send({"type": "http.response.body", "body": b""})


class DeadlinePassed(Exception):
    pass


class DisconnectGuard:
    """Cancels the current task if the client goes away while the response is being produced, or when the
    request's deadline passes.

    uvicorn does not cancel an application when its client disconnects, and silently drops what is sent after;
    without this, an abandoned request would keep its upstream call (and its GPU time) running to the end.
    Leave the guard as soon as the response is sent: after that, ``receive()`` reports a disconnect at once.

    Watching costs a task, so it starts only once the request has taken ``grace`` seconds: most answers are sent
    before that, and a client that leaves sooner costs at most ``grace`` seconds of upstream work. The deadline
    timer starts then too, so a request answered within ``grace`` pays for neither (``asyncio.timeout`` would cost
    a timer for every request). Past the deadline, leaving the guard raises DeadlinePassed.
    """

    __slots__ = ("_receive", "_grace", "_deadline", "_task", "_timer", "_watcher", "disconnected", "expired")

    def __init__(self, receive: Receive, grace: float = 0.05, deadline: float | None = None) -> None:
        self._receive = receive
        self._grace = grace
        self._deadline = deadline  # the event loop's time by which the request must be over
        self._task: asyncio.Task | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._watcher: asyncio.Task | None = None
        self.disconnected = False
        self.expired = False

    async def __aenter__(self) -> "DisconnectGuard":
        self._task = asyncio.current_task()
        self._timer = asyncio.get_running_loop().call_later(self._grace, self._start_watching)
        return self

    def _start_watching(self) -> None:
        loop = asyncio.get_running_loop()
        self._watcher = loop.create_task(self._watch())
        self._timer = loop.call_at(self._deadline, self._expire) if self._deadline is not None else None

    def _expire(self) -> None:
        self.expired = True
        self._task.cancel()

    async def _watch(self) -> None:
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                self.disconnected = True
                self._task.cancel()
                return

    async def __aexit__(self, exc_type, exc, tb) -> bool:
        if self._timer is not None:
            self._timer.cancel()
        if self._watcher is not None:
            self._watcher.cancel()
        if exc_type is asyncio.CancelledError and (self.disconnected or self.expired):
            self._task.uncancel()
            raise ClientDisconnected if self.disconnected else DeadlinePassed
        return False
