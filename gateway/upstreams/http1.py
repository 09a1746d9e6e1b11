"""The request path's HTTP/1.1 client: pooled keep-alive connections to upstreams, a request written in one piece,
the answer parsed by httptools (llhttp, in C) as it arrives.

aiohttp's client was a quarter of the gateway's CPU per forwarded request (a URL object, header multidicts, a
payload object, a writer, a stream reader, trace signals, a timer reset on every piece of the answer). Forwarding
needs far less: bytes in, status, a few headers and bytes out. What this client does:

- one idle-connection list per origin (scheme, host, port), newest first; a connection idle for longer than
  ``KEEPALIVE_SECONDS`` or closed by the server is dropped when it is next picked;
- a request's head (request line and headers) made once per URL and header set and kept;
- a read timeout as aiohttp's ``sock_read``: the longest wait for the next piece of the answer, with one timer a
  request (pushed on when it fires and data came meanwhile, not re-armed on every piece); the connect timeout on
  new connections only;
- a request on a reused connection that the server closed before any byte of the answer came back is sent once
  more on a new connection (the server closed it while idle and never saw the request);
- flow control: past ``HIGH_WATER`` bytes not yet read by the relay the connection stops reading, and the read
  timeout does not run while the gateway is the one that is slow;
- bodies in ``Content-Length``, chunked, or up to the connection's end; gzip and deflate undone (none is asked for).

Failures are ConnectionError subclasses (``Unreachable`` for a connection that could not be made, ``Broken`` for an
answer that broke off or could not be parsed) and ``UpstreamTimeout`` (a TimeoutError), which the forwarding stage turns
into OpenAI-shaped errors.
"""

from __future__ import annotations

import asyncio
import ssl
import zlib
from collections import deque
from typing import AsyncIterator
from urllib.parse import urlsplit

import httptools

KEEPALIVE_SECONDS = 60.0  # an idle connection older than this is not reused (servers close theirs after 5-75 s)
HIGH_WATER = 256 * 1024  # bytes of an answer buffered before the connection stops reading
MAX_HEAD_BYTES = 256 * 1024  # an answer's status line and headers; past this it is taken for broken
_URL_CACHE_SIZE = 4096


class Unreachable(ConnectionError):
    """No connection could be made to the upstream."""


class Broken(ConnectionError):
    """The upstream's answer broke off or could not be parsed."""


class UpstreamTimeout(TimeoutError):
    """No connection within the connect timeout, or nothing from the upstream for longer than the read timeout."""


class Headers(dict):
    """An answer's headers by lower-case name; ``get`` takes a name in any case."""

    def get(self, name: str, default=None):
        return dict.get(self, name.lower(), default)


class _Origin:
    __slots__ = ("host", "port", "ssl", "server_hostname", "idle")

    def __init__(self, host: str, port: int, tls: ssl.SSLContext | None) -> None:
        self.host = host
        self.port = port
        self.ssl = tls
        self.server_hostname = host if tls is not None else None
        self.idle: list[_Connection] = []


class Response:
    """An upstream's answer: ``status``, ``headers``, ``content_type``; its body with ``read()`` or piece by piece
    with ``content.iter_any()``. ``release()`` gives the connection back (or closes it if the answer is unread)."""

    __slots__ = ("status", "headers", "content_type", "content", "_connection", "_chunks", "_size", "_done",
                 "_error", "_waiter", "_decoder", "_released")

    def __init__(self, connection: "_Connection", status: int, headers: Headers) -> None:
        self.status = status
        self.headers = headers
        mime = headers.get("content-type")
        self.content_type = mime.split(";", 1)[0].strip().lower() if mime else "application/octet-stream"
        self.content = self
        self._connection = connection
        self._chunks: deque[bytes] = deque()
        self._size = 0
        self._done = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future | None = None
        encoding = headers.get("content-encoding")
        self._decoder = _decoder(encoding) if encoding and encoding != "identity" else None
        self._released = False

    # -- fed by the connection --------------------------------------------------------------------------------------

    def _feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self._size += len(data)
        if self._size > HIGH_WATER:
            self._connection.pause()
        self._wake()

    def _finish(self, error: BaseException | None = None) -> None:
        if not self._done:
            self._done = True
            self._error = error
            self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    # -- read by the gateway ----------------------------------------------------------------------------------------

    async def _next(self) -> bytes | None:
        """The next piece of the body (decoded), or None at its end."""
        while not self._chunks:
            if self._done:
                if self._error is not None:
                    raise self._error
                return self._flush_decoder()
            self._waiter = self._connection.loop.create_future()
            await self._waiter
        data = self._chunks.popleft()
        self._size -= len(data)
        if self._size <= HIGH_WATER // 4:
            self._connection.resume()
        if self._decoder is not None:
            try:
                data = self._decoder.decompress(data)
            except zlib.error as exc:
                raise Broken(f"the answer's {self.headers.get('content-encoding')} body is corrupt: {exc}") from None
        return data

    def _flush_decoder(self) -> bytes | None:
        if self._decoder is None:
            return None
        try:
            rest = self._decoder.flush()
        except zlib.error as exc:
            raise Broken(f"the answer's {self.headers.get('content-encoding')} body is corrupt: {exc}") from None
        self._decoder = None
        return rest or None

    async def read(self) -> bytes:
        if self._done and self._error is None and self._decoder is None:
            data = b"".join(self._chunks)
            self._chunks.clear()
            self._size = 0
            return data
        parts = []
        while (piece := await self._next()) is not None:
            parts.append(piece)
        return b"".join(parts)

    async def iter_any(self) -> AsyncIterator[bytes]:
        while (piece := await self._next()) is not None:
            if piece:
                yield piece

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._connection.release(self)


class _Connection(asyncio.Protocol):
    __slots__ = ("loop", "origin", "client", "transport", "parser", "response", "_status_waiter", "_headers",
                 "_complete", "_keep_alive", "_length_known", "_timeout", "_timer", "_last_data",
                 "_paused", "_closed", "_got_bytes", "_head_bytes", "idle_since")

    def __init__(self, loop: asyncio.AbstractEventLoop, origin: _Origin, client: "Http1Client") -> None:
        self.loop = loop
        self.origin = origin
        self.client = client
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.response: Response | None = None
        self._status_waiter: asyncio.Future | None = None
        self._headers = Headers()
        self._complete = False
        self._keep_alive = False
        self._length_known = False  # Content-Length or chunked: else the body runs to the connection's end
        self._timeout = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._last_data = 0.0
        self._paused = False
        self._closed = False
        self._got_bytes = False  # any byte of the current answer (a reused connection failing before is retried)
        self._head_bytes = 0
        self.idle_since = 0.0

    # -- asyncio.Protocol -------------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self._status_waiter is None and self.response is None:  # idle: nothing is owed to us
            self.close()
            return
        self._got_bytes = True
        self._last_data = self.loop.time()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(Broken("the upstream switched protocols"))
        except httptools.HttpParserError as exc:
            cause = exc.__cause__ or exc.__context__  # raised by a callback here
            if not isinstance(cause, Broken):
                cause = Broken(f"the upstream's answer could not be parsed: {exc}")
            self._fail(cause)

    def eof_received(self) -> bool:
        return False  # close the transport; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._cancel_timer()
        if self._status_waiter is not None or (self.response is not None and not self._complete):
            if self.response is not None and not self._length_known and exc is None:
                self._complete = True  # a body delimited by the connection's end
                self.response._finish()
            else:
                why = f": {exc}" if exc else ""
                self._fail(Broken(f"the upstream closed the connection before its answer was complete{why}"))

    def pause_writing(self) -> None:  # a request body is written in one call; nothing to wait for
        pass

    def resume_writing(self) -> None:
        pass

    # -- httptools callbacks ----------------------------------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_bytes += len(name) + len(value)
        if self._head_bytes > MAX_HEAD_BYTES:
            raise Broken(f"the upstream's headers run past {MAX_HEAD_BYTES} bytes")
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        if key in self._headers:  # repeated: joined as one value, as HTTP allows
            self._headers[key] += ", " + text
        else:
            self._headers[key] = text

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200:  # an interim answer (100 Continue): the real one follows
            self._headers = Headers()
            return
        headers, self._headers = self._headers, Headers()
        self._length_known = ("content-length" in headers or "chunked" in headers.get("transfer-encoding", "")
                              or status in (204, 304))
        self.response = Response(self, status, headers)
        waiter, self._status_waiter = self._status_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(self.response)

    def on_body(self, body: bytes) -> None:
        self.response._feed(body)

    def on_message_complete(self) -> None:
        if self.response is None:  # the end of an interim answer
            return
        self._complete = True
        self._keep_alive = self.parser.should_keep_alive()
        self._cancel_timer()
        self.response._finish()

    # -- the request ------------------------------------------------------------------------------------------------

    async def send(self, head: bytes, body: bytes, read_timeout: float) -> Response:
        self._headers = Headers()
        self.response = None
        self._complete = False
        self._got_bytes = False
        self._head_bytes = 0
        self._timeout = read_timeout
        self._last_data = self.loop.time()
        self._status_waiter = waiter = self.loop.create_future()
        self._timer = self.loop.call_at(self._last_data + read_timeout, self._check_timeout)
        length = b"%d\r\n\r\n" % len(body)
        if len(body) < 16384:
            self.transport.write(head + length + body)
        else:  # a large body is not copied into one buffer with the head
            self.transport.writelines((head + length, body))
        try:
            return await waiter
        except BaseException:
            self._status_waiter = None
            self.close()
            raise

    def _check_timeout(self) -> None:
        self._timer = None
        if self._closed or self._complete:
            return
        due = self._last_data + self._timeout
        now = self.loop.time()
        if self._paused or due > now:  # data came meanwhile, or the gateway is the slow reader
            self._timer = self.loop.call_at(max(due, now + 0.01) if not self._paused else now + self._timeout,
                                            self._check_timeout)
            return
        self._fail(UpstreamTimeout(f"no answer from the upstream for {self._timeout:g} s"))

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _fail(self, error: BaseException) -> None:
        self._cancel_timer()
        waiter, self._status_waiter = self._status_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)
        elif self.response is not None and not self._complete:
            self.response._finish(error)
        self.close()

    def pause(self) -> None:
        if not self._paused and not self._closed:
            self._paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self._paused and not self._closed:
            self._paused = False
            self._last_data = self.loop.time()
            self.transport.resume_reading()

    def release(self, response: Response) -> None:
        if response is not self.response:
            return
        self.response = None
        if self._complete and self._keep_alive and not self._closed and not self.client.closed:
            self.resume()  # an answer released unread may have paused it
            self.idle_since = self.loop.time()
            self.origin.idle.append(self)
        else:
            self.close()

    def close(self) -> None:
        self._cancel_timer()
        if not self._closed:
            self._closed = True
            self.transport.close()


def _decoder(encoding: str):
    encoding = encoding.strip().lower()
    if encoding in ("gzip", "x-gzip"):
        return zlib.decompressobj(16 + zlib.MAX_WBITS)
    if encoding == "deflate":
        return zlib.decompressobj(32 + zlib.MAX_WBITS)  # zlib-wrapped, as RFC 9110 means it
    return _Unreadable(encoding)


class _Unreadable:
    """The decoder of a content coding the gateway does not read: the answer fails when read."""

    def __init__(self, encoding: str) -> None:
        self.encoding = encoding

    def decompress(self, data: bytes) -> bytes:
        raise zlib.error(f"a content coding the gateway does not read: {self.encoding}")

    def flush(self) -> bytes:
        return self.decompress(b"")


class Http1Client:
    """HTTP/1.1 POSTs to upstreams over pooled keep-alive connections, one client per worker."""

    def __init__(self, user_agent: str = "llm-gateway") -> None:
        self.closed = False
        self._origins: dict[tuple[str, str, int], _Origin] = {}
        self._urls: dict[str, tuple[_Origin, bytes]] = {}  # URL -> its origin and the head's first lines
        self._heads: dict[tuple[str, int], tuple[dict, bytes]] = {}  # (URL, id of headers) -> (headers, head)
        self._user_agent = user_agent
        self._tls: ssl.SSLContext | None = None

    def _tls_context(self) -> ssl.SSLContext:
        if self._tls is None:
            self._tls = ssl.create_default_context()
        return self._tls

    def _route(self, url: str) -> tuple[_Origin, bytes]:
        route = self._urls.get(url)
        if route is None:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise Unreachable(f"not an http(s) URL: {url}")
            tls = parts.scheme == "https"
            port = parts.port or (443 if tls else 80)
            key = (parts.scheme, parts.hostname, port)
            origin = self._origins.get(key)
            if origin is None:
                origin = self._origins[key] = _Origin(parts.hostname, port, self._tls_context() if tls else None)
            target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
            if parts.port is not None:
                host += f":{parts.port}"
            first = f"POST {target} HTTP/1.1\r\nHost: {host}\r\n".encode("latin-1")
            if len(self._urls) >= _URL_CACHE_SIZE:
                self._urls.clear()
                self._heads.clear()
            route = self._urls[url] = (origin, first)
        return route

    def _head(self, url: str, first: bytes, headers: dict[str, str]) -> bytes:
        key = (url, id(headers))
        kept = self._heads.get(key)
        if kept is not None and kept[0] is headers:
            return kept[1]
        lines = [first]
        for name, value in headers.items():
            if name.lower() in ("host", "content-length", "transfer-encoding", "connection"):
                continue
            line = f"{name}: {value}\r\n"
            if any(c in line[:-2] for c in "\r\n\0"):
                raise Unreachable(f"the header {name!r} of this upstream's request holds a line break or NUL")
            lines.append(line.encode("latin-1", "strict") if line.isascii() else line.encode("utf-8"))
        if not any(name.lower() == "user-agent" for name in headers):
            lines.append(b"User-Agent: " + self._user_agent.encode() + b"\r\n")
        lines.append(b"Content-Length: ")
        head = b"".join(lines)
        if len(self._heads) >= _URL_CACHE_SIZE:
            self._heads.clear()
        self._heads[key] = (headers, head)
        return head

    async def post(self, url: str, body: bytes, headers: dict[str, str], connect_timeout: float,
                   read_timeout: float) -> Response:
        if self.closed:
            raise Unreachable("the gateway is shutting down")
        origin, first = self._route(url)
        head = self._head(url, first, headers)
        connection = self._idle(origin)
        if connection is not None:
            try:
                return await connection.send(head, body, read_timeout)
            except Broken:
                if connection._got_bytes:
                    raise
                # closed by the server while idle, before it read the request: once more on a new connection
        connection = await self._connect(origin, connect_timeout)
        return await connection.send(head, body, read_timeout)

    def _idle(self, origin: _Origin) -> _Connection | None:
        idle = origin.idle
        if not idle:
            return None
        oldest = asyncio.get_running_loop().time() - KEEPALIVE_SECONDS
        while idle:
            connection = idle.pop()
            if connection._closed or connection.transport.is_closing() or connection.idle_since < oldest:
                connection.close()
                continue
            return connection
        return None

    async def _connect(self, origin: _Origin, timeout: float) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                _, connection = await loop.create_connection(
                    lambda: _Connection(loop, origin, self), origin.host, origin.port, ssl=origin.ssl,
                    server_hostname=origin.server_hostname)
        except TimeoutError:
            raise UpstreamTimeout(f"no connection to the upstream within {timeout:g} s") from None
        except ssl.SSLError as exc:
            raise Unreachable(f"TLS with the upstream failed: {exc}") from None
        except OSError as exc:
            raise Unreachable(f"no connection to the upstream: {exc}") from None
        return connection

    async def close(self) -> None:
        self.closed = True
        for origin in self._origins.values():
            while origin.idle:
                origin.idle.pop().close()
        self._origins.clear()
        self._urls.clear()
        self._heads.clear()
