"""CORS, so that a browser page on another origin can call the gateway (off unless origins are configured).

Allowed origins come from ``GATEWAY_CORS_ORIGINS`` (every tenant; ``*`` for any origin) and from a tenant's
``cors_origins`` (only that tenant's keys). A preflight is answered without a key, for any origin that some tenant
or the global list allows; the request that follows is checked against its own tenant's list by the pipeline's
authentication stage (``origin_allowed``).

Starlette's CORS middleware does the work; this wraps it so that requests without an ``Origin`` header (every
non-browser client, the hot path) skip it entirely, and so that the allowed origins follow config reloads.
"""

from __future__ import annotations

from typing import Callable
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response

from gateway.asgi import Receive, Scope, Send, header
from gateway.errors import error_body

EXPOSED_HEADERS = (
    "x-request-id", "retry-after", "x-ratelimit-limit-requests", "x-ratelimit-remaining-requests",
    "x-ratelimit-reset-requests", "x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-tokens", "x-gateway-model", "x-gateway-deployment", "x-gateway-upstream-model",
    "x-gateway-overhead-ms", "x-gateway-cost-usd", "x-gateway-cache", "x-gateway-complexity",
    "x-gateway-routing-rule", "x-gateway-cascaded", "x-gateway-confidence", "x-gateway-fallbacks",
)


class _DynamicCORS(CORSMiddleware):
    """Starlette's middleware with the allowed origins read at each request and JSON refusals."""

    def __init__(self, app, allowed: Callable[[], frozenset[str]]) -> None:
        super().__init__(app, allow_origins=(), allow_methods=("*",), allow_headers=("*",),
                         expose_headers=EXPOSED_HEADERS, max_age=600)
        self._allowed = allowed

    def is_allowed_origin(self, origin: str) -> bool:
        allowed = self._allowed()
        return "*" in allowed or origin in allowed

    def preflight_response(self, request_headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code == 400:
            reason = response.body.decode()
            body = error_body(f"{reason}: this origin may not call the gateway from a browser.",
                              "invalid_request_error", None, "cors_not_allowed")
            headers = {k: v for k, v in response.headers.items() if k.lower() not in ("content-length",
                                                                                       "content-type")}
            return Response(body, status_code=400, headers=headers, media_type="application/json")
        return response


class Cors:
    def __init__(self, app, allowed: Callable[[], frozenset[str]]) -> None:
        self.app = app
        self._cors = _DynamicCORS(app, allowed)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and header(scope, b"origin") is not None:
            await self._cors(scope, receive, send)
        else:
            await self.app(scope, receive, send)

