"""The request path's own HTTP/1.1 client against loopback servers that answer byte for byte as HTTP/1.1 allows:
kept-alive connections reused, a connection the server closed while idle, every way a body may be delimited,
codings, timeouts, answers that break off, flow control, and heads that must not be sent."""

from __future__ import annotations

import asyncio
import gzip
import zlib

import pytest
import uvloop

from gateway.upstreams.http1 import Broken, Http1Client, Unreachable, UpstreamTimeout

HEADERS = {"Content-Type": "application/json", "Authorization": "Bearer sk-upstream"}


class Server:
    """A loopback HTTP/1.1 server whose answer to each request is ``answer(request_number, head, body)``: the raw
    bytes to write (or a coroutine function given the writer, for answers that take their time)."""

    def __init__(self, answer) -> None:
        self.answer = answer
        self.connections = 0
        self.requests: list[tuple[bytes, bytes]] = []
        self.writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> "Server":
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/v1/chat/completions"
        return self

    async def __aexit__(self, *exc) -> None:
        for writer in self.writers:
            writer.close()
        self.server.close()
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length:"))
                body = await reader.readexactly(length)
                self.requests.append((head, body))
                answer = self.answer(len(self.requests), head, body)
                if callable(answer):
                    await answer(writer)
                elif answer is None:
                    writer.close()
                    return
                else:
                    writer.write(answer)
                    await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()


def ok(body: bytes, *headers: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n%s" % (
        len(body), b"".join(h + b"\r\n" for h in headers), body)


def run(coroutine):
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:  # the gateway's event loop
        return runner.run(coroutine)


async def _post(client: Http1Client, url: str, body: bytes = b'{"q":1}', read_timeout: float = 5.0) -> tuple:
    response = await client.post(url, body, HEADERS, 2.0, read_timeout)
    try:
        return response.status, response.headers, await response.read()
    finally:
        response.release()


def test_a_connection_is_kept_alive_and_reused_and_the_request_goes_as_asked():
    async def scenario():
        async with Server(lambda n, head, body: ok(b'{"n":%d}' % n)) as server:
            client = Http1Client()
            answers = [await _post(client, server.url, b'{"question":"%d"}' % i) for i in range(5)]
            await client.close()
            return server, answers

    server, answers = run(scenario())
    assert [a[2] for a in answers] == [b'{"n":%d}' % n for n in range(1, 6)]
    assert answers[0][0] == 200 and answers[0][1].get("Content-Type") == "application/json"
    assert server.connections == 1  # one connection for all five
    head, body = server.requests[2]
    assert head.startswith(b"POST /v1/chat/completions HTTP/1.1\r\n") and body == b'{"question":"2"}'
    lines = head.lower().split(b"\r\n")
    assert b"authorization: bearer sk-upstream" in lines and b"content-length: 16" in lines
    assert any(line.startswith(b"host: 127.0.0.1:") for line in lines)


def test_concurrent_requests_each_get_their_own_connection_and_their_own_answer():
    async def scenario():
        async with Server(lambda n, head, body: _later(body)) as server:
            client = Http1Client()
            answers = await asyncio.gather(*[_post(client, server.url, b'{"i":%d}' % i) for i in range(8)])
            await client.close()
            return server, answers

    server, answers = run(scenario())
    assert [a[2] for a in answers] == [b'{"i":%d}' % i for i in range(8)]
    assert server.connections == 8


def _later(body: bytes):
    async def write(writer):
        await asyncio.sleep(0.05)
        writer.write(ok(body))
        await writer.drain()
    return write


def test_a_connection_the_server_closed_while_idle_is_not_an_error():
    """The server answers and closes without saying so (no ``Connection: close``): the next request finds the
    connection dead before any byte of an answer, and goes again on a new one, once."""
    async def scenario():
        async def answer_and_close(writer):
            writer.write(ok(b"{}"))
            await writer.drain()
            writer.close()

        async with Server(lambda n, head, body: answer_and_close) as server:
            client = Http1Client()
            first = await _post(client, server.url)
            await asyncio.sleep(0.05)
            second = await _post(client, server.url)
            await client.close()
            return server, first, second

    server, first, second = run(scenario())
    assert first[0] == second[0] == 200
    assert server.connections == 2 and len(server.requests) == 2  # the request was not sent twice


def test_a_request_the_server_took_and_broke_off_is_not_sent_again():
    async def scenario():
        async def half(writer):
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{\"par")
            await writer.drain()
            writer.close()

        async with Server(lambda n, head, body: ok(b"{}") if n == 1 else half) as server:
            client = Http1Client()
            await _post(client, server.url)
            with pytest.raises(Broken, match="before its answer was complete"):
                await _post(client, server.url)
            await client.close()
            return server

    server = run(scenario())
    assert len(server.requests) == 2


def test_chunked_eof_delimited_and_empty_bodies():
    chunked = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"7\r\ndata: 1\r\n9\r\n\n\ndata: 2\r\n0\r\n\r\n")
    to_the_end = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n{\"whole\":true}"
    empty = b"HTTP/1.1 204 No Content\r\n\r\n"

    async def write_and_close(writer):
        writer.write(to_the_end)
        await writer.drain()
        writer.close()

    async def scenario():
        async with Server(lambda n, head, body: [chunked, empty, write_and_close, ok(b"{}")][n - 1]) as server:
            client = Http1Client()
            response = await client.post(server.url, b"{}", HEADERS, 2.0, 5.0)
            pieces = [piece async for piece in response.content.iter_any()]
            response.release()
            results = [(response.status, response.content_type, b"".join(pieces))]
            for _ in range(3):
                results.append(await _post(client, server.url))
            await client.close()
            return server, results

    server, results = run(scenario())
    assert results[0] == (200, "text/event-stream", b"data: 1\n\ndata: 2")
    assert results[1][0] == 204 and results[1][2] == b""
    assert results[2][0] == 200 and results[2][2] == b'{"whole":true}'
    assert results[3][0] == 200
    assert server.connections == 2  # the chunked and empty answers kept the connection; the EOF-delimited one ended it


def test_gzip_and_deflate_answers_are_undone_and_an_unknown_coding_is_refused():
    text = b'{"answer":"' + b"gateway " * 500 + b'"}'
    answers = [ok(gzip.compress(text), b"Content-Encoding: gzip"),
               ok(zlib.compress(text), b"Content-Encoding: deflate"), ok(b"....", b"Content-Encoding: br")]

    async def scenario():
        async with Server(lambda n, head, body: answers[n - 1]) as server:
            client = Http1Client()
            results = [await _post(client, server.url), await _post(client, server.url)]
            with pytest.raises(Broken, match="br"):
                await _post(client, server.url)
            await client.close()
            return results

    results = run(scenario())
    assert results[0][2] == text and results[1][2] == text


def test_an_interim_answer_is_skipped():
    async def scenario():
        async with Server(lambda n, head, body: b"HTTP/1.1 100 Continue\r\n\r\n" + ok(b'{"ok":1}')) as server:
            client = Http1Client()
            result = await _post(client, server.url)
            await client.close()
            return result

    assert run(scenario())[::2] == (200, b'{"ok":1}')


def test_read_timeout_counts_from_the_last_byte_not_from_the_start():
    """A stream whose pieces come every 0.15 s outlives a read timeout of 0.4 s; one that then stops for longer
    than it fails with UpstreamTimeout, and the connection is not reused."""
    async def scenario():
        async def trickle(writer):
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
            for _ in range(6):
                await asyncio.sleep(0.15)
                writer.write(b"4\r\ndata\r\n")
                await writer.drain()
            await asyncio.sleep(2)

        async with Server(lambda n, head, body: trickle) as server:
            client = Http1Client()
            response = await client.post(server.url, b"{}", HEADERS, 2.0, 0.4)
            pieces = []
            loop = asyncio.get_running_loop()
            started = loop.time()
            with pytest.raises(UpstreamTimeout):
                async for piece in response.content.iter_any():
                    pieces.append(piece)
            waited = loop.time() - started
            response.release()
            await client.close()
            return b"".join(pieces), waited

    body, waited = run(scenario())
    assert body == b"data" * 6
    assert 0.9 + 0.35 < waited < 0.9 + 1.0  # six pieces (0.9 s), then the timeout's 0.4 s of silence


def test_no_status_line_within_the_read_timeout():
    async def scenario():
        async def silent(writer):
            await asyncio.sleep(3)

        async with Server(lambda n, head, body: silent) as server:
            client = Http1Client()
            with pytest.raises(UpstreamTimeout, match="0.3 s"):
                await client.post(server.url, b"{}", HEADERS, 2.0, 0.3)
            await client.close()

    run(scenario())


def test_nothing_listening_is_unreachable_and_a_bad_url_too():
    async def scenario():
        client = Http1Client()
        server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        server.close()
        await server.wait_closed()
        with pytest.raises(Unreachable, match="no connection"):
            await client.post(f"http://127.0.0.1:{port}/v1/x", b"{}", HEADERS, 2.0, 5.0)
        with pytest.raises(Unreachable, match="not an http"):
            await client.post("ftp://127.0.0.1/v1/x", b"{}", HEADERS, 2.0, 5.0)
        await client.close()
        with pytest.raises(Unreachable, match="shutting down"):
            await client.post(f"http://127.0.0.1:{port}/v1/x", b"{}", HEADERS, 2.0, 5.0)

    run(scenario())


def test_a_header_with_a_line_break_or_nul_is_never_sent():
    async def scenario():
        async with Server(lambda n, head, body: ok(b"{}")) as server:
            client = Http1Client()
            for value in ("sk-1\r\nX-Injected: yes", "sk-1\nX: y", "sk\x001"):
                with pytest.raises(Unreachable, match="line break or NUL"):
                    await client.post(server.url, b"{}", {"Authorization": value}, 2.0, 5.0)
            await client.close()
            return server

    assert run(scenario()).requests == []


def test_an_answer_that_is_not_http_is_broken():
    async def scenario():
        async with Server(lambda n, head, body: b"SSH-2.0-OpenSSH_9.6\r\n\r\n") as server:
            client = Http1Client()
            with pytest.raises(Broken, match="could not be parsed"):
                await _post(client, server.url)
            await client.close()

    run(scenario())


def test_a_slow_reader_pauses_the_connection_and_gets_every_byte():
    """A 4 MiB answer read slowly: the connection stops reading past the high-water mark (the buffer stays near it,
    not at 4 MiB), the read timeout does not fire while the reader is the slow one, and every byte arrives."""
    size = 4 * 1024 * 1024

    async def scenario():
        from gateway.upstreams import http1
        async with Server(lambda n, head, body: ok(b"x" * size)) as server:
            client = Http1Client()
            response = await client.post(server.url, b"{}", HEADERS, 2.0, 0.2)
            received, most_buffered = 0, 0
            async for piece in response.content.iter_any():
                received += len(piece)
                most_buffered = max(most_buffered, response._size)
                await asyncio.sleep(0.002)
            response.release()
            await client.close()
            return received, most_buffered, http1.HIGH_WATER

    received, most_buffered, high_water = run(scenario())
    assert received == size
    assert most_buffered < 2 * high_water + 262144  # one socket read past the mark at most


def test_a_request_cancelled_while_waiting_closes_its_connection():
    async def scenario():
        async def never(writer):
            await asyncio.sleep(5)

        async with Server(lambda n, head, body: never if n == 1 else ok(b"{}")) as server:
            client = Http1Client()
            task = asyncio.create_task(_post(client, server.url))
            await asyncio.sleep(0.1)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            answer = await _post(client, server.url)  # not on the cancelled request's connection
            await client.close()
            return server, answer

    server, answer = run(scenario())
    assert answer[0] == 200 and server.connections == 2


def test_headers_without_end_are_broken_not_kept():
    async def scenario():
        async def endless(writer):
            writer.write(b"HTTP/1.1 200 OK\r\n")
            for i in range(5000):
                writer.write(b"X-Filler-%d: %s\r\n" % (i, b"y" * 100))
            await writer.drain()
            await asyncio.sleep(2)

        async with Server(lambda n, head, body: endless) as server:
            client = Http1Client()
            with pytest.raises(Broken, match="headers run past"):
                await _post(client, server.url)
            await client.close()

    run(scenario())


def test_an_answer_released_unread_closes_its_connection_and_the_next_request_gets_its_own():
    """A large answer the gateway gave up on (paused past the high-water mark, never read to its end) is not left
    on a connection that would be reused: the next request gets a new connection and its own answer."""
    big = b"x" * (3 * 1024 * 1024)

    async def scenario():
        async with Server(lambda n, head, body: ok(big) if n == 1 else ok(b'{"next":1}')) as server:
            client = Http1Client()
            response = await client.post(server.url, b"{}", HEADERS, 2.0, 1.0)
            await asyncio.sleep(0.1)
            response.release()
            answer = await _post(client, server.url, read_timeout=1.0)
            await client.close()
            return server, answer

    server, answer = run(scenario())
    assert answer[0] == 200 and answer[2] == b'{"next":1}' and server.connections == 2


def test_https_upstreams_are_verified(tmp_path, monkeypatch):
    """An https upstream whose certificate the machine trusts (here through SSL_CERT_FILE, as OpenSSL reads it)
    answers over TLS on a kept-alive connection; one it does not trust is unreachable, with why."""
    import ssl
    import subprocess

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert, key)

    async def scenario(trusted: bool):
        connections = []

        async def serve(reader, writer):
            connections.append(writer)
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
                    return
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                await reader.readexactly(length)
                writer.write(ok(b'{"tls":true}'))
                await writer.drain()

        server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=server_tls)
        url = f"https://localhost:{server.sockets[0].getsockname()[1]}/v1/chat/completions"
        client = Http1Client()
        try:
            if not trusted:
                with pytest.raises(Unreachable, match="TLS"):
                    await client.post(url, b"{}", HEADERS, 2.0, 5.0)
                return None
            return [await _post(client, url) for _ in range(3)], len(connections)
        finally:
            await client.close()
            for writer in connections:
                writer.close()
            server.close()

    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    answers, connections = run(scenario(trusted=True))
    assert [a[2] for a in answers] == [b'{"tls":true}'] * 3 and connections == 1
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "nothing.pem"))
    monkeypatch.setenv("SSL_CERT_DIR", str(tmp_path))
    run(scenario(trusted=False))
