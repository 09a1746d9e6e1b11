"""Every answer of the gateway is accounted for: it carries a request id and writes one log line.

This wraps the whole app, so the gateway's own 404s and 405s, the model list, the admin API and the health routes
get the same as the OpenAI routes. An exception that escapes a route before its answer started becomes an
OpenAI-shaped 500 rather than a plain-text one.

The request path (the pipeline) gives its answers the id itself and writes its own, richer log line. For the
requests it will serve (``answers_for_itself``), this layer only hands out the id: wrapping ``send`` costs a call
for every message of every answer, which the hot path does not pay.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Callable

from gateway.asgi import LOG_FIELDS, LOGGED, REQUEST_ID, Message, Receive, Scope, Send, send_response
from gateway.errors import error_body
from gateway.observability.logs import log_request

log = logging.getLogger("gateway")


def new_request_id() -> str:
    return "req_" + os.urandom(12).hex()


class RequestIdentity:
    def __init__(self, app, answers_for_itself: Callable[[Scope], bool]) -> None:
        self.app = app
        self.answers_for_itself = answers_for_itself

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = new_request_id()
        scope[REQUEST_ID] = request_id
        if self.answers_for_itself(scope):
            await self.app(scope, receive, send)
            return
        header = (b"x-request-id", request_id.encode())
        started = time.perf_counter()
        status = 0

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), header]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("request %s failed inside the gateway", request_id)
            if status == 0:
                status = 500
                body = error_body("The gateway failed to process this request.", "server_error", None,
                                  "internal_error")
                await send_response(send, 500, body, [header])
        if not scope.get(LOGGED):
            line = {"request_id": request_id, "method": scope["method"], "path": scope["path"], "status": status,
                    "latency_ms": round((time.perf_counter() - started) * 1000, 2)}
            extra = scope.get(LOG_FIELDS)
            if extra:
                line.update(extra)
            log_request(line)
