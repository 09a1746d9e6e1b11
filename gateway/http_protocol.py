"""uvicorn's httptools protocol, with the limits a server facing the internet needs.

uvicorn closes an idle keep-alive connection (``timeout_keep_alive``) but has no limit on how long a client may
take to send its request: a connection that sends half its headers, or declares 1,000 bytes of body and sends 10,
stays open for good. This adds:

- a header timeout: the request line and headers must arrive within ``GATEWAY_HEADER_TIMEOUT`` seconds of the
  connection opening (or of the request's first byte on a kept-alive connection); else the connection is closed;
- a body timeout: no more than ``GATEWAY_BODY_TIMEOUT`` seconds between two pieces of a body the app is reading,
  and no more than ``GATEWAY_BODY_TOTAL_TIMEOUT`` for the whole body (a byte a second must not hold a connection
  for ever); else a 408 and the connection is closed (the app sees the client go away);
- a cap on the request line and headers (``GATEWAY_MAX_HEADER_BYTES``): past it, a 431;
- OpenAI-shaped JSON for the errors written here and for uvicorn's own 400 on a request it cannot parse (bare CR
  or LF, a NUL in a header), instead of plain text;
- an answer of known length goes out in one write, its head and body together (uvicorn writes them apart: two
  system calls and, with Nagle off, two packets per answer).
"""

from __future__ import annotations

import asyncio

import orjson
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from gateway.settings import Settings

_settings: Settings | None = None


def _limits() -> Settings:
    global _settings
    if _settings is None:
        _settings = Settings.from_env()
    return _settings


def error_response(status: int, message: str, code: str) -> bytes:
    body = orjson.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                   "code": code}})
    return b"".join([STATUS_LINE[status], b"content-type: application/json\r\n",
                     b"content-length: %d\r\n" % len(body), b"connection: close\r\n\r\n", body])


class _HeadHolder:
    """The connection's transport as a request's cycle sees it: the head of an answer with a Content-Length is held
    until its body is written, and both go out in one write. A stream's head (no Content-Length) goes at once, so a
    client sees it before the first event."""

    __slots__ = ("transport", "held")

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.held: bytes | None = None

    def write(self, data: bytes) -> None:
        if self.held is not None:
            data, self.held = self.held + data, None
        elif data.startswith(b"HTTP/1.1 ") and b"\r\ncontent-length: " in data and data.endswith(b"\r\n\r\n"):
            self.held = data
            return
        self.transport.write(data)

    def close(self) -> None:
        if self.held is not None:
            data, self.held = self.held, None
            self.transport.write(data)
        self.transport.close()

    def is_closing(self) -> bool:
        return self.transport.is_closing()

    def __getattr__(self, name: str):
        return getattr(self.transport, name)


SWEEP_SECONDS = 0.5  # how often the connections are checked against their deadlines
_IDLE, _HEADERS, _BODY = 0, 1, 2


class GatewayHttpProtocol(HttpToolsProtocol):
    """Each connection notes a deadline as a request goes from phase to phase (an attribute write, no timer); one
    task per event loop sweeps the open connections twice a second and closes those past their deadline. A timer
    armed and cancelled three times a request would cost more than the rest of this class together."""

    _sweepers: dict[asyncio.AbstractEventLoop, asyncio.Task] = {}

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        limits = _limits()
        self._header_timeout = limits.header_timeout
        self._body_timeout = limits.body_timeout
        self._body_total = limits.body_total_timeout
        self._body_ends = 0.0  # when the whole body must be in
        self._max_header_bytes = limits.max_header_bytes
        self._phase = _IDLE
        self._deadline = 0.0
        self._header_bytes = 0
        self._refused = False
        self._writer: _HeadHolder | None = None

    # -- deadlines ------------------------------------------------------------------------------------------------

    def _sweep_later(self) -> None:
        loop = self.loop
        if loop not in self._sweepers or self._sweepers[loop].done():
            self._sweepers[loop] = loop.create_task(_sweep(loop, self.connections))

    def _check(self, now: float) -> None:
        if self._phase == _IDLE or now < self._deadline or self.transport.is_closing():
            return
        if self._phase == _HEADERS:
            self._close_with(408, "The request headers did not arrive in time.")
            return
        if self.flow is not None and self.flow.read_paused:  # waiting on the app, not on the client
            self._deadline = now + self._body_timeout
            self._body_ends = max(self._body_ends, self._deadline)
            return
        cycle = self.cycle
        if cycle is not None and not cycle.response_started:
            self.transport.write(error_response(408, "The request body did not arrive in time.", "request_timeout"))
        if cycle is not None:
            cycle.disconnected = True
            cycle.message_event.set()
        self._phase = _IDLE
        self.transport.close()

    def _close_with(self, status: int, message: str, code: str = "request_timeout") -> None:
        self._phase = _IDLE
        self._refused = True
        self.transport.write(error_response(status, message, code))
        self.transport.close()

    # -- connection and parser callbacks --------------------------------------------------------------------------

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._writer = _HeadHolder(transport)
        self._phase, self._deadline = _HEADERS, self.loop.time() + self._header_timeout
        self._sweep_later()

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        super().data_received(data)
        if self._phase == _HEADERS and self._header_bytes > self._max_header_bytes and not self._refused:
            self._too_large()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._header_bytes = 0
        self._phase, self._deadline = _HEADERS, self.loop.time() + self._header_timeout

    def on_url(self, url: bytes) -> None:
        self._header_bytes += len(url)
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:  # uvicorn's, counting the bytes
        self._header_bytes += len(name) + len(value) + 4
        name = name.lower()
        if name == b"expect" and value.lower() == b"100-continue":
            self.expect_100_continue = True
        self.headers.append((name, value))

    def _too_large(self) -> None:
        self._close_with(431, f"The request line and headers are larger than the gateway's limit of "
                              f"{self._max_header_bytes} bytes.", "request_header_fields_too_large")

    def on_headers_complete(self) -> None:
        if self._refused:
            return
        if self._header_bytes > self._max_header_bytes:
            self._too_large()
            return
        super().on_headers_complete()
        if self.cycle is not None:
            self.cycle.transport = self._writer
        now = self.loop.time()
        self._body_ends = now + self._body_total
        self._phase, self._deadline = _BODY, min(now + self._body_timeout, self._body_ends)

    def on_body(self, body: bytes) -> None:
        if self._refused:
            return
        super().on_body(body)
        self._deadline = min(self.loop.time() + self._body_timeout, self._body_ends)

    def on_message_complete(self) -> None:
        if self._refused:
            return
        self._phase = _IDLE
        super().on_message_complete()

    def send_400_response(self, msg: str) -> None:
        self._close_with(400, "The request is not valid HTTP (a bare CR or LF, a NUL or another byte not allowed "
                              "in a request line or header).", "invalid_http_request")


async def _sweep(loop: asyncio.AbstractEventLoop, connections: set) -> None:
    """Close the connections past their deadline; runs while the server has connections."""
    while connections:
        await asyncio.sleep(SWEEP_SECONDS)
        now = loop.time()
        for connection in list(connections):
            if isinstance(connection, GatewayHttpProtocol):
                connection._check(now)
