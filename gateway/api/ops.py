"""Routes for operators: liveness, readiness and Prometheus metrics. Everything off the hot path is FastAPI."""

from __future__ import annotations

from typing import Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException

from gateway import __version__
from gateway.errors import error_body


def build_ops_app(readiness: Callable[[], dict[str, bool]]) -> FastAPI:
    app = FastAPI(title="LLM gateway", version=__version__, docs_url="/docs", redoc_url=None)

    @app.exception_handler(HTTPException)
    async def openai_shaped(request: Request, exc: HTTPException) -> Response:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        message = f"{request.method} {request.url.path} is not a route of this gateway." if exc.status_code == 404 \
            else str(exc.detail)
        return Response(error_body(message, kind), status_code=exc.status_code, media_type="application/json")

    @app.get("/health", tags=["health"])
    @app.get("/health/live", tags=["health"])
    async def live() -> dict:
        """The process is up and serving HTTP."""
        return {"status": "ok"}

    @app.get("/health/ready", tags=["health"])
    async def ready() -> Response:
        """Every dependency the request path needs is in place."""
        checks = readiness()
        ok = all(checks.values())
        return JSONResponse({"status": "ready" if ok else "not ready", "checks": checks}, status_code=200 if ok else 503)

    @app.get("/metrics", tags=["observability"])
    async def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app
