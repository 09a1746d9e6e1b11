"""The web console: static files served at /console, with nothing to build. Its pages call the admin and usage
APIs with the key the user signs in with; it has no back end of its own."""

from __future__ import annotations

from pathlib import Path

from starlette.staticfiles import StaticFiles

from gateway.asgi import Receive, Scope, Send

FILES = Path(__file__).parent / "static"
# Only this origin's own scripts, styles and API: a tenant name can never run as a script, and nothing is loaded
# from elsewhere.
_HEADERS = [
    (b"content-security-policy", b"default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
                                 b"img-src 'self' data:; connect-src 'self'; form-action 'self'; "
                                 b"frame-ancestors 'none'; base-uri 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-cache"),
]


class Console:
    """The console's files, with headers that keep it to its own origin."""

    def __init__(self) -> None:
        self.files = StaticFiles(directory=FILES, html=True)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *_HEADERS]
            await send(message)

        await self.files(scope, receive, with_headers)
