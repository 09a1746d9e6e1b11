"""uvicorn's httptools protocol, with the limits a server facing the internet needs.

uvicorn closes an idle keep-alive connection (``timeout_keep_alive``) but has no limit on how long a client may
take to send its request: a connection that sends half its headers, or declares 1,000 bytes of body and sends 10,
stays open for good. This adds:

- a header timeout: the request line and headers must arrive within ``GATEWAY_HEADER_TIMEOUT`` seconds of the
  connection opening (or of the request's first byte on a kept-alive connection); else the connection is closed;
- a body timeout: no more than ``GATEWAY_BODY_TIMEOUT`` seconds between two pieces of a body the app is reading;
  else a 408 and the connection is closed (the app sees the client go away);
- a cap on the request line and headers (``GATEWAY_MAX_HEADER_BYTES``): past it, a 431;
- OpenAI-shaped JSON for the errors written here and for uvicorn's own 400 on a request it cannot parse (bare CR
  or LF, a NUL in a header), instead of plain text.
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


class GatewayHttpProtocol(HttpToolsProtocol):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        limits = _limits()
        self._header_timeout = limits.header_timeout
        self._body_timeout = limits.body_timeout
        self._max_header_bytes = limits.max_header_bytes
        self._timer: asyncio.TimerHandle | None = None
        self._header_bytes = 0
        self._refused = False
        self._reading_body = False

    # -- timers ---------------------------------------------------------------------------------------------------

    def _arm(self, seconds: float, callback) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.loop.call_later(seconds, callback)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _headers_too_slow(self) -> None:
        self._timer = None
        if not self.transport.is_closing():
            self.transport.write(error_response(408, "The request headers did not arrive in time.",
                                                "request_timeout"))
            self.transport.close()

    def _body_too_slow(self) -> None:
        self._timer = None
        if self.flow is not None and self.flow.read_paused:  # waiting on the app, not on the client
            self._arm(self._body_timeout, self._body_too_slow)
            return
        cycle = self.cycle
        if cycle is not None and not cycle.response_started and not self.transport.is_closing():
            self.transport.write(error_response(408, "The request body did not arrive in time.", "request_timeout"))
        if cycle is not None:
            cycle.disconnected = True
            cycle.message_event.set()
        self.transport.close()

    # -- connection and parser callbacks --------------------------------------------------------------------------

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm(self._header_timeout, self._headers_too_slow)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        super().data_received(data)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._header_bytes = 0
        self._reading_body = False
        self._arm(self._header_timeout, self._headers_too_slow)

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value) + 4)
        super().on_header(name, value)

    def _count(self, size: int) -> None:
        self._header_bytes += size
        if self._header_bytes > self._max_header_bytes and not self._refused:
            self._refused = True
            self._disarm()
            self.transport.write(error_response(
                431, f"The request line and headers are larger than the gateway's limit of "
                     f"{self._max_header_bytes} bytes.", "request_header_fields_too_large"))
            self.transport.close()

    def on_headers_complete(self) -> None:
        if self._refused:
            return
        self._disarm()
        super().on_headers_complete()
        self._reading_body = True
        self._arm(self._body_timeout, self._body_too_slow)

    def on_body(self, body: bytes) -> None:
        if self._refused:
            return
        super().on_body(body)
        self._arm(self._body_timeout, self._body_too_slow)

    def on_message_complete(self) -> None:
        if self._refused:
            return
        self._reading_body = False
        self._disarm()
        super().on_message_complete()

    def send_400_response(self, msg: str) -> None:
        self._disarm()
        self.transport.write(error_response(
            400, "The request is not valid HTTP (a bare CR or LF, a NUL or another byte not allowed in a request "
                 "line or header).", "invalid_http_request"))
        self.transport.close()
